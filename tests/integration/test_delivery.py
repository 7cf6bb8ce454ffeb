"""Routing and the delivery engine on real PostgreSQL, with an in-process sink that records
what it got (the real sinks have their own tests against their real servers)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest

from pgherald import admin, app, routing_admin
from pgherald.config import Settings
from pgherald.delivery.engine import RetryPolicy
from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.sinks.base import Message, Outcome
from tests import capture_harness as h
from tests.conftest import Database

FAST = RetryPolicy(base=0.05, maximum=0.2, jitter=0.1)


class RecordingSink:
    """Records every message it is sent; ``fail(message, attempt)`` may return an error."""

    def __init__(self, name: str, fail: Callable[[Message, int], Outcome] | None = None) -> None:
        self.name = name
        self.strictly_ordered = False
        self.fail = fail
        self.sent: list[Message] = []
        self.delivered: list[Message] = []
        self.tries: dict[str, int] = {}
        self.lock = threading.Lock()

    async def start(self) -> None:
        return None

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        out: list[Outcome] = []
        with self.lock:
            for m in batch:
                self.sent.append(m)
                n = self.tries[m.idempotency_key] = self.tries.get(m.idempotency_key, 0) + 1
                outcome = self.fail(m, n) if self.fail else None
                if outcome is None:
                    self.delivered.append(m)
                out.append(outcome)
        return out

    async def close(self) -> None:
        return None


def setup(db: Database, *sinks: str) -> Settings:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric)")
    settings = h.install(db.dsn, ["orders"], settings=h.settings_for(db.dsn, method="trigger"),
                         slot=False)  # fmt: skip
    for name in sinks:
        routing_admin.add_sink(settings, name, "stdout", format="simple")
    return settings


def wait_for(what: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def statuses(db: Database) -> dict[str, int]:
    rows = db.execute("SELECT status, count(*) FROM pgherald.deliveries GROUP BY status")
    return {str(r[0]): int(str(r[1])) for r in rows}


def routed_all(db: Database) -> bool:
    """Whether the router's checkpoint has reached the last event of the log."""
    row = db.execute(
        "SELECT (SELECT position::bigint FROM pgherald.checkpoints WHERE source = 'router')"
        " = (SELECT max(id) FROM pgherald.events)"
    )
    return bool(row[0][0])


def bodies(sink: RecordingSink) -> list[dict[str, Any]]:
    return [json.loads(m.body) for m in sink.delivered]


def test_filters_order_and_the_recorded_outcome(db: Database) -> None:
    settings = setup(db, "all", "big_shipped")
    routing_admin.subscribe(settings, "all", ["orders"])
    routing_admin.subscribe(
        settings, "big_shipped", ["orders"], ops=["insert", "update"],
        where="status = 'shipped' and amount > 1000",
    )  # fmt: skip
    every, big = RecordingSink("all"), RecordingSink("big_shipped")
    with h.capturing(settings) as capture:
        delivery = app.Delivery(settings, overrides={"all": every, "big_shipped": big}).start()
        try:
            delivery.wait_ready()
            db.execute(
                "INSERT INTO orders VALUES (1, 'new', 5000), (2, 'new', 10);"
                " UPDATE orders SET status = 'shipped';"
                " UPDATE orders SET amount = 6000 WHERE id = 1;"
                " DELETE FROM orders WHERE id = 1"
            )
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            wait_for(lambda: len(every.delivered) == 6 and len(big.delivered) == 2)
        finally:
            delivery.close()
    assert [(b["operation"], b["new_record"] and b["new_record"]["id"]) for b in bodies(every)] == [
        ("INSERT", 1), ("INSERT", 2), ("UPDATE", 1), ("UPDATE", 2), ("UPDATE", 1), ("DELETE", None),
    ]  # fmt: skip
    assert [(b["operation"], b["new_record"]["amount"]) for b in bodies(big)] == [
        ("UPDATE", "5000"),
        ("UPDATE", "6000"),
    ]
    assert all(m.headers["Idempotency-Key"] == m.event.event_id for m in every.delivered)
    assert statuses(db) == {"delivered": 8}
    attempts = db.execute("SELECT outcome, count(*) FROM pgherald.delivery_attempts GROUP BY 1")
    assert [(str(a), int(str(n))) for a, n in attempts] == [("delivered", 8)]


