"""Failover: two ``pgherald run`` instances on one change log, the leader SIGKILLed mid-workload.

Each capturing part (logical capture of the slot, trigger capture, listen capture, the
snapshot scheduler) is led by the instance that holds its advisory lock
(``pgherald.leadership``); the other stands by and tries every second. These tests run two
real daemons (``pgherald run`` subprocesses) against one database:

- **SIGKILL of the leader.** Four writer threads commit thousands of small transactions on
  two logically captured tables and two trigger-captured ones (inserts, updates, deletes,
  a few hot rows all writers update, a tenth rolled back). While the first instance leads,
  the second must stand by: the locks are held by the first one's process, and the second
  says whom it waits for and starts no source. The leader is then SIGKILLed in the middle
  of the workload; the standby must be storing changes again within 10 seconds (measured
  from the kill to the first event it stores, per method). When the workload is done the
  change log is compared with the truth, a ``test_decoding`` slot made before the
  workload: for the logical tables every change, row by row, in commit order, each once;
  for the trigger tables every change once, each row's changes in commit order (trigger
  capture orders by row, not across rows), and nothing from a rolled-back transaction.
- **Clean stop, and listen and snapshot roles.** A listen watch and a snapshot watch run
  beside a trigger watch; while the first instance leads, notifications are stored once
  (a standby that listened too would store each twice) and only the leader's process
  holds the locks. SIGTERM hands every role to the second instance, which then stores
  notifications and runs the snapshot watch.
- **Delivery in both instances.** Both deliver to a webhook receiver run by the test; every
  event is received exactly once, and both instances' connections posted some of them.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
import psycopg
import pytest
from psycopg import sql

from pgherald import admin, app, routing_admin
from pgherald.config import Settings
from pgherald.db.sqlfiles import named_query
from pgherald.events import ChangeEvent
from pgherald.leadership import Holder, lock_key
from pgherald.schedule import Schedule
from tests import capture_harness as h
from tests.conftest import Database

pytestmark = pytest.mark.slow

LOGICAL = ("fo_log_a", "fo_log_b")
TRIGGER = ("fo_trg_a", "fo_trg_b")
FULL = {"fo_log_b"}
HOT_ROWS = 4
WRITERS = 4
TAKEOVER_LIMIT = 10.0
SETUP = """
CREATE TABLE fo_log_a (id bigint PRIMARY KEY, v int NOT NULL, note text);
CREATE TABLE fo_log_b (id bigint PRIMARY KEY, v int NOT NULL, note text);
ALTER TABLE fo_log_b REPLICA IDENTITY FULL;
CREATE TABLE fo_trg_a (id bigint PRIMARY KEY, v int NOT NULL, note text);
CREATE TABLE fo_trg_b (id bigint PRIMARY KEY, v int NOT NULL, note text);
"""


# -- who leads ---------------------------------------------------------------------------------


def roles(settings: Settings) -> dict[str, str]:
    """The leadership roles of these settings, by a short name (see ``app.Capture``)."""
    return {
        "logical": f"logical:{settings.slot}",
        "trigger": f"trigger:{settings.schema}",
        "listen": f"listen:{settings.schema}",
        "snapshots": "snapshots",
    }


def lock_holders(conn: psycopg.Connection[Any], settings: Settings) -> dict[str, int | None]:
    """The process id of the pgherald instance holding each role's lock (None: nobody)."""
    out: dict[str, int | None] = {}
    for short, role in roles(settings).items():
        key = lock_key(settings.schema, role)
        row = conn.execute(
            named_query("leadership.sql", "holder"),
            {"high": (key >> 32) & 0xFFFFFFFF, "low": key & 0xFFFFFFFF},
        ).fetchone()
        out[short] = Holder.from_row(row).pid if row else None
    return out


def wait_until(what: Callable[[], bool], seconds: float, message: Callable[[], str]) -> float:
    """Polls ``what``; the seconds it took."""
    started = time.monotonic()
    while not what():
        if time.monotonic() - started > seconds:
            raise AssertionError(message())
        time.sleep(0.02)
    return time.monotonic() - started


