"""Slot safety on real servers: warning, critical, and each policy's effect.

The thresholds are tiny (kB), so a few hundred kB of WAL written into a table nobody
watches, while capture is stopped or blocked, puts the slot over them. Capture runs
in-process (``LogicalSource`` with the change log behind it), as ``pgherald run`` runs
it; the slot is checked every 0.2 s. Policies are proved by their effect on the change
log: ``alert`` goes on capturing, ``pause-and-alert`` stops and loses nothing, and
``drop-and-resync`` records a gap and reads the table again, so that replaying the log
(a ``gap`` empties what a reader knew of the table, the ``read`` events refill it)
gives exactly the table, and later changes are captured once.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgherald import admin
from pgherald.app import ChangeLogSink, logical_source_name, logical_watches
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.events import ChangeEvent
from pgherald.sources.logical import LogicalSettings, LogicalSource, parse_lsn
from pgherald.sources.slot_safety import Policy, SlotThresholds
from pgherald.store.changelog import ChangeLog
from tests import capture_harness as h
from tests.conftest import Database

WARN = 64 << 10
CRITICAL = 256 << 10
POLICY = 1 << 20
TIMEOUT = 60.0


def wait_for(what: Callable[[], Any], message: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")


def install(db: Database) -> Settings:
    """The store, a watched table ``t`` (rows 1..5), an unwatched ``pad``, and the slot."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
    db.execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 5) g")
    db.execute("CREATE TABLE pad (filler text)")
    settings = h.settings_for(db.dsn, method="logical")
    admin.init(settings)
    admin.add_watch(settings, "public.t")
    h.ensure_slot(settings)
    return settings


class Running:
    """A logical source capturing in a thread of its own, into the change log."""

    def __init__(
        self, db: Database, settings: Settings, policy: Policy, resync: bool, big: bool
    ) -> None:
        sizes = (1 << 30, 2 << 30, 4 << 30) if big else (WARN, CRITICAL, POLICY)
        self.source = LogicalSource(
            LogicalSettings(
                dsn=db.dsn,
                slot=settings.slot,
                max_batch_delay=0.02,
                heartbeat_interval=0.2,
                slot_check_interval=0.2,
                snapshot_chunk_size=2,
                resync=resync,
                thresholds=SlotThresholds(*sizes, policy),
            ),
            logical_watches(settings),
        )
        self.sink = ChangeLogSink(db.dsn, settings.schema, logical_source_name(settings))
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.source.run(self.sink, self.stop)
        except BaseException as e:  # reported by the test
            self.error = e

    def alive(self) -> bool:
        """False while capture runs (for ``run.alive() or ...``); raises what ended it."""
        assert self.error is None, repr(self.error)
        assert self.thread.is_alive(), "capture ended"
        return False


@contextmanager
def capturing(
    db: Database,
    settings: Settings,
    policy: Policy = "alert",
    resync: bool = False,
    big: bool = False,
) -> Iterator[Running]:
    """Capture with the small thresholds, or (``big``) with thresholds of GBs."""
    run = Running(db, settings, policy, resync, big)
    run.thread.start()
    try:
        yield run
    finally:
        run.stop.set()
        run.thread.join(30)
        run.sink.close()
        h.wait_released(settings)
    assert not run.thread.is_alive(), "capture did not stop"


def slot_row(db: Database, slot: str) -> tuple[Any, ...] | None:
    rows = db.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8,"
        " confirmed_flush_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return rows[0] if rows else None


def pad_wal(db: Database, slot: str, at_least: int) -> None:
    """Writes WAL into the unwatched table until the slot holds back ``at_least`` bytes."""
    with db.connect() as conn:
        for _ in range(2000):
            row = slot_row(db, slot)
            assert row is not None
            if row[0] is not None and int(str(row[0])) >= at_least:
                return
            conn.execute("INSERT INTO pad SELECT repeat('x', 1000) FROM generate_series(1, 40)")
    raise AssertionError("the slot did not grow")


