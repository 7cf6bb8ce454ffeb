"""An idle watched database in a busy cluster must not pin WAL forever.

The slot moves on through keepalive positions (acknowledged once everything before them
is stored) and through pgherald's own heartbeat messages; this test proves the guarantee
with both at work.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import psycopg

from pgherald import admin
from pgherald.app import ChangeLogSink, logical_source_name, logical_watches
from pgherald.config import Settings
from pgherald.sources import logical_admin
from pgherald.sources.logical import LogicalSettings, LogicalSource, parse_lsn
from pgherald.sources.slot_safety import heartbeat_name
from pgherald.store import checkpoints
from tests.conftest import Database


def test_idle_slot_advances_while_another_database_is_busy(db: Database) -> None:
    settings = Settings(dsn=db.dsn)
    db.execute("CREATE TABLE quiet (id int PRIMARY KEY)")
    admin.init(settings)
    admin.add_watch(settings, "public.quiet")
    busy = f"{db.name}_busy"
    with psycopg.connect(db.cluster.dsn(), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(busy)))
    source = LogicalSource(
        LogicalSettings(dsn=db.dsn, heartbeat_interval=0.3, slot_check_interval=0.5),
        logical_watches(settings),
    )
    sink = ChangeLogSink(db.dsn, settings.schema, logical_source_name(settings))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        assert source.connected.wait(20)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            before = logical_admin.slot_info(conn, "pgherald")
            assert before is not None and before.confirmed_flush_lsn is not None
            with psycopg.connect(db.cluster.dsn(busy), autocommit=True) as other:
                other.execute("CREATE TABLE churn (n int)")
                for _ in range(20):
                    other.execute("INSERT INTO churn SELECT generate_series(1, 2000)")
                target = other.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert target is not None
            deadline = time.monotonic() + 20
            after: logical_admin.SlotInfo | None = before
            while time.monotonic() < deadline:
                after = logical_admin.slot_info(conn, "pgherald")
                assert after is not None and after.confirmed_flush_lsn is not None
                if parse_lsn(after.confirmed_flush_lsn) >= parse_lsn(str(target[0])):
                    break
                time.sleep(0.2)
            assert after is not None and after.confirmed_flush_lsn is not None
            assert parse_lsn(after.confirmed_flush_lsn) >= parse_lsn(str(target[0]))
        assert source.slot_status is not None and source.slot_status.name == "pgherald"
        # Nothing of the quiet table was invented along the way.
        assert db.execute("SELECT count(*) FROM pgherald.events") == [(0,)]
    finally:
        stop.set()
        thread.join(10)
        sink.close()
        with psycopg.connect(db.cluster.dsn(), autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    psycopg.sql.Identifier(busy)
                )
            )


def test_idle_watched_tables_in_a_busy_database_let_the_slot_and_checkpoint_advance(
    db: Database,
) -> None:
    """Other tables of the same database write WAL the publication does not carry (the
    server sends nothing for those transactions): heartbeats still move the slot's
    confirmed position past that WAL, and the change log's checkpoint with it, dated by
    the heartbeat, so a gap recorded later would start from there."""
    settings = Settings(dsn=db.dsn)
    db.execute("CREATE TABLE quiet (id int PRIMARY KEY)")
    db.execute("CREATE TABLE churn (n int)")
    admin.init(settings)
    admin.add_watch(settings, "public.quiet")
    source = LogicalSource(
        LogicalSettings(dsn=db.dsn, heartbeat_interval=0.3, slot_check_interval=0.5),
        logical_watches(settings),
    )
    sink = ChangeLogSink(db.dsn, settings.schema, logical_source_name(settings))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(sink, stop), daemon=True)
    thread.start()
    try:
        assert source.connected.wait(20)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            for _ in range(20):
                conn.execute("INSERT INTO churn SELECT generate_series(1, 2000)")
            row = conn.execute("SELECT pg_current_wal_lsn()::text, now()").fetchone()
            assert row is not None
            target, written = parse_lsn(str(row[0])), row[1]
            deadline = time.monotonic() + 20
            confirmed = stored = 0
            while time.monotonic() < deadline:
                info = logical_admin.slot_info(conn, "pgherald")
                assert info is not None and info.confirmed_flush_lsn is not None
                confirmed = parse_lsn(info.confirmed_flush_lsn)
                position = checkpoints.load_checkpoint(
                    conn, "pgherald", logical_source_name(settings)
                )
                stored = parse_lsn(position) if position else 0
                if confirmed >= target and stored >= target:
                    break
                time.sleep(0.2)
            assert confirmed >= target, "the slot moved past the other tables' WAL"
            assert stored >= target, "and the change log's checkpoint with it"
            beat = checkpoints.load_checkpoint(conn, "pgherald", heartbeat_name("pgherald"))
        assert beat is not None
        saved = json.loads(beat)
        assert parse_lsn(saved["lsn"]) >= target
        assert datetime.fromisoformat(saved["time"]) >= written
        assert db.execute("SELECT count(*) FROM pgherald.events") == [(0,)]
    finally:
        stop.set()
        thread.join(10)
        sink.close()
