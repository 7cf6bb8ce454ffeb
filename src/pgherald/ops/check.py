"""``pgherald check``: the health of a pgherald installation, as a Nagios/Icinga plugin.

A plugin prints exactly one line and exits with its state: 0 OK, 1 WARNING, 2 CRITICAL,
3 UNKNOWN. The line names what is wrong (or sums up that nothing is), then, after a
``|``, performance data that monitoring systems graph: ``label=value[unit];warn;crit;min``.

What it judges, each against a warning and a critical threshold (a value *above* the
threshold alerts, as the plugin guidelines say):

- capture lag of the logical slot, in bytes and in seconds (``ops.slot_stats``);
- WAL retained by pgherald's slot (the slot-safety thresholds of the configuration by
  default); a slot that is missing while logical watches need it, invalidated, or about
  to be (``wal_status`` unreserved) is critical whatever the thresholds;
- for each snapshot watch, the age of its last successful run (by default two and four
  schedule periods; watches without a schedule only with explicit thresholds);
- deliveries failing now (waiting for a retry), and dead letters of the last 24 hours;
- errors recorded in the last hour.

UNKNOWN means the check itself could not tell: the database does not answer, the
configuration is wrong, the store is not installed. The figures come from
``ops.measure``, under a timeout, so the check never hangs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import psycopg

from pgherald.config import Settings
from pgherald.errors import ConfigError, PgHeraldError
from pgherald.ops.measure import Measurements, SnapshotAge, measure, open_session
from pgherald.store import migrations

OK: Final = 0
WARNING: Final = 1
CRITICAL: Final = 2
UNKNOWN: Final = 3
STATE_NAMES: Final = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
SNAPSHOT_WARN_PERIODS: Final = 2.0
SNAPSHOT_CRIT_PERIODS: Final = 4.0
DEAD_WINDOW: Final = timedelta(hours=24)
ERRORS_WINDOW: Final = timedelta(hours=1)
DEFAULT_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class Limit:
    """A warning and a critical threshold; a value above one alerts."""

    warn: float
    crit: float

    def __post_init__(self) -> None:
        if self.warn < 0 or self.crit < 0:
            raise ConfigError("thresholds cannot be negative")
        if self.warn > self.crit:
            raise ConfigError(
                f"a warning threshold ({_number(self.warn)}) above its critical one"
                f" ({_number(self.crit)}) would never warn"
            )

    def state(self, value: float) -> int:
        if value > self.crit:
            return CRITICAL
        if value > self.warn:
            return WARNING
        return OK


@dataclass(frozen=True)
class Thresholds:
    lag_bytes: Limit = Limit(256 * MiB, 1 * GiB)
    lag_seconds: Limit = Limit(60, 300)
    retained_bytes: Limit = Limit(1 * GiB, 4 * GiB)
    snapshot_age: Limit | None = None
    """None: each scheduled watch by its own schedule (``SNAPSHOT_*_PERIODS``)."""
    failed: Limit = Limit(0, 100)
    dead: Limit = Limit(0, 10)
    errors: Limit = Limit(0, 10)


def default_thresholds(settings: Settings) -> Thresholds:
    """The defaults, with the retained-WAL ones from the configuration's slot safety."""
    safety = getattr(settings, "slot_safety", None)
    warn = getattr(safety, "warn_retained_wal", None)
    crit = getattr(safety, "critical_retained_wal", None)
    if isinstance(warn, int) and isinstance(crit, int) and warn <= crit:
        return Thresholds(retained_bytes=Limit(warn, crit))
    return Thresholds()


# -- reading thresholds ----------------------------------------------------------------------

_SIZE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|k|mb|m|gb|g|tb|t)?\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "b": 1, "k": KiB, "kb": KiB, "m": MiB, "mb": MiB, "g": GiB, "gb": GiB,
    "t": 1024 * GiB, "tb": 1024 * GiB,
}  # fmt: skip
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str, what: str) -> int:
    """Bytes from ``"512"``, ``"64kB"``, ``"256MB"``, ``"1GB"`` (units of 1024, as
    PostgreSQL's settings count them)."""
    found = _SIZE.match(text)
    if not found:
        raise ConfigError(f"{what} {text!r} is not a size; write it like 512MB or 2GB")
    return int(float(found.group(1)) * _SIZE_UNITS[(found.group(2) or "b").lower()])


def parse_duration(text: str, what: str) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"``."""
    compact = text.strip().lower().replace(" ", "")
    try:
        return float(compact)
    except ValueError:
        pass
    seconds, pos = 0.0, 0
    for part in _DURATION.finditer(compact):
        if part.start() != pos:
            break
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        pos = part.end()
    if not compact or pos != len(compact):
        raise ConfigError(f"{what} {text!r} is not a duration; write it like 90s, 15m or 2h")
    return seconds


