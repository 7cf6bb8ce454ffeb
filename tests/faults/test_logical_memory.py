"""Bounded memory: a one-million-row transaction streams through ``pgherald run``.

The transaction is never held whole in pgherald's memory: it is written to the change
log in batches inside one store transaction. The proof is the process's peak resident
set (``VmHWM``, read from /proc while it still runs) after all 1,000,000 events are in
the log.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgherald.store.changelog import ChangeLog
from tests import capture_harness as h
from tests.conftest import Database

pytestmark = pytest.mark.slow

ROWS = 1_000_000
LIMIT_MB = 250


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_million_row_transaction_streams_through_with_bounded_memory(
    db_primary: Database,
) -> None:
    started = time.monotonic()
    db_primary.execute("CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL)")
    settings = h.install(db_primary.dsn, ["public.big"])
    proc = h.CaptureProcess(settings)
    try:
        proc.start()
        proc.wait_ready()
        idle_mb = peak_rss_mb(proc.pid)
        with db_primary.connect() as conn, conn.transaction():
            xid_row = conn.execute("SELECT txid_current()").fetchone()
            conn.execute(
                "INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, %s) g",
                (ROWS,),
            )
        assert xid_row is not None
        inserted = time.monotonic()
        h.catch_up(
            settings, timeout=400, alive=lambda: None if proc.alive() else proc.log(), log=proc.log
        )
        stored_at = time.monotonic()
        peak_mb = peak_rss_mb(proc.pid)
        assert proc.stop() == 0, proc.log()[-3000:]
    finally:
        proc.close()

    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), count(DISTINCT event_id), count(DISTINCT row_key),"
                " count(DISTINCT xid), min(xid) FROM {}.events WHERE watch = 'big'"
            ).format(sql.Identifier(settings.schema))
        ).fetchone()
        assert row is not None
        total, ids, keys, xids, xid = row
        assert (total, ids, keys, xids) == (ROWS, ROWS, ROWS, 1)
        assert xid == int(str(xid_row[0])) & 0xFFFFFFFF
        changelog = ChangeLog(conn, settings.schema)
        first = changelog.read(watch="big", limit=3)
        assert [s.event.key["id"] for s in first] == ["1", "2", "3"]
        assert first[0].event.new is not None
        expected = conn.execute("SELECT repeat(md5('1'), 3)").fetchone()
        assert expected is not None
        assert first[0].event.new.text("payload") == expected[0]
    print(
        f"\nmillion-row transaction: {ROWS} events stored {stored_at - inserted:.1f}s after the"
        f" commit ({ROWS / max(stored_at - inserted, 1e-9):,.0f} rows/s); pgherald peak RSS"
        f" {peak_mb:.0f} MB (idle {idle_mb:.0f} MB, limit {LIMIT_MB} MB);"
        f" {time.monotonic() - started:.1f}s in all"
    )
    assert peak_mb < LIMIT_MB, f"peak RSS {peak_mb:.0f} MB"