def lead_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\b(leading|waiting to lead)\b", line)]


# -- the workload ------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Small transactions on the four tables until ``stop``: inserts of its own rows, updates
    and deletes of them, and updates of the hot rows every writer shares (one per table and
    transaction, tables in a fixed order, so writers queue behind each other's row locks
    without deadlocks). A tenth roll back. ``committed`` counts the changes committed per
    table, by the rows the statements returned."""

    def __init__(self, dsn: str, number: int, seed: int, stop: threading.Event) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.stop = stop
        self.next_id = (number + 1) * 10_000_000
        self.live: dict[str, list[int]] = {t: [] for t in LOGICAL + TRIGGER}
        self.committed: Counter[str] = Counter()
        self.transactions = 0
        self.rolled_back = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    self._transaction(conn)
                    time.sleep(self.rng.uniform(0.0, 0.004))
        except BaseException as e:  # reported by the test
            self.error = e

    def _transaction(self, conn: psycopg.Connection[Any]) -> None:
        roll = self.rng.random()
        if roll < 0.45:
            tables = [self.rng.choice(LOGICAL)]
        elif roll < 0.9:
            tables = [self.rng.choice(TRIGGER)]
        else:
            tables = sorted({self.rng.choice(LOGICAL), self.rng.choice(TRIGGER)})
        live = {t: list(ids) for t, ids in self.live.items()}
        made: Counter[str] = Counter()
        next_id = self.next_id
        roll_back = self.rng.random() < 0.1
        try:
            with conn.transaction(force_rollback=roll_back):
                for table in tables:
                    next_id = self._statements(conn, table, live[table], made, next_id)
        except psycopg.errors.DeadlockDetected:
            return
        if roll_back:
            self.rolled_back += 1
            return
        self.live, self.next_id = live, next_id
        self.committed.update(made)
        self.transactions += 1

    def _statements(
        self,
        conn: psycopg.Connection[Any],
        table: str,
        live: list[int],
        made: Counter[str],
        next_id: int,
    ) -> int:
        ident = sql.Identifier(table)
        if self.rng.random() < 0.3:
            hot = self.rng.randint(1, HOT_ROWS)
            rows = conn.execute(
                sql.SQL("UPDATE {} SET v = v + 1, note = %s WHERE id = %s RETURNING id").format(
                    ident
                ),
                (f"h{self.rng.randrange(10**6)}", hot),
            ).fetchall()
            made[table] += len(rows)
        n = self.rng.randint(1, 6)
        rows = conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, v, note) SELECT g, g %% 97,"
                " CASE WHEN g %% 5 = 0 THEN NULL ELSE md5(g::text) END"
                " FROM generate_series(%s::bigint, %s::bigint) g RETURNING id"
            ).format(ident),
            (next_id, next_id + n - 1),
        ).fetchall()
        next_id += n
        live.extend(int(r[0]) for r in rows)
        made[table] += len(rows)
        if len(live) > 20 and self.rng.random() < 0.5:
            chosen = self.rng.sample(live, self.rng.randint(1, 4))
            rows = conn.execute(
                sql.SQL(
                    "UPDATE {} SET v = v + 1, note = %s WHERE id = ANY(%s) RETURNING id"
                ).format(ident),
                (f"u{self.rng.randrange(10**6)}", chosen),
            ).fetchall()
            made[table] += len(rows)
        if len(live) > 20 and self.rng.random() < 0.3:
            victim = live.pop(self.rng.randrange(len(live)))
            rows = conn.execute(
                sql.SQL("DELETE FROM {} WHERE id = %s RETURNING id").format(ident), (victim,)
            ).fetchall()
            made[table] += len(rows)
        return next_id


@dataclass
class Workload:
    writers: list[Writer]
    stop: threading.Event

    @property
    def transactions(self) -> int:
        return sum(w.transactions for w in self.writers)

    def problem(self) -> str | None:
        for w in self.writers:
            if w.error is not None:
                return f"{w.name} failed: {w.error!r}"
        return None

    def finish(self) -> Counter[str]:
        self.stop.set()
        for w in self.writers:
            w.join(60)
            assert not w.is_alive(), f"{w.name} did not stop"
        assert self.problem() is None, self.problem()
        total: Counter[str] = Counter({t: HOT_ROWS for t in LOGICAL + TRIGGER})
        for w in self.writers:
            total.update(w.committed)
        return total


def start_workload(dsn: str, seed: int) -> Workload:
    with psycopg.connect(dsn, autocommit=True) as conn:  # the hot rows, captured too
        for table in LOGICAL + TRIGGER:
            conn.execute(
                sql.SQL("INSERT INTO {} SELECT g, 0, 'hot' FROM generate_series(1, %s) g").format(
                    sql.Identifier(table)
                ),
                (HOT_ROWS,),
            )
    stop = threading.Event()
    writers = [Writer(dsn, n, seed * 100 + n, stop) for n in range(WRITERS)]
    for w in writers:
        w.start()
    return Workload(writers, stop)


# -- the log and the truth ---------------------------------------------------------------------


def install(db: Database) -> Settings:
    db.execute(SETUP)
    settings = h.install(
        db.dsn, [f"public.{t}" for t in LOGICAL], settings=h.settings_for(db.dsn, method="logical")
    )
    for table in TRIGGER:
        admin.add_watch(settings, f"public.{table}", method="trigger")
    return settings


def newest_ids(conn: psycopg.Connection[Any], settings: Settings) -> dict[str, int]:
    """The newest log id of each capture method."""
    rows = conn.execute(
        sql.SQL("SELECT method, max(id) FROM {} GROUP BY method").format(
            sql.Identifier(settings.schema, "events")
        )
    ).fetchall()
    return {str(m): int(i) for m, i in rows}


def queued(conn: psycopg.Connection[Any], settings: Settings) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(settings.schema, "trigger_queue"))
    ).fetchone()
    return int(row[0]) if row else 0


RowKey = tuple[str, str]
RowChange = tuple[int, str, tuple[tuple[str, str | None], ...] | None]
"""(xid, op, new row texts) of one change of one row."""


def _texts(values: dict[str, Any] | None) -> tuple[tuple[str, str | None], ...] | None:
    return None if values is None else tuple(sorted(values.items()))


def truth_per_row(txns: list[h.TruthTxn]) -> dict[RowKey, list[RowChange]]:
    """Each trigger-captured row's committed changes, in commit order."""
    out: dict[RowKey, list[RowChange]] = defaultdict(list)
    for txn in txns:
        for ch in txn.changes:
            if ch.schema != "public" or ch.table not in TRIGGER:
                continue
            image = ch.new if ch.new is not None else ch.old
            assert image is not None, ch
            new = _texts(ch.new) if ch.op != "delete" else None
            out[(ch.table, str(image["id"]))].append((txn.xid, ch.op, new))
    return out


