"""Typed settings, gathered from defaults, a TOML file, ``PGHERALD_*`` variables and flags.

Every front end (the CLI, the Python API, the web app) builds one frozen ``Settings`` and
hands it on, so that nothing deeper down reads the environment on its own and the same
configuration always means the same thing. Sources, lowest priority first::

    defaults < TOML file < PGHERALD_* environment variables < command-line flags

The TOML file is ``--config``, else ``$PGHERALD_CONFIG``, else ``./pgherald.toml`` when it
exists. Connection settings follow libpq: the DSN may be a ``key=value`` string or a URI,
and whatever it leaves out (host, user, password, ...) comes from the ``PG*`` variables and
``~/.pgpass``, which libpq reads itself; an empty DSN means "libpq defaults only".
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

from pgherald.db.connect import parse_dsn, redact_dsn
from pgherald.errors import ConfigError
from pgherald.retain import check_interval, check_retain

TableMethod = Literal["auto", "logical", "trigger", "snapshot"]
"""Capture methods that watch a table (``listen`` watches channels, not tables); ``auto``
means logical where the server and the role allow it, else trigger, decided at ``watch add``."""

TABLE_METHODS: Final[tuple[str, ...]] = get_args(TableMethod)
LOG_LEVELS: Final[tuple[str, ...]] = ("debug", "info", "warning", "error")
LOG_FORMATS: Final[tuple[str, ...]] = ("text", "json")
DEFAULT_CONFIG_FILE: Final = "pgherald.toml"
ENV_PREFIX: Final = "PGHERALD_"


@dataclass(frozen=True)
class WatchSpec:
    """A watch declared in the configuration file (``[[watch]]``).

    ``table`` is written as on the command line (``schema.table`` or ``table``, with SQL
    quoting for unusual names); the column lists are exact column names, because a TOML
    list already separates them and needs no quoting.
    """

    table: str
    name: str | None = None
    method: TableMethod | None = None
    columns: tuple[str, ...] | None = None
    ignore_columns: tuple[str, ...] = ()
    key: tuple[str, ...] | None = None
    replica_identity_full: bool = False
    snapshot: bool = False
    retain: str | None = None
    """How long its events are kept (``pgherald.retain``); ``None``: the default ``retain``."""


@dataclass(frozen=True)
class SinkSpec:
    """A sink declared in the configuration file (``[[sink]]``, its options in
    ``[sink.options]``); the sink's own module checks the options."""

    name: str
    kind: str
    format: str = "pgherald"
    options: Mapping[str, Any] = field(default_factory=dict)
    strictly_ordered: bool = False
    max_attempts: int = 10


@dataclass(frozen=True)
class SubscriptionSpec:
    """A subscription declared in the configuration file (``[[subscription]]``)."""

    sink: str
    watches: tuple[str, ...]
    ops: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None
    where: str | None = None
    ignore_columns: tuple[str, ...] = ()


SlotPolicy = Literal["alert", "pause-and-alert", "drop-and-resync"]
SLOT_POLICIES: Final[tuple[str, ...]] = get_args(SlotPolicy)


@dataclass(frozen=True)
class SlotSafety:
    """How logical capture guards its replication slot (``[slot_safety]``).

    An unconsumed slot keeps WAL until the disk fills. pgherald warns when the slot holds
    back ``warn_retained_wal`` bytes, goes critical at ``critical_retained_wal``, and applies
    ``policy`` at ``policy_retained_wal``: ``alert`` only tells, ``pause-and-alert`` stops
    capturing and keeps the slot, ``drop-and-resync`` drops it, records a gap event and
    reads the watched tables again.
    """

    warn_retained_wal: int = 1 << 30
    critical_retained_wal: int = 4 << 30
    policy_retained_wal: int = 16 << 30
    policy: SlotPolicy = "alert"
    check_interval: float = 30.0
    """Seconds between two checks of the slot."""
    heartbeat_interval: float = 10.0
    """Seconds between heartbeats written to an idle watched database (0: none)."""


