"""The delivery engine follows the store's sinks while it runs, and idle sinks are cheap.

Real PostgreSQL, real trigger capture, the real router and engine (``app.Delivery``, as
``pgherald run`` wires it) and a real webhook receiver: sinks are added, changed,
disabled, enabled and removed by the store functions that the CLI, a configuration reload
and the console use, while delivery runs, and what arrives at the receivers is checked.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from pgherald import app, routing_admin
from pgherald.config import Settings
from pgherald.db.connect import connect as engine_connect
from pgherald.delivery import engine as engine_module
from pgherald.delivery.engine import RetryPolicy
from pgherald.store import deliveries
from tests import capture_harness as h
from tests.conftest import Database
from tests.daemon_support import Answer, Receiver

FAST = RetryPolicy(base=0.05, maximum=0.2, jitter=0.1)
PROMPT = 10.0
"""Seconds a change may take to be served (a few in practice; the machine is shared)."""


@pytest.fixture
def receivers() -> Iterator[Callable[[], Receiver]]:
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for r in made:
        r.close()


def within(what: Callable[[], bool], seconds: float = PROMPT, why: str = "") -> float:
    """Polls ``what`` until it holds; how long that took."""
    started = time.monotonic()
    while not what():
        assert time.monotonic() - started < seconds, f"not within {seconds:g}s: {why}"
        time.sleep(0.02)
    return time.monotonic() - started


def setup(db: Database) -> Settings:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, v text)")
    return h.install(
        db.dsn, ["orders"], settings=h.settings_for(db.dsn, method="trigger"), slot=False
    )


def change_sink(settings: Settings, name: str, **changes: Any) -> None:
    """Changes a stored sink as a configuration reload does (``deliveries.update_sink``)."""
    with psycopg.connect(settings.dsn) as conn:
        [sink] = [s for s in deliveries.list_sinks(conn, settings.schema) if s.name == name]
        assert deliveries.update_sink(conn, settings.schema, dataclasses.replace(sink, **changes))
        conn.commit()


def statuses(db: Database, sink: str) -> dict[str, int]:
    rows = db.execute(
        f"SELECT status, count(*) FROM pgherald.deliveries WHERE sink = '{sink}' GROUP BY 1"
    )
    return {str(s): int(str(n)) for s, n in rows}


def rows(receiver: Receiver) -> list[int]:
    """The ids of the rows whose changes arrived, in arrival order."""
    return [int(json.loads(body)["key"]["id"]) for _, body in receiver.received()]


def lanes(db: Database, sink: str) -> int:
    """The connections a sink's lanes hold now."""
    [(n,)] = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        f" AND application_name = 'pgherald-deliver-{sink}'"
    )
    return int(str(n))


