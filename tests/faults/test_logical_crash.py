"""Crash safety of logical capture: kill pgherald, restart PostgreSQL, lose nothing.

A mixed workload (inserts, updates, deletes; multi-row transactions, some rolled back)
runs in several writer threads, each on its own key range, and keeps a journal of what
it committed: the transaction's xid and each row change with the row's values as the
server returned them (``RETURNING``). Meanwhile ``pgherald run`` (a subprocess, as
operators run it) is SIGKILLed at random moments and started again, or the server
itself is restarted under it. At the end the change log must equal the journal: every
committed transaction present with exactly its changes, none twice, none from a
rolled-back transaction.

When the server dies under a writer in the middle of COMMIT, the writer cannot know
whether the transaction committed: each transaction also writes a marker row of its own
(in a table nobody watches), and the writer looks for it once the server is back. Not
``txid_status``: after a crash, the xid of a transaction that was lost is handed out
again, and the status then tells of another transaction.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald.db.embedded import EmbeddedCluster
from pgherald.events import ChangeEvent
from pgherald.sources.logical import parse_lsn
from tests import capture_harness as h
from tests.conftest import Database

pytestmark = pytest.mark.slow

TABLES = ("crash_default", "crash_full")
SETUP = """
CREATE TABLE crash_default (id bigint PRIMARY KEY, v int NOT NULL, note text);
CREATE TABLE crash_full (id bigint PRIMARY KEY, v int NOT NULL, note text);
ALTER TABLE crash_full REPLICA IDENTITY FULL;
CREATE TABLE crash_marker (token text PRIMARY KEY);
"""

Change = tuple[str, str, str, tuple[str, ...] | None]
"""(table, op, key, new values as texts or None for a delete)"""


@dataclass
class Journal:
    """What the writers committed, by xid (32 bits, as the replication stream has it)."""

    txns: dict[int, list[Change]] = field(default_factory=dict)
    rolled_back: int = 0
    in_doubt_committed: int = 0
    in_doubt_xids: set[int] = field(default_factory=set)
    in_doubt_aborted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def changes(self) -> int:
        return sum(len(c) for c in self.txns.values())

    def add(self, xid: int, changes: list[Change]) -> None:
        with self.lock:
            assert xid not in self.txns
            self.txns[xid] = changes


def _texts(row: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in row)


class Writer(threading.Thread):
    """One writer: random transactions on its own key range until it made ``target`` changes."""

    def __init__(
        self, dsn: str, number: int, target: int, seed: int, journal: Journal, big_every: int
    ) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.dsn = dsn
        self.base = number * 10_000_000
        self.next_id = self.base
        self.target = target
        self.rng = random.Random(seed)
        self.journal = journal
        self.big_every = big_every
        self.live: dict[str, set[int]] = {t: set() for t in TABLES}
        self.made = 0
        self.error: BaseException | None = None
        self.reconnects = 0

    def connect(self, deadline: float) -> psycopg.Connection[Any]:
        while True:
            try:
                return psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self) -> None:
        conn = self.connect(time.monotonic() + 60)
        number = 0
        while self.made < self.target:
            number += 1
            roll_back = self.rng.random() < 0.1
            big = number % self.big_every == 0
            xid: int | None = None
            changes: list[Change] = []
            live = {t: set(s) for t, s in self.live.items()}
            next_id = self.next_id
            try:
                conn.execute("BEGIN")
                row = conn.execute("SELECT txid_current()").fetchone()
                assert row is not None
                xid = int(row[0])
                for _ in range(1 if big else self.rng.randint(1, 4)):
                    next_id = self._statement(conn, big, live, changes, next_id)
                token = f"{self.name}/{number}"
                conn.execute("INSERT INTO crash_marker VALUES (%s)", (token,))
                if roll_back:
                    conn.execute("ROLLBACK")
                    self.journal.rolled_back += 1
                    continue
                conn.execute("COMMIT")
                committed = True
            except psycopg.OperationalError:
                # The server went away; did the transaction commit? Ask it once it is back.
                self.reconnects += 1
                conn.close()
                conn = self.connect(time.monotonic() + 60)
                committed = False
                if xid is not None and not roll_back:
                    marker = conn.execute(
                        "SELECT 1 FROM crash_marker WHERE token = %s", (f"{self.name}/{number}",)
                    ).fetchone()
                    committed = marker is not None
                    if committed:
                        self.journal.in_doubt_committed += 1
                        self.journal.in_doubt_xids.add(xid & 0xFFFFFFFF)
                    else:
                        self.journal.in_doubt_aborted += 1
                if not committed:
                    continue
            if committed and changes:
                assert xid is not None
                self.journal.add(xid & 0xFFFFFFFF, changes)
                self.live = live
                self.next_id = next_id
                self.made += len(changes)
        conn.close()

    def _statement(
        self,
        conn: psycopg.Connection[Any],
        big: bool,
        live: dict[str, set[int]],
        changes: list[Change],
        next_id: int,
    ) -> int:
        table = self.rng.choice(TABLES)
        ident = sql.Identifier(table)
        keys = live[table]
        kind = (
            "insert" if big or len(keys) < 50 else self.rng.choice(("insert", "update", "delete"))
        )
        if kind == "insert":
            n = 2000 if big else self.rng.randint(1, 30)
            rows = conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, v, note)"
                    " SELECT g, g %% 97, CASE WHEN g %% 7 = 0 THEN NULL ELSE md5(g::text) END"
                    " FROM generate_series(%s::bigint, %s::bigint) g RETURNING id, v, note"
                ).format(ident),
                (next_id, next_id + n - 1),
            ).fetchall()
            next_id += n
            for r in rows:
                keys.add(int(r[0]))
                changes.append((table, "insert", str(r[0]), _texts(r)))
        elif kind == "update":
            chosen = self.rng.sample(sorted(keys), min(len(keys), self.rng.randint(1, 20)))
            rows = conn.execute(
                sql.SQL(
                    "UPDATE {} SET v = v + 1, note = %s WHERE id = ANY(%s) RETURNING id, v, note"
                ).format(ident),
                (f"u{self.rng.randrange(10**6)}", chosen),
            ).fetchall()
            changes.extend((table, "update", str(r[0]), _texts(r)) for r in rows)
        else:
            chosen = self.rng.sample(sorted(keys), min(len(keys), self.rng.randint(1, 10)))
            rows = conn.execute(
                sql.SQL("DELETE FROM {} WHERE id = ANY(%s) RETURNING id").format(ident),
                (chosen,),
            ).fetchall()
            for r in rows:
                keys.discard(int(r[0]))
                changes.append((table, "delete", str(r[0]), None))
        return next_id


def run_writers(dsn: str, total: int, threads: int, seed: int, journal: Journal) -> list[Writer]:
    writers = [
        Writer(dsn, n, total // threads, seed * 100 + n, journal, big_every=97)
        for n in range(threads)
    ]
    for w in writers:
        w.start()
    return writers


def _change_of(e: ChangeEvent) -> Change:
    key = str(e.key["id"])
    if e.op == "delete":
        return (e.table, "delete", key, None)
    assert e.new is not None
    values = tuple("" if t is None else str(t) for t in (e.new.texts))
    return (e.table, e.op, key, values)


def assert_log_equals_journal(events: list[ChangeEvent], journal: Journal) -> None:
    """Same transactions, each with exactly its changes; none twice; in commit order."""
    assert len({e.event_id for e in events}) == len(events), "an event stored twice"
    stored: dict[int, list[Change]] = defaultdict(list)
    order: list[int] = []
    for e in events:
        assert e.xid is not None
        if not order or order[-1] != e.xid:
            assert e.xid not in stored, f"transaction {e.xid} is not contiguous in the log"
            order.append(e.xid)
        stored[e.xid].append(_change_of(e))
    positions = [parse_lsn(events[0].position)] if events else []
    for e in events[1:]:
        p = parse_lsn(e.position)
        assert p >= positions[-1], "the log is in commit order"
        positions.append(p)
    extra = sorted(set(stored) - set(journal.txns))
    missing = sorted(set(journal.txns) - set(stored))
    assert not extra, f"{len(extra)} transactions in the log that did not commit: {extra[:5]}"
    assert not missing, (
        f"{len(missing)} committed transactions missing: {missing[:5]}"
        f" (of which in doubt when the server went away: {sorted(journal.in_doubt_xids)})"
    )
    for xid, changes in journal.txns.items():
        # Rows of one statement may come in any order; each row's own history may not.
        def per_row(cs: list[Change]) -> dict[tuple[str, str], list[Change]]:
            rows: dict[tuple[str, str], list[Change]] = defaultdict(list)
            for c in cs:
                rows[(c[0], c[2])].append(c)
            return rows

        assert per_row(stored[xid]) == per_row(changes), f"transaction {xid} differs"
    assert len(events) == journal.changes


def install_crash_tables(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP.encode())
    return h.install(dsn, [f"public.{t}" for t in TABLES])


def wait_writers(writers: list[Writer], timeout: float, during: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while any(w.is_alive() for w in writers):
        during()
        assert time.monotonic() < deadline, "the workload did not finish in time"
        time.sleep(0.05)
    for w in writers:
        if w.error is not None:
            raise w.error


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(db_primary: Database) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    settings = install_crash_tables(db_primary.dsn)
    journal = Journal()
    proc = h.CaptureProcess(settings)
    kills = 0
    try:
        writers = run_writers(db_primary.dsn, 100_000, 3, seed, journal)
        # 20 kills, at random moments, while the workload runs and while capture then
        # works through its backlog.
        while kills < 20:
            proc.start()
            proc.wait_ready(timeout=60)
            time.sleep(rng.uniform(0.05, 1.5))
            proc.kill()
            kills += 1
        wait_writers(writers, 240, lambda: None)
        workload_done = time.monotonic()
        proc.start()
        h.catch_up(
            settings, timeout=180, alive=lambda: None if proc.alive() else proc.log(), log=proc.log
        )
        caught_up = time.monotonic()
        assert proc.stop() == 0, proc.log()[-3000:]
        events = h.stored_events(settings)
        assert_log_equals_journal(events, journal)
    finally:
        proc.close()
    print(
        f"\nsigkill (seed {seed}): {len(events)} events in {len(journal.txns)} transactions"
        f" ({journal.rolled_back} rolled back), {kills} kills, {proc.starts} starts;"
        f" workload {workload_done - started:.1f}s, caught up {caught_up - workload_done:.1f}s"
        f" later, {time.monotonic() - started:.1f}s in all"
    )


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restart_mid_stream_loses_and_duplicates_nothing(
    private_cluster: EmbeddedCluster, mode: str
) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    dsn = private_cluster.dsn("app")
    settings = install_crash_tables(dsn)
    has_truth = h.create_truth_slot(dsn, "truth")
    journal = Journal()
    proc = h.CaptureProcess(settings)
    restarts = 0
    try:
        proc.start()
        proc.wait_ready()
        writers = run_writers(dsn, 30_000, 2, seed, journal)
        marks = [5_000, 10_000, 15_000, 20_000, 25_000]

        def restart_when_due() -> None:
            nonlocal restarts
            made = sum(w.made for w in writers)
            if marks and made >= marks[0]:
                marks.pop(0)
                private_cluster.restart(mode)
                restarts += 1
            assert proc.alive(), f"pgherald run died:\n{proc.log()[-3000:]}"

        wait_writers(writers, 240, restart_when_due)
        assert restarts == 5
        workload_done = time.monotonic()
        h.catch_up(
            settings, timeout=120, alive=lambda: None if proc.alive() else proc.log(), log=proc.log
        )
        assert proc.stop() == 0, proc.log()[-3000:]
        events = h.stored_events(settings)
        try:
            assert_log_equals_journal(events, journal)
        except AssertionError as e:
            decoded = {t.xid for t in h.truth(dsn, "truth")} if has_truth else set()
            raise AssertionError(
                f"{e}\ntest_decoding has the in-doubt ones:"
                f" {sorted(x for x in journal.in_doubt_xids if x in decoded)}"
                f"\npgherald run said:\n{proc.log()[-4000:]}"
            ) from None
        reconnects = sum(w.reconnects for w in writers)
    finally:
        proc.close()
    print(
        f"\nrestart {mode} (seed {seed}): {len(events)} events in {len(journal.txns)}"
        f" transactions, {restarts} restarts, writers reconnected {reconnects} times"
        f" ({journal.in_doubt_committed} in-doubt commits), pgherald started {proc.starts}"
        f" time(s); workload {workload_done - started:.1f}s, {time.monotonic() - started:.1f}s"
        " in all"
    )
