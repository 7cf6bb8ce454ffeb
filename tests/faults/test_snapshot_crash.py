"""A snapshot watch's baseline through server crashes: it is an UNLOGGED table, which crash
recovery empties; the next run must notice, record the baseline again, say why, and report
no phantom change; and runs after it must be exact again.

The server is crashed for real (``pg_ctl stop -m immediate``, or SIGKILL of the postmaster,
as a power cut) on a cluster of the test's own. The truth is the table's text output,
read here at the moment of each run.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald import admin, snapshots
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.events.model import Text
from pgherald.sources.snapshot import baseline_table
from tests import capture_harness as h
from tests.acceptance._cli import PGHERALD, WORKDIR, assert_ok, clean_env, cli

pytestmark = pytest.mark.slow

WATCH = "accounts"
ROWS = 5000
Rows = dict[str, dict[str, Text]]


@pytest.fixture
def app(private_cluster: EmbeddedCluster) -> tuple[EmbeddedCluster, Settings]:
    """A database ``app`` with table ``accounts`` and a snapshot watch on it (baseline made)."""
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    settings = h.settings_for(private_cluster.dsn("app"))
    admin.init(settings)
    execute(
        settings,
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric(12, 2))",
        f"INSERT INTO accounts SELECT i, 'owner ' || i, i * 1.5 FROM generate_series(1, {ROWS}) i",
    )
    added = admin.add_snapshot_watch(settings, WATCH, table="accounts")
    assert any(f"baseline recorded, {ROWS} rows" in n for n in added.notes), added.notes
    return private_cluster, settings


def execute(settings: Settings, *statements: str) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        for s in statements:
            cur = conn.execute(s.encode())  # the tests' own literal SQL
            rows = cur.fetchall() if cur.description else []
    return rows


def workload(settings: Settings, round_: int) -> None:
    """Updates, deletes and inserts, different in each round."""
    execute(
        settings,
        f"UPDATE accounts SET balance = balance + {round_} WHERE id % 41 = {round_}",
        f"UPDATE accounts SET owner = NULL WHERE id % 97 = {round_ + 1}",
        f"DELETE FROM accounts WHERE id % 113 = {round_ + 2}",
        f"INSERT INTO accounts SELECT {ROWS} + {round_} * 1000 + i, 'new', 0"
        " FROM generate_series(1, 25) i",
    )


def contents(settings: Settings, relation: sql.Composable) -> Rows:
    with h.canonical_connect(settings.dsn) as conn:
        rows = h.raw_rows(conn, sql.SQL("SELECT id, owner, balance FROM {}").format(relation))
    return {str(r["id"]): r for r in rows}


def table(settings: Settings) -> Rows:
    return contents(settings, sql.Identifier("accounts"))


def baseline(settings: Settings) -> Rows:
    return contents(settings, sql.Identifier("pgherald", baseline_table(WATCH)))


def persistence(settings: Settings) -> str:
    ((kind,),) = execute(
        settings,
        "SELECT relpersistence FROM pg_class WHERE oid = "
        f"'pgherald.{baseline_table(WATCH)}'::regclass",
    )
    return str(kind)


def truth(before: Rows, after: Rows) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for key in before.keys() | after.keys():
        old, new = before.get(key), after.get(key)
        if old is None:
            out.append((int(key), "insert", ()))
        elif new is None:
            out.append((int(key), "delete", ()))
        elif old != new:
            out.append((int(key), "update", tuple(c for c in new if old[c] != new[c])))
    return sorted(out)


def events_of_run(settings: Settings, run_id: int | None) -> list[tuple[Any, ...]]:
    return sorted(
        (int(e.key["id"]), e.op, e.changed)
        for e in h.stored_events(settings, watch=WATCH)
        if e.position == str(run_id)
    )


def lost_errors(settings: Settings) -> list[tuple[Any, ...]]:
    return execute(
        settings,
        "SELECT run_id, source, message, detail FROM pgherald.errors"
        f" WHERE watch = '{WATCH}' AND detail ->> 'reason' = 'baseline_lost' ORDER BY id",
    )


def exact_run(settings: Settings, since: Rows) -> snapshots.RunResult:
    """A run that must report exactly what changed since ``since``."""
    now = table(settings)
    result = snapshots.run_watch(settings, WATCH)
    assert result.status == "ok" and not result.baseline_created, result.describe()
    want = truth(since, now)
    assert events_of_run(settings, result.run_id) == want
    assert (result.inserts, result.updates, result.deletes) == tuple(
        sum(1 for t in want if t[1] == op) for op in ("insert", "update", "delete")
    )
    assert baseline(settings) == now
    return result


def crash(cluster: EmbeddedCluster, how: str) -> None:
    if how == "immediate":
        cluster.restart("immediate")  # pg_ctl stop -m immediate: no shutdown checkpoint
    else:
        cluster.kill()  # SIGKILL of the postmaster, as a power cut
        cluster.start_again()


@pytest.mark.parametrize("how", ["immediate", "sigkill"])
def test_a_crash_empties_the_baseline_and_the_next_run_records_it_again(
    app: tuple[EmbeddedCluster, Settings], how: str
) -> None:
    cluster, settings = app
    assert persistence(settings) == "u"
    initial = baseline(settings)
    workload(settings, 1)
    state = table(settings)
    first = exact_run(settings, initial)  # a good run before the crash...
    assert first.inserts == 25
    # ...then rows change, and the server crashes before the next run sees them.
    workload(settings, 2)
    changed_meanwhile = truth(state, table(settings))
    assert len(changed_meanwhile) > 100
    events_before = len(h.stored_events(settings, watch=WATCH))
    crash(cluster, how)
    assert baseline(settings) == {}, "crash recovery empties an UNLOGGED table"

    done = assert_ok(cli("snapshot", "run", WATCH, dsn=settings.dsn))
    rows_now = len(table(settings))
    assert done.lines[0].startswith(
        f"{WATCH}: the baseline was lost (server crash?) and recorded again, {rows_now} rows;"
        " changes since the last run are not reported"
    ), done.lines
    # No phantom change: not every row as inserted, nothing at all for this run.
    assert len(h.stored_events(settings, watch=WATCH)) == events_before
    ((run_id, status, counts, compared),) = execute(
        settings,
        "SELECT id, status, ARRAY[inserts, updates, deletes], rows_compared FROM pgherald.runs"
        f" WHERE watch = '{WATCH}' ORDER BY id DESC LIMIT 1",
    )
    assert (status, counts, compared) == ("ok", [0, 0, 0], rows_now)
    # A clear record of why, tied to the run.
    ((error_run, source, message, detail),) = lost_errors(settings)
    assert (error_run, source) == (run_id, "snapshot")
    assert "UNLOGGED" in message and f"run {first.run_id}" in message
    assert detail == {
        "reason": "baseline_lost",
        "recorded_run": first.run_id,
        "recorded_rows": len(state),
        "rows": rows_now,
    }
    watch = next(w for w in admin.list_watches(settings) if w.name == WATCH)
    assert watch.status != "error"
    # The baseline is the table again, and the runs after it are exact.
    reset = table(settings)
    assert baseline(settings) == reset
    workload(settings, 3)
    exact_run(settings, reset)
    assert len(lost_errors(settings)) == 1


def test_a_clean_restart_keeps_the_baseline(app: tuple[EmbeddedCluster, Settings]) -> None:
    cluster, settings = app
    good = baseline(settings)
    workload(settings, 1)
    cluster.restart("fast")  # a shutdown checkpoint writes UNLOGGED tables out too
    assert baseline(settings) == good
    exact_run(settings, good)
    assert lost_errors(settings) == []


def test_an_empty_result_is_not_a_lost_baseline(app: tuple[EmbeddedCluster, Settings]) -> None:
    cluster, settings = app
    execute(settings, "DELETE FROM accounts")
    assert snapshots.run_watch(settings, WATCH).deletes == ROWS
    crash(cluster, "immediate")
    execute(settings, "INSERT INTO accounts VALUES (1, 'back', 1)")
    result = exact_run(settings, {})  # the record says 0 rows: an empty baseline is right
    assert result.inserts == 1
    assert lost_errors(settings) == []


def test_a_crash_during_a_run_loses_nothing_but_the_baseline(
    app: tuple[EmbeddedCluster, Settings],
) -> None:
    """A run in progress when the server crashes: it committed nothing; the next run finds
    the baseline lost (the last committed run's record says it held rows) and records it."""
    cluster, settings = app
    workload(settings, 1)
    execute(
        settings,
        "CREATE FUNCTION crash_here() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$",
        f"CREATE TRIGGER hold AFTER INSERT ON pgherald.{baseline_table(WATCH)}"
        " FOR EACH STATEMENT EXECUTE FUNCTION crash_here()",
    )
    run = subprocess.Popen(
        [str(PGHERALD), "--dsn", settings.dsn, "snapshot", "run", WATCH],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=WORKDIR,
    )
    try:
        deadline = time.monotonic() + 60
        while not execute(
            settings,
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgherald-snapshot'"
            " AND wait_event = 'PgSleep'",
        ):
            assert time.monotonic() < deadline, "the run never reached the baseline's insert"
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        crash(cluster, "immediate")
        run.wait(60)
    finally:
        if run.poll() is None:
            run.kill()
        run.communicate()
    assert run.returncode != 0
    events_before = len(h.stored_events(settings, watch=WATCH))
    assert events_before == 0
    execute(settings, f"DROP TRIGGER hold ON pgherald.{baseline_table(WATCH)}")
    result = snapshots.run_watch(settings, WATCH)
    assert result.baseline_lost and result.status == "ok", result.describe()
    assert h.stored_events(settings, watch=WATCH) == []
    assert len(lost_errors(settings)) == 1
    statuses = execute(
        settings, f"SELECT status FROM pgherald.runs WHERE watch = '{WATCH}' ORDER BY id"
    )
    assert [r[0] for r in statuses] == ["ok", "aborted", "ok"]
    # And the runs after it are exact.
    reset = table(settings)
    assert baseline(settings) == reset
    workload(settings, 2)
    exact_run(settings, reset)