@dataclass(frozen=True)
class Settings:
    """Everything pgherald needs to know to run, after all sources were merged.

    ``batch_size`` bounds how many events are appended to the change log in one round
    trip; ``batch_interval`` bounds how long (seconds) a partial batch may wait, so that
    latency stays low when changes trickle in.
    """

    dsn: str = ""
    schema: str = "pgherald"
    slot: str = "pgherald"
    publication: str = "pgherald"
    method: TableMethod = "auto"
    batch_size: int = 5000
    batch_interval: float = 0.2
    log_level: str = "info"
    log_format: str = "text"
    """``text`` (one readable line per record) or ``json`` (one JSON object per line)."""
    shutdown_timeout: float = 30.0
    """Seconds ``pgherald run`` waits for in-flight work after SIGTERM before it gives up on
    it (what it abandons is released and redone by the next run) and exits non-zero."""
    locale: str = "en"
    """How people-facing pages, feeds and mails write numbers and dates (a Babel locale)."""
    timezone: str = "UTC"
    """The time zone they show times in (an IANA name)."""
    templates_dir: str | None = None
    """A folder of Jinja2 templates that override pgherald's own (also per watch)."""
    public_url: str = ""
    """The web console's address as people reach it (feeds need absolute links)."""
    slot_safety: SlotSafety = field(default_factory=SlotSafety)
    """Retained-WAL thresholds and the policy of logical capture's slot (``[slot_safety]``)."""
    smtp: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The mail server (``[smtp]``: host, port, starttls, username, password, from...) of
    the e-mail subscriptions people make for themselves in the web console; checked by the
    e-mail sink when used. Never in ``repr``: it may hold a password."""
    retain: str | None = None
    """How long watches without a ``retain`` of their own keep their events (``"400d"``);
    ``None``: forever. See ``pgherald.retain`` and ``pgherald.pruning``."""
    prune_interval: str = "1h"
    """How often ``pgherald run`` prunes the change log (``"off"``: never)."""
    prune_batch_size: int = 1000
    """Events deleted per transaction when pruning."""
    delivery_connections: int = 20
    """PostgreSQL connections one process's delivery engine holds at most for its sinks
    together (besides its control connection): a burst of work for many sinks at once
    must not take all of the server's connections."""
    watches: tuple[WatchSpec, ...] = ()
    sinks: tuple[SinkSpec, ...] = ()
    subscriptions: tuple[SubscriptionSpec, ...] = ()
    config_file: Path | None = field(default=None, compare=False)

    def redacted_dsn(self) -> str:
        """The DSN as it is safe to show: every password replaced by ``***``."""
        return redacted_dsn(self.dsn)

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some settings replaced and checked, e.g. from command-line flags."""
        unknown = set(overrides) - _SCALAR_FIELDS.keys()
        if unknown:
            raise ConfigError(f"unknown setting {sorted(unknown)[0]!r}")
        checked = {
            k: _coerce(k, v, f"setting {k!r}") for k, v in overrides.items() if v is not None
        }
        return replace(self, **checked)


def redacted_dsn(dsn: str) -> str:
    """``dsn`` with passwords masked, as ``key=value`` pairs; never echoes an unparsable DSN.

    An unparsable DSN is not shown at all, because libpq's parse error quotes the text
    around the mistake, which may well be part of the password.
    """
    return redact_dsn(dsn)


def check_dsn(dsn: str) -> str:
    """Returns ``dsn`` if libpq can parse it; the error never quotes the DSN itself."""
    parse_dsn(dsn)
    return dsn


# -- coercion of raw values ---------------------------------------------------------------

_SCALAR_FIELDS: Final[dict[str, type]] = {
    "dsn": str,
    "schema": str,
    "slot": str,
    "publication": str,
    "method": str,
    "batch_size": int,
    "batch_interval": float,
    "log_level": str,
    "log_format": str,
    "shutdown_timeout": float,
    "locale": str,
    "timezone": str,
    "templates_dir": str,
    "public_url": str,
    "retain": str,
    "prune_interval": str,
    "prune_batch_size": int,
    "delivery_connections": int,
}
_NAME_FIELDS: Final = ("schema", "slot", "publication")
_WATCH_KEYS: Final = frozenset(f.name for f in fields(WatchSpec))


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turns a raw value (TOML value, environment text, flag) into the setting's type."""
    kind = _SCALAR_FIELDS[key]
    if key == "shutdown_timeout":
        return _duration(value, where)
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a whole number, not {value!r}") from None
        if number < 1:
            raise ConfigError(f"{where} must be at least 1, not {number}")
        return number
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number of seconds, not {value!r}")
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number of seconds, not {value!r}") from None
        if not 0 <= seconds <= 3600:
            raise ConfigError(f"{where} must be between 0 and 3600 seconds, not {seconds}")
        return seconds
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    if key == "dsn":
        return check_dsn(value)
    if key == "method":
        return _method(value, where)
    if key == "log_level":
        level = value.lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"{where} must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
        return level
    if key == "log_format":
        if value.lower() not in LOG_FORMATS:
            raise ConfigError(f"{where} must be one of {', '.join(LOG_FORMATS)}, not {value!r}")
        return value.lower()
    if key in _NAME_FIELDS:
        return check_object_name(value, where)
    if key == "retain":
        return check_retain(value, where)
    if key == "prune_interval":
        return check_interval(value, where)
    if key == "locale":
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(value.replace("-", "_"))
        except (ValueError, UnknownLocaleError):
            raise ConfigError(f"{where}: unknown locale {value!r} (e.g. en, de_DE)") from None
    if key == "timezone":
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ValueError, ZoneInfoNotFoundError):
            raise ConfigError(
                f"{where}: unknown time zone {value!r} (an IANA name, e.g. Europe/Berlin)"
            ) from None
    return value


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: Any, where: str) -> float:
    """Seconds from a number or a duration text (``"30s"``, ``"2m"``, ``"1m30s"``, ``"45"``),
    between 0 (exclusive) and one hour."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, total = 0, 0.0
            for match in _DURATION_PART.finditer(text):
                if match.start() != pos:
                    break
                total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            seconds = total if text and pos == len(text) else None
    if seconds is None:
        raise ConfigError(f'{where} must be a duration like "30s", "2m" or "1m30s", not {value!r}')
    if not 0 < seconds <= 3600:
        raise ConfigError(f"{where} must be more than 0 and at most 1 hour, not {value!r}")
    return seconds


def _method(value: str, where: str) -> TableMethod:
    if value not in TABLE_METHODS:
        raise ConfigError(f"{where} must be one of {', '.join(TABLE_METHODS)}, not {value!r}")
    return cast(TableMethod, value)


def check_object_name(value: str, where: str) -> str:
    """Checks a name pgherald gives a server object (its schema, slot, publication).

    PostgreSQL would silently truncate a name longer than 63 bytes, and then pgherald would
    look for an object that does not exist under the name it was given; refuse it instead.
    """
    if not value:
        raise ConfigError(f"{where} must not be empty")
    if len(value.encode()) > 63:
        raise ConfigError(f"{where} is longer than PostgreSQL's 63-byte limit for names")
    if "\x00" in value:
        raise ConfigError(f"{where} must not contain a NUL character")
    return value


def _string_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{where} must be a list of column names, e.g. ["id", "name"]')
    return tuple(value)


def _watch_spec(raw: Any, where: str) -> WatchSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table ([[watch]])")
    unknown = sorted(set(raw) - _WATCH_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(_WATCH_KEYS))}"
        )
    table = raw.get("table")
    if not isinstance(table, str) or not table:
        raise ConfigError(f'{where} needs table = "schema.table"')
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"{where}.name must be a non-empty string")
    method = raw.get("method")
    if method is not None:
        if not isinstance(method, str):
            raise ConfigError(f"{where}.method must be a string")
        method = _method(method, f"{where}.method")
    flags = {}
    for flag in ("replica_identity_full", "snapshot"):
        flags[flag] = raw.get(flag, False)
        if not isinstance(flags[flag], bool):
            raise ConfigError(f"{where}.{flag} must be true or false")
    retain = raw.get("retain")
    if retain is not None:
        retain = check_retain(retain, f"{where}.retain")
    return WatchSpec(
        table=table,
        name=name,
        method=method,
        columns=_string_list(raw["columns"], f"{where}.columns") if "columns" in raw else None,
        ignore_columns=_string_list(raw.get("ignore_columns", []), f"{where}.ignore_columns"),
        key=_string_list(raw["key"], f"{where}.key") if "key" in raw else None,
        replica_identity_full=flags["replica_identity_full"],
        snapshot=flags["snapshot"],
        retain=retain,
    )


def _table(raw: Any, where: str, keys: frozenset[str], required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(keys))}"
        )
    for key in required:
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f'{where} needs {key} = "..."')
    return raw


def _flag(raw: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key} must be true or false")
    return value


def _sink_spec(raw: Any, where: str) -> SinkSpec:
    keys = frozenset({"name", "kind", "format", "options", "strictly_ordered", "max_attempts"})
    raw = _table(raw, where, keys, ("name", "kind"))
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.options must be a table ([sink.options])")
    attempts = raw.get("max_attempts", 10)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ConfigError(f"{where}.max_attempts must be a whole number of at least 1")
    fmt = raw.get("format", "pgherald")
    if not isinstance(fmt, str):
        raise ConfigError(f"{where}.format must be a string")
    return SinkSpec(
        name=raw["name"],
        kind=raw["kind"],
        format=fmt,
        options=options,
        strictly_ordered=_flag(raw, "strictly_ordered", where, False),
        max_attempts=attempts,
    )


def _subscription_spec(raw: Any, where: str) -> SubscriptionSpec:
    keys = frozenset({"sink", "watches", "ops", "columns", "where", "ignore_columns"})
    raw = _table(raw, where, keys, ("sink",))
    condition = raw.get("where")
    if condition is not None and not isinstance(condition, str):
        raise ConfigError(f"{where}.where must be a string (a condition)")
    return SubscriptionSpec(
        sink=raw["sink"],
        watches=_string_list(raw.get("watches"), f"{where}.watches"),
        ops=_string_list(raw["ops"], f"{where}.ops") if "ops" in raw else None,
        columns=_string_list(raw["columns"], f"{where}.columns") if "columns" in raw else None,
        where=condition,
        ignore_columns=_string_list(raw.get("ignore_columns", []), f"{where}.ignore_columns"),
    )


# -- slot safety --------------------------------------------------------------------------

_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
_SLOT_SAFETY_KEYS: Final = frozenset(f.name for f in fields(SlotSafety))


def parse_size(value: Any, where: str) -> int:
    """Bytes from a size with a unit, as PostgreSQL writes them (``"64kB"``, ``"512MB"``,
    ``"1GB"``, ``"2TB"``; 1 kB = 1024 bytes; ``KiB``... too), or a whole number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(value) if isinstance(value, str) else None
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                f'{where} must be a size like "64kB", "512MB", "1GB" or "2TB", not {value!r}'
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ConfigError(f"{where} must be more than 0 bytes, not {value!r}")
    return size


