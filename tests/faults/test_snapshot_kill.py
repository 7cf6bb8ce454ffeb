"""Crash safety of snapshot runs: SIGKILL a run half-way, or fail it; lose and invent nothing.

A run is one transaction: comparison, baseline, events and the run's record commit
together, and the run's start is committed before it. So a run killed at any moment
must leave the baseline exactly as the last good run left it, no event of its own, and
its run record ``running``, until the next run marks it ``aborted`` and reports, exactly,
what changed since the last good run.

``pgherald snapshot run NAME`` runs as a subprocess, as cron runs it, and is SIGKILLed
at one of three moments, each held open by a ``pg_sleep`` that the test controls, and
seen in ``pg_stat_activity`` (the run's backend is inside its transaction, which has
written, and waits in the statement of that moment) before the kill:

- ``compare``: the watch's query sleeps once per execution, so the run waits while the
  FULL JOIN fills the difference table;
- ``apply``: a statement trigger on the baseline table sleeps after the baseline's rows
  were deleted and the new ones inserted;
- ``events``: a statement trigger on the change log sleeps after the run's events went in.

Killing the client leaves its backend to finish the statement; it then finds the client
gone and rolls back. The truth for the next run is computed here, from the text output
of the table at the last good run and now.

A failing run (division by zero for one row of the query) must likewise leave the
baseline, and the next good run must be exact.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest
from psycopg import sql

from pgherald import admin
from pgherald.config import Settings
from pgherald.sources.snapshot import baseline_table
from tests import capture_harness as h
from tests.acceptance._cli import PGHERALD, WORKDIR, assert_ok, clean_env, cli
from tests.conftest import Database

pytestmark = pytest.mark.slow

ROWS = 20_000
WATCH = "big"
HOLD_SECONDS = 2.0
"""How long a held moment lasts: long enough to see and kill, short for the orphan backend."""

Rows = dict[tuple[str | None, ...], dict[str, str | None]]

SETUP = f"""
CREATE TABLE big (id int PRIMARY KEY, v int, note text, d int NOT NULL DEFAULT 1);
INSERT INTO big SELECT i, i % 1000, 'note ' || i, 1 + i % 7 FROM generate_series(1, {ROWS}) i;
CREATE TABLE control (point text PRIMARY KEY, delay float8 NOT NULL);
CREATE FUNCTION hold(at text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_sleep(delay) FROM public.control WHERE point = at;
    RETURN true;
END $$;
CREATE FUNCTION hold_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.hold(TG_ARGV[0]);
    RETURN NULL;
END $$;
"""

QUERY = "SELECT b.id, b.v, b.note FROM big b WHERE (SELECT hold('compare'))"
"""The watched query: the table's rows; it sleeps once per execution while ``compare`` is held."""


def workload(db: Database, round_: int) -> None:
    """A few hundred changes of every kind, different in each round."""
    db.execute(
        f"UPDATE big SET v = v + 1000 WHERE id % 97 = {round_};"
        f" UPDATE big SET note = 'changed {round_}' WHERE id % 211 = {round_ + 1};"
        f" UPDATE big SET note = NULL WHERE id % 499 = {round_ + 2};"
        f" UPDATE big SET v = v WHERE id % 53 = {round_};"  # written again, the same
        f" DELETE FROM big WHERE id % 307 = {round_ + 3};"
        f" INSERT INTO big SELECT {ROWS} + {round_} * 1000 + i, i, 'new ' || i"
        f" FROM generate_series(1, 150) i"
    )


def contents(db: Database, relation: sql.Composable, columns: tuple[str, ...]) -> Rows:
    """The rows of ``relation`` as text output, by key (``id``)."""
    with h.canonical_connect(db.dsn) as conn:
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in columns), relation
        )
        rows = h.raw_rows(conn, query)
    return {(str(r["id"]),): {k: _text(v) for k, v in r.items()} for r in rows}


