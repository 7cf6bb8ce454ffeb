"""`pgherald status`: the slot's retained WAL and lag, the checkpoint, the watches."""

from __future__ import annotations

import json
import threading
import time

from pgherald import admin
from pgherald.app import Capture
from pgherald.config import Settings
from tests.acceptance._cli import assert_ok, cli
from tests.conftest import Database


def test_status_shows_the_slot_and_how_far_capture_got(db: Database) -> None:
    db.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric)")
    settings = Settings(dsn=db.dsn)
    assert cli("init", dsn=db.dsn).returncode == 0
    before = cli("status", dsn=db.dsn)
    assert before.returncode == 0, before.stderr
    assert "slot pgherald: none" in before.stdout
    admin.add_watch(settings, "public.ledger")
    db.execute("INSERT INTO ledger SELECT g, g FROM generate_series(1, 500) g")

    waiting = cli("status", "--format", "json", dsn=db.dsn)
    report = json.loads(waiting.stdout)
    assert report["slot"]["active"] is False
    assert report["slot"]["lag_bytes"] > 0, "the inserts wait in the slot for capture"
    assert report["checkpoint"] is None and report["events"] == 0
    assert "inactive" in cli("status", dsn=db.dsn).stdout

    capture = Capture(settings).start()
    try:
        capture.wait_ready()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = json.loads(cli("status", "--format", "json", dsn=db.dsn).stdout)
            if report["events"] >= 500:
                break
            threading.Event().wait(0.2)
        text = cli("status", dsn=db.dsn).stdout
    finally:
        capture.close()
    assert report["events"] == 500
    assert report["slot"]["active"] is True
    assert report["checkpoint"] is not None
    assert report["watches"] == [
        {
            "name": "ledger",
            "method": "logical",
            "changes_seen": 500,
            "last_run_at": report["watches"][0]["last_run_at"],
            "last_error": None,
        }
    ]
    assert "slot pgherald: active" in text and "retains" in text
    assert "watch ledger (logical): 500 changes" in text


def test_status_before_init_says_what_to_do(db: Database) -> None:
    result = cli("status", dsn=db.dsn)
    assert result.returncode == 1
    assert "pgherald init" in result.stderr and "Traceback" not in result.stderr


def test_status_shows_the_trigger_queue(db: Database) -> None:
    db.execute("CREATE TABLE q (id int PRIMARY KEY)")
    settings = Settings(dsn=db.dsn, method="trigger")
    admin.init(settings)
    admin.add_watch(settings, "q")
    db.execute("INSERT INTO q SELECT generate_series(1, 3)")
    out = assert_ok(cli("status", dsn=db.dsn)).stdout
    assert "trigger queue: 3 change(s) waiting, oldest from " in out
    report = json.loads(assert_ok(cli("status", "--format", "json", dsn=db.dsn)).stdout)
    assert report["trigger_queue"]["depth"] == 3
