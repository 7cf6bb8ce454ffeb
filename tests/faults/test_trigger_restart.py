"""Trigger capture across PostgreSQL restarts and terminated backends: reconnect, lose nothing.

The server is restarted (``fast``: backends told to quit; ``immediate``: a crash, with
recovery) four times under a workload from three writers (the mixed one of
``test_trigger_crash``: rollbacks, savepoints, big transactions, hot rows shared by all
writers), while one ``pgherald run`` (trigger watches only) keeps running. Every other
restart keeps the server down for 1-2.5 s, so that reconnection attempts meet a refused
connection. pgherald must notice each loss, wait for the server and go on by itself: it
is never restarted, and must be alive at the end and stop cleanly. Then the change log
must equal the writers' journal: every committed change once, nothing rolled back, each
row's changes in commit order, replaying the log gives the tables, and the queue is
empty.

A writer whose connection breaks during COMMIT cannot know whether its transaction
committed. Each transaction writes a marker row of its own (in a table nobody watches)
just before COMMIT, and the writer looks for it once the server is back; not
``txid_status``, because after a crash the xid of a lost transaction is handed out again.

The drainer's own position needs no such care: its claim-and-delete and the append to
the log commit together, so a batch whose COMMIT was cut off is either in the log and
gone from the queue, or still queued, and the next drain takes whatever is still queued.

A second, shorter test terminates the drainer's own backends (``pg_terminate_backend``)
one at a time: the LISTEN connection and the store connection, each while the drainer
idles and while it is busy. The LISTEN connection holds the leader lock, so while busy
it must be back while the changes keep coming (not only once the drainer idles).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, cast

import psycopg
import pytest
from psycopg import sql

from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.events import ChangeEvent
from tests import capture_harness as h
from tests.conftest import Database
from tests.faults.test_trigger_crash import (
    HOT,
    HOT_ROWS,
    OWN_TABLES,
    SETUP,
    Change,
    Journal,
    Pace,
    Writer,
    assert_comparison_can_fail,
    assert_log_equals_journal,
    drain_in_progress,
    queue_depth,
    server_now,
    wait_draining,
)

pytestmark = pytest.mark.slow

MARKER = "trestart_marker"
TABLES = (*OWN_TABLES, HOT)
RESTARTS = 4
TOTAL_CHANGES = 16_000
WRITERS = 3
WORKLOAD_SECONDS = 14.0
LOST_CONNECTION = "trigger capture lost its connection"
LOST_LEAD = "lost the lead of trigger capture"
"""What the leadership says when its lock connection fails first: it ends the capture's
term, so a capture that was between two drains stops without a connection error of its
own, and takes the next term once the server is back."""


def connect_when_up(dsn: str, timeout: float = 60.0) -> psycopg.Connection[Any]:
    """A connection, retried while the server is down, starting up or recovering."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class MarkedConnection:
    """The part of a connection that ``Writer`` uses (``execute``), kept across restarts.

    Before each COMMIT it writes the transaction's marker row. When the COMMIT's
    connection breaks, it waits for the server and looks for the marker: found, the
    COMMIT counts as done (the writer journals it); not found, the error goes on.
    """

    def __init__(self, dsn: str, name: str) -> None:
        self.dsn = dsn
        self.name = name
        self.conn = connect_when_up(dsn)
        self.commits = 0
        self.in_doubt_committed = 0
        self.in_doubt_aborted = 0

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = connect_when_up(self.dsn)

    def execute(self, query: Any, params: Any = None) -> psycopg.Cursor[Any]:
        if query != "COMMIT":
            return self.conn.execute(query, params)
        self.commits += 1
        token = f"{self.name}/{self.commits}"
        # An error here is no doubt: the transaction is lost, and the writer starts again.
        self.conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(ident(MARKER)), (token,))
        try:
            return self.conn.execute("COMMIT")
        except psycopg.OperationalError:
            self.reconnect()
            found = self.conn.execute(
                sql.SQL("SELECT 1 FROM {} WHERE token = %s").format(ident(MARKER)), (token,)
            ).fetchone()
            if found is None:
                self.in_doubt_aborted += 1
                raise
            self.in_doubt_committed += 1
            return self.conn.execute("SELECT 'committed after all'")

    def close(self) -> None:
        self.conn.close()


def ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


