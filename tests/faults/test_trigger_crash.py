"""Crash safety of trigger capture: SIGKILL the drainer at random moments, lose nothing.

Four writer threads run a mixed workload (inserts, updates and deletes in transactions of
one to a few statements, some large; a tenth rolled back whole; savepoints rolled back or
released) and keep a journal of what they committed: the transaction's xid and each row
change with the row's values as the server returned them (``RETURNING``). Besides its own
key range, each writer now and then updates one of a few *hot* rows that all writers
share, which makes the writers of one row queue behind each other's row lock; the value
they increment tells the commit order of a hot row's updates.

Meanwhile ``pgherald run`` (a subprocess, trigger watches only) is SIGKILLed 20 times at
random moments, mostly while it drains, sometimes while it starts, and started again.
The drainer moves queue rows into the change log with claim-and-delete in the store's
own transaction, so a kill before COMMIT leaves them queued and one after it has them in
the log. At the end:

- the log has exactly the journal's committed changes: every event id once, one event per
  change, nothing from rolled-back transactions or savepoints, the same changes per xid;
- each row's events are in commit order (the writer's own order for its rows, the
  incremented value's order for hot rows);
- replaying the log gives the tables' contents, column by column;
- the queue is empty.

Writers are paced so that the workload spans the 20 kills (and never finish before the
last one), which keeps the test near 40 s on a busy 2-core machine.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald.config import Settings
from pgherald.events import ChangeEvent
from tests import capture_harness as h
from tests.conftest import Database

pytestmark = pytest.mark.slow

TOTAL_CHANGES = 50_000
WRITERS = 4
KILLS = 20
WORKLOAD_SECONDS = 30.0
"""The pace: the writers together make ``TOTAL_CHANGES`` in about this long."""

OWN_TABLES = ("tcrash_a", "tcrash_b")
HOT = "tcrash_hot"
HOT_ROWS = 6
ROLLED_BACK_NOTE = "rolled back"
SETUP = """
CREATE TABLE tcrash_a (id bigint PRIMARY KEY, v int NOT NULL, note text);
CREATE TABLE tcrash_b (id bigint PRIMARY KEY, v int NOT NULL, note text, w int);
CREATE TABLE tcrash_hot (id int PRIMARY KEY, v bigint NOT NULL, writer int);
"""

Change = tuple[str, str, str, tuple[str, ...] | None]
"""(table, op, key, row values as texts, None for a delete)"""


def _texts(row: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in row)


@dataclass
class Journal:
    """What the writers committed, by xid, in the order each writer committed it."""

    txns: dict[int, list[Change]] = field(default_factory=dict)
    rolled_back: int = 0
    savepoints_rolled_back: int = 0
    savepoints_released: int = 0
    made: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def changes(self) -> int:
        return sum(len(c) for c in self.txns.values())

    def add(self, xid: int, changes: list[Change]) -> None:
        with self.lock:
            assert xid not in self.txns
            self.txns[xid] = changes
            self.made += len(changes)


@dataclass
class Pace:
    """How far the writers may be: ``total`` over ``seconds``, and short of the end until
    every kill happened (so that each kill lands during the workload)."""

    total: int
    seconds: float
    started: float = field(default_factory=time.monotonic)
    kills_done: threading.Event = field(default_factory=threading.Event)

    def allowed(self) -> float:
        by_time = self.total * (time.monotonic() - self.started) / self.seconds
        return by_time if self.kills_done.is_set() else min(by_time, self.total * 0.95)


class Writer(threading.Thread):
    """Random transactions on its own key range (and the shared hot rows) until it
    committed ``target`` changes."""

    def __init__(
        self, dsn: str, number: int, target: int, seed: int, journal: Journal, pace: Pace
    ) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.dsn = dsn
        self.number = number
        self.next_id = number * 10_000_000
        self.target = target
        self.rng = random.Random(seed)
        self.journal = journal
        self.pace = pace
        self.live: dict[str, set[int]] = {t: set() for t in OWN_TABLES}
        self.made = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self._run(conn)
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self, conn: psycopg.Connection[Any]) -> None:
        number = 0
        while self.made < self.target:
            while self.journal.made > self.pace.allowed() or self._held_back():
                time.sleep(0.01)
            number += 1
            roll_back = self.rng.random() < 0.1
            big = number % 40 == 0
            changes: list[Change] = []
            live = {t: set(s) for t, s in self.live.items()}
            next_id = self.next_id
            note = ROLLED_BACK_NOTE if roll_back else None
            conn.execute("BEGIN")
            row = conn.execute("SELECT txid_current()").fetchone()
            assert row is not None
            xid = int(row[0])
            for _ in range(1 if big else self.rng.randint(1, 3)):
                next_id = self._statement(conn, big, live, changes, next_id, note)
            if not big and self.rng.random() < 0.3:
                # A savepoint, then one more statement, kept or rolled back.
                undo = self.rng.random() < 0.5
                saved_live = {t: set(s) for t, s in live.items()}
                saved_changes = len(changes)
                conn.execute("SAVEPOINT s")
                after = self._statement(
                    conn, False, live, changes, next_id, ROLLED_BACK_NOTE if undo else note
                )
                # next_id moves on either way: a rolled-back insert's id is never used
                # again, so a leaked event could not hide behind a later real one.
                next_id = after
                if undo:
                    conn.execute("ROLLBACK TO SAVEPOINT s")
                    live = saved_live
                    del changes[saved_changes:]
                    self.journal.savepoints_rolled_back += 1
                else:
                    conn.execute("RELEASE SAVEPOINT s")
                    self.journal.savepoints_released += 1
            if self.rng.random() < 0.2:
                hot = self.rng.randrange(HOT_ROWS)
                rows = conn.execute(
                    sql.SQL(
                        "UPDATE {} SET v = v + 1, writer = %s WHERE id = %s RETURNING id, v, writer"
                    ).format(sql.Identifier(HOT)),
                    (self.number, hot),
                ).fetchall()
                changes.extend((HOT, "update", str(r[0]), _texts(r)) for r in rows)
            if roll_back:
                conn.execute("ROLLBACK")
                self.journal.rolled_back += 1
                self.next_id = next_id
                continue
            conn.execute("COMMIT")
            self.journal.add(xid, changes)
            self.live = live
            self.next_id = next_id
            self.made += len(changes)

    def _held_back(self) -> bool:
        """Short of its own target until every kill happened: at the total's cap, a big
        transaction of each writer could otherwise end the workload before the last kill
        (a slow restart on a busy machine gives them the time to get there)."""
        return not self.pace.kills_done.is_set() and self.made >= self.target * 0.9

    def _statement(
        self,
        conn: psycopg.Connection[Any],
        big: bool,
        live: dict[str, set[int]],
        changes: list[Change],
        next_id: int,
        note: str | None,
    ) -> int:
        table = self.rng.choice(OWN_TABLES)
        ident = sql.Identifier(table)
        keys = live[table]
        kind = (
            "insert" if big or len(keys) < 50 else self.rng.choice(("insert", "update", "delete"))
        )
        if kind == "insert":
            n = self.rng.randint(800, 1500) if big else self.rng.randint(1, 25)
            rows = conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, v, note)"
                    " SELECT g, g %% 97, CASE WHEN g %% 7 = 0 THEN NULL"
                    " ELSE coalesce(%s, md5(g::text)) END"
                    " FROM generate_series(%s::bigint, %s::bigint) g RETURNING *"
                ).format(ident),
                (note, next_id, next_id + n - 1),
            ).fetchall()
            next_id += n
            for r in rows:
                keys.add(int(r[0]))
                changes.append((table, "insert", str(r[0]), _texts(r)))
        elif kind == "update":
            chosen = self.rng.sample(sorted(keys), min(len(keys), self.rng.randint(1, 20)))
            rows = conn.execute(
                sql.SQL("UPDATE {} SET v = v + 1, note = %s WHERE id = ANY(%s) RETURNING *").format(
                    ident
                ),
                (note or f"u{self.rng.randrange(10**6)}", chosen),
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


# -- the drainer process ---------------------------------------------------------------------


def server_now(dsn: str) -> datetime:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def wait_draining(proc: h.CaptureProcess, since: datetime, timeout: float = 30.0) -> None:
    """Returns once a drainer started after ``since`` holds the queue's leader lock (the
    one pgherald takes before it drains; the killed one's backend may still hold it for a
    moment)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(proc.settings.dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"pgherald run exited early:\n{proc.log()[-3000:]}")
            row = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted"
                " AND a.application_name = 'pgherald-trigger' AND a.backend_start >= %s",
                (since,),
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.02)
    raise AssertionError(
        f"pgherald run did not start draining in {timeout:g}s; the database's sessions:\n"
        f"{h.sessions(proc.settings)}\n-- its log:\n{proc.log()[-3000:]}"
    )