def test_sinks_added_changed_disabled_enabled_and_removed_while_it_runs(
    db: Database, receivers: Callable[[], Receiver]
) -> None:
    settings = setup(db)
    first, second = receivers(), receivers()
    with h.capturing(settings) as capture:
        delivery = app.Delivery(settings, policy=FAST, sweep=0.5, refresh=1.0).start()
        try:
            delivery.wait_ready()
            assert delivery.engine.sinks == {}

            # added (with its subscription) while delivery runs: served within seconds
            routing_admin.add_sink(
                settings, "hook", "webhook", options={"url": first.url}, max_attempts=1000
            )  # its failing delivery below must not die of fast retries before it is disabled
            routing_admin.subscribe(settings, "hook", ["orders"])
            db.execute("INSERT INTO orders VALUES (1, 'a')")
            took = within(lambda: len(first.keys()) == 1, why="row 1 at the first receiver")
            print(f"a sink added while delivery runs delivered the next change in {took:.2f}s")

            # its URL changed: later deliveries go to the new one
            change_sink(settings, "hook", options={"url": second.url})
            took = within(
                lambda: delivery.engine.sinks["hook"][1].options["url"] == second.url,
                why="the engine serves the new URL",
            )
            print(f"the engine served the new URL {took:.2f}s after the change committed")
            db.execute("INSERT INTO orders VALUES (2, 'b')")
            within(lambda: len(second.keys()) == 1, why="row 2 at the second receiver")
            assert len(first.keys()) == 1 and first.requests == 1

            # disabled while its delivery of row 3 fails: nothing more is sent, it stays open
            second.answer = lambda key, body: Answer(status=503)
            db.execute("INSERT INTO orders VALUES (3, 'c')")
            within(lambda: second.requests >= 3, why="row 3 tried and retried")
            routing_admin.set_sink_enabled(settings, "hook", False)
            within(lambda: "hook" not in delivery.engine.sinks, why="the engine stops it")
            within(lambda: lanes(db, "hook") == 0, why="its lanes closed")
            second.answer = lambda key, body: Answer()
            tried = second.requests
            time.sleep(3.0)  # many retry delays, sweeps and re-reads: the checks are below
            assert second.requests == tried
            assert statuses(db, "hook") == {"delivered": 2, "failed": 1}
            assert "hook" not in delivery.engine.sinks

            # enabled again: the open delivery goes
            routing_admin.set_sink_enabled(settings, "hook", True)
            within(lambda: len(second.keys()) == 2, why="row 3 after enabling")
            # The receiver has it once it answered; the engine records that just after.
            within(lambda: statuses(db, "hook") == {"delivered": 3}, why="row 3 recorded")

            # removed: the engine lets it go, and goes on
            routing_admin.remove_sink(settings, "hook")
            within(lambda: "hook" not in delivery.engine.sinks, why="the removed sink gone")
            within(lambda: lanes(db, "hook") == 0, why="its lanes closed")
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            assert not delivery.errors
        finally:
            delivery.close()
    assert rows(first) == [1]
    assert rows(second) == [2, 3]  # each once, to the URL of its time


def test_a_missed_notify_only_delays_a_change(
    db: Database, receivers: Callable[[], Receiver]
) -> None:
    """A sink changed behind pgherald's back (SQL, no NOTIFY) is served after the periodic
    re-read; a delivery put back by SQL is found by the look at idle sinks."""
    settings = setup(db)
    first, second = receivers(), receivers()
    routing_admin.add_sink(settings, "hook", "webhook", options={"url": first.url})
    routing_admin.subscribe(settings, "hook", ["orders"])
    with h.capturing(settings):
        delivery = app.Delivery(settings, policy=FAST, refresh=1.0, sweep=0.5, idle_close=0.5)
        delivery.start()
        try:
            delivery.wait_ready()
            db.execute("INSERT INTO orders VALUES (1, 'a')")
            within(lambda: len(first.keys()) == 1, why="row 1")
            db.execute(
                "UPDATE pgherald.sinks SET config = jsonb_build_object('url', %s::text)",
                (second.url,),
            )
            within(
                lambda: delivery.engine.sinks["hook"][1].options["url"] == second.url,
                seconds=5.0,
                why="the periodic re-read",
            )
            within(lambda: lanes(db, "hook") == 0, why="idle: its lanes closed")
            db.execute(
                "UPDATE pgherald.deliveries SET status = 'pending', next_attempt_at = now()"
            )  # as a worker that died would leave a claim: nobody NOTIFYs
            within(lambda: len(second.keys()) == 1, seconds=5.0, why="row 1 found by a look")
            assert not delivery.errors
        finally:
            delivery.close()


