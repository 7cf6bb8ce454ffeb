"""Pruning the change log by age, in batches that never lock out capture or delivery.

One watch at a time, its events are walked in log order (index ``events (watch, id)``),
``batch_size`` at a time, each batch in a transaction of its own that deletes the
events older than the cutoff with their field rows, finished deliveries and attempts.
The walk stops at the first event younger than the cutoff: a watch's events are
captured in log order, so what follows is younger too (an event whose capture time is
out of order goes when the ones before it do).

What stays, whatever its age, and why:

- an event with an open delivery (``pending``, ``delivering``, ``failed``): it has yet
  to reach its sink (digests keep theirs open until the digest goes); counted as
  ``held_open``;
- an event the router has not looked at yet, when the watch has subscriptions: it has no
  delivery *yet*; counted as ``held_unrouted``;
- with ``keep_newest`` (logical watches), the newest version of each row that still
  exists: logical capture completes an update that comes without its old row
  (``REPLICA IDENTITY DEFAULT``) or with unchanged TOAST values from the latest stored
  version of the row (see ``ChangeLog.append``); counted as ``kept_newest``. A row whose
  newest version is a delete needs nothing (nothing reads back past a delete), so it
  goes with its history unless an older version of it has to stay for another reason;
- the events ``ChangeLog.last_shape`` reads (a watch's latest full row and later schema
  event), from which capture learns a watch's row shape at start; ``kept_shape``.

Nothing here waits for the writers, nor they for it: events are only ever appended,
and the deliveries deleted are finished ones, which nobody updates (they are locked
first, so that one reopened by hand meanwhile is seen and kept).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from pgherald.db.sqlfiles import named_query
from pgherald.store.session import check_schema_name, in_schema

_FILE: Final = "retention.sql"
_MAX_ID: Final = 2**63 - 1
ROUTER_CHECKPOINT: Final = "router"
"""The router's checkpoint name (``pgherald.delivery.router.CHECKPOINT``; the store does
not import delivery)."""


def _q(name: str) -> LiteralString:
    return named_query(_FILE, name)


_STAYING: Final = sql.SQL(
    "(e.captured_at >= %(cutoff)s OR e.id = ANY (%(keep)s::bigint[]) OR EXISTS ("
    "SELECT FROM deliveries d WHERE d.event_id = e.id"
    " AND d.status IN ('pending', 'delivering', 'failed')))"
)
"""In a dry run, whether an event of a run would stay (see prune_runs in retention.sql)."""


@dataclass
class PruneCounts:
    """What one prune did (or, in a dry run, would do)."""

    events: int = 0
    fields: int = 0
    deliveries: int = 0
    attempts: int = 0
    runs: int = 0
    errors: int = 0
    held_open: int = 0
    held_unrouted: int = 0
    kept_newest: int = 0
    kept_shape: int = 0
    batches: int = 0

    def add(self, other: PruneCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def held(self) -> int:
        return self.held_open + self.held_unrouted + self.kept_newest + self.kept_shape


def logged_watches(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """Every watch name in the log, the runs or the errors (registered or removed)."""
    with in_schema(conn, schema):
        rows = conn.cursor(row_factory=tuple_row).execute(_q("logged_watches")).fetchall()
    conn.commit()
    return [str(r[0]) for r in rows]


def clock(conn: psycopg.Connection[Any]) -> datetime:
    """The database's time: cutoffs are computed by the clock that stamped the events."""
    row = conn.cursor(row_factory=tuple_row).execute(_q("clock")).fetchone()
    conn.commit()
    assert row is not None
    value: datetime = row[0]
    return value


