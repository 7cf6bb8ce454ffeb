"""The router: turns new change-log events into deliveries, one per matching subscription.

It follows the log by id (gap-free in commit order, see ``ChangeLog.append``'s lock),
applies each subscription's filter in Python (the condition language is evaluated here,
never spliced into SQL), and inserts the batch's deliveries and its own checkpoint in one
transaction: a crash re-routes the batch, and ``ON CONFLICT`` makes that harmless. One
router per store at a time (an advisory lock); it wakes on the log's NOTIFY and tells the
delivery workers with one of its own, naming the sinks that got deliveries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, Final, cast

import psycopg
from psycopg import sql

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry
from pgherald.errors import ConfigError, ConnectionFailed
from pgherald.events import ChangeEvent
from pgherald.events.model import Operation
from pgherald.routing.subscriptions import Subscription, order_key
from pgherald.store import checkpoints, deliveries
from pgherald.store.changelog import ChangeLog, changes_channel
from pgherald.store.deliveries import RoutingRow

log = logging.getLogger("pgherald.router")

CHECKPOINT = "router"


class Router:
    """Routes in batches until stopped; ``route_once`` is one batch (for tests and tools)."""

    def __init__(self, settings: Settings, batch_size: int = 2000, poll: float = 0.5) -> None:
        self.settings = settings
        self.batch_size = batch_size
        self.poll = poll
        self.routed_events = 0
        self.created = 0
        self.connected = threading.Event()
        self._loader: TypeRegistry | None = None
        self._changelog: ChangeLog | None = None
        self._leading = False
        """Whether this router holds the store's routing lock: then nobody else moves its
        checkpoint, and the position it committed last is where it goes on."""
        self._position: int | None = None

    def _subscriptions(
        self, conn: psycopg.Connection[Any]
    ) -> dict[str, list[tuple[Subscription, int]]]:
        by_watch: dict[str, list[tuple[Subscription, int]]] = defaultdict(list)
        for s in deliveries.list_subscriptions(conn, self.settings.schema):
            if not s.enabled:
                continue
            try:
                sub = Subscription.from_filter(
                    s.sink, s.watch, s.filter, s.ignore_columns, s.strictly_ordered
                )
            except ConfigError as e:
                log.error("subscription of %s to %s is not usable: %s", s.sink, s.watch, e)
                continue
            by_watch[s.watch].append((sub, s.from_event))
        return by_watch

    def route_once(self, conn: psycopg.Connection[Any]) -> int:
        """Routes one batch in its own transaction; returns how many events it looked at.

        The batch runs in one psycopg pipeline: its statements go out together and only
        the reads wait for answers (subscriptions, the checkpoint unless it is known, the
        events; the inserts, the checkpoint, the NOTIFY and the COMMIT in one more round
        trip). Statement by statement it took about 17 round trips, and each of them
        waits for the interpreter lock again when capture and delivery keep it busy. The
        COMMIT does not wait for the disk either (why that is safe is said where it is
        set): a batch costs about 3 ms less.
        """
        schema = self.settings.schema
        if self._loader is None:
            self._loader = TypeRegistry.load(conn)
        if self._changelog is None or self._changelog.conn is not conn:
            self._changelog = ChangeLog(conn, schema)  # it remembers shapes it has read
        changelog = self._changelog
        try:
            with conn.pipeline():
                # No wait for the WAL flush at COMMIT: a crash of the server may lose the
                # last batches routed, and then the checkpoint with them, so they are
                # routed again (ON CONFLICT makes that harmless); whatever was done with
                # them since was committed after them, and the WAL keeps that order.
                conn.execute("SET LOCAL synchronous_commit TO off")
                subs = self._subscriptions(conn)
                after = self._position if self._leading else None
                if after is None:
                    saved = checkpoints.load_checkpoint(conn, schema, CHECKPOINT)
                    after = (
                        int(saved)
                        if saved is not None
                        else min((f for group in subs.values() for _, f in group), default=0)
                    )
                batch = self._read(conn, changelog, subs, after)
                if not batch:
                    conn.rollback()
                    self._position = after
                    return 0
                rows: list[tuple[int, str, str]] = []
                for log_id, event in batch:
                    for sub, from_event in subs.get(event.watch, ()):
                        if log_id > from_event and sub.wants(event):
                            key = "" if sub.strictly_ordered else order_key(event)
                            rows.append((log_id, sub.sink, key))
                deliveries.insert_deliveries(conn, schema, rows)
                checkpoints.save_checkpoint(conn, schema, CHECKPOINT, str(batch[-1][0]))
                # Wakes the workers of the sinks that got deliveries (by name: an idle
                # sink's worker holds no connection, and the others need not wake).
                deliveries.notify_deliveries(conn, schema, {sink for _, sink, _ in rows})
                conn.commit()
        except BaseException:
            self._position = None  # rolled back: read it again
            raise
        self._position = batch[-1][0]
        self.routed_events += len(batch)
        self.created += len(rows)
        return len(batch)

    def _read(
        self,
        conn: psycopg.Connection[Any],
        changelog: ChangeLog,
        subs: dict[str, list[tuple[Subscription, int]]],
        after: int,
    ) -> list[tuple[int, ChangeEvent]]:
        """The next events with their log ids: whole when a subscription tests row values
        (``where``), else without their rows (``routing_events``), which are what costs
        most to read and decode (about 15 us of the router's ~20 per event)."""
        if any(sub.where is not None for group in subs.values() for sub, _ in group):
            read = changelog.read(after_id=after, limit=self.batch_size, loader=self._loader)
            return [(stored.id, stored.event) for stored in read]
        light = deliveries.routing_events(conn, self.settings.schema, after, self.batch_size)
        return [(r.id, _without_rows(r)) for r in light]

    def run(self, stop: threading.Event) -> None:
        """Routes until ``stop``; reconnects when the connection is lost."""
        delay = 0.5
        while not stop.is_set():
            try:
                self._session(stop)
                return
            except (psycopg.OperationalError, ConnectionFailed) as e:
                log.warning("router lost its connection (%s); retrying", str(e).splitlines()[0])
                self.connected.clear()
                stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _session(self, stop: threading.Event) -> None:
        schema = self.settings.schema
        with (
            connect(self.settings, application_name="pgherald-router") as conn,
            connect(self.settings, autocommit=True, application_name="pgherald-router") as wake,
        ):
            self.connected.set()  # ready, whether it leads or stands by
            said = False
            while not stop.is_set():
                row = wake.execute(
                    "SELECT pg_try_advisory_lock(hashtext('pgherald.router:' || %s))", (schema,)
                ).fetchone()
                if row and row[0]:
                    break
                if not said:
                    log.info("another pgherald routes this change log; standing by")
                    said = True
                stop.wait(1.0)
            wake.execute(sql.SQL("LISTEN {}").format(sql.Identifier(changes_channel(schema))))
            self._leading, self._position = True, None
            try:
                self._route(conn, wake, stop)
            finally:
                self._leading, self._position = False, None

    def _route(
        self,
        conn: psycopg.Connection[Any],
        wake: psycopg.Connection[Any],
        stop: threading.Event,
    ) -> None:
        """Routes what the log has, then waits for its NOTIFY (or ``poll`` seconds)."""
        while not stop.is_set():
            looked = self.route_once(conn)
            if looked >= self.batch_size:
                continue
            deadline = time.monotonic() + self.poll
            while not stop.is_set() and time.monotonic() < deadline:
                got = False
                for _ in wake.notifies(timeout=min(0.1, self.poll), stop_after=1):
                    got = True
                if got:
                    break


_UNKNOWN_TIME: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _without_rows(row: RoutingRow) -> ChangeEvent:
    """An event with only what ``Subscription.wants`` (without ``where``) and ``order_key``
    read: watch, operation, key and changed columns. The rest are placeholders that routing
    never reads; such an event goes nowhere else."""
    return ChangeEvent(
        event_id="",
        watch=row.watch,
        op=cast(Operation, row.op),
        schema="",
        table="",
        key=row.key,
        old=None,
        new=None,
        changed=row.changed,
        xid=None,
        position="",
        commit_time=None,
        captured_at=_UNKNOWN_TIME,
        method="logical",
    )
