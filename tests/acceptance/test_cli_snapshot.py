"""Snapshot watches from the command line, and runs on schedule in `pgherald run`."""

from __future__ import annotations

import json
import time

from pgherald import admin
from tests import capture_harness as h
from tests.acceptance._cli import assert_fails, assert_ok, cli
from tests.conftest import Database

QUERY = "SELECT g.code, e.name FROM grants g JOIN emp e ON e.id = g.pi WHERE NOT e.active"


def make_tables(db: Database) -> None:
    db.execute(
        "CREATE TABLE emp (id int PRIMARY KEY, name text, active bool);"
        " CREATE TABLE grants (code text PRIMARY KEY, pi int);"
        " INSERT INTO emp VALUES (1, 'Ada', true), (2, 'Bob', true);"
        " INSERT INTO grants VALUES ('G1', 1), ('G2', 2)"
    )


def test_add_run_list_and_a_failing_run(db: Database) -> None:
    make_tables(db)
    assert_ok(cli("init", dsn=db.dsn))
    added = assert_ok(
        cli("watch", "add", "orphans", "--query", QUERY, "--key", "code", "--every", "1h",
            dsn=db.dsn)
    )  # fmt: skip
    assert added.lines[0] == f"added watch 'orphans' on {QUERY} (snapshot capture, key: code)"
    assert "  note: runs every 1h while `pgherald run` runs" in added.lines
    assert any("first run: orphans: baseline recorded, 0 rows" in line for line in added.lines)
    table = assert_ok(cli("watch", "add", "emp", "--method", "snapshot", dsn=db.dsn))
    assert "(snapshot capture, key: id)" in table.lines[0]
    assert any("run it with `pgherald snapshot run`" in line for line in table.lines)

    db.execute("UPDATE emp SET active = false WHERE id = 2")
    ran = assert_ok(cli("snapshot", "run", dsn=db.dsn))
    assert ran.lines[0].startswith("emp: 0 inserted, 1 updated, 0 deleted of 2 rows")
    assert ran.lines[1].startswith("orphans: 1 inserted, 0 updated, 0 deleted of 1 rows")
    listed = assert_ok(cli("watch", "list", dsn=db.dsn)).stdout
    assert "NEXT RUN" in listed and "manual" in listed

    changes = assert_ok(cli("changes", "--watch", "orphans", "--format", "json", dsn=db.dsn))
    [event] = [json.loads(line) for line in changes.lines]
    assert event["op"] == "insert" and event["new"] == {"code": "G2", "name": "Bob"}

    db.execute("ALTER TABLE grants RENAME COLUMN pi TO lead")
    failed = cli("snapshot", "run", "orphans", dsn=db.dsn)
    assert failed.returncode == 1
    assert "orphans: FAILED (run" in failed.stderr and "column g.pi does not exist" in failed.stderr
    assert_fails(cli("snapshot", "run", "ghost", dsn=db.dsn), "no watch named 'ghost'")


def test_bad_snapshot_options_are_one_clear_error(db: Database) -> None:
    make_tables(db)
    assert_ok(cli("init", dsn=db.dsn))
    for args, message in [
        (("watch", "add", "w", "--query", "SELECT 1 AS a", "--every", "soon"), "--every 'soon'"),
        (("watch", "add", "w", "--query", "SELECT 1 AS a", "--schedule", "daily"),
         "not a cron expression"),
        (("watch", "add", "emp", "--every", "1h"), "are for snapshot watches"),
        (("watch", "add", "w", "--query", "SELEC 1"), "the query does not run"),
        (("watch", "add", "w", "--query", "SELECT 1 AS a", "--method", "trigger"),
         "make snapshot watches"),
    ]:  # fmt: skip
        assert_fails(cli(*args, dsn=db.dsn), message)
    assert assert_ok(cli("watch", "list", dsn=db.dsn)).stdout.startswith("no watches")


def test_the_daemon_runs_due_watches_and_a_missed_run_once_on_start(db: Database) -> None:
    make_tables(db)
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    assert_ok(cli("watch", "add", "emp", "--method", "snapshot", "--every", "1s", dsn=db.dsn))
    assert_ok(cli("watch", "add", "daily", "--view", "public.emp", "--schedule", "0 5 * * *",
                  dsn=db.dsn))  # fmt: skip
    # The daily watch last ran two days ago: it missed a run while nothing ran.
    db.execute(
        "UPDATE pgherald.watches SET last_run_at = now() - interval '2 days' WHERE name = 'daily'"
    )
    db.execute("UPDATE emp SET name = 'Ada L.' WHERE id = 1")
    with h.capturing(settings) as capture:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = {
                (r.watch, r.updates)
                for r in (capture.scheduler.results if capture.scheduler else [])
            }
            if ("emp", 1) in done and ("daily", 1) in done:
                break
            time.sleep(0.1)
        db.execute("UPDATE emp SET name = 'Bob B.' WHERE id = 2")
        while time.monotonic() < deadline:
            results = capture.scheduler.results if capture.scheduler else []
            if sum(r.updates for r in results if r.watch == "emp") == 2:
                break
            time.sleep(0.1)
        assert capture.scheduler is not None
        results = list(capture.scheduler.results)
    assert sum(r.updates for r in results if r.watch == "emp") == 2
    assert [r.updates for r in results if r.watch == "daily"] == [1]  # once, not twice
    assert all(r.status == "ok" for r in results)
