"""The ``pgherald`` command: a thin shell over ``pgherald.admin``, ``doctor`` and ``app``.

Every expected failure (anything pgherald raises on purpose, a database that refuses a
statement) becomes one line on stderr, ``pgherald: <what is wrong and how to fix it>``,
and exit status 1; usage errors exit with 2, as click does. Tracebacks are for bugs.

Connection options (``--config``, ``--dsn``, ``--schema``, ``--slot``, ``--publication``)
are accepted both before and after the command name (``pgherald --dsn X init`` and
``pgherald init --dsn X``), and the settings are only read when a command needs them, so
``--help`` works whatever state the configuration is in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

import click
import psycopg
import psycopg2

from pgherald import __version__, admin, present
from pgherald.cli_listen import listen
from pgherald.config import LOG_FORMATS, LOG_LEVELS, TABLE_METHODS, Settings, load_settings
from pgherald.db.connect import connection_failed
from pgherald.errors import ConfigError, PgHeraldError, WatchError
from pgherald.events import ChangeEvent
from pgherald.retain import check_retain
from pgherald.schedule import Schedule
from pgherald.store.migrations import LATEST_VERSION

if TYPE_CHECKING:
    from pgherald.daemon import Roles

F = TypeVar("F", bound=Callable[..., Any])
_OPTIONS_KEY: Final = "pgherald.options"


# -- settings from options ------------------------------------------------------------------


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keeps a connection option given at any level; later (inner) ones win."""
    if value is not None and param.name is not None:
        ctx.meta.setdefault(_OPTIONS_KEY, {})[param.name] = value
    return value