def test_removing_a_sink_while_it_sends_a_batch(
    db: Database, receivers: Callable[[], Receiver]
) -> None:
    """``sink remove`` waits for the batch in flight to be recorded (its rows are locked),
    then the engine lets the sink go without an error and serves the others."""
    settings = setup(db)
    slow, other = receivers(), receivers()
    slow.answer = lambda key, body: Answer(delay=1.5)
    routing_admin.add_sink(settings, "slow", "webhook", options={"url": slow.url})
    routing_admin.add_sink(settings, "other", "webhook", options={"url": other.url})
    routing_admin.subscribe(settings, "slow", ["orders"])
    routing_admin.subscribe(settings, "other", ["orders"])
    with h.capturing(settings):
        delivery = app.Delivery(settings, policy=FAST).start()
        try:
            delivery.wait_ready()
            db.execute("INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 20) g")
            within(lambda: slow.requests >= 1, why="a batch in flight to the slow receiver")
            routing_admin.remove_sink(settings, "slow")
            within(lambda: "slow" not in delivery.engine.sinks, why="the sink let go")
            within(lambda: lanes(db, "slow") == 0, why="its lanes closed")
            within(lambda: len(other.keys()) == 20, why="the other sink served")
            db.execute("INSERT INTO orders VALUES (21, 'y')")
            within(lambda: len(other.keys()) == 21, why="and goes on")
            assert not delivery.errors
        finally:
            delivery.close()
    assert statuses(db, "slow") == {}


def test_idle_sinks_hold_no_connections_and_still_deliver_promptly(
    db_primary: Database, receivers: Callable[[], Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 sinks (webhooks and feeds): idle, they hold no connection of their own (before,
    each held two: 100 of PostgreSQL's usual 100); a change wakes each at once, and while
    they work they hold at most ``delivery_connections`` together."""
    db = db_primary
    settings = setup(db).with_overrides(delivery_connections=6)
    receiver = receivers()
    names = [f"hook-{i}" for i in range(25)] + [f"feed-{i}" for i in range(25)]
    for name in names:
        if name.startswith("hook"):
            routing_admin.add_sink(settings, name, "webhook", options={"url": receiver.url})
        else:
            routing_admin.add_sink(settings, name, "feed")
        routing_admin.subscribe(settings, name, ["orders"])

    def delivery_connections() -> int:
        [(n,)] = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'pgherald-deliver%'"
        )
        return int(str(n))

    def delivered() -> int:
        [(n,)] = db.execute("SELECT count(*) FROM pgherald.deliveries WHERE status = 'delivered'")
        return int(str(n))

    # What the engine holds, counted at the client: a backend outlives its closed
    # connection by a moment, so pg_stat_activity may count one just given back.
    lanes: list[psycopg.Connection[Any]] = []

    def counted(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
        conn = engine_connect(*args, **kwargs)
        if kwargs.get("application_name", "").startswith("pgherald-deliver-"):
            lanes.append(conn)
        return conn

    monkeypatch.setattr(engine_module, "connect", counted)
    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.wait(0.005):
            peak = max(peak, sum(1 for c in list(lanes) if not c.closed))

    sampler = threading.Thread(target=sample, daemon=True)
    with h.capturing(settings) as capture:
        delivery = app.Delivery(settings, idle_close=1.0).start()
        sampler.start()
        try:
            delivery.wait_ready()
            assert len(delivery.engine.sinks) == 50
            time.sleep(2.0)  # past idle_close and a sweep: the count below is the proof
            idle = delivery_connections()
            print(f"50 idle sinks: {idle} delivery connection(s)")
            assert idle == 1  # the engine's control connection
            for round_ in (1, 2):
                db.execute(f"INSERT INTO orders VALUES ({round_}, 'x')")
                h.catch_up(settings, alive=lambda: h.capture_problem(capture))
                took = within(lambda: delivered() == 50 * round_, why=f"round {round_}")  # noqa: B023
                busy = delivery_connections()
                print(f"round {round_}: 50 sinks delivered in {took:.2f}s ({busy} connections)")
                within(lambda: delivery_connections() == 1, why="idle again: lanes closed")
            assert len(receiver.keys()) == 50
            assert not delivery.errors
        finally:
            sampling.set()
            sampler.join()
            delivery.close()
    print(f"at most {peak} lane connections at once")
    assert delivery.engine.max_connections == 6
    assert 1 < peak <= 6
