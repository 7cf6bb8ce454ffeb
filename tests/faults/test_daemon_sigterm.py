"""SIGTERM stops ``pgherald run`` gracefully, in the middle of a workload, within its bound.

A daemon (a subprocess, as an operator runs it) captures a logical watch and a trigger
watch and delivers both to a webhook receiver run by the test, while two writers change
the tables. It is sent SIGTERM three times in the middle of the workload and started
again each time; each stop must end with exit status 0 within ``shutdown_timeout`` and
say it stopped cleanly, with the slot acknowledged up to what the change log stored.
Once the writers are done and the last daemon has caught up, the results are compared
with the truth, row by row:

- the logical watch's change log against ``test_decoding``'s account of the same WAL (a
  second slot made before the workload), change by change;
- the trigger watch's change log, replayed, against the table's final contents (a change
  stored twice or lost would break the replay);
- the receiver's arrivals against the change log (``delivery_harness.verdict``): every
  event arrived, each row's events in log order, and — because every stop was graceful —
  not one of them twice.

A second test gives stopping no chance: the receiver holds a request open longer than the
bound. The daemon must give up when the bound passes, say what it abandoned, and exit 1;
the delivery it abandoned is released, and the next run sends it.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg
import pytest

from pgherald import admin, routing_admin
from pgherald.app import logical_source_name
from pgherald.store import checkpoints
from tests import capture_harness as h
from tests.conftest import Database
from tests.daemon_support import Answer, Daemon, Receiver
from tests.faults import delivery_harness as d

pytestmark = pytest.mark.slow

BOUND = 20.0
SECONDS = 24.0
STOPS = 3
TRUTH_SLOT = "pgherald_sigterm_truth"


class LedgerWriter(threading.Thread):
    """Small transactions on ``ledger`` (logical capture) for ``seconds``: inserts, updates
    of recent rows, now and then a delete and a multi-row update."""

    def __init__(self, dsn: str, seconds: float, seed: int) -> None:
        super().__init__(name="ledger-writer", daemon=True)
        self.dsn = dsn
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self) -> None:
        ids: list[int] = []
        next_id = 1
        deadline = time.monotonic() + self.seconds
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                with conn.transaction():
                    for _ in range(self.rng.randint(1, 4)):
                        conn.execute(
                            "INSERT INTO ledger VALUES (%s, %s, %s)",
                            (next_id, self.rng.randrange(10**6), f"n{next_id}"),
                        )
                        ids.append(next_id)
                        next_id += 1
                    if len(ids) > 10 and self.rng.random() < 0.5:
                        conn.execute(
                            "UPDATE ledger SET amount = amount + 1, note = %s WHERE id = %s",
                            (f"u{self.rng.randrange(10**6)}", self.rng.choice(ids[-50:])),
                        )
                    if len(ids) > 100 and self.rng.random() < 0.1:
                        victim = ids.pop(self.rng.randrange(len(ids) - 50))
                        conn.execute("DELETE FROM ledger WHERE id = %s", (victim,))
                    if self.rng.random() < 0.02:
                        conn.execute("UPDATE ledger SET amount = amount + 1 WHERE id % 7 = 0")
                self.transactions += 1
                time.sleep(0.01)


def slot_confirmed(settings: Any) -> int:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot,),
        ).fetchone()
    assert row is not None
    return lsn(str(row[0]))


def stored_checkpoint(settings: Any) -> int:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        text = checkpoints.load_checkpoint(conn, settings.schema, logical_source_name(settings))
    assert text is not None
    return lsn(text)


def lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def test_sigterm_mid_workload_loses_and_duplicates_nothing(db_primary: Database) -> None:
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    dsn = db_primary.dsn
    db_primary.execute(d.STREAM_SETUP)
    db_primary.execute("CREATE TABLE ledger (id bigint PRIMARY KEY, amount int, note text)")
    settings = h.install(dsn)
    admin.add_watch(settings, "ledger", method="logical")
    admin.add_watch(settings, d.STREAM_TABLE, method="trigger")
    receiver = Receiver()
    routing_admin.add_sink(settings, "hook", "webhook", options={"url": receiver.url})
    routing_admin.subscribe(settings, "hook", ["ledger", d.STREAM_WATCH])
    assert h.create_truth_slot(dsn, TRUTH_SLOT)
    daemon = Daemon(settings, "--shutdown-timeout", f"{BOUND:g}s").start()
    stop_seconds: list[float] = []
    said: list[str] = []
    try:
        daemon.wait_ready()
        stream = d.StreamWriter(dsn, total=5000, seconds=SECONDS, seed=seed)
        ledger = LedgerWriter(dsn, SECONDS, seed)
        stream.start()
        ledger.start()
        for _ in range(STOPS):
            time.sleep(rng.uniform(3.0, 6.0))
            assert daemon.alive(), daemon.log()[-3000:]
            mark = len(daemon.log())
            status, seconds = daemon.terminate_timed(timeout=BOUND + 30)
            stop_seconds.append(seconds)
            log = daemon.log()[mark:]
            assert status == 0, daemon.log()[-6000:]
            assert seconds < BOUND, f"stopping took {seconds:.1f}s"
            assert "stopped cleanly" in log, log[-3000:]
            said.append(log[log.index("stopped cleanly") :].splitlines()[0])
            # what was stored is acknowledged to the slot
            assert slot_confirmed(settings) >= stored_checkpoint(settings)
            h.wait_released(settings)
            daemon.start()
            daemon.wait_ready()
        stream.finish(SECONDS + 60)
        ledger.join(SECONDS + 60)
        assert ledger.error is None, ledger.error
        h.catch_up(
            settings,
            timeout=120,
            alive=lambda: None if daemon.alive() else daemon.log(),
            log=daemon.log,
        )
        # keyed by watch and row: the two tables have rows with the same key
        truth_events = {
            key: d.Logged(logged.log_id, f"{watch}:{logged.row}")
            for watch in ("ledger", d.STREAM_WATCH)
            for key, logged in d.log_truth(settings, watch).items()
        }
        d.wait_for(
            lambda: set(receiver.keys()) >= truth_events.keys(),
            120,
            lambda: f"{len(truth_events.keys() - set(receiver.keys()))} events not delivered",
            alive=lambda: None if daemon.alive() else daemon.log()[-3000:],
        )
        d.wait_for(lambda: d.open_deliveries(settings) == 0, 60, lambda: "deliveries open")
        status, seconds = daemon.terminate_timed(timeout=BOUND + 30)
        stop_seconds.append(seconds)
        assert status == 0, daemon.log()[-3000:]
    finally:
        log = daemon.log()
        daemon.close()
        receiver.close()
    assert "Traceback" not in log

    # the logical watch: the log is what test_decoding says, change by change
    txns = h.truth(dsn, TRUTH_SLOT)
    h.drop_slot(dsn, TRUTH_SLOT)
    expected = h.expected_steps(txns, {("public", "ledger"): h.Watched("ledger", ("id",))})
    stored = h.stored_steps(h.stored_events(settings, "ledger"))
    h.assert_same_steps(stored, expected)
    # the trigger watch: replaying the log gives the table
    events = h.stored_events(settings, d.STREAM_WATCH)
    h.assert_replay_matches(dsn, events, "public", d.STREAM_TABLE, ("id",))
    assert sum(1 for e in events if e.op != "schema") == stream.made
    # the receiver: everything, in order per row, and nothing twice
    verdict = d.verdict(receiver.received(), truth_events)
    assert verdict.duplicates == 0, verdict
    assert d.delivery_statuses(settings, "hook") == {"delivered": len(truth_events)}
    print(
        f"\nseed {seed}: {len(expected)} logical and {stream.made} trigger changes,"
        f" {verdict.arrivals} deliveries, {STOPS + 1} SIGTERMs, stops took"
        f" {', '.join(f'{s:.2f}s' for s in stop_seconds)} (bound {BOUND:g}s)"
    )
    print("\n".join(said))


def test_a_stop_past_the_bound_gives_up_and_the_next_run_redoes_it(db_primary: Database) -> None:
    dsn = db_primary.dsn
    db_primary.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = h.install(dsn, ["t"], settings=h.settings_for(dsn, method="trigger"), slot=False)
    hold = threading.Event()
    # The held answer would come long after the test (and is a 503, so even then it would
    # not count as an arrival): only the next run's request may arrive.
    receiver = Receiver(
        lambda key, body: Answer() if hold.is_set() else Answer(status=503, delay=300.0)
    )
    routing_admin.add_sink(
        settings, "hook", "webhook", options={"url": receiver.url, "timeout": 600}
    )
    routing_admin.subscribe(settings, "hook", ["t"])
    daemon = Daemon(settings, "--shutdown-timeout", "3s").start()
    try:
        daemon.wait_ready()
        db_primary.execute("INSERT INTO t VALUES (1)")
        d.wait_for(lambda: receiver.requests >= 1, 60, lambda: "no request")
        mark = len(daemon.log())
        status, seconds = daemon.terminate_timed(timeout=60)
        log = daemon.log()[mark:]
        assert status == 1, log
        assert 3.0 <= seconds < 20.0, seconds  # the bound, not the 300 s request
        assert "gave up after 3s waiting for delivery" in log, log
        assert "Traceback" not in log
        assert receiver.arrivals == []  # the request was still open
        assert d.delivery_statuses(settings, "hook") == {"pending": 1}

        hold.set()  # the receiver answers at once from now on
        daemon.start()
        d.wait_for(lambda: len(receiver.arrivals) == 1, 60, lambda: "not delivered again")
        d.wait_for(
            lambda: d.delivery_statuses(settings, "hook") == {"delivered": 1},
            30,
            lambda: str(d.delivery_statuses(settings, "hook")),
        )
        status, _ = daemon.terminate_timed()
        assert status == 0, daemon.log()[-3000:]
    finally:
        daemon.close()
        receiver.close()