def _text(value: object) -> str | None:
    assert value is None or isinstance(value, str)
    return value


def baseline(db: Database, columns: tuple[str, ...]) -> Rows:
    return contents(db, sql.Identifier("pgherald", baseline_table(WATCH)), columns)


def expected_events(before: Rows, after: Rows) -> list[tuple[Any, ...]]:
    """What a comparison of the two states must report, as the test reads events."""
    out: list[tuple[Any, ...]] = []
    for key in before.keys() | after.keys():
        old, new = before.get(key), after.get(key)
        if old is None:
            out.append(("insert", key[0], (), None, new))
        elif new is None:
            out.append(("delete", key[0], (), old, None))
        elif old != new:
            changed = tuple(c for c in new if old[c] != new[c])
            out.append(("update", key[0], changed, old, new))
    return sorted(out, key=_order)


def _order(item: tuple[Any, ...]) -> tuple[int, str]:
    return int(item[1]), item[0]


def events_of_run(settings: Settings, run_id: int) -> list[tuple[Any, ...]]:
    events = [e for e in h.stored_events(settings, watch=WATCH) if e.position == str(run_id)]
    return sorted(
        ((e.op, e.key["id"], e.changed, h.texts(e.old), h.texts(e.new)) for e in events),
        key=_order,
    )


def runs(db: Database) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in db.execute(
            "SELECT id, status, inserts, updates, deletes, rows_compared, error"
            " FROM pgherald.runs WHERE watch = %s ORDER BY id",
            (WATCH,),
        )
    ]


def hold(db: Database, point: str | None) -> None:
    db.execute("DELETE FROM control")
    if point is not None:
        db.execute("INSERT INTO control VALUES (%s, %s)", (point, HOLD_SECONDS))


def start_run(db: Database) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(PGHERALD), "--dsn", db.dsn, "snapshot", "run", WATCH],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=WORKDIR,
    )


STATEMENT_OF = {
    "compare": "pgherald_diff",  # CREATE TEMP TABLE pgherald_diff AS ... FULL JOIN ...
    "apply": "INSERT INTO",  # apply_inserts, into the baseline
    # The change log's INSERT ... SELECT that makes the events in the server: its text is
    # longer than pg_stat_activity keeps (1 kB), and the only statement that can sleep
    # then, as the trigger holding it is on the change log: any statement of the run.
    "events": "",
}