def stored_per_row(events: list[ChangeEvent]) -> dict[RowKey, list[RowChange]]:
    out: dict[RowKey, list[RowChange]] = defaultdict(list)
    for e in events:
        assert e.xid is not None
        new = _texts(dict(h.texts(e.new) or {})) if e.op != "delete" else None
        out[(e.table, str(e.key["id"]))].append((e.xid & 0xFFFFFFFF, e.op, new))
    return out


def assert_log_matches_truth(settings: Settings, truth_slot: str, committed: Counter[str]) -> int:
    """The comparison of the module docstring; returns the number of changes compared."""
    txns = h.truth(settings.dsn, truth_slot)
    events = h.stored_events(settings)
    assert len({e.event_id for e in events}) == len(events), "an event is stored twice"
    truth_counts = Counter(
        ch.table
        for t in txns
        for ch in t.changes
        if ch.schema == "public" and ch.table in LOGICAL + TRIGGER
    )
    assert truth_counts == committed, (
        f"test_decoding and the writers disagree: {truth_counts} vs {committed}"
    )
    logical = [e for e in events if e.table in LOGICAL and e.op != "schema"]
    watched = {("public", t): h.Watched(t, ("id",), full=t in FULL) for t in LOGICAL}
    h.assert_same_steps(h.stored_steps(logical), h.expected_steps(txns, watched))
    triggered = [e for e in events if e.table in TRIGGER and e.op != "schema"]
    assert {e.method for e in triggered} == {"trigger"}
    want, got = truth_per_row(txns), stored_per_row(triggered)
    missing = [k for k in want if want[k] != got.get(k)]
    extra = [k for k in got if k not in want]
    assert not missing and not extra, (
        f"trigger rows that differ from the truth: {missing[:3]}"
        f" (first: stored {got.get(missing[0]) if missing else None},"
        f" truth {want[missing[0]] if missing else None}); rows the truth lacks: {extra[:3]}"
    )
    return len(logical) + len(triggered)