def test_retries_keep_a_rows_order_and_dead_letters(db: Database) -> None:
    settings = setup(db, "flaky")
    routing_admin.subscribe(settings, "flaky", ["orders"])
    db.execute("UPDATE pgherald.sinks SET max_attempts = 3")

    def fail(m: Message, attempt: int) -> Outcome:
        key, op = m.event.key.get("id"), m.event.op
        if key == "1" and op == "insert" and attempt <= 2:
            return RetryableSinkError("503 from the far end")
        if key == "2" and op == "insert":
            return PermanentSinkError("400 bad payload")
        if key == "3":
            return RetryableSinkError("always down")
        return None

    sink = RecordingSink("flaky", fail)
    with h.capturing(settings) as capture:
        delivery = app.Delivery(settings, overrides={"flaky": sink}, policy=FAST).start()
        try:
            delivery.wait_ready()
            db.execute(
                "INSERT INTO orders VALUES (1, 'a', 1), (2, 'a', 1), (3, 'a', 1), (4, 'a', 1)"
            )
            db.execute("UPDATE orders SET status = 'b'")
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            wait_for(
                lambda: statuses(db).get("delivered", 0) == 5 and statuses(db).get("dead") == 3
            )
        finally:
            delivery.close()
    got = [(m.event.key.get("id"), m.event.op) for m in sink.delivered]
    # Row 1's update waited for its insert's retries; row 2's update went after its insert died.
    assert got.index(("1", "insert")) < got.index(("1", "update"))
    assert sorted(got) == sorted(
        [("1", "insert"), ("1", "update"), ("2", "update"), ("4", "insert"), ("4", "update")]
    )
    assert (
        sink.tries[next(m.idempotency_key for m in sink.sent if m.event.key.get("id") == "1")] == 3
    )
    rows = routing_admin.list_deliveries(settings, status="dead")
    assert sorted((r.op, r.attempts, r.last_error) for r in rows) == [
        ("insert", 1, "400 bad payload"),  # permanent: dead at once
        ("insert", 3, "always down"),  # retryable: dead after max_attempts
        ("update", 3, "always down"),  # waited behind the row's insert, then the same
    ]
    assert routing_admin.retry_deliveries(settings, sink="flaky")  # back in line
    assert statuses(db).get("pending", 0) == 3


def test_several_workers_share_a_sink_without_double_sends(db: Database) -> None:
    settings = setup(db, "shared")
    routing_admin.subscribe(settings, "shared", ["orders"])
    sink = RecordingSink("shared")
    with h.capturing(settings) as capture:
        workers = [
            app.Delivery(settings, overrides={"shared": sink}, batch_size=20).start()
            for _ in range(3)
        ]
        try:
            for w in workers:
                w.wait_ready()
            for i in range(20):
                first, last = i * 20, i * 20 + 19
                db.execute(
                    f"INSERT INTO orders SELECT g,'n', {i} FROM generate_series({first}, {last}) g;"
                    f" UPDATE orders SET amount = amount + 1 WHERE id % 7 = {i % 7}"
                )
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            wait_for(lambda: routed_all(db))  # else `total` may be counted half-way
            total = int(str(db.execute("SELECT count(*) FROM pgherald.deliveries")[0][0]))
            wait_for(lambda: len(sink.delivered) == total, 60)
        finally:
            for w in workers:
                w.close()
    keys = [m.idempotency_key for m in sink.delivered]
    assert len(keys) == len(set(keys))  # nothing sent twice
    per_row: dict[str, list[int]] = {}
    for m in sink.delivered:
        per_row.setdefault(m.event.key["id"], []).append(m.log_id)
    assert all(ids == sorted(ids) for ids in per_row.values())  # each row in log order


def test_bad_sinks_and_subscriptions_are_one_clear_error(db: Database) -> None:
    settings = setup(db)
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: routing_admin.add_sink(settings, "x", "carrier-pigeon"), "unknown kind"),
        (lambda: routing_admin.add_sink(settings, "x", "stdout", format="xml"), "unknown format"),
        (lambda: routing_admin.add_sink(settings, "x", "stdout", options={"a": "1"}),
         "unknown option"),
        (lambda: routing_admin.subscribe(settings, "nope", ["orders"]), "no sink named"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ConfigError, match=message):
            call()
    routing_admin.add_sink(settings, "s", "stdout")
    with pytest.raises(ConfigError, match="exists already"):
        routing_admin.add_sink(settings, "s", "stdout")
    with pytest.raises(ConfigError, match="no watch named 'ghost'"):
        routing_admin.subscribe(settings, "s", ["orders", "ghost"])
    with pytest.raises(ConfigError, match="condition"):
        routing_admin.subscribe(settings, "s", ["orders"], where="amount >")
    with pytest.raises(ConfigError, match="unknown operation"):
        routing_admin.subscribe(settings, "s", ["orders"], ops=["upsert"])
    assert routing_admin.list_subscriptions(settings) == []
    admin.remove_watch(settings, "orders")
    with psycopg.connect(db.dsn) as conn:
        assert conn.execute(b"SELECT count(*) FROM pgherald.subscriptions").fetchone() == (0,)


def test_sinks_and_subscriptions_from_the_configuration_file(db: Database, tmp_path: Any) -> None:
    from pgherald.config import load_settings

    db.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric)")
    path = tmp_path / "pgherald.toml"
    path.write_text(
        f"dsn = {db.dsn!r}\n"
        'method = "trigger"\n'
        '[[watch]]\ntable = "orders"\n'
        '[[sink]]\nname = "out"\nkind = "stdout"\nformat = "simple"\nmax_attempts = 3\n'
        '[[subscription]]\nsink = "out"\nwatches = ["orders"]\nops = ["insert"]\n'
        "where = \"status = 'new'\"\n",
        encoding="utf-8",
    )
    settings = load_settings(path, env={})
    admin.init(settings)
    admin.init(settings)  # harmless to repeat
    [sink] = routing_admin.list_sinks(settings)
    assert (sink.name, sink.kind, sink.format, sink.max_attempts) == ("out", "stdout", "simple", 3)
    [sub] = routing_admin.list_subscriptions(settings)
    assert (sub.sink, sub.watch, sub.filter) == (
        "out",
        "orders",
        {"ops": ["insert"], "where": "status = 'new'"},
    )