def try_lock(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Takes the store's prune lock (a session lock) if nobody else holds it."""
    with in_schema(conn, schema):
        row = conn.cursor(row_factory=tuple_row).execute(_q("prune_lock")).fetchone()
        conn.execute(_q("prune_settings"))
    conn.commit()
    return bool(row and row[0])


def unlock(conn: psycopg.Connection[Any], schema: str) -> None:
    with in_schema(conn, schema):
        conn.execute(_q("prune_unlock"))
    conn.commit()


class Pruner:
    """Prunes one store through a connection of its own (not in autocommit: it commits per
    batch), whose search path it sets to the store's schema."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        schema: str,
        batch_size: int = 1000,
        dry_run: bool = False,
    ) -> None:
        if conn.autocommit:
            raise ValueError("the pruner commits per batch: give it a connection in a transaction")
        check_schema_name(schema)
        self.conn = conn
        self.schema = schema
        self.batch_size = batch_size
        self.dry_run = dry_run
        # The connection is the pruner's: a session search path saves a statement per batch.
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.commit()

    def _rows(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self.conn.cursor(row_factory=tuple_row).execute(_q(name), params).fetchall()

    def prune_watch(
        self,
        watch: str,
        cutoff: datetime,
        *,
        keep_newest: bool,
        stop: threading.Event | None = None,
    ) -> PruneCounts:
        """Prunes one watch's events, runs and errors older than ``cutoff``.

        ``stop`` (a ``threading.Event``) ends the walk between batches; what is done is
        committed.
        """
        counts = PruneCounts()
        conn = self.conn
        upto_row = self._rows("routing_limit", {"watch": watch, "router": ROUTER_CHECKPOINT})
        limit = upto_row[0][0] if upto_row else None
        upto = _MAX_ID if limit is None else int(limit)
        keep = [int(r[0]) for r in self._rows("shape_keepers", {"watch": watch})]
        conn.commit()
        after = 0
        reached_young = False
        while not reached_young and not (stop is not None and stop.is_set()):
            params = {
                "watch": watch,
                "after": after,
                "upto": upto,
                "limit": self.batch_size,
                "cutoff": cutoff,
                "keep_newest": keep_newest,
            }
            rows = self._rows("prune_candidates", params)
            if not rows:
                conn.commit()
                break
            doomed: list[int] = []
            last_deletes: list[tuple[int, str]] = []
            for event_id, op, row_key, young, is_open, newest in rows:
                if young:
                    reached_young = True
                    break
                after = event_id
                if event_id in keep:
                    counts.kept_shape += 1
                elif is_open:
                    counts.held_open += 1
                elif newest and op == "delete":
                    last_deletes.append((event_id, row_key))
                elif newest:
                    counts.kept_newest += 1
                else:
                    doomed.append(event_id)
            if last_deletes:
                found = self._rows(
                    "prunable_last_deletes",
                    {
                        "watch": watch,
                        "ids": [i for i, _ in last_deletes],
                        "row_keys": [k for _, k in last_deletes],
                        "keep": keep,
                    },
                )
                may_go = {int(r[0]) for r in found}
                counts.kept_newest += len(last_deletes) - len(may_go)
                doomed.extend(sorted(may_go))
            if doomed:
                self._delete(doomed, counts)
            conn.commit()
            counts.batches += 1
            if len(rows) < self.batch_size:
                break
        if not reached_young and upto != _MAX_ID:
            row = self._rows("count_unrouted", {"watch": watch, "after": after, "cutoff": cutoff})
            counts.held_unrouted = int(row[0][0]) if row else 0
            conn.commit()
        counts.errors += self._prune_table("prune_errors", "errors", watch, cutoff, stop)
        counts.runs += self._prune_table("prune_runs", "runs", watch, cutoff, stop, keep)
        return counts

    def prune_sources(self, cutoff: datetime, stop: threading.Event | None = None) -> PruneCounts:
        """Prunes the runs and errors that belong to no watch (whole sources)."""
        counts = PruneCounts()
        counts.errors = self._prune_table("prune_errors", "errors", None, cutoff, stop)
        counts.runs = self._prune_table("prune_runs", "runs", None, cutoff, stop)
        return counts

    def _delete(self, ids: Sequence[int], counts: PruneCounts) -> None:
        """Deletes the events (counting what goes with them), or counts them in a dry run.

        Three round trips: the lock on their finished deliveries with the recheck for
        open ones, then the counts with the delete (the COMMIT is the caller's)."""
        conn = self.conn
        doomed = list(ids)
        if not self.dry_run:
            with conn.pipeline():
                conn.execute(_q("lock_finished_deliveries"), {"ids": doomed})
                check = conn.cursor(row_factory=tuple_row)
                check.execute(_q("doomed_events"), {"ids": doomed})
            doomed = [int(r[0]) for r in check.fetchall()]
            counts.held_open += len(ids) - len(doomed)  # reopened since the look
        if not doomed:
            return
        with conn.pipeline():
            counted = conn.cursor(row_factory=tuple_row)
            counted.execute(_q("count_events"), {"ids": doomed})
            if not self.dry_run:
                conn.execute(_q("delete_events"), {"ids": doomed})
        row = counted.fetchone()
        assert row is not None
        events, field_rows, deliveries, attempts = (int(v) for v in row)
        counts.events += events
        counts.fields += field_rows
        counts.deliveries += deliveries
        counts.attempts += attempts

    def _prune_table(
        self,
        name: str,
        table: str,
        watch: str | None,
        cutoff: datetime,
        stop: threading.Event | None,
        keep: Sequence[int] = (),
    ) -> int:
        alias = "r" if table == "runs" else "x"
        match = (
            sql.SQL("{}.watch IS NULL").format(sql.Identifier(alias))
            if watch is None
            else sql.SQL("{}.watch = %(watch)s").format(sql.Identifier(alias))
        )
        action: sql.Composable
        if self.dry_run:
            action = sql.SQL("SELECT count(*) FROM doomed")
        else:
            action = sql.SQL(
                "DELETE FROM {table} t USING doomed WHERE t.id = doomed.id RETURNING t.id"
            ).format(table=sql.Identifier(table))
        statement = sql.SQL(_q(name)).format(
            match=match, action=action, staying=_STAYING if self.dry_run else sql.SQL("true")
        )
        params = {
            "watch": watch,
            "cutoff": cutoff,
            "limit": None if self.dry_run else self.batch_size,
            "keep": list(keep),
        }
        total = 0
        while not (stop is not None and stop.is_set()):
            cur = self.conn.cursor(row_factory=tuple_row)
            rows = cur.execute(statement, params).fetchall()
            self.conn.commit()
            if self.dry_run:
                return int(rows[0][0]) if rows else 0
            total += len(rows)
            if len(rows) < self.batch_size:
                break
        return total


__all__ = ["ROUTER_CHECKPOINT", "PruneCounts", "Pruner", "clock", "logged_watches", "try_lock"]