# -- the tests ---------------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[Callable[..., h.CaptureProcess]]:
    """Makes ``pgherald run`` subprocesses, killed at the end whatever happened."""
    made: list[h.CaptureProcess] = []

    def make(settings: Settings, *args: str) -> h.CaptureProcess:
        proc = h.CaptureProcess(settings, *args)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.close()


def test_sigkill_of_the_leader_mid_workload_loses_and_duplicates_nothing(
    db_primary: Database, pair: Callable[..., h.CaptureProcess]
) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    settings = install(db_primary)
    truth_slot = f"truth_{db_primary.name}"[:63]
    assert h.create_truth_slot(settings.dsn, truth_slot), "test_decoding is missing"
    first, second = pair(settings), pair(settings)
    first.start()
    first.wait_ready(timeout=60)
    with psycopg.connect(settings.dsn, autocommit=True) as watcher:

        def leads() -> dict[str, int | None]:
            return lock_holders(watcher, settings)

        wait_until(
            lambda: leads()["logical"] == first.pid and leads()["trigger"] == first.pid,
            30,
            lambda: f"the first instance does not lead: {leads()}\n{first.log()[-2000:]}",
        )
        second.start()
        wait_until(
            lambda: len(re.findall(r"waiting to lead", second.log())) >= 2,
            30,
            lambda: f"the second instance does not stand by:\n{second.log()[-2000:]}",
        )
        workload = start_workload(settings.dsn, seed)
        try:
            # The standby stands by while the leader lives, whatever the load.
            deadline = time.monotonic() + 6.0
            samples = 0
            while time.monotonic() < deadline:
                held = leads()
                assert held["logical"] == held["trigger"] == first.pid, (
                    f"{held}\n{first.log()[-3000:]}"
                )
                assert second.alive(), second.log()[-3000:]
                assert workload.problem() is None, workload.problem()
                samples += 1
                time.sleep(0.1)
            standby_log = second.log()
            assert f"(held by pid {first.pid} on host" in standby_log, standby_log[-2000:]
            for said in ("capturing from slot", "trigger capture: draining", "leading "):
                assert said not in standby_log, f"the standby captured:\n{standby_log[-3000:]}"
            before = newest_ids(watcher, settings)
            assert before.get("logical") and before.get("trigger"), before

            # SIGKILL the leader in the middle of the workload.
            transactions_at_kill = workload.transactions
            first.kill()
            killed = time.monotonic()
            # Capture resumed = the first event stored after the standby said it leads (an
            # event stored just after the kill may be the dead leader's last COMMIT, which
            # the server finishes after the client is gone).
            leading_line = {
                "logical": f"leading logical capture (slot {settings.slot})",
                "trigger": "leading trigger capture",
            }
            at_lead: dict[str, int] = {}
            led: dict[str, float] = {}
            takeover: dict[str, float] = {}
            while len(takeover) < 2:
                standby_log, now = second.log(), newest_ids(watcher, settings)
                for method in ("logical", "trigger"):
                    if method not in at_lead and leading_line[method] in standby_log:
                        at_lead[method] = now.get(method, 0)
                        led[method] = time.monotonic() - killed
                    elif (
                        method in at_lead
                        and method not in takeover
                        and now.get(method, 0) > at_lead[method]
                    ):
                        takeover[method] = time.monotonic() - killed
                elapsed = time.monotonic() - killed
                assert elapsed < 30, f"no takeover after {elapsed:.0f}s:\n{second.log()[-3000:]}"
                assert second.alive(), second.log()[-3000:]
                time.sleep(0.02)
            held = leads()
            assert held["logical"] == held["trigger"] == second.pid, held
            time.sleep(4.0)  # the workload goes on under the new leader
        finally:
            committed = workload.finish()
        workload_done = time.monotonic()
        h.catch_up(settings, timeout=120, alive=lambda: None if second.alive() else second.log())
        wait_until(
            lambda: queued(watcher, settings) == 0,
            60,
            lambda: f"the trigger queue is not drained: {queued(watcher, settings)} left",
        )
    assert second.stop() == 0, second.log()[-3000:]
    compared = assert_log_matches_truth(settings, truth_slot, committed)
    for method, seconds in takeover.items():
        assert seconds < TAKEOVER_LIMIT, f"{method} capture took {seconds:.1f}s to resume"
    print(
        f"\nfailover (seed {seed}): {workload.transactions} transactions"
        f" ({sum(w.rolled_back for w in workload.writers)} rolled back),"
        f" {transactions_at_kill} before the kill; {compared} changes compared with the truth;"
        f" {samples} samples of the standby standing by; the standby led"
        f" {led['logical']:.2f}s (logical) and {led['trigger']:.2f}s (trigger) after the"
        f" SIGKILL and stored its first events {takeover['logical']:.2f}s and"
        f" {takeover['trigger']:.2f}s after it; caught up"
        f" {time.monotonic() - workload_done:.1f}s after the workload;"
        f" {time.monotonic() - started:.1f}s in all\nthe standby said:\n"
        + "\n".join(lead_lines(second.log()))
    )


