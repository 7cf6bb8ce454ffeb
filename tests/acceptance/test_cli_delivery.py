"""Sinks, subscriptions, deliveries and `tail` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

from tests import capture_harness as h
from tests.acceptance._cli import assert_fails, assert_ok, cli
from tests.conftest import Database


def test_sink_subscribe_deliveries_round_trip(db: Database) -> None:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
    assert_ok(cli("init", dsn=db.dsn))
    assert_ok(cli("watch", "add", "orders", "--method", "trigger", dsn=db.dsn))
    added = assert_ok(cli("sink", "add", "out", "stdout", "--format", "simple", dsn=db.dsn))
    assert added.lines == ["added sink 'out' (stdout, format simple)"]
    subscribed = assert_ok(
        cli("subscribe", "out", "orders", "--ops", "insert", "--where", "status = 'new'",
            dsn=db.dsn)
    )  # fmt: skip
    assert subscribed.lines == ["subscribed sink 'out' to 'orders'"]
    listed = json.loads(assert_ok(cli("sink", "list", "--format", "json", dsn=db.dsn)).stdout)
    assert listed[0]["subscriptions"] == [
        {"watch": "orders", "filter": {"ops": ["insert"], "where": "status = 'new'"},
         "ignore_columns": []}
    ]  # fmt: skip
    assert_fails(cli("sink", "add", "x", "amqp", dsn=db.dsn), "option 'exchange' is required")
    assert_fails(cli("subscribe", "out", "ghost", dsn=db.dsn), "no watch named 'ghost'")
    assert_fails(cli("subscribe", "out", "orders", "--where", "status ==", dsn=db.dsn),
                 "condition")  # fmt: skip
    assert_fails(cli("sink", "add", "o2", "stdout", "-o", "nokey", dsn=db.dsn), "not key=value")

    # `pgherald run` captures, routes and delivers (to its own stdout, as JSON lines).
    proc = h.CaptureProcess(h.settings_for(db.dsn))
    try:
        proc.start()
        proc.wait_ready()
        db.execute(
            "INSERT INTO orders VALUES (1, 'new'), (2, 'old'); UPDATE orders SET status = 'x'"
        )
        deadline = time.monotonic() + 30
        delivered: list[str] = []
        while time.monotonic() < deadline:
            out = assert_ok(cli("deliveries", "list", "--format", "json", dsn=db.dsn)).stdout
            delivered = [d["status"] for d in json.loads(out)]
            if delivered == ["delivered"]:
                break
            time.sleep(0.2)
        assert delivered == ["delivered"]
    finally:
        proc.stop()
    assert_ok(cli("deliveries", "discard", "99999", dsn=db.dsn))
    retried = assert_ok(cli("deliveries", "retry", "--sink", "out", dsn=db.dsn))
    assert retried.lines == ["0 deliveries will be tried again"]
    assert_ok(cli("unsubscribe", "out", "orders", dsn=db.dsn))
    assert_ok(cli("sink", "remove", "out", dsn=db.dsn))
    assert assert_ok(cli("sink", "list", dsn=db.dsn)).stdout.startswith("no sinks")


def test_tail_follows_the_log(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"),
                         slot=False)  # fmt: skip
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgherald",
            "--dsn",
            db.dsn,
            "tail",
            "t",
            "--format",
            "simple",
            "--since",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=h.cli_env(),
    )
    try:
        with h.capturing(settings) as capture:
            db.execute("INSERT INTO t VALUES (1, 'a'); UPDATE t SET v = 'b'")
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            assert tail.stdout is not None
            lines: list[dict[str, Any]] = []
            stream = tail.stdout
            reader = threading.Thread(
                target=lambda: lines.extend(json.loads(line) for line in stream), daemon=True
            )
            reader.start()
            deadline = time.monotonic() + 60
            while len(lines) < 2:
                if time.monotonic() > deadline:
                    tail.kill()
                    raise AssertionError(f"tail printed {lines}: {tail.communicate()[1][-2000:]}")
                time.sleep(0.05)
    finally:
        tail.terminate()
        tail.wait(10)
    assert [(x["operation"], x["new_record"]["v"]) for x in lines] == [
        ("INSERT", "a"),
        ("UPDATE", "b"),
    ]