def wait_until_held(db: Database, proc: subprocess.Popen[str], point: str) -> int:
    """The pid of the run's backend once it sleeps at ``point`` inside its open transaction."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before {point}: {proc.communicate()}"
        found = db.execute(
            "SELECT pid, query FROM pg_stat_activity"
            " WHERE application_name = 'pgherald-snapshot' AND state = 'active'"
            " AND wait_event = 'PgSleep' AND xact_start IS NOT NULL"
            " AND backend_xid IS NOT NULL"  # the transaction has written
        )
        for pid, query in found:
            if STATEMENT_OF[point] in str(query):
                return int(str(pid))
        time.sleep(0.02)
    raise AssertionError(f"the run was never seen held at {point}")


def wait_gone(db: Database, pid: int) -> None:
    deadline = time.monotonic() + 60
    while db.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
        assert time.monotonic() < deadline, "the killed run's backend never went away"
        time.sleep(0.05)


def setup(
    db: Database, query: str = QUERY, columns: tuple[str, ...] = ("id", "v", "note")
) -> Settings:
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    db.execute(SETUP)
    added = admin.add_snapshot_watch(settings, WATCH, query=query, key=["id"])
    assert any(f"baseline recorded, {ROWS} rows" in n for n in added.notes), added.notes
    assert baseline(db, columns) == contents(db, sql.SQL(f"({query}) q"), columns)
    return settings


@pytest.mark.parametrize("point", ["compare", "apply", "events"])
def test_a_run_killed_half_way_changes_nothing_and_the_next_run_is_exact(
    db_primary: Database, point: str
) -> None:
    db = db_primary
    columns = ("id", "v", "note")
    settings = setup(db)
    table = sql.SQL("big")
    if point == "apply":
        db.execute(
            f"CREATE TRIGGER hold_apply AFTER INSERT ON pgherald.{baseline_table(WATCH)}"
            " FOR EACH STATEMENT EXECUTE FUNCTION hold_trigger('apply')"
        )
    elif point == "events":
        db.execute(
            "CREATE TRIGGER hold_events AFTER INSERT ON pgherald.events"
            " FOR EACH STATEMENT EXECUTE FUNCTION hold_trigger('events')"
        )
    good = baseline(db, columns)
    assert good == contents(db, table, columns)
    events_before = len(h.stored_events(settings, watch=WATCH))
    assert events_before == 0

    workload(db, 1)
    hold(db, point)
    proc = start_run(db)
    try:
        backend = wait_until_held(db, proc, point)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    hold(db, None)
    wait_gone(db, backend)  # it finished its statement, found its client gone, rolled back

    recorded = runs(db)
    killed_run = recorded[-1][0]
    assert [r[1] for r in recorded] == ["ok", "running"]
    assert baseline(db, columns) == good, "the killed run changed the baseline"
    assert len(h.stored_events(settings, watch=WATCH)) == events_before
    assert not db.execute(
        "SELECT 1 FROM pg_class WHERE relname = 'pgherald_diff' AND relpersistence = 't'"
    )

    workload(db, 2)
    now = contents(db, table, columns)
    done = assert_ok(cli("snapshot", "run", WATCH, dsn=db.dsn))
    truth = expected_events(good, now)
    recorded = runs(db)
    (_, status, *_, error), (good_run, *counts, _) = recorded[1], recorded[2]
    assert (status, error) == (
        "aborted",
        "the run ended without finishing (process killed or connection lost)",
    )
    assert recorded[1][0] == killed_run
    ops = [t[0] for t in truth]
    assert counts == ["ok", ops.count("insert"), ops.count("update"), ops.count("delete"),
                      len(now)]  # fmt: skip
    assert done.lines[0].startswith(
        f"{WATCH}: {ops.count('insert')} inserted, {ops.count('update')} updated,"
        f" {ops.count('delete')} deleted of {len(now)} rows"
    )
    assert events_of_run(settings, good_run) == truth
    assert len(truth) > 500  # the comparison is worth something
    assert baseline(db, columns) == now


def test_a_failing_run_keeps_the_baseline_and_the_next_run_is_exact(db_primary: Database) -> None:
    db = db_primary
    query = "SELECT id, v, note, 1000 / d AS ratio FROM big"
    columns = ("id", "v", "note", "ratio")
    settings = setup(db, query, columns)
    result_of = sql.SQL(f"({query}) q")
    good = baseline(db, columns)

    workload(db, 1)
    db.execute("UPDATE big SET d = 0 WHERE id = 4242")  # one row now divides by zero
    failed = cli("snapshot", "run", WATCH, dsn=db.dsn)
    assert failed.returncode == 1
    assert "FAILED" in failed.stderr and "division by zero" in failed.stderr
    assert baseline(db, columns) == good
    assert h.stored_events(settings, watch=WATCH) == []
    status, error = runs(db)[-1][1], runs(db)[-1][-1]
    assert status == "error" and "division by zero" in str(error)

    db.execute("UPDATE big SET d = 3 WHERE id = 4242")  # its ratio changes: 1000 / 3
    workload(db, 2)
    now = contents(db, result_of, columns)
    assert_ok(cli("snapshot", "run", WATCH, dsn=db.dsn))
    last = runs(db)[-1]
    assert last[1] == "ok"
    truth = expected_events(good, now)
    assert ("update", "4242") in {t[:2] for t in truth}
    assert events_of_run(settings, int(str(last[0]))) == truth
    assert baseline(db, columns) == now