def test_a_standby_never_captures_and_a_clean_stop_hands_over(
    db_primary: Database, pair: Callable[..., h.CaptureProcess]
) -> None:
    db_primary.execute(
        "CREATE TABLE fo_rows (id int PRIMARY KEY, v int NOT NULL);"
        " INSERT INTO fo_rows SELECT g, 0 FROM generate_series(1, 10) g"
    )
    settings = h.install(
        db_primary.dsn,
        ["public.fo_rows"],
        settings=h.settings_for(db_primary.dsn, method="trigger"),
        slot=False,
    )
    admin.add_listen_watch(settings, "bells", ["bells"])
    admin.add_snapshot_watch(
        settings,
        "fo_snap",
        query="SELECT id, v FROM fo_rows",
        key=["id"],
        schedule=Schedule.parse(every="1s"),
    )
    first, second = pair(settings), pair(settings)
    all_roles = ("trigger", "listen", "snapshots")
    with psycopg.connect(settings.dsn, autocommit=True) as conn:

        def leads() -> dict[str, int | None]:
            return lock_holders(conn, settings)

        def notify(payloads: range) -> None:
            for n in payloads:
                conn.execute("SELECT pg_notify('bells', %s)", (str(n),))

        def messages() -> list[str]:
            """The payloads stored, probes left out."""
            payloads = [
                str((h.texts(e.new) or {}).get("payload"))
                for e in h.stored_events(settings)
                if e.op == "message"
            ]
            return sorted(p for p in payloads if not p.startswith("probe"))

        def listening(tag: str) -> None:
            """Until a probe is stored: NOTIFY is at most once, so what is sent before the
            leader's LISTEN is lost by design, not by failover."""

            def stored() -> bool:
                conn.execute("SELECT pg_notify('bells', %s)", (f"probe-{tag}",))
                time.sleep(0.1)
                return any(
                    e.op == "message" and (h.texts(e.new) or {}).get("payload") == f"probe-{tag}"
                    for e in h.stored_events(settings)
                )

            wait_until(stored, 30, lambda: f"no listener stores notifications ({tag})")

        def runs() -> int:
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE watch = 'fo_snap'").format(
                    sql.Identifier(settings.schema, "runs")
                )
            ).fetchone()
            return int(row[0]) if row else 0

        first.start()
        wait_until(
            lambda: all(leads()[r] == first.pid for r in all_roles),
            30,
            lambda: f"the first instance does not lead: {leads()}\n{first.log()[-2000:]}",
        )
        second.start()
        wait_until(
            lambda: len(re.findall(r"waiting to lead", second.log())) >= len(all_roles),
            30,
            lambda: f"the second instance does not stand by:\n{second.log()[-2000:]}",
        )
        listening("first")
        notify(range(0, 50))
        wait_until(
            lambda: len(messages()) >= 50, 30, lambda: f"{len(messages())} of 50 notifications"
        )
        time.sleep(1.0)  # a standby that listened too would store them twice by now
        assert messages() == sorted(str(n) for n in range(50)), "each notification once"
        assert all(leads()[r] == first.pid for r in all_roles), leads()
        standby_log = second.log()
        for said in ("trigger capture: draining", "snapshot fo_snap", "leading "):
            assert said not in standby_log, f"the standby captured:\n{standby_log[-3000:]}"

        # A clean stop gives every role back at once.
        assert first.stop() == 0, first.log()[-3000:]
        stopped = time.monotonic()
        handover = wait_until(
            lambda: all(leads()[r] == second.pid for r in all_roles),
            TAKEOVER_LIMIT,
            lambda: f"no handover: {leads()}\n{second.log()[-3000:]}",
        )
        runs_then = runs()
        listening("second")
        notify(range(50, 60))
        conn.execute("UPDATE fo_rows SET v = v + 1 WHERE id = 1")
        wait_until(
            lambda: len(messages()) >= 60 and runs() > runs_then,
            30,
            lambda: f"{len(messages())} of 60 notifications, {runs()} runs\n{second.log()[-2000:]}",
        )
        h.catch_up(settings, alive=lambda: None if second.alive() else second.log())
        assert messages() == sorted(str(n) for n in range(60))
        for title in ("trigger capture", "listen capture", "the snapshot scheduler"):
            assert f"leading {title}" in second.log(), second.log()[-3000:]
    assert second.stop() == 0, second.log()[-3000:]
    print(
        f"\nclean handover: every role led by the standby {handover:.2f}s after the leader"
        f" stopped ({time.monotonic() - stopped:.1f}s until it stored and ran what came"
        " after)\nthe standby said:\n" + "\n".join(lead_lines(second.log()))
    )