def pad_until_policy(db: Database, run: Running) -> None:
    """Writes WAL while capture runs but cannot confirm, until its monitor sees the policy
    level: the server may still move the slot's restart_lsn up to the last confirmed
    position meanwhile, so the retained size is measured again, not assumed."""
    slot = run.source.settings.slot
    deadline = time.monotonic() + TIMEOUT
    while run.source.slot_level != "policy":
        assert time.monotonic() < deadline, "the slot did not reach the policy threshold"
        row = slot_row(db, slot)
        assert row is not None
        pad_wal(db, slot, max(POLICY, int(str(row[0]))) + (64 << 10))
        time.sleep(0.5)


def events(db: Database) -> list[ChangeEvent]:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        return [s.event for s in ChangeLog(conn, "pgherald").read(watch="t", limit=10_000)]


def keys(db: Database, op: str) -> list[str]:
    return [str(e.key.get("id")) for e in events(db) if e.op == op]


def errors(db: Database) -> list[tuple[Any, ...]]:
    return db.execute("SELECT message, detail FROM pgherald.errors ORDER BY id")


def records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and text in r.getMessage() and r.name.startswith("pgherald")
    ]


def replay(log: list[ChangeEvent]) -> dict[str, str]:
    """The table as a reader of the log knows it; a gap empties it (its rows follow)."""
    state: dict[str, str] = {}
    for e in log:
        key = str(e.key.get("id"))
        if e.op in ("read", "insert", "update"):
            assert e.new is not None
            state[key] = str(e.new.text("v"))
        elif e.op == "delete":
            state.pop(key, None)
        elif e.op in ("truncate", "gap"):
            state.clear()
    return state


def truth(db: Database) -> dict[str, str]:
    return {str(i): str(v) for i, v in db.execute("SELECT id, v FROM t")}


def capture_once(db: Database, settings: Settings) -> None:
    """Capture runs until the table's rows are stored, then stops: the log has a checkpoint."""
    with capturing(db, settings) as run:
        db.execute("UPDATE t SET v = v || '.' WHERE id = 1")
        wait_for(lambda: run.alive() or keys(db, "update"), "the first change")


