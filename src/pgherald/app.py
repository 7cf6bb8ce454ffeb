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
from pgherald.errors import ConfigError
from pgherald.events import ChangeEvent
from pgherald.sources import logical_admin
from pgherald.sources.logical import LogicalSettings, LogicalSource, LogicalWatch
from pgherald.store import checkpoints, migrations, watches
from pgherald.store.changelog import ChangeLog

log = logging.getLogger("pgherald")


class ChangeLogSink:
    """Backs a source's ``CaptureSink`` with the change log: events and checkpoint commit together.

    It owns one connection in a transaction of its own; nothing else writes through it, so
    a rollback after a lost replication connection forgets exactly the unacknowledged part.
    """

    def __init__(self, dsn: str, schema: str, source: str) -> None:
        self.conn: psycopg.Connection[Any] = psycopg.connect(
            dsn, autocommit=False, application_name="pgherald-store"
        )
        self.schema = schema
        self.source = source
        self.log = ChangeLog(self.conn, schema)
        self._per_watch: Counter[str] = Counter()
        self.stored_events = 0

    def write(self, events: Sequence[ChangeEvent]) -> None:
        self.log.append(events)
        self._per_watch.update(e.watch for e in events)

    def commit(self, position: str, extra: Mapping[str, str] | None = None) -> None:
        for name, count in self._per_watch.items():
            watches.record_watch_activity(self.conn, self.schema, name, count, True, None)
        checkpoints.save_checkpoint(self.conn, self.schema, self.source, position)
        for name, value in (extra or {}).items():
            checkpoints.save_checkpoint(self.conn, self.schema, name, value)
        self.conn.commit()
        self.stored_events += sum(self._per_watch.values())
        self._per_watch.clear()

    def rollback(self) -> None:
        self._per_watch.clear()
        if not self.conn.closed:
            try:
                self.conn.rollback()
            except psycopg.Error:
                self.conn.close()
        if self.conn.closed:
            self.conn = psycopg.connect(self.conn.info.dsn, autocommit=False)
            self.log = ChangeLog(self.conn, self.schema)

    def checkpoint(self, name: str | None = None) -> str | None:
        position = checkpoints.load_checkpoint(self.conn, self.schema, name or self.source)
        self.conn.commit()
        return position

    def close(self) -> None:
        self.conn.close()


def logical_source_name(settings: Settings) -> str:
    return f"logical:{settings.slot}"


def logical_watches(settings: Settings) -> list[LogicalWatch]:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
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


def ensure_slot(settings: Settings) -> bool:
    """Creates the replication slot when capture has never run, so changes are kept from now.

    Called right after a logical watch is added: from that moment PostgreSQL retains every
    change for pgherald even if ``pgherald run`` starts later. A slot that is missing while
    the change log holds a checkpoint is *not* recreated here: that is a gap, and the
    capture source reports it (see ``LogicalSource.prepare_slot``).
    """
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        if logical_admin.slot_info(conn, settings.slot) is not None:
            return False
        if checkpoints.load_checkpoint(conn, settings.schema, logical_source_name(settings)):
            return False
        logical_admin.create_slot(conn, settings.slot)
        return True


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