def test_a_leader_that_loses_its_lock_connection_stops_capturing(
    db_primary: Database, pair: Callable[..., h.CaptureProcess]
) -> None:
    """The leader's lock connection is terminated by the server (as an administrator's
    ``pg_terminate_backend`` or an ``idle_session_timeout`` would): the leader says it lost
    the lead and stops both sources at once, one instance leads each role again within
    seconds, and what is written meanwhile and afterwards is captured once."""
    settings = install(db_primary)
    first, second = pair(settings), pair(settings)
    first.start()
    first.wait_ready(timeout=60)
    with psycopg.connect(settings.dsn, autocommit=True) as conn:

        def leads() -> dict[str, int | None]:
            return lock_holders(conn, settings)

        wait_until(
            lambda: leads()["logical"] == leads()["trigger"] == first.pid,
            30,
            lambda: f"the first instance does not lead: {leads()}",
        )
        second.start()
        wait_until(
            lambda: len(re.findall(r"waiting to lead", second.log())) >= 2,
            30,
            lambda: f"the second instance does not stand by:\n{second.log()[-2000:]}",
        )
        for table in ("fo_log_a", "fo_trg_a"):
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (1, 1, 'before')").format(sql.Identifier(table))
            )
        row = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"pgherald-lead {first.pid}@{socket.gethostname()}"[:63],),
        ).fetchone()
        assert row is not None and row[0], "the leader's lock connection was not found"
        fenced = wait_until(
            lambda: all(
                f"lost the lead of {title}" in first.log()
                for title in (f"logical capture (slot {settings.slot})", "trigger capture")
            ),
            10,
            lambda: f"the leader did not notice:\n{first.log()[-3000:]}",
        )
        for table in ("fo_log_a", "fo_trg_a"):
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (2, 2, 'after')").format(sql.Identifier(table))
            )
        again = wait_until(
            lambda: None not in (leads()["logical"], leads()["trigger"]),
            TAKEOVER_LIMIT,
            lambda: f"nobody leads: {leads()}\n{first.log()[-2000:]}\n{second.log()[-2000:]}",
        )
        h.catch_up(settings, alive=lambda: None if first.alive() and second.alive() else "died")
        wait_until(
            lambda: queued(conn, settings) == 0, 30, lambda: "the trigger queue is not drained"
        )
        held = leads()
    assert first.alive() and second.alive()
    events = [e for e in h.stored_events(settings) if e.op != "schema"]
    assert sorted((e.table, e.key["id"]) for e in events) == [
        ("fo_log_a", "1"), ("fo_log_a", "2"), ("fo_trg_a", "1"), ("fo_trg_a", "2"),
    ]  # fmt: skip
    assert first.stop() == 0 and second.stop() == 0
    print(
        f"\nlock connection terminated: the leader stopped capturing {fenced:.2f}s later;"
        f" roles led again {again:.2f}s after that, by"
        f" {['the old leader', 'the standby'][held['logical'] == second.pid]} (logical) and"
        f" {['the old leader', 'the standby'][held['trigger'] == second.pid]} (trigger)"
    )