def drain_in_progress(conn: psycopg.Connection[Any]) -> bool:
    """Whether the store connection is inside a transaction (claiming or storing a batch)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgherald-store'"
        " AND datname = current_database() AND xact_start IS NOT NULL"
    ).fetchone()
    return bool(row and row[0])


# -- the comparison --------------------------------------------------------------------------


def _change_of(e: ChangeEvent) -> Change:
    key = str(e.key["id"])
    if e.op == "delete":
        return (e.table, "delete", key, None)
    assert e.new is not None
    return (e.table, e.op, key, tuple("" if t is None else str(t) for t in e.new.texts))


def assert_log_equals_journal(events: list[ChangeEvent], journal: Journal) -> None:
    """Same transactions with the same changes, each once; each row's in commit order."""
    ids = Counter(e.event_id for e in events)
    twice = [i for i, n in ids.items() if n > 1]
    assert not twice, f"{len(twice)} event ids stored more than once: {twice[:5]}"
    assert {e.method for e in events} <= {"trigger"}
    leaked = [e.event_id for e in events if e.new is not None and ROLLED_BACK_NOTE in e.new.texts]
    assert not leaked, f"changes of rolled-back work in the log: {leaked[:5]}"

    stored: dict[int, list[Change]] = defaultdict(list)
    for e in events:
        assert e.xid is not None
        stored[e.xid].append(_change_of(e))
    extra = sorted(set(stored) - set(journal.txns))
    missing = sorted(set(journal.txns) - set(stored))
    assert not extra, f"{len(extra)} transactions in the log that did not commit: {extra[:5]}"
    assert not missing, f"{len(missing)} committed transactions missing: {missing[:5]}"
    for xid, changes in journal.txns.items():
        assert Counter(stored[xid]) == Counter(changes), f"transaction {xid} differs"
    assert len(events) == journal.changes, (len(events), journal.changes)

    # Each row's history, in commit order: a writer's own rows in the order it committed
    # them (the journal keeps it), a hot row in the order of the value its writers
    # incremented (a rolled-back increment is undone, so committed ones count 1, 2, 3 ...).
    expected: dict[tuple[str, str], list[Change]] = defaultdict(list)
    for changes in journal.txns.values():
        for c in changes:
            expected[(c[0], c[2])].append(c)
    for (table, key), history in expected.items():
        if table == HOT:
            assert history[0][3] is not None
            history.sort(key=lambda c: int(c[3][1]) if c[3] is not None else -1)
            values = [int(c[3][1]) for c in history if c[3] is not None]
            assert values == list(range(values[0], values[0] + len(values))), (key, values)
    got: dict[tuple[str, str], list[Change]] = defaultdict(list)
    for e in events:
        c = _change_of(e)
        got[(c[0], c[2])].append(c)
    for row, history in expected.items():
        assert got[row] == history, f"{row}: the log's history differs from the commits"


