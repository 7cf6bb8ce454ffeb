"""The figures operators watch, read from the database in one short session.

``pgherald check`` judges them against thresholds, the ``/metrics`` collector exports
them as gauges, and ``/readyz`` reads a few. Every statement runs under a short
``statement_timeout`` and the connection under a short ``connect_timeout``, so that a
scrape or a check answers (with an error) rather than hangs when the server does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, LiteralString

import psycopg
from croniter import croniter
from psycopg import sql

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.sqlfiles import ident, named_query
from pgherald.ops.slot_stats import SlotStats, slot_stats
from pgherald.schedule import Schedule
from pgherald.sources.logical import checkpoint_name

_FILE: Final = "monitoring.sql"
_TABLES: Final = (
    "watches", "checkpoints", "trigger_queue", "deliveries", "delivery_attempts", "sinks",
    "errors",
)  # fmt: skip
OPEN_STATUSES: Final = ("pending", "delivering", "failed")


def query(name: str, schema: str) -> sql.Composed:
    """A block of ``monitoring.sql`` with the store's tables filled in."""
    text: LiteralString = named_query(_FILE, name)
    return sql.SQL(text).format(**{t: ident(schema, t) for t in _TABLES})


def open_session(
    settings: Settings, timeout: float, application_name: str = "pgherald-monitor"
) -> psycopg.Connection[Any]:
    """An autocommit connection whose connecting and every statement are bounded by
    ``timeout`` seconds (raises ``ConnectionFailed`` when the server cannot be reached)."""
    conn = connect(
        settings,
        autocommit=True,
        application_name=application_name,
        connect_timeout=max(int(timeout + 0.999), 1),
    )
    try:
        conn.execute(
            named_query(_FILE, "statement_timeout"), {"ms": str(max(int(timeout * 1000), 1))}
        )
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass(frozen=True)
class SnapshotAge:
    """How long ago a snapshot watch last ran successfully, and what it should be."""

    watch: str
    schedule: Schedule | None
    success_age: float | None
    """Seconds since its last successful run; None: it never ran successfully."""
    created_age: float
    last_error: str | None

    @property
    def age(self) -> float:
        """Seconds since the last success, or since the watch was made if none."""
        return self.success_age if self.success_age is not None else self.created_age

    def period(self) -> float | None:
        """Seconds between two scheduled runs (for cron, the next two), None unscheduled."""
        if self.schedule is None:
            return None
        if self.schedule.every is not None:
            return self.schedule.every.total_seconds()
        assert self.schedule.cron is not None
        it = croniter(self.schedule.cron, datetime.now(UTC))
        first: datetime = it.get_next(datetime)
        second: datetime = it.get_next(datetime)
        return (second - first).total_seconds()


@dataclass(frozen=True)
class Measurements:
    slot_name: str
    slot: SlotStats | None
    """None: no such slot."""
    logical_watches: int
    trigger_rows: int
    trigger_oldest_seconds: float | None
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per sink: pending, delivering, failed and dead deliveries."""
    dead_recent: dict[str, int] = field(default_factory=dict)
    """Per sink: dead letters within the window (when a window was asked for)."""
    errors_recent: int = 0
    last_error: tuple[str | None, str] | None = None
    """The latest error within the window: its watch and message."""
    snapshots: tuple[SnapshotAge, ...] = ()


def measure(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    dead_window: timedelta = timedelta(hours=24),
    errors_window: timedelta = timedelta(hours=1),
) -> Measurements:
    """Reads every figure (a handful of statements, each under the session's timeout)."""
    schema = settings.schema
    row = conn.execute(
        query("capture_progress", schema), {"checkpoint": checkpoint_name(settings.slot)}
    ).fetchone()
    assert row is not None
    logical_watches, idle_since = int(row[0]), row[1]
    slot = slot_stats(conn, settings.slot, idle_since)
    row = conn.execute(query("trigger_queue", schema)).fetchone()
    assert row is not None
    trigger_rows, trigger_oldest = int(row[0]), row[1]
    deliveries: dict[str, dict[str, int]] = {}
    for sink, status, count in conn.execute(query("deliveries_by_sink", schema)):
        deliveries.setdefault(sink, {})[status] = int(count)
    dead_recent = {
        sink: int(count)
        for sink, count in conn.execute(query("dead_since", schema), {"window": dead_window})
    }
    row = conn.execute(query("errors_since", schema), {"window": errors_window}).fetchone()
    assert row is not None
    errors_recent = int(row[0])
    last_error = (row[1], str(row[2])) if row[2] is not None else None
    snapshots = tuple(
        SnapshotAge(
            watch=name,
            schedule=Schedule.from_options(dict(options or {})),
            success_age=None if success is None else float(success),
            created_age=float(created),
            last_error=error,
        )
        for name, options, success, created, error in conn.execute(
            query("snapshot_watches", schema)
        )
    )
    return Measurements(
        slot_name=settings.slot,
        slot=slot,
        logical_watches=logical_watches,
        trigger_rows=trigger_rows,
        trigger_oldest_seconds=None if trigger_oldest is None else float(trigger_oldest),
        deliveries=deliveries,
        dead_recent=dead_recent,
        errors_recent=errors_recent,
        last_error=last_error,
        snapshots=snapshots,
    )


__all__ = [
    "OPEN_STATUSES", "Measurements", "SnapshotAge", "measure", "open_session", "query",
]  # fmt: skip
