"""`pgherald check` as Nagios/Icinga run it: a subprocess, its exit code and its one line.

Each condition is brought about for real (WAL written while nothing captures, a snapshot
watch whose table went away, a webhook to a closed port, errors in the store) and driven
to WARNING and to CRITICAL; the performance data is parsed and compared with what the
test measured itself.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from pgherald import admin, app, routing_admin
from pgherald.store import errors as error_store
from tests import capture_harness as h
from tests.acceptance._cli import Result, assert_ok, cli
from tests.conftest import Database
from tests.plugin_output import CODES, PluginOutput, parse


def run_check(db: Database, *args: str, slot: str | None = None) -> tuple[Result, PluginOutput]:
    extra = ("--slot", slot) if slot else ()
    result = cli("check", *extra, *args, dsn=db.dsn)
    assert result.stderr == "", result.stderr
    out = parse(result.stdout)
    assert result.returncode == CODES[out.state], (result.returncode, result.stdout)
    return result, out


def expect(db: Database, state: str, *args: str, slot: str | None = None) -> PluginOutput:
    result, out = run_check(db, *args, slot=slot)
    assert out.state == state, result.stdout
    return out


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def wal_lsn(db: Database) -> int:
    [(lsn,)] = db.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    return int(str(lsn))


def test_lag_and_retained_wal_while_nothing_captures(db: Database) -> None:
    db.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
    installed = time.monotonic()
    settings = h.install(db.dsn, ["t"])
    slot = settings.slot
    calm = expect(db, "OK", slot=slot)
    assert calm.perf["lag_bytes"].value < 1 << 20
    assert calm.perf["lag_bytes"].warn == 256 << 20 and calm.perf["lag_bytes"].crit == 1 << 30
    assert calm.perf["retained_wal_bytes"].crit == 4 << 30

    # WAL for the slot to keep: about 4 MB of rows in the watched table, nothing capturing.
    before = wal_lsn(db)
    db.execute("INSERT INTO t (v) SELECT repeat('x', 150) FROM generate_series(1, 20000)")
    written = wal_lsn(db) - before
    assert written > 3 << 20

    warned = expect(db, "WARNING", "--lag-warn", "2MB", "--retained-warn", "2MB", slot=slot)
    for label in ("lag_bytes", "retained_wal_bytes"):
        value = warned.perf[label].value
        assert written <= value <= written + (1 << 20), (label, value, written)
        assert warned.perf[label].warn == 2 << 20
    assert "capture lag of slot" in warned.text and "(warning above 2.0 MB)" in warned.text
    assert "retained WAL of slot" in warned.text

    crit = expect(db, "CRITICAL", "--lag-warn", "1MB", "--lag-crit", "3MB", slot=slot)
    assert "critical above 3.0 MB" in crit.text and crit.perf["lag_bytes"].crit == 3 << 20
    crit = expect(db, "CRITICAL", "--retained-warn", "1MB", "--retained-crit", "2MB", slot=slot)
    assert "retained WAL of slot" in crit.text and "critical above 2.0 MB" in crit.text

    # Seconds: nothing streams, so the lag counts from the last progress capture made
    # (it never ran: from the watch's creation).
    time.sleep(2.5)
    warned = expect(db, "WARNING", "--lag-seconds-warn", "2s", slot=slot)
    seconds = warned.perf["lag_seconds"].value
    assert 2.5 <= seconds <= time.monotonic() - installed + 1, seconds
    expect(db, "CRITICAL", "--lag-seconds-warn", "1", "--lag-seconds-crit", "2", slot=slot)

    # Capture catches up: the same thresholds are fine again.
    with h.capturing(settings):

        def caught_up() -> bool:
            _, out = run_check(db, "--lag-warn", "1MB", "--lag-seconds-warn", "30", slot=slot)
            return out.state == "OK"

        wait_until(caught_up, what="the check to see capture caught up")

    # A slot that went away while logical watches need it is critical, whatever the flags.
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    gone = expect(db, "CRITICAL", "--lag-warn", "1TB", "--lag-crit", "1TB", slot=slot)
    assert f"replication slot {slot} does not exist" in gone.text
    assert "lag_bytes" not in gone.perf


def test_a_failing_snapshot_watch_grows_old(db_primary: Database) -> None:
    db = db_primary
    db.execute("CREATE TABLE stock (id int PRIMARY KEY, n int); INSERT INTO stock VALUES (1, 1)")
    assert_ok(cli("init", dsn=db.dsn))
    adding = time.monotonic()
    assert_ok(cli("watch", "add", "stock", "--method", "snapshot", "--every", "5s", dsn=db.dsn))
    succeeded = time.monotonic()  # `watch add` ran it once (the baseline), successfully
    fresh = expect(db, "OK")  # on time, judged by its schedule: 2 and 4 periods
    assert fresh.perf["snapshot_age_stock"].warn == 10
    assert fresh.perf["snapshot_age_stock"].crit == 20
    assert "1 of 1 snapshot watches on time" in fresh.text

    db.execute("DROP TABLE stock")
    failed = cli("snapshot", "run", "stock", dsn=db.dsn)
    assert failed.returncode == 1 and "FAILED" in failed.stderr
    quiet = ("--errors-warn", "5", "--errors-crit", "10")  # the failed run recorded an error

    wait_until(lambda: time.monotonic() - succeeded > 10.5, what="10 s")
    warned = expect(db, "WARNING", *quiet)
    age = warned.perf["snapshot_age_stock"].value
    assert 10 < age < time.monotonic() - adding, age
    assert "snapshot watch stock last succeeded" in warned.text
    assert "warning above 10 s" in warned.text
    assert 'relation "public.stock" does not exist' in warned.text  # its last run's error

    wait_until(lambda: time.monotonic() - succeeded > 20.5, what="20 s")
    crit = expect(db, "CRITICAL", *quiet)
    assert "critical above 20 s" in crit.text
    # Fixed thresholds override the schedule's.
    expect(db, "OK", *quiet, "--snapshot-age-warn", "1h", "--snapshot-age-crit", "2h")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def count_status(db: Database, sink: str, status: str) -> int:
    [(n,)] = db.execute(
        "SELECT count(*) FROM pgherald.deliveries WHERE sink = %s AND status = %s", (sink, status)
    )
    return int(str(n))


def test_failed_and_dead_deliveries(db_primary: Database) -> None:
    db = db_primary
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, state text)")
    settings = h.install(db.dsn, ["orders"], settings=h.settings_for(db.dsn, method="trigger"),
                         slot=False)  # fmt: skip
    url = f"http://127.0.0.1:{closed_port()}/hook"
    routing_admin.add_sink(settings, "dead-end", "webhook", options={"url": url}, max_attempts=1)
    routing_admin.add_sink(settings, "flaky", "webhook", options={"url": url}, max_attempts=100)
    for sink in ("dead-end", "flaky"):
        routing_admin.subscribe(settings, sink, ["orders"])
    expect(db, "OK")

    with h.capturing(settings):
        delivery = app.Delivery(settings).start()
        try:
            db.execute("INSERT INTO orders VALUES (1, 'new'), (2, 'new')")
            wait_until(
                lambda: (
                    count_status(db, "dead-end", "dead") == 2
                    and count_status(db, "flaky", "failed") == 2
                ),
                what="2 dead letters and 2 failing deliveries",
            )
        finally:
            delivery.close()  # no retry in flight while the check looks

    both = expect(db, "WARNING")  # the defaults warn above 0 of each
    assert both.perf["failed_deliveries"].value == 2 and both.perf["dead_deliveries"].value == 2
    assert "2 deliveries failing (to be retried) (flaky 2)" in both.text
    assert "2 dead letters in the last 24 h (dead-end 2)" in both.text

    only_dead = ("--failed-warn", "5", "--failed-crit", "10")
    expect(db, "CRITICAL", *only_dead, "--dead-crit", "1")
    warned = expect(db, "WARNING", *only_dead, "--dead-crit", "2")
    assert "flaky" not in warned.text and "dead-end 2" in warned.text
    only_failed = ("--dead-warn", "5", "--dead-crit", "10")
    crit = expect(db, "CRITICAL", *only_failed, "--failed-crit", "1")
    assert "flaky 2" in crit.text and "dead-end" not in crit.text

    # Dead letters put back in line are not dead any more; older ones leave the window.
    assert_ok(cli("deliveries", "retry", "--sink", "dead-end", dsn=db.dsn))
    assert expect(db, "WARNING").perf["dead_deliveries"].value == 0


def test_errors_in_the_last_hour(db_primary: Database) -> None:
    db = db_primary
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    expect(db, "OK")
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        error_store.record_error(conn, "pgherald", "the first thing that broke", watch="w1")
    warned = expect(db, "WARNING")
    assert warned.perf["errors_last_hour"].value == 1
    assert "1 errors in the last hour (latest in w1: the first thing that broke)" in warned.text
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for i in range(10):
            error_store.record_error(conn, "pgherald", f"failure {i}", source="test")
    assert expect(db, "CRITICAL").perf["errors_last_hour"].value == 11
    # Errors older than an hour do not count.
    db.execute("UPDATE pgherald.errors SET occurred_at = now() - interval '61 minutes'")
    assert expect(db, "OK").perf["errors_last_hour"].value == 0


def test_unknown_when_the_check_cannot_tell(db: Database) -> None:
    # Not installed.
    out = expect(db, "UNKNOWN")
    assert "store is not installed" in out.text and out.perf == {}
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    expect(db, "OK")
    # A server nobody listens on, a bad flag, a configuration file that is not there,
    # thresholds that contradict each other: 3, on the one line, never a traceback.
    port = closed_port()
    for args, words in [
        (("--dsn", f"host=127.0.0.1 port={port} dbname=x"), "cannot connect"),
        (("--no-such-flag",), "No such option"),
        (("--config", "/nonexistent/pgherald.toml"), "does not exist"),
        (("--lag-warn", "2GB", "--lag-crit", "1GB"), "never warn"),
        (("--dead-warn", "many"), "not a count"),
        (("--timeout", "0"), "--timeout"),
    ]:
        result = cli("check", *args, dsn=db.dsn)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert words in parse(result.stdout).text, result.stdout


def test_a_schema_of_another_name(db: Database) -> None:
    settings = h.settings_for(db.dsn, schema="herald ops")
    admin.init(settings)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        error_store.record_error(conn, "herald ops", "in the other schema")
        conn.execute(sql.SQL("SELECT 1 FROM {}.errors").format(sql.Identifier("herald ops")))
    result = cli("check", "--schema", "herald ops", dsn=db.dsn)
    assert result.returncode == 1, result.stdout
    assert parse(result.stdout).perf["errors_last_hour"].value == 1