def assert_comparison_can_fail(events: list[ChangeEvent], journal: Journal, rng: Any) -> None:
    """The comparison rejects a log with one event lost, one stored twice, or two events
    of one row swapped (so a pass above means something)."""
    lost = list(events)
    del lost[rng.randrange(len(lost))]
    twice = list(events)
    twice.insert(rng.randrange(len(twice)), twice[rng.randrange(len(twice))])
    hot: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        if e.table == HOT and e.op == "update":
            hot[str(e.key["id"])].append(i)
    positions = rng.choice([p for p in hot.values() if len(p) >= 2])
    first, second = positions[0], positions[1]
    swapped = list(events)
    swapped[first], swapped[second] = swapped[second], swapped[first]
    for broken in (lost, twice, swapped):
        with pytest.raises(AssertionError):
            assert_log_equals_journal(broken, journal)


def queue_depth(settings: Settings) -> int:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(settings.schema, "trigger_queue")
            )
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_sigkill_of_the_drainer_at_random_moments_loses_and_duplicates_nothing(
    db_primary: Database,
) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    dsn = db_primary.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP.encode())
    tables = [f"public.{t}" for t in (*OWN_TABLES, HOT)]
    settings = h.install(dsn, tables, settings=h.settings_for(dsn, method="trigger"), slot=False)
    journal = Journal()
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        row = conn.execute("SELECT txid_current()").fetchone()
        assert row is not None
        rows = conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, v) SELECT g, 0 FROM generate_series(0, %s) g"
                " RETURNING id, v, writer"
            ).format(sql.Identifier(HOT)),
            (HOT_ROWS - 1,),
        ).fetchall()
        journal.add(int(row[0]), [(HOT, "insert", str(r[0]), _texts(r)) for r in rows])

    pace = Pace(TOTAL_CHANGES, WORKLOAD_SECONDS)
    writers = [
        Writer(dsn, n, TOTAL_CHANGES // WRITERS, seed * 100 + n, journal, pace)
        for n in range(WRITERS)
    ]
    proc = h.CaptureProcess(settings)
    kills = during_start = mid_drain = 0
    events: list[ChangeEvent] = []
    try:
        for w in writers:
            w.start()
        with psycopg.connect(dsn, autocommit=True) as watcher:
            while kills < KILLS:
                since = server_now(dsn)
                proc.start()
                if rng.random() < 0.2:
                    time.sleep(rng.uniform(0.0, 0.6))  # somewhere in its start-up
                    during_start += 1
                else:
                    wait_draining(proc, since)
                    time.sleep(rng.uniform(0.05, 2.0))
                    mid_drain += drain_in_progress(watcher)
                proc.kill()
                kills += 1
                assert any(w.is_alive() for w in writers), "the workload ended before a kill"
        pace.kills_done.set()
        killed_at = time.monotonic()
        for w in writers:
            w.join(max(1.0, 120 - (time.monotonic() - started)))
            assert not w.is_alive(), "the workload did not finish in time"
            if w.error is not None:
                raise w.error
        workload_done = time.monotonic()
        assert journal.changes >= TOTAL_CHANGES
        since = server_now(dsn)
        proc.start()
        # In two steps, so that a failure says which: the last drainer never took the
        # queue's lock, or it took it and stored nothing.
        wait_draining(proc, since, timeout=60)
        h.catch_up(
            settings,
            timeout=60,
            alive=lambda: None if proc.alive() else proc.log(),
            log=proc.log,
        )
        caught_up = time.monotonic()
        assert proc.stop() == 0, proc.log()[-3000:]
        assert queue_depth(settings) == 0, "the queue is not empty"
        events = h.stored_events(settings)
        assert_log_equals_journal(events, journal)
        for table in (*OWN_TABLES, HOT):
            h.assert_replay_matches(dsn, events, "public", table, ["id"])
        assert_comparison_can_fail(events, journal, rng)
    finally:
        pace.kills_done.set()
        for w in writers:
            w.target = 0  # let a writer still running end
        proc.close()
    print(
        f"\ntrigger sigkill (seed {seed}): {len(events)} events in {len(journal.txns)}"
        f" transactions ({journal.rolled_back} rolled back, savepoints"
        f" {journal.savepoints_rolled_back} rolled back / {journal.savepoints_released}"
        f" released), {kills} kills ({during_start} in start-up, {mid_drain} of"
        f" {kills - during_start} with a store transaction open), {proc.starts} starts;"
        f" kills done {killed_at - started:.1f}s, workload {workload_done - started:.1f}s,"
        f" caught up {caught_up - workload_done:.1f}s later, {time.monotonic() - started:.1f}s"
        " in all"
    )