def parse_count(text: str, what: str) -> int:
    if not text.strip().isdigit():
        raise ConfigError(f"{what} {text!r} is not a count (a whole number, 0 or more)")
    return int(text)


# -- the result ----------------------------------------------------------------------------


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


_LABEL_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]")


def perf_label(text: str) -> str:
    """A performance-data label: letters, digits, ``_.-``; anything else becomes ``_``."""
    return _LABEL_UNSAFE.sub("_", text)[:100] or "_"


@dataclass(frozen=True)
class Perf:
    label: str
    value: float
    unit: str = ""
    limit: Limit | None = None

    def render(self) -> str:
        warn = _number(self.limit.warn) if self.limit else ""
        crit = _number(self.limit.crit) if self.limit else ""
        return f"{perf_label(self.label)}={_number(self.value)}{self.unit};{warn};{crit};0"


@dataclass(frozen=True)
class Finding:
    state: int
    text: str


@dataclass
class Result:
    findings: list[Finding] = field(default_factory=list)
    perf: list[Perf] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    """What is fine, in words, for the OK line."""

    @property
    def state(self) -> int:
        return max((f.state for f in self.findings), default=OK)

    def line(self) -> str:
        """The plugin's one line: state, what is wrong (or the summary), perf data."""
        state = self.state
        if state == OK:
            text = ", ".join(self.summary) or "nothing to check"
        else:
            worst_first = sorted(self.findings, key=lambda f: -f.state)
            text = "; ".join(f.text for f in worst_first if f.state != OK)
        perf = " ".join(p.render() for p in self.perf)
        out = f"PGHERALD {STATE_NAMES[state]} - {clean(text)}"
        return f"{out} | {perf}" if perf else out


def unknown(message: str) -> Result:
    return Result([Finding(UNKNOWN, message)])


def clean(text: str) -> str:
    """One line without ``|`` (it starts the performance data)."""
    return " ".join(text.replace("|", "/").split())


def size_text(n: float) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def duration_text(seconds: float) -> str:
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _short(text: str, width: int = 80) -> str:
    one = clean(text)
    return one if len(one) <= width else one[: width - 1] + "…"


# -- judging ---------------------------------------------------------------------------------


def evaluate(m: Measurements, t: Thresholds) -> Result:
    """Judges the measurements against the thresholds."""
    r = Result()
    _judge_slot(m, t, r)
    _judge_snapshots(m.snapshots, t, r)
    _judge_deliveries(m, t, r)
    r.perf.append(Perf("errors_last_hour", m.errors_recent, "", t.errors))
    state = t.errors.state(m.errors_recent)
    if state != OK:
        latest = ""
        if m.last_error is not None:
            watch, message = m.last_error
            latest = f" (latest{' in ' + watch if watch else ''}: {_short(message)})"
        r.findings.append(Finding(state, f"{m.errors_recent} errors in the last hour{latest}"))
    else:
        r.summary.append(f"{m.errors_recent} errors in the last hour")
    r.perf.append(Perf("trigger_queue_rows", m.trigger_rows))
    return r


def _judge_slot(m: Measurements, t: Thresholds, r: Result) -> None:
    slot = m.slot
    name = clean(m.slot_name)
    if slot is None:
        if m.logical_watches:
            r.findings.append(
                Finding(
                    CRITICAL,
                    f"replication slot {name} does not exist, but {m.logical_watches} logical"
                    " watch(es) need it: changes are not being kept for capture",
                )
            )
        return
    if slot.lost:
        r.findings.append(
            Finding(
                CRITICAL,
                f"replication slot {name} was invalidated (wal_status lost): changes made"
                " meanwhile are gone; see `pgherald status`",
            )
        )
    elif slot.wal_status == "unreserved":
        r.findings.append(
            Finding(
                CRITICAL,
                f"replication slot {name} is about to be invalidated (wal_status unreserved:"
                " it holds more WAL than max_slot_wal_keep_size allows)",
            )
        )
    measures: list[tuple[str, float | int | None, str, Limit, str]] = [
        ("lag_bytes", slot.lag_bytes, "B", t.lag_bytes, "capture lag"),
        ("lag_seconds", slot.lag_seconds, "s", t.lag_seconds, "capture lag"),
        ("retained_wal_bytes", slot.retained_bytes, "B", t.retained_bytes, "retained WAL"),
    ]
    shown: dict[str, str] = {}
    for label, value, unit, limit, title in measures:
        if value is None:
            continue
        r.perf.append(Perf(label, value, unit, limit))
        shown[label] = size_text(value) if unit == "B" else duration_text(value)
        state = limit.state(value)
        if state == OK:
            continue
        level = "critical" if state == CRITICAL else "warning"
        bound = limit.crit if state == CRITICAL else limit.warn
        bound_text = size_text(bound) if unit == "B" else duration_text(bound)
        r.findings.append(
            Finding(state, f"{title} of slot {name} is {shown[label]} ({level} above {bound_text})")
        )
    lag = " / ".join(shown[k] for k in ("lag_bytes", "lag_seconds") if k in shown)
    retained = shown.get("retained_wal_bytes")
    r.summary.append(f"slot {name}: lag {lag or 'unknown'}, retained WAL {retained or 'unknown'}")


