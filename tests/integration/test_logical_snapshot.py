"""The initial snapshot is consistent with the change stream, and resumes after a stop.

Proof by reconstruction: replay the change log (read, insert, update, delete events in
log order) and compare with the table itself, while a writer changes the table during
the snapshot and capture is stopped and restarted half-way.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from pgherald import admin
from pgherald.app import ChangeLogSink, logical_source_name, logical_watches
from pgherald.config import Settings
from pgherald.sources.logical import LogicalSettings, LogicalSource
from pgherald.sources.logical_snapshot import TableSnapshot
from pgherald.store.changelog import ChangeLog
from tests.conftest import Database

ROWS = 6000


def _capture(db: Database, settings: Settings, chunk: int) -> tuple[LogicalSource, Any]:
    source = LogicalSource(
        LogicalSettings(dsn=db.dsn, snapshot_chunk_size=chunk), logical_watches(settings)
    )
    sink = ChangeLogSink(db.dsn, settings.schema, logical_source_name(settings))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    return source, (thread, stop, sink)


def _stop(handle: Any) -> None:
    thread, stop, sink = handle
    stop.set()
    thread.join(15)
    sink.close()


def _replay(db: Database) -> tuple[dict[str, tuple[Any, ...]], Counter[str]]:
    state: dict[str, tuple[Any, ...]] = {}
    reads: Counter[str] = Counter()
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        log = ChangeLog(conn, "pgherald")
        after = 0
        while batch := log.read(after_id=after, limit=5000):
            for stored in batch:
                after = stored.id
                ev = stored.event
                key = str(ev.key.get("id"))
                if ev.op in ("read", "insert", "update"):
                    assert ev.new is not None
                    state[key] = (ev.new.text("id"), ev.new.text("label"), ev.new.text("n"))
                    if ev.op == "read":
                        reads[key] += 1
                elif ev.op == "delete":
                    state.pop(key, None)
                elif ev.op == "truncate":
                    state.clear()
    return state, reads


def _truth(db: Database) -> dict[str, tuple[Any, ...]]:
    rows = db.execute("SELECT id::text, label, n::text FROM items")
    return {str(r[0]): (r[0], r[1], r[2]) for r in rows}


def _writer(db: Database, stop: threading.Event, seed: int) -> int:
    rng = random.Random(seed)
    done = 0
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        while not stop.is_set():
            k = rng.randrange(1, ROWS + 500)
            roll = rng.random()
            if roll < 0.5:
                conn.execute(
                    "UPDATE items SET n = n + 1, label = %s WHERE id = %s", (f"u{done}", k)
                )
            elif roll < 0.75:
                conn.execute("DELETE FROM items WHERE id = %s", (k,))
            else:
                conn.execute(
                    "INSERT INTO items VALUES (%s, %s, 0) ON CONFLICT (id) DO NOTHING",
                    (k, f"i{done}"),
                )
            done += 1
            time.sleep(0.001)
    return done


def test_snapshot_under_concurrent_writes_and_a_restart_matches_the_table(db: Database) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL, n int NOT NULL)")
    db.execute(f"INSERT INTO items SELECT g, 'row ' || g, 0 FROM generate_series(1, {ROWS}) g")
    settings = Settings(dsn=db.dsn)
    admin.init(settings)
    admin.add_watch(settings, "public.items")
    db.execute("UPDATE pgherald.watches SET options = '{\"snapshot\": true}'")

    writer_stop = threading.Event()
    writes: list[int] = []
    writer = threading.Thread(target=lambda: writes.append(_writer(db, writer_stop, 1)))
    writer.start()
    try:
        _, handle = _capture(db, settings, chunk=400)
        # Stop capture somewhere in the middle of the snapshot, then start it again.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = db.execute(
                "SELECT position FROM pgherald.checkpoints WHERE source = 'snapshot:items'"
            )
            if progress and progress[0][0] != "done":
                break
            time.sleep(0.05)
        _stop(handle)
        assert progress and progress[0][0] != "done", "the snapshot should be half-way"
        _, handle = _capture(db, settings, chunk=400)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            done = db.execute(
                "SELECT position FROM pgherald.checkpoints WHERE source = 'snapshot:items'"
            )
            if done and done[0][0] == "done":
                break
            time.sleep(0.1)
        assert done == [("done",)]
        time.sleep(0.5)
    finally:
        writer_stop.set()
        writer.join()
    # Let capture drain what the writer did last, then compare.
    db.execute("INSERT INTO items VALUES (-1, 'sentinel', 0)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state, reads = _replay(db)
        if "-1" in state:
            break
        time.sleep(0.2)
    _stop(handle)
    state, reads = _replay(db)
    assert writes and writes[0] > 50, "the writer should have raced the snapshot"
    assert state == _truth(db)
    assert max(reads.values()) == 1, "no row is read twice, even across the restart"
    assert len(reads) > ROWS // 2


def test_rows_changed_inside_the_chunk_window_are_not_read_stale(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes committed after a chunk was read but before its high watermark win over it."""
    db.execute("CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL, n int NOT NULL)")
    db.execute("INSERT INTO items SELECT g, 'row ' || g, 0 FROM generate_series(1, 50) g")
    settings = Settings(dsn=db.dsn)
    admin.init(settings)
    admin.add_watch(settings, "public.items")
    db.execute("UPDATE pgherald.watches SET options = '{\"snapshot\": true}'")
    original = TableSnapshot._watermark

    def racing_watermark(self: TableSnapshot, conn: psycopg.Connection[Any], mark: str) -> None:
        if mark == "high" and self.rows:
            # A writer commits right after the chunk was read: the chunk is now stale.
            first, second = self.rows[0][0], self.rows[1][0]
            db.execute("UPDATE items SET label = 'changed in window' WHERE id = %s", (first,))
            db.execute("DELETE FROM items WHERE id = %s", (second,))
        original(self, conn, mark)

    monkeypatch.setattr(TableSnapshot, "_watermark", racing_watermark)
    _, handle = _capture(db, settings, chunk=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if db.execute(
            "SELECT 1 FROM pgherald.checkpoints"
            " WHERE source = 'snapshot:items' AND position = 'done'"
        ):
            break
        time.sleep(0.1)
    db.execute("INSERT INTO items VALUES (-1, 'sentinel', 0)")
    while time.monotonic() < deadline:
        if "-1" in _replay(db)[0]:
            break
        time.sleep(0.1)
    _stop(handle)
    state, reads = _replay(db)
    raced = db.execute("SELECT count(*) FROM items WHERE label = 'changed in window'")[0][0]
    assert isinstance(raced, int) and raced >= 4
    assert state == _truth(db)
    # The raced rows are represented by their change events, not by a read.
    changed = {
        str(r[0]) for r in db.execute("SELECT id FROM items WHERE label = 'changed in window'")
    }
    assert not changed & set(reads)


def test_snapshot_values_are_the_texts_the_stream_sends(db: Database) -> None:
    """A row read by the initial snapshot and the same values streamed by an INSERT give
    the same texts: each is what the type's output function prints, as pgoutput sends it
    (a cast to text would give ``true`` for ``t``, trim char(n), add ``/32`` to an inet)."""
    db.execute("CREATE DOMAIN flag AS boolean")
    db.execute(
        """CREATE TABLE odd (
            id int PRIMARY KEY, b boolean, f flag, c char(5), ch "char", ip inet, net cidr,
            bs boolean[], ts timestamptz, n numeric, r real, iv interval, j jsonb, m money)"""
    )
    db.execute(
        """INSERT INTO odd VALUES (1, true, false, 'ab', 'x', '10.1.2.3', '10.1.0.0/16',
            '{t,f,NULL}', '2024-02-29 12:34:56.789+02', 1.50, 0.1, '1 mon 2 days 03:04:05',
            '{"b": 1, "a": [true, null]}', 12.5)"""
    )
    settings = Settings(dsn=db.dsn)
    admin.init(settings)
    admin.add_watch(settings, "public.odd")
    db.execute("UPDATE pgherald.watches SET options = '{\"snapshot\": true}'")
    _, handle = _capture(db, settings, chunk=10)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not db.execute(
            "SELECT 1 FROM pgherald.checkpoints WHERE source = 'snapshot:odd' AND position = 'done'"
        ):
            time.sleep(0.1)
        # The same values again, this time through the stream.
        db.execute(
            "INSERT INTO odd SELECT 2, b, f, c, ch, ip, net, bs, ts, n, r, iv, j, m FROM odd"
        )
        streamed = None
        while time.monotonic() < deadline and streamed is None:
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                found = ChangeLog(conn, "pgherald").read(after_id=0, limit=100)
            events = {(s.event.op, s.event.key.get("id")): s.event for s in found}
            streamed = events.get(("insert", "2"))
            time.sleep(0.1)
    finally:
        _stop(handle)
    assert streamed is not None and streamed.new is not None
    read = events[("read", "1")]
    assert read.new is not None
    columns = [c for c in streamed.new.shape.names if c != "id"]
    assert [read.new.text(c) for c in columns] == [streamed.new.text(c) for c in columns]
    texts = dict(zip(columns, (read.new.text(c) for c in columns), strict=True))
    # And those are the output functions' texts, not a cast's.
    assert texts["b"] == "t" and texts["f"] == "f"
    assert texts["c"] == "ab   " and texts["ch"] == "x"
    assert texts["ip"] == "10.1.2.3" and texts["net"] == "10.1.0.0/16"
    assert texts["bs"] == "{t,f,NULL}"
