"""Running snapshot watches: one run, every due run, and the daemon's scheduler.

A run is one transaction (``REPEATABLE READ``, so a query sees one consistent state):
comparison, baseline, events and the run's record commit together. The run's start is
recorded first, in a transaction of its own, so that a run that fails, or is killed,
still shows in ``runs``: as ``error`` with the database's message, or left ``running``
until the next run of that watch marks it ``aborted``. A watch never runs twice at once,
in one process or several (a session advisory lock per watch).

Each run also saves, with everything else, how many rows the baseline holds now, as the
checkpoint ``snapshot:<watch>`` (``{"run": id, "rows": n}``): the baseline is an UNLOGGED
table, which a server crash empties, and the next run tells it from an empty result by
that count. A lost baseline is recorded again, and the run says so in ``errors`` (with
the run ``ok``: nothing failed, but the changes since the last run were not reported).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry
from pgherald.errors import ConnectionFailed, PgHeraldError, WatchError
from pgherald.events import ChangeEvent
from pgherald.events.model import RowShape
from pgherald.ops import metrics
from pgherald.schedule import Schedule
from pgherald.sources.snapshot import SnapshotComparer, SnapshotWatch, baseline_checkpoint
from pgherald.store import checkpoints, errors, runs
from pgherald.store import watches as registry
from pgherald.store.changelog import ChangeLog
from pgherald.store.selected import append_selected
from pgherald.store.watches import Watch

log = logging.getLogger("pgherald.snapshot")

_LOCK = "SELECT pg_try_advisory_lock(hashtext('pgherald.snapshot:' || %s || ':' || %s))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext('pgherald.snapshot:' || %s || ':' || %s))"
_ABORT_STALE = """
UPDATE {runs} SET status = 'aborted', ended_at = now(),
       error = 'the run ended without finishing (process killed or connection lost)'
