"""The composition root: the one place that wires sources, the store and (later) delivery.

The CLI, the Python API and the demo build a ``Settings`` and call in here, so that the
same configuration always gives the same pipeline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.errors import ConfigError
from pgherald.events import ChangeEvent
from pgherald.events.model import RowShape
from pgherald.sources.logical import (
    LogicalSettings,
    LogicalSource,
    LogicalWatch,
    checkpoint_name,
)
from pgherald.store import checkpoints, migrations, watches
from pgherald.store.changelog import ChangeLog, Statement
from pgherald.store.queries import query

log = logging.getLogger("pgherald")


class ChangeLogSink:
    """Backs a source's ``CaptureSink`` with the change log: events and checkpoint commit together.

    It owns one connection in a transaction of its own; nothing else writes through it, so
    a rollback after a lost replication connection forgets exactly the unacknowledged part.
    """

    def __init__(self, dsn: str, schema: str, source: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.source = source
        self._conn: psycopg.Connection[Any] | None = None
        self._log: ChangeLog | None = None
        self._per_watch: Counter[str] = Counter()
        self._held: list[ChangeEvent] = []
        self.stored_events = 0
        self._connection()  # fail fast on a wrong DSN

    def _connection(self) -> psycopg.Connection[Any]:
        """The store connection, opened again after it was lost (lazily, on next use)."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, autocommit=False, application_name="pgherald-store")
            self._log = ChangeLog(self._conn, self.schema)
        return self._conn

    def write(self, events: Sequence[ChangeEvent]) -> None:
        """Adds events to the store transaction.

        The last batch written is held back (one batch at most) and sent by the next
        ``write`` or by ``commit``, whose statements then ride in its last round trip.
        """
        self._check_not_lost()
        self._connection()
        assert self._log is not None
        if self._held:
            self._log.append(self._held, notify=False)  # commit() notifies for all
        self._held = list(events)
        self._per_watch.update(e.watch for e in events)

    def commit(self, position: str, extra: Mapping[str, str] | None = None) -> None:
        """Stores what is held back, notes the watches' activity, saves the checkpoints and
        commits; the statements and the COMMIT go in the batch's last pipeline.

        This runs for every batch, so it costs no round trip of its own: the statements are
        what ``watches.record_watch_activity`` and ``checkpoints.save_checkpoint`` run (one
        by one, with a search path each, when called on their own).
        """
        self._check_not_lost()
        self._connection()
        assert self._log is not None

        statements: list[Statement] = [
            (
                query("record_watch_activity"),
                {"name": name, "changes": count, "ok": True, "error": None},
            )
            for name, count in self._per_watch.items()
        ]
        statements += [
            (query("save_checkpoint"), {"source": source, "position": value})
            for source, value in ((self.source, position), *(extra or {}).items())
        ]
        held, self._held = self._held, []
        self._log.append(held, then=statements, commit=True)
        self.stored_events += sum(self._per_watch.values())
        self._per_watch.clear()

    def _check_not_lost(self) -> None:
        """Refuses to go on in a new connection while the lost one held written events: a
        checkpoint committed without them would skip them for good."""
        if (self._conn is None or self._conn.closed) and (self._held or self._per_watch):
            raise psycopg.OperationalError(
                "the store connection was lost in the middle of a batch; capture resumes"
                " from the last checkpoint"
            )

    def rollback(self) -> None:
        """Forgets the uncommitted part; never raises, so a source can always call it."""
        self._per_watch.clear()
        self._held = []
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.rollback()
            except psycopg.Error:
                self._conn.close()

    def checkpoint(self, name: str | None = None) -> str | None:
        conn = self._connection()
        position = checkpoints.load_checkpoint(conn, self.schema, name or self.source)
        conn.commit()
        return position

    def last_shapes(self, watches: Sequence[str]) -> dict[str, RowShape]:
        """Each watch's shape as the change log last recorded it (``ChangeLog.last_shape``)."""
        conn = self._connection()
        assert self._log is not None
        found = {name: self._log.last_shape(name) for name in watches}
        conn.commit()
        return {name: shape for name, shape in found.items() if shape is not None}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def logical_source_name(settings: Settings) -> str:
    """The checkpoint name of the logical source of these settings."""
    return checkpoint_name(settings.slot)


def logical_watches(settings: Settings) -> list[LogicalWatch]:
    with connect(settings, autocommit=True) as conn:
        migrations.require_current(conn, settings.schema)
        found = [w for w in watches.list_watches(conn, settings.schema) if w.method == "logical"]
    return [
        LogicalWatch(
            name=w.name,
            schema=w.schema_name or "",
            table=w.table_name or "",
            key_columns=tuple(w.key_columns or ()),
            columns=tuple(w.columns) if w.columns else None,
            ignore_columns=tuple(w.ignore_columns or ()),
            snapshot=bool((w.options or {}).get("snapshot")),
        )
        for w in found
        if w.enabled and w.schema_name and w.table_name
    ]


def build_logical_source(settings: Settings, resync: bool = False) -> LogicalSource:
    found = logical_watches(settings)
    if not found:
        raise ConfigError("no logical watches: add one with `pgherald watch add SCHEMA.TABLE`")
    return LogicalSource(
        LogicalSettings(
            dsn=settings.dsn,
            slot=settings.slot,
            publication=settings.publication,
            batch_size=max(settings.batch_size, 1),
            max_batch_delay=settings.batch_interval,
            resync=resync,
        ),
        found,
    )


def run(settings: Settings, stop: threading.Event, resync: bool = False) -> None:
    """Captures the configured watches into the change log until ``stop`` is set."""
    source = build_logical_source(settings, resync=resync)
    sink = ChangeLogSink(settings.dsn, settings.schema, logical_source_name(settings))
    try:
        log.info("capturing %d watch(es) from %s", len(source.watches), settings.redacted_dsn())
        source.run(sink, stop)
    finally:
        sink.close()


class Capture:
    """Logical capture in a background thread, for the demo, the Python API and tests.

    ``errors`` holds what ended the thread, so the caller can report it.
    """

    def __init__(self, settings: Settings, resync: bool = False) -> None:
        self.settings = settings
        self.source = build_logical_source(settings, resync=resync)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._target, name="pgherald-capture", daemon=True)

    def _target(self) -> None:
        sink = ChangeLogSink(
            self.settings.dsn, self.settings.schema, logical_source_name(self.settings)
        )
        try:
            self.source.run(sink, self.stop)
        except BaseException as e:  # handed to whoever joins
            self.errors.append(e)
            self.stop.set()
        finally:
            sink.close()

    def start(self) -> Capture:
        self.thread.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Returns once the replication stream is open; raises what stopped it otherwise."""
        deadline = time.monotonic() + timeout
        while not self.source.connected.wait(0.05):
            if self.errors:
                raise self.errors[0]
            if time.monotonic() > deadline:
                raise TimeoutError("capture did not start in time")

    def close(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        if self.errors:
            raise self.errors[0]