def test_an_in_process_capture_stands_by_while_a_daemon_leads(
    db_primary: Database, pair: Callable[..., h.CaptureProcess]
) -> None:
    """``app.Capture`` (the Python API's, the demo's) is ready at once as a standby, and
    takes over when the daemon stops."""
    db_primary.execute("CREATE TABLE fo_api (id int PRIMARY KEY)")
    settings = h.install(
        db_primary.dsn,
        ["public.fo_api"],
        settings=h.settings_for(db_primary.dsn, method="trigger"),
        slot=False,
    )
    daemon = pair(settings).start()
    daemon.wait_ready(timeout=60)
    capture = app.Capture(settings).start()
    try:
        started = time.monotonic()
        capture.wait_ready(timeout=20)
        ready = time.monotonic() - started
        assert capture.trigger is not None and not capture.trigger.connected.is_set()
        assert capture.leadership.status()["trigger:pgherald"].startswith(
            f"standby (held by pid {daemon.pid} on host"
        ), capture.leadership.status()
        db_primary.execute("INSERT INTO fo_api VALUES (1)")
        h.catch_up(settings, alive=lambda: None if daemon.alive() else daemon.log(), log=daemon.log)
        assert daemon.stop() == 0, daemon.log()[-3000:]
        wait_until(
            lambda: capture.trigger is not None and capture.trigger.connected.is_set(),
            TAKEOVER_LIMIT,
            lambda: f"no takeover: {capture.leadership.status()}",
        )
        db_primary.execute("INSERT INTO fo_api VALUES (2)")
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    finally:
        capture.close()
    keys = [e.key["id"] for e in h.stored_events(settings) if e.table == "fo_api"]
    assert keys == ["1", "2"]
    print(f"\nin-process capture ready as a standby in {ready:.2f}s")


# -- delivery in both instances ---------------------------------------------------------------