WHERE watch = %s AND source = 'snapshot' AND status = 'running'
"""


@dataclass(frozen=True)
class RunResult:
    watch: str
    status: str  # ok, error, skipped
    run_id: int | None = None
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    rows_compared: int = 0
    baseline_created: bool = False
    shape_changed: bool = False
    error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    baseline_lost: bool = False
    """The baseline had been emptied by a crash: recorded again, changes since not reported."""

    def describe(self) -> str:
        if self.status == "skipped":
            return f"{self.watch}: skipped ({self.error})"
        if self.status == "error":
            return f"{self.watch}: FAILED (run {self.run_id}): {self.error}"
        if self.baseline_lost:
            return (
                f"{self.watch}: the baseline was lost (server crash?) and recorded again,"
                f" {self.rows_compared} rows; changes since the last run are not reported"
                f" (run {self.run_id})"
            )
        if self.baseline_created:
            return f"{self.watch}: baseline recorded, {self.rows_compared} rows (run {self.run_id})"
        shape = ", shape changed" if self.shape_changed else ""
        return (
            f"{self.watch}: {self.inserts} inserted, {self.updates} updated,"
            f" {self.deletes} deleted of {self.rows_compared} rows{shape} (run {self.run_id})"
        )


def snapshot_watch(w: Watch) -> SnapshotWatch:
    """What the comparer needs of a registered snapshot watch."""
    if w.query:
        query, schema, table = w.query, "", w.name
    elif w.schema_name and w.table_name:
        ident = sql.Identifier(w.schema_name, w.table_name)
        columns: sql.Composable = (
            sql.SQL(", ").join(sql.Identifier(c) for c in w.columns) if w.columns else sql.SQL("*")
        )
        query = sql.SQL("SELECT {} FROM {}").format(columns, ident).as_string(None)
        schema, table = w.schema_name, w.table_name
    else:
        raise WatchError(f"watch {w.name!r} has neither a query nor a table")
    return SnapshotWatch(
        name=w.name,
        query=query,
        key_columns=tuple(w.key_columns),
        ignore_columns=tuple(w.ignore_columns),
        schema=schema,
        table=table,
        initial_events=bool((w.options or {}).get("initial_events")),
    )


@dataclass(frozen=True)
class BaselineRecord:
    """What the last committed run of a watch left in its baseline."""

    run: int | None
    rows: int

    @classmethod
    def parse(cls, position: str | None) -> BaselineRecord | None:
        if position is None:
            return None
        try:
            found = json.loads(position)
            run = found.get("run")
            return cls(None if run is None else int(run), int(found["rows"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # not ours to read: as if nothing was kept

    def position(self) -> str:
        return json.dumps({"run": self.run, "rows": self.rows})


def _lost_message(watch: str, run_id: int, record: BaselineRecord | None, rows: int) -> str:
    since = f"run {record.run}" if record and record.run is not None else "the last run"
    held = f"{record.rows} rows" if record else "rows"
    return (
        f"snapshot watch {watch!r}: its baseline (an UNLOGGED table, which a server crash or a"
        f" failover empties) had lost its {held}; run {run_id} recorded it again from the"
        f" current {rows} rows, and changes made between {since} and run {run_id} are not"
        " reported"
    )


def _one_line(e: BaseException) -> str:
    if isinstance(e, psycopg.Error) and e.diag.message_primary:
        where = f" (at character {e.diag.statement_position})" if e.diag.statement_position else ""
        return f"{e.diag.message_primary}{where}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def run_watch(settings: Settings, name: str) -> RunResult:
    """Runs one snapshot watch now (unless it is running elsewhere)."""
    with connect(settings, application_name="pgherald-snapshot") as conn:
        watch = registry.get_watch(conn, settings.schema, name)
        conn.commit()
        if watch is None:
            raise WatchError(f"no watch named {name!r} (see `pgherald watch list`)")
        if watch.method != "snapshot":
            raise WatchError(f"watch {name!r} uses {watch.method} capture, not snapshot")
        locked = conn.execute(_LOCK, (settings.schema, name)).fetchone()
        conn.commit()
        if not locked or not locked[0]:
            return RunResult(name, "skipped", error="a run of this watch is in progress")
        started, status = time.monotonic(), "error"
        try:
            result = _locked_run(conn, settings, watch)
            status = result.status
            return result
        finally:
            metrics.snapshot_run(name, status, time.monotonic() - started)
            if not conn.closed:
                conn.rollback()
                conn.execute(_UNLOCK, (settings.schema, name))
                conn.commit()


def _locked_run(conn: psycopg.Connection[Any], settings: Settings, watch: Watch) -> RunResult:
    schema = settings.schema
    conn.execute(sql.SQL(_ABORT_STALE).format(runs=sql.Identifier(schema, "runs")), (watch.name,))
    run_id = runs.start_run(conn, schema, watch.name, "snapshot")
    conn.commit()
    target = snapshot_watch(watch)
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        registry_types = TypeRegistry.load(conn)

        def type_names(oids: Any) -> dict[int, str]:
            wanted = set(oids)
            missing = registry_types.missing(wanted)
            if missing:
                registry_types.refresh(missing, conn)
            return {oid: registry_types.type_name(oid) for oid in wanted}

        changelog = ChangeLog(conn, schema)

        def emit(events: Sequence[ChangeEvent]) -> None:
            changelog.append(events)

        selected = 0  # events made in the server: append_selected notes their activity

        def emit_selected(
            rows: sql.Composable, params: Mapping[str, Any], shapes: Mapping[str, RowShape]
        ) -> int:
            nonlocal selected
            stored = sum(append_selected(changelog, rows, params, shapes).values())
            selected += stored
            return stored

        record_name = baseline_checkpoint(watch.name)
        record = BaselineRecord.parse(checkpoints.load_checkpoint(conn, schema, record_name))
        outcome = SnapshotComparer(schema, type_names).run(
            conn,
            target,
            run_id,
            emit,
            datetime.now(UTC),
            baseline_rows=record.rows if record else None,
            emit_selected=emit_selected,
        )
        checkpoints.save_checkpoint(
            conn, schema, record_name, BaselineRecord(run_id, outcome.rows_compared).position()
        )
        if outcome.baseline_lost:
            lost = _lost_message(watch.name, run_id, record, outcome.rows_compared)
            errors.record_error(
                conn,
                schema,
                lost,
                watch=watch.name,
                run_id=run_id,
                source="snapshot",
                detail={
                    "reason": "baseline_lost",
                    "recorded_run": record.run if record else None,
                    "recorded_rows": record.rows if record else None,
                    "rows": outcome.rows_compared,
                },
            )
            log.warning("%s", lost)
        runs.finish_run(
            conn,
            schema,
            run_id,
            status="ok",
            inserts=outcome.inserts,
            updates=outcome.updates,
            deletes=outcome.deletes,
            rows_compared=outcome.rows_compared,
        )
        registry.record_watch_activity(
            conn, schema, watch.name, outcome.events - selected, True, None
        )
        conn.commit()
        metrics.captured({(watch.name, "snapshot"): outcome.events})
    except (psycopg.Error, PgHeraldError) as e:
        message = _one_line(e)
        if conn.closed:
            raise
        conn.rollback()
        runs.finish_run(conn, schema, run_id, status="error", error=message)
        errors.record_error(
            conn,
            schema,
            message,
            watch=watch.name,
            run_id=run_id,
            source="snapshot",
            detail={"sqlstate": e.sqlstate} if isinstance(e, psycopg.Error) else {},
        )
        registry.record_watch_activity(conn, schema, watch.name, 0, False, message)
        conn.commit()
        log.error("snapshot watch %s: run %d failed: %s", watch.name, run_id, message)
        return RunResult(watch.name, "error", run_id, error=message)
    result = RunResult(
        watch.name,
        "ok",
        run_id,
        outcome.inserts,
        outcome.updates,
        outcome.deletes,
        outcome.rows_compared,
        outcome.baseline_created,
        outcome.shape_changed,
        notes=tuple(outcome.notes),
        baseline_lost=outcome.baseline_lost,
    )
    log.info("snapshot %s", result.describe())
    return result


def snapshot_watches(
    settings: Settings, conn: psycopg.Connection[Any] | None = None
) -> list[Watch]:
    if conn is None:
        with connect(settings, autocommit=True) as own:
            return snapshot_watches(settings, own)
    return [
        w
        for w in registry.list_watches(conn, settings.schema)
        if w.method == "snapshot" and w.enabled
    ]


def run_named(settings: Settings, names: Sequence[str]) -> list[RunResult]:
    """``pgherald snapshot run [NAME...]``: the named watches, or every snapshot watch."""
    targets = list(names) or [w.name for w in snapshot_watches(settings)]
    return [run_watch(settings, n) for n in targets]


def due_watches(
    settings: Settings, now: datetime, conn: psycopg.Connection[Any] | None = None
) -> list[str]:
    """The snapshot watches whose schedule says they should have run by ``now``."""
    out = []
    for w in snapshot_watches(settings, conn):
        schedule = Schedule.from_options(dict(w.options or {}))
        if schedule is None:
            continue
        created = w.created_at or now
        if schedule.is_due(w.last_run_at, created, now):
            out.append(w.name)
    return out


class Scheduler:
    """Runs due snapshot watches until stopped (the daemon's part of snapshot capture).

    It looks every ``tick`` seconds; runs happen one at a time in this thread, so one
    watch never overlaps itself here, and the per-watch lock covers other processes.
    """

    def __init__(
        self,
        settings: Settings,
        tick: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.tick = tick
        self.clock = clock
        self.connected = threading.Event()
        self.results: list[RunResult] = []

    def run(self, stop: threading.Event) -> None:
        conn: psycopg.Connection[Any] | None = None
        self.connected.set()
        try:
            while not stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = connect(
                            self.settings, autocommit=True, application_name="pgherald-scheduler"
                        )
                    for name in due_watches(self.settings, self.clock(), conn):
                        if stop.is_set():
                            break
                        self.results.append(run_watch(self.settings, name))
                except (psycopg.OperationalError, ConnectionFailed) as e:
                    log.warning("snapshot scheduler: %s; retrying", _one_line(e))
                    if conn is not None:
                        conn.close()
                stop.wait(self.tick)
        finally:
            if conn is not None:
                conn.close()