def connection_options(f: F) -> F:
    """The options that say where pgherald's database and objects are."""
    hidden: dict[str, Any] = {"expose_value": False, "callback": _remember}
    options = [
        click.option(
            "--config",
            type=click.Path(dir_okay=False, path_type=Path),
            help="TOML configuration file (default: $PGHERALD_CONFIG, else ./pgherald.toml).",
            **hidden,
        ),
        click.option(
            "--dsn",
            help="libpq connection string or URI; unset parts come from PG* variables and"
            " ~/.pgpass.",
            **hidden,
        ),
        click.option("--schema", help="Schema of pgherald's store (default: pgherald).", **hidden),
        click.option("--slot", help="Replication slot name (default: pgherald).", **hidden),
        click.option("--publication", help="Publication name (default: pgherald).", **hidden),
        click.option(
            "--log-level",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            help="Log level (default: info).",
            **hidden,
        ),
        click.option(
            "--log-format",
            type=click.Choice(LOG_FORMATS, case_sensitive=False),
            help="Log format of `run` and `deliver`: text (default) or json (one object a line).",
            **hidden,
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def settings_of(ctx: click.Context) -> Settings:
    """The merged settings: defaults < file < ``PGHERALD_*`` < flags."""
    cached = ctx.meta.get("pgherald.settings")
    if isinstance(cached, Settings):
        return cached
    options = dict(ctx.meta.get(_OPTIONS_KEY, {}))
    config = options.pop("config", None)
    settings = load_settings(config, **options)
    ctx.meta["pgherald.settings"] = settings
    return settings


# -- error handling -------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


class HeraldGroup(click.Group):
    """A click group that turns expected errors into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PgHeraldError as e:
            _fail(ctx, str(e))
        except (psycopg.OperationalError, psycopg2.OperationalError) as e:
            if getattr(e, "sqlstate", None) or getattr(e, "pgcode", None):
                _fail(ctx, _server_said(e))
            # No SQLSTATE: libpq could not connect, or lost the connection. Explain it the
            # way db.connect does, for code paths that connect on their own.
            settings = ctx.meta.get("pgherald.settings")
            dsn = settings.dsn if isinstance(settings, Settings) else ""
            _fail(ctx, str(connection_failed(dsn, str(e))))
        except (psycopg.Error, psycopg2.Error) as e:
            # The server refused something (a privilege, a lock, a constraint): that is
            # about the database, not a bug here, so say what PostgreSQL said.
            logging.getLogger("pgherald").debug("database error", exc_info=True)
            _fail(ctx, _server_said(e))
        except BrokenPipeError:
            # `pgherald changes | head`: the reader has all it wants.
            sys.stderr.close()
            ctx.exit(0)


def _server_said(e: psycopg.Error | psycopg2.Error) -> str:
    """PostgreSQL's primary message and SQLSTATE, from either driver."""
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
    lines = str(e).strip().splitlines()
    text = primary or (lines[0] if lines else type(e).__name__)
    return f"PostgreSQL said: {text}" + (f" [{state}]" if state else "")


def _fail(ctx: click.Context, message: str) -> NoReturn:
    if ctx.find_root().meta.get(_LOG_ERRORS_KEY):
        # `run --log-format json`: every line on stderr is a JSON object, this one too.
        logging.getLogger("pgherald").error(_one_line(message))
    else:
        click.echo(f"pgherald: {_one_line(message)}", err=True)
    ctx.exit(1)


@click.group(cls=HeraldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="pgherald")
@connection_options
def main() -> None:
    """pgherald tells people and programs what changed in their PostgreSQL tables.

    Start with `pgherald doctor`, then `pgherald init`, `pgherald watch add TABLE` and
    `pgherald run`; `pgherald changes` lists what was captured.
    """


# -- install, migrate, uninstall -------------------------------------------------------------


@main.command()
@connection_options
@click.pass_context
def init(ctx: click.Context) -> None:
    """Install pgherald's store (harmless to repeat) and the configuration's watches."""
    settings = settings_of(ctx)
    result = admin.init(settings)
    schema = admin.show_name(result.schema)
    if result.installed:
        click.echo(f"installed pgherald's store in schema {schema} (version {result.version})")
    elif result.version < LATEST_VERSION:
        click.echo(
            f"pgherald's store is already installed in schema {schema} at version"
            f" {result.version}; this pgherald needs {LATEST_VERSION}: run `pgherald migrate`"
        )
    else:
        click.echo(
            f"pgherald's store is already installed in schema {schema}"
            f" (version {result.version}); nothing to do"
        )
    for name in result.watches_added:
        click.echo(f"added watch {name!r} from the configuration file")


@main.command()
@connection_options
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Upgrade pgherald's store to this version's schema."""
    result = admin.migrate(settings_of(ctx))
    schema = admin.show_name(result.schema)
    if result.from_version == result.to_version:
        click.echo(f"store in schema {schema} is up to date (version {result.to_version})")
    else:
        click.echo(
            f"migrated store in schema {schema} from version {result.from_version}"
            f" to {result.to_version}"
        )


@main.command()
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@click.pass_context
def uninstall(ctx: click.Context, yes: bool) -> None:
    """Remove everything pgherald created: triggers, publication, slot and store."""
    settings = settings_of(ctx)
    if not yes and not click.confirm(
        f"Remove pgherald's store (schema {admin.show_name(settings.schema)}, with its change"
        f" log), its triggers, publication {settings.publication!r} and replication slot"
        f" {settings.slot!r} from {settings.redacted_dsn()}?",
        err=True,
    ):
        if not sys.stdin.isatty():
            click.echo("", err=True)  # the answer was not echoed: end the prompt's line
        _fail(ctx, "uninstall cancelled; nothing was removed (pass --yes to skip the question)")
    result = admin.uninstall(settings)
    for item in result.removed:
        click.echo(f"removed {item}")
    for item in result.kept:
        click.echo(f"kept {item}")
    if not result.removed:
        click.echo("nothing to remove: pgherald is not installed here")


# -- watches ----------------------------------------------------------------------------------


@main.group(cls=HeraldGroup)
def watch() -> None:
    """Add, list and remove watches."""


def _columns(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else admin.parse_column_list(value)


@watch.command("add")
@click.argument("table")
@click.option("--columns", help="Only these columns (comma-separated SQL names).")
@click.option("--ignore-columns", help="Changes to only these columns are not reported.")
@click.option("--key", help="Columns that identify a row (default: the primary key).")
@click.option("--name", help="Name of the watch (default: the table's name).")
@click.option(
    "--method",
    type=click.Choice(TABLE_METHODS),
    help="Capture method (default: from the configuration, else logical).",
)
@click.option(
    "--replica-identity-full",
    is_flag=True,
    help="Set REPLICA IDENTITY FULL so updates and deletes carry whole old rows.",
)
@click.option(
    "--snapshot",
    is_flag=True,
    help="Start with the table's current rows (as 'read' events), then follow its changes.",
)
@click.option("--query", help="Snapshot watch of this SQL query; TABLE is then the watch's name.")
@click.option(
    "--view", help="Snapshot watch of this view (schema.view); TABLE is then the watch's name."
)
@click.option(
    "--schedule", help="Snapshot watches: run on this cron schedule (UTC), e.g. '0 5 * * *'."
)
@click.option("--every", help="Snapshot watches: run at this interval, e.g. 15m, 1h, 1d.")
@click.option(
    "--initial-events",
    is_flag=True,
    help="Snapshot watches: report the first run's rows (as 'read' events), not only record them.",
)
@click.option(
    "--channel",
    "channels",
    multiple=True,
    help="Watch NOTIFY channel(s) instead of a table; TABLE is then the watch's name.",
)
@click.option(
    "--retain",
    help="Keep its events this long (e.g. 90d, 400d, 1y, forever; default: the"
    " configuration's retain, else forever).",
)
@connection_options
@click.pass_context
def watch_add(
    ctx: click.Context,
    table: str,
    columns: str | None,
    ignore_columns: str | None,
    key: str | None,
    name: str | None,
    method: str | None,
    replica_identity_full: bool,
    snapshot: bool,
    query: str | None,
    view: str | None,
    schedule: str | None,
    every: str | None,
    initial_events: bool,
    channels: tuple[str, ...],
    retain: str | None,
) -> None:
    """Watch TABLE (schema.table, or table in public; quote unusual names as in SQL).

    With --query or --view (snapshot watches) and with --channel (NOTIFY channels), TABLE
    is the watch's name instead."""
    timing = (
        Schedule.parse(cron=schedule, every=every)
        if schedule is not None or every is not None
        else None
    )
    retain = check_retain(retain, "--retain") if retain is not None else None
    if query is not None or view is not None or method == "snapshot" or initial_events:
        if channels or replica_identity_full or snapshot:
            raise WatchError(
                "--channel, --replica-identity-full and --snapshot do not apply to snapshot watches"
            )
        if method not in (None, "snapshot"):
            raise WatchError(f"--query and --view make snapshot watches, not {method} ones")
        added = admin.add_snapshot_watch(
            settings_of(ctx),
            name if query is None and view is None else (name or table),
            table=table if query is None and view is None else None,
            view=view,
            query=query,
            key=_columns(key),
            columns=_columns(columns),
            ignore_columns=_columns(ignore_columns) or (),
            schedule=timing,
            initial_events=initial_events,
            retain=retain,
        )
        w = added.watch
        keys = ", ".join(admin.show_name(k) for k in w.key_columns) or "none: rows by content"
        click.echo(f"added watch {w.name!r} on {w.target} (snapshot capture, key: {keys})")
        for note in added.notes:
            click.echo(f"  note: {note}")
        return
    if timing is not None:
        raise WatchError("--schedule and --every are for snapshot watches (--method snapshot)")
    if channels:
        others = {
            "--columns": columns,
            "--ignore-columns": ignore_columns,
            "--key": key,
            "--name": name,
            "--replica-identity-full": replica_identity_full,
            "--snapshot": snapshot,
        }
        given = [flag for flag, value in others.items() if value]
        if given or method not in (None, "auto"):
            raise WatchError(f"--channel cannot be combined with {', '.join(given) or '--method'}")
        added = admin.add_listen_watch(settings_of(ctx), table, channels, retain=retain)
        click.echo(
            f"added watch {added.watch.name!r} on channel(s)"
            f" {', '.join(repr(c) for c in channels)} (listen capture)"
        )
        for note in added.notes:
            click.echo(f"  note: {note}")
        return
    added = admin.add_watch(
        settings_of(ctx),
        table,
        columns=_columns(columns),
        ignore_columns=_columns(ignore_columns) or (),
        key=_columns(key),
        name=name,
        method=method,
        replica_identity_full=replica_identity_full,
        snapshot=snapshot,
        retain=retain,
    )
    w = added.watch
    keys = ", ".join(admin.show_name(k) for k in w.key_columns)
    click.echo(
        f"added watch {w.name!r} on {admin.show_name(w.schema_name or '', w.table_name or '')}"
        f" ({w.method} capture, key: {keys}"
        + (", starting with a snapshot of its rows)" if snapshot else ")")
    )
    for note in added.notes:
        click.echo(f"  note: {note}")


def _watch_dict(w: Any) -> dict[str, Any]:
    fields = (
        "name",
        "schema_name",
        "table_name",
        "method",
        "key_columns",
        "columns",
        "ignore_columns",
        "query",
        "options",
        "enabled",
        "created_at",
        "last_run_at",
        "last_success_at",
        "last_error",
        "changes_seen",
        "status",
        "retain",
    )
    out: dict[str, Any] = {}
    for f in fields:
        value = getattr(w, f, None)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, tuple):
            value = list(value)
        out[f] = value
    return out


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value is not None else "never"


@watch.command("list")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@connection_options
@click.pass_context
def watch_list(ctx: click.Context, fmt: str) -> None:
    """List the watches and their status."""
    found = admin.list_watches(settings_of(ctx))
    if fmt == "json":
        click.echo(json.dumps([_watch_dict(w) for w in found], ensure_ascii=False, indent=2))
        return
    if not found:
        click.echo("no watches: add one with `pgherald watch add SCHEMA.TABLE`")
        return
    rows = [("NAME", "TABLE", "METHOD", "KEY", "STATUS", "CHANGES", "LAST SUCCESS", "NEXT RUN")]
    for w in found:
        rows.append(
            (
                present.clean(w.name, 40),
                present.clean(
                    admin.show_name(w.schema_name or "", w.table_name or "")
                    if w.table_name
                    else w.target,
                    60,
                ),
                w.method,
                present.clean(",".join(w.key_columns or ()), 30),
                w.status + ("" if w.enabled else " (disabled)"),
                str(w.changes_seen),
                _when(w.last_success_at),
                _next_run(w),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)))
    for w in found:
        if w.last_error:
            click.echo(f"{w.name}: last error: {present.clean(w.last_error, 200)}")