class Receiver:
    """An HTTP server that accepts every POST and records its idempotency key and the port
    it came from (which tells the sending process)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(
                        (self.headers.get("Idempotency-Key", ""), self.client_address[1])
                    )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def keys(self) -> list[str]:
        with self._lock:
            return [k for k, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PortOwners(threading.Thread):
    """Notes which process owns each local port connected to the receiver, every 50 ms."""

    def __init__(self, pids: list[int], port: int) -> None:
        super().__init__(name="port-owners", daemon=True)
        self.pids = pids
        self.port = port
        self.owners: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in self.pids:
                try:
                    conns = psutil.Process(pid).net_connections(kind="tcp")
                except psutil.Error:
                    continue
                for c in conns:
                    if c.raddr and c.raddr.port == self.port:
                        self.owners[c.laddr.port] = pid


def test_two_instances_share_delivery_and_never_send_twice(
    db_primary: Database, pair: Callable[..., h.CaptureProcess]
) -> None:
    events_wanted = 2000
    db_primary.execute("CREATE TABLE fo_out (id int PRIMARY KEY, v int NOT NULL)")
    settings = h.install(
        db_primary.dsn,
        ["public.fo_out"],
        settings=h.settings_for(db_primary.dsn, method="trigger"),
        slot=False,
    )
    receiver = Receiver()
    routing_admin.add_sink(settings, "hook", "webhook", options={"url": receiver.url})
    routing_admin.subscribe(settings, "hook", ["fo_out"])
    first, second = pair(settings), pair(settings)
    owners: PortOwners | None = None
    started = time.monotonic()
    try:
        first.start()
        first.wait_ready(timeout=60)
        second.start()
        wait_until(
            lambda: "waiting to lead" in second.log(),
            30,
            lambda: f"the second instance does not stand by:\n{second.log()[-2000:]}",
        )
        owners = PortOwners([first.pid, second.pid], receiver.port)
        owners.start()
        both = time.monotonic()
        with psycopg.connect(settings.dsn, autocommit=True) as conn:
            made = 0
            while made < events_wanted:  # small transactions, so the work comes in a stream
                conn.execute(
                    "INSERT INTO fo_out SELECT g, 0 FROM generate_series(%s::int, %s::int) g",
                    (made + 1, made + 10),
                )
                made += 10
                time.sleep(0.002)
            written = time.monotonic()
            h.catch_up(settings, alive=lambda: None if first.alive() else first.log())
            captured = time.monotonic()
            delivered = captured + wait_until(
                lambda: len(receiver.keys()) >= events_wanted,
                120,
                lambda: f"{len(receiver.keys())} of {events_wanted} received",
            )
            time.sleep(1.0)  # a second copy of anything would have come by now
            logged = {
                str(r[0])
                for r in conn.execute(
                    sql.SQL("SELECT event_id FROM {} WHERE watch = 'fo_out'").format(
                        sql.Identifier(settings.schema, "events")
                    )
                )
            }
            statuses: dict[str, int] = dict(
                conn.execute(
                    sql.SQL("SELECT status, count(*) FROM {} GROUP BY status").format(
                        sql.Identifier(settings.schema, "deliveries")
                    )
                ).fetchall()
            )
    finally:
        if owners is not None:
            owners.stop.set()
            owners.join(5)
        receiver.close()
    keys = Counter(receiver.keys())
    twice = [k for k, n in keys.items() if n > 1]
    assert not twice, f"{len(twice)} events sent more than once: {twice[:5]}"
    assert set(keys) == logged and len(logged) == events_wanted
    assert statuses == {"delivered": events_wanted}, statuses
    assert owners is not None
    by_process = Counter(owners.owners.get(port) for _, port in receiver.requests)
    assert by_process[first.pid] > 0 and by_process[second.pid] > 0, (
        f"one instance did all the work: {by_process}"
    )
    assert first.stop() == 0 and second.stop() == 0
    print(
        f"\ntwo instances delivering: {len(keys)} events, each received once; posted by"
        f" the leader {by_process[first.pid]}, by the standby {by_process[second.pid]},"
        f" unattributed {by_process[None]}; both running {both - started:.1f}s after the start,"
        f" stream written in {written - both:.1f}s, captured {captured - written:.1f}s and all"
        f" delivered {delivered - written:.1f}s after that"
    )