class RestartWriter(Writer):
    """``Writer``'s workload, carried on over lost connections (see ``MarkedConnection``)."""

    link: MarkedConnection | None = None
    reconnects = 0

    def run(self) -> None:
        try:
            self.link = MarkedConnection(self.dsn, self.name)
            while self.made < self.target:
                try:
                    # Writer uses nothing of a connection but execute().
                    self._run(cast("psycopg.Connection[Any]", self.link))
                except psycopg.OperationalError:
                    self.reconnects += 1
                    # Never reuse the ids of a transaction that was lost: a leaked event
                    # of it could not then hide behind a later real one.
                    self.next_id += 100_000
                    self.link.reconnect()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            if self.link is not None:
                self.link.close()


def install_tables(dsn: str) -> tuple[Settings, Journal]:
    """The workload's tables, watched by triggers, and the hot rows (in the journal)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP.encode())
        conn.execute(sql.SQL("CREATE TABLE {} (token text PRIMARY KEY)").format(ident(MARKER)))
    settings = h.install(
        dsn,
        [f"public.{t}" for t in TABLES],
        settings=h.settings_for(dsn, method="trigger"),
        slot=False,
    )
    journal = Journal()
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        row = conn.execute("SELECT txid_current()").fetchone()
        assert row is not None
        rows = conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, v) SELECT g, 0 FROM generate_series(0, %s) g"
                " RETURNING id, v, writer"
            ).format(ident(HOT)),
            (HOT_ROWS - 1,),
        ).fetchall()
        journal.add(int(row[0]), [(HOT, "insert", str(r[0]), texts(r)) for r in rows])
    return settings, journal


def assert_log_is_the_truth(
    settings: Settings, journal: Journal, rng: random.Random, said: Callable[[], str]
) -> list[ChangeEvent]:
    assert queue_depth(settings) == 0, "the queue is not empty"
    events = h.stored_events(settings)
    try:
        assert_log_equals_journal(events, journal)
        for table in TABLES:
            h.assert_replay_matches(settings.dsn, events, "public", table, ["id"])
    except AssertionError as e:
        raise AssertionError(f"{e}\npgherald run said:\n{said()[-4000:]}") from None
    assert_comparison_can_fail(events, journal, rng)
    return events


SHUTDOWN_SIGNALS = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}
"""What ``pg_ctl stop -m MODE`` sends the postmaster."""


def restart(cluster: EmbeddedCluster, mode: str, down: float) -> None:
    """Stops the server in ``mode``, keeps it down for ``down`` seconds, and starts it.

    ``cluster.restart`` starts it again at once; a real restart (an upgrade, a failover)
    takes longer, and a drainer that tries to reconnect meanwhile must keep trying.
    """
    if down <= 0:
        cluster.restart(mode)
        return
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, SHUTDOWN_SIGNALS[mode])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the postmaster did not stop ({mode}) in time")
    time.sleep(down)
    cluster.start_again()


def check_writers(writers: Sequence[Writer]) -> None:
    for w in writers:
        if w.error is not None:
            raise w.error


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgresql_restarts_under_trigger_capture_lose_and_duplicate_nothing(
    private_cluster: EmbeddedCluster, mode: str
) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    dsn = private_cluster.dsn("app")
    settings, journal = install_tables(dsn)
    pace = Pace(TOTAL_CHANGES, WORKLOAD_SECONDS)
    writers = [
        RestartWriter(dsn, n, TOTAL_CHANGES // WRITERS, seed * 100 + n, journal, pace)
        for n in range(WRITERS)
    ]
    proc = h.CaptureProcess(settings)
    restarts = mid_drain = 0
    downtime = 0.0
    reconnected_in: list[float] = []
    events: list[ChangeEvent] = []
    try:
        since = server_now(dsn)
        proc.start()
        wait_draining(proc, since)
        for w in writers:
            w.start()
        for mark in [0.15 + 0.6 * i / (RESTARTS - 1) for i in range(RESTARTS)]:
            while journal.made < TOTAL_CHANGES * mark:
                assert proc.alive(), f"pgherald run died:\n{proc.log()[-3000:]}"
                check_writers(writers)
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            since = server_now(dsn)
            with psycopg.connect(dsn, autocommit=True) as watcher:
                mid_drain += drain_in_progress(watcher)
            # Every other restart keeps the server down for a while.
            down = rng.uniform(1.0, 2.5) if restarts % 2 else 0.0
            restart(private_cluster, mode, down)
            up = time.monotonic()
            downtime += down
            restarts += 1
            # The same process, never restarted, drains again (wait_draining fails at
            # once if it exited).
            wait_draining(proc, since, timeout=20)
            reconnected_in.append(time.monotonic() - up)
            assert any(w.is_alive() for w in writers), "the workload ended before a restart"
        pace.kills_done.set()
        for w in writers:
            w.join(max(1.0, 90 - (time.monotonic() - started)))
            assert not w.is_alive(), "the workload did not finish in time"
        check_writers(writers)
        workload_done = time.monotonic()
        assert journal.changes >= TOTAL_CHANGES
        h.catch_up(
            settings, timeout=30, alive=lambda: None if proc.alive() else proc.log(), log=proc.log
        )
        caught_up = time.monotonic()
        assert proc.alive() and proc.starts == 1
        assert proc.stop() == 0, proc.log()[-3000:]
        said = proc.log()
        assert said.count(LOST_CONNECTION) + said.count(LOST_LEAD) >= restarts, said[-3000:]
        events = assert_log_is_the_truth(settings, journal, rng, lambda: said)
    finally:
        pace.kills_done.set()
        for w in writers:
            w.target = 0  # let a writer still running end
        proc.close()
    links = [w.link for w in writers if w.link is not None]
    print(
        f"\ntrigger restart {mode} (seed {seed}): {len(events)} events in {len(journal.txns)}"
        f" transactions ({journal.rolled_back} rolled back), {restarts} restarts"
        f" ({mid_drain} with a store transaction open, {downtime:.1f}s down), writers reconnected"
        f" {sum(w.reconnects for w in writers)} times (in-doubt commits:"
        f" {sum(k.in_doubt_committed for k in links)} committed,"
        f" {sum(k.in_doubt_aborted for k in links)} not), pgherald reconnected"
        f" {said.count(LOST_CONNECTION)} times and drained again at most"
        f" {max(reconnected_in):.1f}s after the server was up; workload"
        f" {workload_done - started:.1f}s, caught up {caught_up - workload_done:.1f}s later,"
        f" {time.monotonic() - started:.1f}s in all"
    )


# -- pg_terminate_backend of the drainer's own backends ---------------------------------------

LISTEN_BACKEND = "pgherald-trigger"
STORE_BACKEND = "pgherald-store"


def backend_started(conn: psycopg.Connection[Any], application: str) -> datetime | None:
    row = conn.execute(
        "SELECT max(backend_start) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (application,),
    ).fetchone()
    return None if row is None else cast("datetime | None", row[0])


def terminate(conn: psycopg.Connection[Any], application: str) -> datetime:
    """Terminates the one backend of ``application`` in this database; when, server time."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)), clock_timestamp()"
        " FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
        (application,),
    ).fetchone()
    assert row is not None and row[0] == 1, f"{application}: {row}"
    return cast(datetime, row[1])