def test_warning_then_critical_then_alert_policy(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgherald")
    settings = install(db)
    capture_once(db, settings)

    pad_wal(db, settings.slot, WARN + (16 << 10))
    with capturing(db, settings) as run:
        wait_for(
            lambda: run.alive() or records(caplog, logging.WARNING, "over the warning threshold"),
            "a warning",
        )
        assert run.source.slot_health is not None
    assert errors(db) == [], "a warning is only logged"
    warning = records(caplog, logging.WARNING, "over the warning threshold")[0]
    assert settings.slot in warning and "holds back" in warning and "kB of WAL" in warning

    pad_wal(db, settings.slot, CRITICAL + (16 << 10))
    with capturing(db, settings) as run:
        wait_for(lambda: run.alive() or errors(db), "the critical report")
    critical = records(caplog, logging.ERROR, "over the critical threshold")
    assert critical and critical[0].startswith("CRITICAL: ")
    assert [d["level"] for _, d in errors(db)] == ["critical"]

    pad_wal(db, settings.slot, POLICY + (16 << 10))
    caplog.clear()
    with capturing(db, settings, "alert") as run:
        wait_for(lambda: run.alive() or len(errors(db)) == 2, "the policy report")
        # Policy alert only tells: capture goes on.
        db.execute("INSERT INTO t VALUES (100, 'after the alert')")
        wait_for(lambda: run.alive() or "100" in keys(db, "insert"), "capture to go on")
        assert run.source.paused is None
    message, detail = errors(db)[-1]
    assert detail["level"] == "policy" and detail["policy"] == "alert"
    assert "over the policy threshold of 1 MB" in message and "policy alert" in message
    assert slot_row(db, settings.slot) is not None
    assert [e.op for e in events(db)].count("gap") == 0


def test_pause_and_alert_keeps_the_slot_and_loses_nothing(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgherald")
    settings = install(db)
    capture_once(db, settings)
    db.execute("INSERT INTO t VALUES (6, 'made while capture was stopped')")
    pad_wal(db, settings.slot, POLICY + (16 << 10))

    with capturing(db, settings, "pause-and-alert") as run:
        wait_for(lambda: run.alive() or run.source.paused, "the pause")
        time.sleep(1.0)  # paused means paused: nothing is captured meanwhile
        run.alive()
        assert not run.source.connected.is_set()
        assert "6" not in keys(db, "insert")
        assert slot_row(db, settings.slot) is not None, "the slot is kept"
    paused = records(caplog, logging.ERROR, "policy pause-and-alert")
    assert paused and "--resync" in paused[0] and "policy_retained_wal" in paused[0]
    assert any(d.get("action") == "paused" for _, d in errors(db))

    # The operator lets capture catch up (policy alert for a while): nothing was lost.
    with capturing(db, settings, "alert") as run:
        wait_for(lambda: run.alive() or "6" in keys(db, "insert"), "the kept change")
    assert [e.op for e in events(db)].count("gap") == 0
    assert replay(events(db))["6"] == "made while capture was stopped"


def test_the_monitor_reports_while_the_store_is_blocked_and_the_pause_follows(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgherald")
    settings = install(db)
    capture_once(db, settings)
    with capturing(db, settings, "pause-and-alert") as run:
        wait_for(lambda: run.alive() or run.source.connected.is_set(), "capture")
        with db.connect(autocommit=False) as blocker:
            blocker.execute("LOCK TABLE pgherald.events IN EXCLUSIVE MODE")
            db.execute("INSERT INTO t VALUES (7, 'stored once the store lets go')")
            # Capture is stuck on the store, the monitor is not: it reports.
            pad_until_policy(db, run)
            wait_for(
                lambda: records(caplog, logging.ERROR, "over the policy threshold"),
                "the report while blocked",
            )
            assert run.source.paused is None, "the policy waits for capture to get control"
            blocker.rollback()
        wait_for(lambda: run.alive() or run.source.paused, "the pause")
        # What was committed before the pause is stored, once.
        assert keys(db, "insert") == ["7"]


def test_drop_and_resync_records_the_gap_and_leaves_no_silent_hole(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgherald")
    settings = install(db)
    capture_once(db, settings)
    stored_before = events(db)
    last_stored = max(e.commit_time for e in stored_before if e.commit_time is not None)

    # While capture is stopped: changes, then more WAL than the policy allows.
    lsn0, t0 = db.execute("SELECT pg_current_wal_lsn()::text, clock_timestamp()")[0]
    assert isinstance(t0, datetime)
    db.execute("UPDATE t SET v = 'changed in the gap' WHERE id = 2")
    db.execute("DELETE FROM t WHERE id = 3")
    db.execute("INSERT INTO t VALUES (6, 'added in the gap')")
    pad_wal(db, settings.slot, POLICY + (16 << 10))
    lsn1, t1 = db.execute("SELECT pg_current_wal_lsn()::text, clock_timestamp()")[0]
    assert isinstance(t1, datetime)
    old_confirmed = slot_row(db, settings.slot)

    with capturing(db, settings, "drop-and-resync") as run:
        wait_for(
            lambda: (
                run.alive()
                or db.execute(
                    "SELECT 1 FROM pgherald.checkpoints WHERE source = 'snapshot:t'"
                    " AND position = 'done'"
                )
            ),
            "the table read again",
        )
        # Capture goes on from the new slot.
        db.execute("INSERT INTO t VALUES (7, 'after')")
        db.execute("UPDATE t SET v = 'after too' WHERE id = 1")
        wait_for(lambda: run.alive() or "7" in keys(db, "insert"), "the later changes")
        wait_for(lambda: keys(db, "update").count("1") == 2, "the later update")
        assert run.source.connected.is_set()

    log = events(db)
    assert log[: len(stored_before)] == stored_before, "what was stored stays"
    gaps = [e for e in log if e.op == "gap"]
    assert len(gaps) == 1
    gap = gaps[0]
    meta = gap.meta
    # The uncertain range starts at the last stored change at the latest, before the
    # changes made in the gap, and ends at the new slot's consistent point, after them.
    start, end = datetime.fromisoformat(meta["from_time"]), datetime.fromisoformat(meta["to_time"])
    assert last_stored <= start <= t0 and end >= t1
    assert parse_lsn(meta["from_lsn"]) <= parse_lsn(str(lsn0)) < parse_lsn(str(lsn1))
    assert parse_lsn(meta["to_lsn"]) >= parse_lsn(str(lsn1))
    assert old_confirmed is not None and parse_lsn(meta["from_lsn"]) >= parse_lsn(
        str(old_confirmed[1])
    )
    assert "policy drop-and-resync" in meta["reason"] and meta["resnapshot"] is True
    assert str(t0.year) in meta["uncertain"] and meta["to_lsn"] in meta["uncertain"]
    assert gap.position == meta["to_lsn"]
    # The rows changed in the gap are in the fresh snapshot, after the gap event.
    after = log[log.index(gap) + 1 :]
    reads = {str(e.key["id"]): e for e in after if e.op == "read"}
    assert sorted(reads) == ["1", "2", "4", "5", "6"]
    assert reads["2"].new is not None and reads["2"].new.text("v") == "changed in the gap"
    # Replaying the log gives the table; later changes are there exactly once.
    assert replay(log) == truth(db)
    assert [k for k in keys(db, "insert") if k == "7"] == ["7"]
    assert len([e for e in after if e.op == "update" and e.key["id"] == "1"]) == 1
    # The new slot starts where the gap ends, and people were told.
    new_slot = slot_row(db, settings.slot)
    assert new_slot is not None and parse_lsn(str(new_slot[1])) >= parse_lsn(meta["to_lsn"])
    assert any("recreated" in m for m, _ in errors(db))
    assert records(caplog, logging.ERROR, "dropping replication slot")


def test_drop_and_resync_while_running(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """The policy reached while capture runs (blocked by its store, then let go)."""
    caplog.set_level(logging.INFO, logger="pgherald")
    settings = install(db)
    capture_once(db, settings)
    with capturing(db, settings, "drop-and-resync") as run:
        wait_for(lambda: run.alive() or run.source.connected.is_set(), "capture")
        with db.connect(autocommit=False) as blocker:
            blocker.execute("LOCK TABLE pgherald.events IN EXCLUSIVE MODE")
            db.execute("INSERT INTO t VALUES (8, 'committed before the policy')")
            db.execute("DELETE FROM t WHERE id = 4")
            pad_until_policy(db, run)
            blocker.rollback()
        wait_for(lambda: run.alive() or [e for e in events(db) if e.op == "gap"], "the gap event")
        wait_for(
            lambda: (
                run.alive()
                or db.execute(
                    "SELECT 1 FROM pgherald.checkpoints WHERE source = 'snapshot:t'"
                    " AND position = 'done'"
                )
            ),
            "the table read again",
        )
        db.execute("INSERT INTO t VALUES (9, 'after')")
        wait_for(lambda: run.alive() or "9" in keys(db, "insert"), "capture to go on")
    log = events(db)
    assert [e.op for e in log].count("gap") == 1
    assert replay(log) == truth(db)
    assert keys(db, "insert").count("9") == 1


# -- an invalidated slot (max_slot_wal_keep_size), with `pgherald run` as operators run it ------


def run_to_the_end(settings: Settings, config: Path) -> tuple[int, str, str]:
    """``pgherald run`` with a configuration file, until it exits: (status, the one
    ``pgherald:`` error line, the whole log)."""
    proc = h.CaptureProcess(settings, env={"PGHERALD_CONFIG": str(config)}).start()
    try:
        try:
            code = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"pgherald run kept going:\n{proc.log()[-3000:]}") from None
        text = proc.log()
        lines = [line for line in text.splitlines() if line.startswith("pgherald: ")]
        assert len(lines) == 1, f"expected one error line, got:\n{text[-3000:]}"
        assert "Traceback" not in text, text[-3000:]
        return code, lines[0], text
    finally:
        proc.close()


def invalidate(db: Database, slot: str) -> None:
    """Writes and switches WAL segments and checkpoints until the server invalidates the
    slot for holding more than max_slot_wal_keep_size."""
    with db.connect() as conn:
        for _ in range(30):
            row = slot_row(db, slot)
            assert row is not None
            if row[2] == "lost":
                return
            conn.execute("INSERT INTO pad SELECT repeat('x', 1000) FROM generate_series(1, 500)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
    raise AssertionError("the slot was not invalidated")


def test_an_invalidated_slot_is_reported_and_resynced_by_policy(
    private_cluster: EmbeddedCluster, tmp_path: Path
) -> None:
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE DATABASE app")
    db = Database(private_cluster, "app")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
    db.execute("CREATE TABLE pad (filler text)")
    settings = h.install(db.dsn, ["public.t"], settings=h.settings_for(db.dsn, method="logical"))
    with h.capturing(settings) as capture:
        db.execute("INSERT INTO t VALUES (1, 'stored')")
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    db.execute("INSERT INTO t VALUES (2, 'made before the slot was lost')")
    invalidate(db, settings.slot)

    alert = tmp_path / "alert.toml"
    alert.write_text('[slot_safety]\npolicy = "alert"\n')
    code, line, text = run_to_the_end(settings, alert)
    assert code == 1
    assert "was invalidated by PostgreSQL" in line and "wal_status = lost" in line, line
    assert "`pgherald run --resync`" in line and settings.slot in line, line
    # The server's limit was reported at start, against the thresholds it makes useless.
    assert "max_slot_wal_keep_size is 1 MB" in text and "warn_retained_wal (1 GB)" in text
    assert h.stored_events(settings)[-1].op == "insert", "nothing recorded, nothing recreated"

    resync = tmp_path / "resync.toml"
    resync.write_text('[slot_safety]\npolicy = "drop-and-resync"\n')
    proc = h.CaptureProcess(settings, env={"PGHERALD_CONFIG": str(resync)}).start()
    try:
        proc.wait_ready()
        wait_for(
            lambda: (
                db.execute(
                    "SELECT 1 FROM pgherald.checkpoints WHERE source = 'snapshot:t'"
                    " AND position = 'done'"
                )
                or not proc.alive()
            ),
            "the table read again",
        )
        db.execute("INSERT INTO t VALUES (3, 'after')")
        h.catch_up(settings, alive=lambda: None if proc.alive() else proc.log()[-3000:])
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
        proc.close()
    found = [(e.op, e.key.get("id")) for e in h.stored_events(settings, watch="t")]
    assert found == [
        ("insert", "1"),
        ("gap", None),
        ("read", "1"),
        ("read", "2"),  # made before the slot was lost: not silently gone
        ("insert", "3"),
    ]
    gap = h.stored_events(settings, watch="t")[1]
    assert "invalidated" in gap.meta["reason"] and "drop-and-resync" in gap.meta["reason"]
    row = slot_row(db, settings.slot)
    assert row is not None and row[2] != "lost"


def test_a_slot_invalidated_while_capture_runs_is_resynced(
    private_cluster: EmbeddedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Capture is connected but cannot store (its store is locked) when the server
    invalidates the slot under it: the session ends, and the next one finds the slot lost
    and repairs it by policy, with the rows changed meanwhile read again."""
    caplog.set_level(logging.INFO, logger="pgherald")
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("CREATE DATABASE app")
    db = Database(private_cluster, "app")
    settings = install(db)
    capture_once(db, settings)
    # Thresholds of GBs: the server's 1 MB limit strikes first.
    with capturing(db, settings, "drop-and-resync", big=True) as run:
        wait_for(lambda: run.alive() or run.source.connected.is_set(), "capture")
        with db.connect(autocommit=False) as blocker:
            blocker.execute("LOCK TABLE pgherald.events IN EXCLUSIVE MODE")
            db.execute("UPDATE t SET v = 'changed while the slot was lost' WHERE id = 5")
            db.execute("DELETE FROM t WHERE id = 4")
            invalidate(db, settings.slot)
            blocker.rollback()
        wait_for(
            lambda: (
                run.alive()
                or db.execute(
                    "SELECT 1 FROM pgherald.checkpoints WHERE source = 'snapshot:t'"
                    " AND position = 'done'"
                )
            ),
            "the table read again",
        )
        db.execute("INSERT INTO t VALUES (9, 'after')")
        wait_for(lambda: run.alive() or "9" in keys(db, "insert"), "capture to go on")
    log = events(db)
    gaps = [e for e in log if e.op == "gap"]
    assert len(gaps) == 1 and "was invalidated by PostgreSQL" in gaps[0].meta["reason"]
    assert replay(log) == truth(db)
    assert keys(db, "insert").count("9") == 1
    assert records(caplog, logging.ERROR, "was invalidated by PostgreSQL")