def _next_run(w: Any) -> str:
    """When a snapshot watch runs next ("-" for other methods, "manual" without schedule)."""
    if w.method != "snapshot":
        return "-"
    schedule = Schedule.from_options(dict(w.options or {}))
    if schedule is None:
        return "manual"
    due = schedule.next_run(w.last_run_at, w.created_at or datetime.now(UTC))
    return "now (due)" if due <= datetime.now(UTC) else _when(due)


@watch.command("remove")
@click.argument("name")
@connection_options
@click.pass_context
def watch_remove(ctx: click.Context, name: str) -> None:
    """Stop watching; the watch's events stay in the change log."""
    removed = admin.remove_watch(settings_of(ctx), name)
    click.echo(f"removed watch {removed.name!r}")


# -- snapshot runs --------------------------------------------------------------------------------


@main.group()
def snapshot() -> None:
    """Run snapshot watches now (for cron jobs and for trying a watch out)."""


@snapshot.command("run")
@click.argument("names", nargs=-1)
@connection_options
@click.pass_context
def snapshot_run(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Run the named snapshot watches (all of them without NAME) once, now.

    Exit status 0 when every run succeeded (or was skipped because a run of that watch is in
    progress elsewhere), 1 when one failed; each run prints one line.
    """
    from pgherald import snapshots

    results = snapshots.run_named(settings_of(ctx), names)
    if not results:
        click.echo("no snapshot watches: add one with `pgherald watch add NAME --query ...`")
    failed = False
    for r in results:
        if r.status == "error":
            failed = True
            click.echo(present.clean(r.describe(), 400), err=True)
        else:
            click.echo(present.clean(r.describe(), 400))
    ctx.exit(1 if failed else 0)


# -- running ----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--resync",
    is_flag=True,
    help="Start again with a new replication slot when the old one was lost (changes made"
    " meanwhile are not captured).",
)
@click.option(
    "--web",
    "web_address",
    metavar="HOST:PORT",
    help="Also serve the web console (and feeds) on this address, e.g. 127.0.0.1:8080.",
)
@click.option(
    "--http",
    "http_address",
    metavar="HOST:PORT",
    help="Serve /healthz, /readyz and /metrics (no console, no login) on this address, e.g."
    " 127.0.0.1:9187.",
)
@click.option(
    "--no-capture",
    is_flag=True,
    help="Do not run the logical, trigger and listen sources (another process captures).",
)
@click.option(
    "--no-snapshots",
    is_flag=True,
    help="Do not run snapshot watches (another process runs them).",
)
@click.option(
    "--no-delivery",
    is_flag=True,
    help="Do not route and deliver events to the sinks (another process delivers).",
)
@click.option(
    "--shutdown-timeout",
    metavar="DURATION",
    help="On SIGTERM, wait at most this long (e.g. 30s, 2m) for what is in flight, then give"
    " it up and exit 1 (default: the configuration's shutdown_timeout, else 30s).",
)
@connection_options
@click.pass_context
def run(
    ctx: click.Context,
    resync: bool,
    web_address: str | None,
    http_address: str | None,
    no_capture: bool,
    no_snapshots: bool,
    no_delivery: bool,
    shutdown_timeout: str | None,
) -> None:
    """Capture, run snapshot watches, route and deliver until stopped (Ctrl-C, SIGTERM).

    SIGHUP reloads the configuration file. --no-capture, --no-snapshots and --no-delivery
    leave parts to other processes (`pgherald run --no-capture --no-snapshots` is a
    delivery worker).
    """
    from pgherald import daemon

    roles = daemon.Roles(
        capture=not no_capture,
        snapshots=not no_snapshots,
        delivery=not no_delivery,
        web=_address(web_address),
    )
    roles.check()
    _run_daemon(ctx, roles, http_address, resync=resync, shutdown_timeout=shutdown_timeout)


def _run_daemon(
    ctx: click.Context,
    roles: Roles,
    http_address: str | None,
    *,
    resync: bool = False,
    shutdown_timeout: str | None = None,
) -> None:
    """Runs ``roles`` in a daemon until it is stopped (``run`` and ``deliver``): the
    settings read again on SIGHUP, health and metrics on ``http_address``, exit 1 when the
    stop gave up on a part."""
    from pgherald import daemon, logs
    from pgherald.ops.http import parse_address, serving

    def read_settings() -> Settings:
        options = dict(ctx.meta.get(_OPTIONS_KEY, {}))
        config = options.pop("config", None)
        return load_settings(config, **options).with_overrides(shutdown_timeout=shutdown_timeout)

    settings = read_settings()
    ctx.meta["pgherald.settings"] = settings
    logs.setup(settings.log_level, settings.log_format)
    ctx.meta[_LOG_ERRORS_KEY] = settings.log_format == "json"
    herald = daemon.Daemon(settings, roles, resync=resync, reload=read_settings)
    expect = [p for p, on in (("capture", roles.capture or roles.snapshots),
                              ("delivery", roles.delivery)) if on]  # fmt: skip
    with _signals(herald), serving(settings, parse_address(http_address), expect):
        try:
            herald.run()
        except daemon.ShutdownIncomplete:
            # Threads that did not stop may hold the interpreter's exit: leave now (the
            # server rolls back what their connections had open).
            _exit_now(1)


_LOG_ERRORS_KEY: Final = "pgherald.log_errors"
"""Set when errors are to be logged (JSON lines) rather than printed as a plain line."""


@contextlib.contextmanager
def _signals(herald: Any) -> Iterator[None]:
    """SIGTERM and SIGINT stop ``herald`` (a second one exits at once), SIGHUP reloads it.

    The handlers only set flags: the work happens in the daemon's loop, in the main thread.
    """
    log = logging.getLogger("pgherald")
    signalled: list[int] = []

    def on_stop(signum: int, frame: object) -> None:
        if signalled:
            log.warning("second signal: stopping at once; what was in flight is redone next run")
            _exit_now(1)
        signalled.append(signum)
        herald.request_stop(signum)
        # The last resort, should stopping itself hang past the bound.
        timer = threading.Timer(herald.settings.shutdown_timeout + 10, _exit_now, (1,))
        timer.daemon = True
        timer.start()

    def on_reload(signum: int, frame: object) -> None:
        herald.request_reload()

    handlers: dict[int, Any] = {signal.SIGINT: on_stop, signal.SIGTERM: on_stop}
    if hasattr(signal, "SIGHUP") and hasattr(herald, "request_reload"):
        handlers[signal.SIGHUP] = on_reload
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exit_now(status: int) -> NoReturn:
    """Flushes the logs and ends the process without waiting for other threads."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@main.command()
@click.option("--sink", "sinks", multiple=True, help="Only this sink (repeatable).")
@click.option(
    "--http",
    "http_address",
    metavar="HOST:PORT",
    help="Serve /healthz, /readyz and /metrics on this address, e.g. 127.0.0.1:9188.",
)
@connection_options
@click.pass_context
def deliver(ctx: click.Context, sinks: tuple[str, ...], http_address: str | None) -> None:
    """Route and deliver the change log's events to the sinks, without capturing.

    For running delivery workers apart from capture (several may run: they share the
    load); `pgherald run` does both, and `pgherald run --no-capture --no-snapshots` is this
    for all sinks. SIGHUP reloads the configuration file; SIGTERM finishes what is in
    flight within shutdown_timeout, as `pgherald run` does.
    """
    from pgherald import daemon

    roles = daemon.Roles(capture=False, snapshots=False, delivery=True, sinks=sinks)
    _run_daemon(ctx, roles, http_address)


def _address(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--web {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]"), int(port)


# -- reading the change log --------------------------------------------------------------------


def describe(event: ChangeEvent) -> str:
    """One readable line per change (see ``pgherald.present``)."""
    return present.describe(event)


def _emit(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


@main.command()
@click.option("--watch", "watch_name", help="Only this watch's changes.")
@click.option("--since", help="Only changes after this event id, or after this log id (a number).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many changes.")
@click.option(
    "--op",
    type=click.Choice(["insert", "update", "delete", "truncate", "read", "schema", "gap"]),
    help="Only this operation.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@connection_options
@click.pass_context
def changes(
    ctx: click.Context,
    watch_name: str | None,
    since: str | None,
    limit: int | None,
    op: str | None,
    fmt: str,
) -> None:
    """List the change log, oldest first (JSON lines in pgherald's format with --format json)."""
    stored = admin.read_changes(settings_of(ctx), watch=watch_name, since=since, limit=limit, op=op)
    if fmt == "json":
        from pgherald.events.formats import to_pgherald_json

        _emit(
            json.dumps(to_pgherald_json(s.event), ensure_ascii=False, separators=(",", ":"))
            for s in stored
        )
    else:
        _emit(describe(s.event) for s in stored)


def _size(n: int | None) -> str:
    """Bytes for people: 512 bytes, 3.2 MB."""
    if n is None:
        return "unknown"
    if abs(n) < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


@main.command()
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@connection_options
@click.pass_context
def status(ctx: click.Context, fmt: str) -> None:
    """Show the replication slot (retained WAL, lag, activity), the checkpoint and the watches."""
    settings = settings_of(ctx)
    report = admin.status(settings)
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
        return
    slot = report.slot
    if slot is None:
        click.echo(
            f"slot {present.clean(settings.slot)}: none (created by the first logical watch)"
        )
    else:
        state = "active" if slot.active else "inactive (is `pgherald run` running?)"
        click.echo(
            f"slot {present.clean(slot.name)}: {state}, wal_status {slot.wal_status},"
            f" retains {_size(slot.retained_bytes)} of WAL, {_size(slot.lag_bytes)} behind"
            f" the server, confirmed up to {slot.confirmed_flush_lsn}"
        )
    click.echo(f"change log: {report.events} events, checkpoint {report.checkpoint or 'none yet'}")
    if report.queued or any(w.method == "trigger" for w in report.watches):
        oldest = (
            f", oldest from {report.oldest_queued:%Y-%m-%d %H:%M:%S%z}"
            if report.oldest_queued
            else ""
        )
        click.echo(f"trigger queue: {report.queued} change(s) waiting{oldest}")
    for w in report.watches:
        seen = f"{w.changes_seen} changes" if w.changes_seen is not None else "no changes yet"
        click.echo(f"watch {present.clean(w.name, 40)} ({w.method}): {seen}")


# -- doctor and demo ------------------------------------------------------------------------------


@main.command()
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@connection_options
@click.pass_context
def doctor(ctx: click.Context, fmt: str) -> None:
    """Check the database and say which capture methods can work; exit 1 when none can."""
    from pgherald import doctor as doctor_module

    report = doctor_module.diagnose(settings_of(ctx))
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        _emit(doctor_module.render(report))
    if not report.ok:
        ctx.exit(1)


@main.command()
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=4.0,
    show_default=True,
    help="Workload transactions per second.",
)
@click.option("--seed", type=int, help="Seed of the random workload, to repeat a run.")
@click.option(
    "--journal",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write every committed change of the workload to this file (JSON lines).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Serve the changes over HTTP on this loopback port (0: any free port).",
)
@click.pass_context
def demo(
    ctx: click.Context,
    duration: float | None,
    rate: float,
    seed: int | None,
    journal: Path | None,
    port: int,
) -> None:
    """Start a throwaway PostgreSQL, run a demo workload, and show and serve its changes live."""
    from pgherald import demo as demo_module

    ctx.exit(demo_module.main(duration=duration, rate=rate, seed=seed, journal=journal, port=port))


main.add_command(listen)


def _register_delivery_commands() -> None:
    from pgherald import cli_delivery

    for command in cli_delivery.LEAVES:
        connection_options(command)
    for command in cli_delivery.COMMANDS:
        main.add_command(command)


_register_delivery_commands()


def _register_render_commands() -> None:
    from pgherald import cli_delivery, cli_render

    for command in cli_render.LEAVES:
        connection_options(command)
    for command in cli_render.COMMANDS_ON_WATCH:
        watch.add_command(command)
    for command in cli_render.COMMANDS_ON_SINK:
        cli_delivery.sink.add_command(command)
    for command in cli_render.COMMANDS:
        main.add_command(command)


_register_render_commands()


def _register_web_commands() -> None:
    from pgherald import cli_web

    for command in cli_web.LEAVES:
        connection_options(command)
    for command in cli_web.COMMANDS:
        main.add_command(command)


_register_web_commands()


def _register_digest_commands() -> None:
    from pgherald import cli_digests

    for command in cli_digests.LEAVES:
        connection_options(command)
    for command in cli_digests.COMMANDS:
        main.add_command(command)


_register_digest_commands()


def _register_check_commands() -> None:
    from pgherald import cli_check

    for command in cli_check.LEAVES:
        connection_options(command)
    for command in cli_check.COMMANDS:
        main.add_command(command)


_register_check_commands()


def _register_retention_commands() -> None:
    from pgherald import cli_retention

    for command in cli_retention.LEAVES:
        connection_options(command)
    for command in cli_retention.COMMANDS_ON_WATCH:
        watch.add_command(command)
    for command in cli_retention.COMMANDS:
        main.add_command(command)


_register_retention_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