def snapshot_limit(s: SnapshotAge, t: Thresholds) -> Limit | None:
    """The thresholds of one snapshot watch: the flags', else two and four periods."""
    if t.snapshot_age is not None:
        return t.snapshot_age
    period = s.period()
    if period is None:
        return None
    return Limit(SNAPSHOT_WARN_PERIODS * period, SNAPSHOT_CRIT_PERIODS * period)


def _judge_snapshots(found: tuple[SnapshotAge, ...], t: Thresholds, r: Result) -> None:
    fresh = 0
    for s in found:
        limit = snapshot_limit(s, t)
        r.perf.append(Perf(f"snapshot_age_{s.watch}", round(s.age, 3), "s", limit))
        state = limit.state(s.age) if limit is not None else OK
        if state == OK:
            fresh += 1
            continue
        assert limit is not None
        bound = limit.crit if state == CRITICAL else limit.warn
        level = "critical" if state == CRITICAL else "warning"
        when = (
            f"last succeeded {duration_text(s.age)} ago"
            if s.success_age is not None
            else f"never succeeded (made {duration_text(s.age)} ago)"
        )
        error = f": {_short(s.last_error)}" if s.last_error else ""
        r.findings.append(
            Finding(
                state,
                f"snapshot watch {_short(s.watch, 40)} {when} ({level} above"
                f" {duration_text(bound)}){error}",
            )
        )
    if found:
        r.summary.append(f"{fresh} of {len(found)} snapshot watches on time")


def _per_sink(counts: dict[str, int]) -> str:
    named = [f"{_short(sink, 30)} {n}" for sink, n in sorted(counts.items()) if n]
    return f" ({', '.join(named)})" if named else ""


def _judge_deliveries(m: Measurements, t: Thresholds, r: Result) -> None:
    failed = {sink: c.get("failed", 0) for sink, c in m.deliveries.items()}
    dead = dict(m.dead_recent)
    hours = _number(DEAD_WINDOW.total_seconds() / 3600)
    for label, counts, limit, words in (
        ("failed_deliveries", failed, t.failed, "deliveries failing (to be retried)"),
        ("dead_deliveries", dead, t.dead, f"dead letters in the last {hours} h"),
    ):
        total = sum(counts.values())
        r.perf.append(Perf(label, total, "", limit))
        state = limit.state(total)
        if state == OK:
            r.summary.append(f"{total} {words}")
        else:
            r.findings.append(Finding(state, f"{total} {words}{_per_sink(counts)}"))


def run_check(settings: Settings, thresholds: Thresholds, timeout: float) -> Result:
    """Measures and judges; any failure to measure is UNKNOWN, never an exception."""
    if not math.isfinite(timeout) or timeout <= 0:
        return unknown("--timeout must be a positive number of seconds")
    try:
        with open_session(settings, timeout, "pgherald-check") as conn:
            migrations.require_current(conn, settings.schema)
            found = measure(conn, settings, dead_window=DEAD_WINDOW, errors_window=ERRORS_WINDOW)
    except psycopg.errors.QueryCanceled:
        return unknown(f"the database did not answer within {_number(timeout)} s")
    except (psycopg.Error, PgHeraldError) as e:
        return unknown(_error_text(e))
    return evaluate(found, thresholds)


def _error_text(e: BaseException) -> str:
    diag: Any = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return clean(primary or str(e) or type(e).__name__)


__all__ = [
    "CRITICAL",
    "OK",
    "UNKNOWN",
    "WARNING",
    "Limit",
    "Perf",
    "Result",
    "Thresholds",
    "default_thresholds",
    "evaluate",
    "parse_count",
    "parse_duration",
    "parse_size",
    "run_check",
    "unknown",
]