def _seconds(value: Any, where: str, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number of seconds, not {value!r}")
    low = 0 if allow_zero else 0.01
    if not low <= value <= 3600:
        raise ConfigError(f"{where} must be between {low} and 3600 seconds, not {value}")
    return float(value)


def _slot_safety(raw: Any, where: str) -> SlotSafety:
    """``[slot_safety]``, checked: sizes with units, in increasing order, a known policy."""
    raw = _table(raw, where, _SLOT_SAFETY_KEYS, ())
    default = SlotSafety()
    sizes = {
        key: parse_size(raw[key], f"{where}.{key}") if key in raw else getattr(default, key)
        for key in ("warn_retained_wal", "critical_retained_wal", "policy_retained_wal")
    }
    if (
        not sizes["warn_retained_wal"]
        <= sizes["critical_retained_wal"]
        <= sizes["policy_retained_wal"]
    ):
        raise ConfigError(
            f"{where}: the sizes must grow: warn_retained_wal <= critical_retained_wal <="
            " policy_retained_wal (each step is a worse state of the slot)"
        )
    policy = raw.get("policy", default.policy)
    if policy not in SLOT_POLICIES:
        raise ConfigError(
            f"{where}.policy must be one of {', '.join(SLOT_POLICIES)}, not {policy!r}"
        )
    return SlotSafety(
        **sizes,
        policy=cast(SlotPolicy, policy),
        check_interval=_seconds(
            raw.get("check_interval", default.check_interval), f"{where}.check_interval", False
        ),
        heartbeat_interval=_seconds(
            raw.get("heartbeat_interval", default.heartbeat_interval),
            f"{where}.heartbeat_interval",
            True,
        ),
    )


# -- the sources --------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    """The checked contents of a configuration file, as ``Settings`` keyword arguments."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "watch":
            if not isinstance(value, list):
                raise ConfigError(f"{path}: 'watch' must be an array of tables ([[watch]])")
            values["watches"] = tuple(
                _watch_spec(w, f"{path}: [[watch]] #{i + 1}") for i, w in enumerate(value)
            )
        elif key in ("sink", "subscription"):
            if not isinstance(value, list):
                raise ConfigError(f"{path}: {key!r} must be an array of tables ([[{key}]])")
            parse = _sink_spec if key == "sink" else _subscription_spec
            values[f"{key}s"] = tuple(
                parse(v, f"{path}: [[{key}]] #{i + 1}") for i, v in enumerate(value)
            )
        elif key == "slot_safety":
            values["slot_safety"] = _slot_safety(value, f"{path}: [slot_safety]")
        elif key == "smtp":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: 'smtp' must be a table ([smtp])")
            values["smtp"] = dict(value)
        elif key in _SCALAR_FIELDS:
            values[key] = _coerce(key, value, f"{path}: {key}")
        else:
            known = ", ".join(
                [*_SCALAR_FIELDS, "watch", "sink", "subscription", "slot_safety", "smtp"]
            )
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {known}")
    return values


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``PGHERALD_<SETTING>`` variables (``PGHERALD_DSN``, ``PGHERALD_SCHEMA``...).

    Empty variables count as unset, as in most shells' idea of "not configured". Other
    ``PGHERALD_*`` names are left alone: they may belong to other tools or to tests.
    """
    values: dict[str, Any] = {}
    for key in _SCALAR_FIELDS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw:
            values[key] = _coerce(key, raw, f"{ENV_PREFIX}{key.upper()}")
    return values


def config_path(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    """Which configuration file applies: the flag, ``$PGHERALD_CONFIG``, or ``./pgherald.toml``."""
    if explicit:
        return Path(explicit)
    if env.get(ENV_PREFIX + "CONFIG"):
        return Path(env[ENV_PREFIX + "CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Merges defaults, the TOML file, ``PGHERALD_*`` variables and ``overrides`` (flags).

    ``None`` overrides are ignored, so a CLI can pass every flag, given or not.
    """
    env = os.environ if env is None else env
    path = config_path(config_file, env)
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    values.update(read_env(env))
    settings = Settings(**values, config_file=path)
    return settings.with_overrides(**overrides)
