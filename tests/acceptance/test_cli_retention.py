"""`pgherald prune` and `--retain` from the command line: counts printed, dry runs that
change nothing, and bad input refused in one line with nothing changed; `pgherald run`
prunes by itself and applies a watch's new retain on reload."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pgherald import admin
from pgherald.config import load_settings
from pgherald.events.model import ChangeEvent, RowImage
from pgherald.store.changelog import ChangeLog
from tests.acceptance._cli import WORKDIR, assert_fails, assert_ok, catalog_snapshot, cli
from tests.conftest import Database
from tests.daemon_support import Daemon, toml_string, write_config
from tests.retention_data import SHAPE


def old_events(db: Database, watch: str, days: int, count: int) -> None:
    """``count`` inserts of distinct rows, captured ``days`` ago."""
    at = datetime.now(UTC) - timedelta(days=days)
    events = [
        ChangeEvent(
            event_id=f"{watch}/{days}/{i}",
            watch=watch,
            op="insert",
            schema="public",
            table="t",
            key={"id": str(i)},
            old=None,
            new=RowImage(SHAPE, (str(i), "x")),
            changed=(),
            xid=i,
            position=f"0/{i:X}",
            commit_time=at,
            captured_at=at,
            method="trigger",
        )
        for i in range(count)
    ]
    with db.connect() as conn:
        ChangeLog(conn, "pgherald").append(events)


def events_of(db: Database, watch: str) -> int:
    rows = db.execute("SELECT count(*) FROM pgherald.events WHERE watch = %s", (watch,))
    return int(str(rows[0][0]))


def test_retain_and_prune(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY)")
    assert_ok(cli("init", dsn=db.dsn))
    added = assert_ok(
        cli("watch", "add", "t", "--method", "trigger", "--retain", "90D", dsn=db.dsn)
    )
    assert added.lines[0].startswith("added watch 't'")
    assert_ok(cli("watch", "add", "u", "--method", "trigger", dsn=db.dsn))
    listed = json.loads(assert_ok(cli("watch", "list", "--format", "json", dsn=db.dsn)).stdout)
    assert [(w["name"], w["retain"]) for w in listed] == [("t", "90d"), ("u", None)]

    old_events(db, "t", 200, 50)
    old_events(db, "t", 10, 5)
    old_events(db, "u", 200, 7)

    dry = assert_ok(cli("prune", "--dry-run", dsn=db.dsn))
    assert dry.lines[0].startswith("t: retain 90d (before ")
    assert dry.lines[0].endswith(
        "would prune 50 events, 0 field rows, 0 deliveries, 0 attempts, 0 runs, 0 errors"
    )
    assert dry.lines[1] == "u: retain forever, nothing to prune"
    assert events_of(db, "t") == 55

    done = json.loads(assert_ok(cli("prune", "--format", "json", dsn=db.dsn)).stdout)
    assert done["dry_run"] is False
    t = next(w for w in done["watches"] if w["watch"] == "t")
    assert (t["retain"], t["events"], t["kept_shape"]) == ("90d", 50, 0)
    assert done["total"]["events"] == 50 and done["sources"] is None
    assert (events_of(db, "t"), events_of(db, "u")) == (5, 7)

    # u by the configuration's default, and only u: its newest event stays, as the last
    # full row that capture reads the watch's row shape from.
    config = WORKDIR / "retention.toml"
    config.write_text('retain = "30d"\n')
    pruned = assert_ok(cli("prune", "--watch", "u", "--config", str(config), dsn=db.dsn))
    assert len(pruned.lines) == 1 and pruned.lines[0].startswith("u: retain 30d (before ")
    assert "pruned 6 events" in pruned.lines[0]
    assert pruned.lines[0].endswith("kept though older: 1 row shape records")
    assert (events_of(db, "t"), events_of(db, "u")) == (5, 1)

    set_ = assert_ok(cli("watch", "set", "u", "--retain", "forever", dsn=db.dsn))
    assert set_.lines == ["watch 'u' keeps its events forever"]
    again = assert_ok(cli("prune", "--config", str(config), dsn=db.dsn))
    assert "u: retain forever, nothing to prune" in again.lines
    assert_ok(cli("watch", "set", "u", "--retain", "default", dsn=db.dsn))
    assert db.execute("SELECT retain FROM pgherald.watches WHERE name = 'u'") == [(None,)]


def test_bad_retain_changes_nothing(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    assert_ok(cli("init", dsn=db.dsn))
    before = catalog_snapshot(db)
    trigger = ("watch", "add", "t", "--method", "trigger")
    for args, fragments in [
        ((*trigger, "--retain", "3m"), ("--retain '3m'", "months are ambiguous")),
        ((*trigger, "--retain", "0d"), ("at least one hour",)),
        (("watch", "add", "q", "--query", "SELECT 1 AS id", "--retain", "soon"), ("'soon'",)),
        (("watch", "add", "n", "--channel", "c", "--retain", "1.5d"), ("--retain '1.5d'",)),
    ]:
        assert_fails(cli(*args, dsn=db.dsn), *fragments)
        assert catalog_snapshot(db) == before, args

    assert_ok(cli("watch", "add", "t", "--method", "trigger", "--retain", "90d", dsn=db.dsn))
    before = catalog_snapshot(db)
    assert_fails(cli("watch", "set", "t", "--retain", "90 days", dsn=db.dsn), "'90 days'")
    assert_fails(
        cli("watch", "set", "ghost", "--retain", "90d", dsn=db.dsn), "no watch named 'ghost'"
    )
    assert_fails(cli("prune", "--watch", "ghost", dsn=db.dsn), "no watch named 'ghost'")
    config = WORKDIR / "bad-retention.toml"
    config.write_text('retain = "1 month"\n')
    assert_fails(cli("prune", "--config", str(config), dsn=db.dsn), "retain '1 month'")
    assert catalog_snapshot(db) == before
    missing = cli("watch", "set", "t", dsn=db.dsn)
    assert missing.returncode == 2 and "--retain" in missing.stderr


def test_prune_refuses_while_another_runs(db: Database) -> None:
    assert_ok(cli("init", dsn=db.dsn))
    with db.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(hashtext('pgherald.prune:pgherald'))")
        assert_fails(cli("prune", dsn=db.dsn), "another prune of this store is running")
    nothing = assert_ok(cli("prune", dsn=db.dsn))
    assert nothing.lines[0].startswith("nothing to prune: every watch keeps its events forever")


def test_the_daemon_prunes_and_reloads_a_watch_retain(db: Database, tmp_path: Path) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    config = tmp_path / "pgherald.toml"

    def text(retain: str) -> str:
        return (
            f"dsn = {toml_string(db.dsn)}\n"
            'retain = "30d"\nprune_interval = "1s"\nshutdown_timeout = "20s"\n'
            f'[[watch]]\ntable = "t"\nmethod = "trigger"\nretain = "{retain}"\n'
        )

    write_config(config, text("90d"))
    settings = load_settings(config)
    admin.init(settings)
    old_events(db, "t", 200, 50)
    old_events(db, "t", 10, 5)
    daemon = Daemon(settings, config=config).start()
    try:
        daemon.wait_log("pruning the change log by its retentions every 1s")
        wait_until(lambda: events_of(db, "t") == 5, "the events older than 90 days pruned")
        daemon.wait_log("pruned the change log: 50 events")
        # Only the watch's retain changed in the file: a reload applies it.
        mark = len(daemon.log())
        write_config(config, text("7d"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("changed the retain of watch 't'", after=mark)
        assert db.execute("SELECT retain FROM pgherald.watches WHERE name = 't'") == [("7d",)]
        # The newest stays as the watch's last full row, which capture reads its shape from.
        wait_until(lambda: events_of(db, "t") == 1, "the events older than 7 days pruned")
        status, _ = daemon.terminate_timed()
        assert status == 0, daemon.log()
    finally:
        daemon.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