def wait_for(what: str, check: Callable[[], bool], proc: h.CaptureProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.alive(), f"pgherald run died:\n{proc.log()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s\n{proc.log()[-3000:]}"
        time.sleep(0.02)


def armed(conn: psycopg.Connection[Any], settings: Settings) -> bool:
    """Whether the drainer armed the wake-up: it found nothing to drain for a while."""
    row = conn.execute(
        sql.SQL("SELECT armed FROM {}").format(sql.Identifier(settings.schema, "trigger_wake"))
    ).fetchone()
    return bool(row and row[0])


class Trickle(threading.Thread):
    """Small transactions without pause (insert a row, update the one before and a hot
    row), journaled, so that the drainer never finds the queue empty long enough to idle."""

    def __init__(self, dsn: str, first_id: int, journal: Journal) -> None:
        super().__init__(name="trickle", daemon=True)
        self.dsn = dsn
        self.next_id = first_id
        self.journal = journal
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        table = ident(OWN_TABLES[0])
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.done.is_set():
                    with conn.transaction():
                        row = conn.execute("SELECT txid_current()").fetchone()
                        assert row is not None
                        rows = conn.execute(
                            sql.SQL(
                                "INSERT INTO {} (id, v, note) VALUES (%s, 0, 'trickle')"
                                " RETURNING id, v, note"
                            ).format(table),
                            (self.next_id,),
                        ).fetchall()
                        changes: list[Change] = [
                            (OWN_TABLES[0], "insert", str(r[0]), texts(r)) for r in rows
                        ]
                        rows = conn.execute(
                            sql.SQL(
                                "UPDATE {} SET v = v + 1 WHERE id = %s RETURNING id, v, note"
                            ).format(table),
                            (self.next_id - 1,),
                        ).fetchall()
                        changes += [(OWN_TABLES[0], "update", str(r[0]), texts(r)) for r in rows]
                        rows = conn.execute(
                            sql.SQL(
                                "UPDATE {} SET v = v + 1, writer = -1 WHERE id = %s"
                                " RETURNING id, v, writer"
                            ).format(ident(HOT)),
                            (self.next_id % HOT_ROWS,),
                        ).fetchall()
                        changes += [(HOT, "update", str(r[0]), texts(r)) for r in rows]
                    self.journal.add(int(row[0]), changes)
                    self.next_id += 1
                    time.sleep(0.002)
        except BaseException as e:  # reported by the test
            self.error = e


def texts(row: Sequence[Any]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in row)


def wait_back(
    watcher: psycopg.Connection[Any],
    application: str,
    at: datetime,
    proc: h.CaptureProcess,
    timeout: float,
) -> None:
    """Waits for a backend of ``application`` that started after ``at``."""
    wait_for(
        f"{application} back",
        lambda: (backend_started(watcher, application) or at) > at,
        proc,
        timeout,
    )


def terminate_while(
    state: str,
    application: str,
    number: int,
    watcher: psycopg.Connection[Any],
    settings: Settings,
    journal: Journal,
    proc: h.CaptureProcess,
) -> None:
    """Terminates the drainer's backend of ``application`` while it idles or is busy; returns
    once a new one is there and capture has caught up with what came meanwhile."""
    if state == "idle":
        h.catch_up(settings, alive=lambda: None if proc.alive() else proc.log(), log=proc.log)
        wait_for("idle", lambda: armed(watcher, settings), proc, 10)
        at = terminate(watcher, application)
    else:
        trickle = Trickle(settings.dsn, 50_000_000 + number * 1_000_000, journal)
        trickle.start()
        try:
            wait_for("busy", lambda: not armed(watcher, settings), proc, 10)
            time.sleep(0.3)
            at = terminate(watcher, application)
            # Back while the changes keep coming: the LISTEN connection holds the leader
            # lock, which must not stay released while this drainer drains.
            deadline = time.monotonic() + 3
            while (backend_started(watcher, application) or at) <= at:
                assert proc.alive(), f"pgherald run died:\n{proc.log()[-3000:]}"
                assert not armed(watcher, settings), "the drainer idled: the test proves nothing"
                assert trickle.is_alive() and trickle.error is None, trickle.error
                assert time.monotonic() < deadline, f"{application} not back while busy"
                time.sleep(0.02)
        finally:
            trickle.done.set()
            trickle.join(10)
        if trickle.error is not None:
            raise trickle.error
    h.catch_up(
        settings, timeout=20, alive=lambda: None if proc.alive() else proc.log(), log=proc.log
    )
    wait_back(watcher, application, at, proc, 10)
    assert proc.alive()


def test_terminated_backends_of_the_drainer_reconnect_and_capture_on(
    db_primary: Database,
) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    dsn = db_primary.dsn
    settings, journal = install_tables(dsn)
    proc = h.CaptureProcess(settings)
    cases = [
        (LISTEN_BACKEND, "idle"),
        (STORE_BACKEND, "idle"),
        (LISTEN_BACKEND, "busy"),
        (STORE_BACKEND, "busy"),
    ]
    try:
        since = server_now(dsn)
        proc.start()
        wait_draining(proc, since)
        with psycopg.connect(dsn, autocommit=True) as watcher:
            for number, (application, state) in enumerate(cases):
                terminate_while(state, application, number, watcher, settings, journal, proc)
        assert proc.starts == 1
        assert proc.stop() == 0, proc.log()[-3000:]
        said = proc.log()
        assert said.count(LOST_CONNECTION) >= len(cases), said[-3000:]
        events = assert_log_is_the_truth(settings, journal, rng, lambda: said)
    finally:
        proc.close()
    print(
        f"\nterminate (seed {seed}): {len(cases)} backends terminated, {len(events)} events,"
        f" {time.monotonic() - started:.1f}s in all"
    )
