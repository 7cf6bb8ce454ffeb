"""A snapshot watch's baseline table: UNLOGGED, its row count kept with each run, a lost one
told from an empty one, and baselines made by an older pgherald (logged) taken over.

A crash is what empties an UNLOGGED baseline (tests/faults/test_snapshot_crash.py crashes
servers for real); here the same state is made by emptying the table by hand.
"""

from __future__ import annotations

from typing import Any

from pgherald import admin, snapshots
from pgherald.config import Settings
from pgherald.sources.snapshot import baseline_checkpoint, baseline_table
from tests import capture_harness as h
from tests.conftest import Database

WATCH = "t"
BASELINE = f"pgherald.{baseline_table(WATCH)}"


def setup(db: Database, rows: int = 3) -> Settings:
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    if rows:
        db.execute(f"INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, {rows}) i")
    admin.add_snapshot_watch(settings, WATCH, table="t")
    return settings


def persistence(db: Database) -> str:
    ((kind,),) = db.execute(
        f"SELECT relpersistence FROM pg_class WHERE oid = '{BASELINE}'::regclass"
    )
    return str(kind)


def record(db: Database) -> Any:
    found = db.execute(
        "SELECT position::jsonb FROM pgherald.checkpoints WHERE source = %s",
        (baseline_checkpoint(WATCH),),
    )
    return found[0][0] if found else None


def lost_errors(db: Database) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT run_id, detail FROM pgherald.errors WHERE detail ->> 'reason' = 'baseline_lost'"
    )


def ops(settings: Settings, run_id: int | None) -> list[tuple[str, str]]:
    return sorted(
        (e.op, e.key["id"])
        for e in h.stored_events(settings, watch=WATCH)
        if e.position == str(run_id)
    )


def test_the_baseline_is_unlogged_and_each_run_records_its_row_count(db: Database) -> None:
    settings = setup(db)
    assert persistence(db) == "u"
    first = db.execute("SELECT max(id) FROM pgherald.runs")[0][0]
    assert record(db) == {"run": first, "rows": 3}
    db.execute("INSERT INTO t VALUES (4, 'four'), (5, 'five'); DELETE FROM t WHERE id = 1")
    result = snapshots.run_watch(settings, WATCH)
    assert (result.inserts, result.deletes) == (2, 1)
    assert record(db) == {"run": result.run_id, "rows": 4}
    # A failed run records nothing: the count stays the last good run's.
    db.execute("ALTER TABLE t RENAME TO t_away")
    assert snapshots.run_watch(settings, WATCH).status == "error"
    assert record(db) == {"run": result.run_id, "rows": 4}


def test_an_emptied_baseline_is_recorded_again_with_nothing_reported(db: Database) -> None:
    settings = setup(db)
    db.execute("UPDATE t SET v = 'changed' WHERE id = 2; INSERT INTO t VALUES (9, 'nine')")
    db.execute(f"TRUNCATE {BASELINE}")  # what crash recovery does to an UNLOGGED table
    result = snapshots.run_watch(settings, WATCH)
    assert result.status == "ok" and result.baseline_lost and result.baseline_created
    assert (result.inserts, result.updates, result.deletes, result.rows_compared) == (0, 0, 0, 4)
    assert "baseline was lost" in result.describe()
    assert any("changes since the last run are not reported" in n for n in result.notes)
    assert h.stored_events(settings, watch=WATCH) == []
    ((run_id, detail),) = lost_errors(db)
    assert run_id == result.run_id and detail["recorded_rows"] == 3 and detail["rows"] == 4
    assert record(db) == {"run": result.run_id, "rows": 4}
    # From the new baseline on, runs are exact.
    db.execute("DELETE FROM t WHERE id = 9")
    after = snapshots.run_watch(settings, WATCH)
    assert not after.baseline_created
    assert ops(settings, after.run_id) == [("delete", "9")]


def test_an_empty_result_is_not_a_lost_baseline(db: Database) -> None:
    settings = setup(db, rows=0)
    assert record(db)["rows"] == 0
    db.execute("INSERT INTO t VALUES (1, 'one')")
    result = snapshots.run_watch(settings, WATCH)
    assert not result.baseline_lost and result.inserts == 1
    assert lost_errors(db) == []


def test_without_a_record_an_empty_unlogged_baseline_counts_as_lost(db: Database) -> None:
    """Every UNLOGGED baseline gets its record in the transaction that makes it; one without
    (the record deleted, or unreadable) and empty cannot be trusted: recorded again."""
    settings = setup(db)
    db.execute("UPDATE pgherald.checkpoints SET position = 'not json' WHERE source LIKE 'snap%'")
    assert snapshots.run_watch(settings, WATCH).status == "ok"  # not empty: compared as usual
    db.execute(f"DELETE FROM pgherald.checkpoints; TRUNCATE {BASELINE}")
    result = snapshots.run_watch(settings, WATCH)
    assert result.baseline_lost and h.stored_events(settings, watch=WATCH) == []
    assert lost_errors(db)[0][1]["recorded_rows"] is None


def test_a_logged_baseline_of_an_older_pgherald_is_taken_over(db: Database) -> None:
    settings = setup(db)
    # What an older pgherald left: a logged baseline and no record of its rows.
    db.execute(f"ALTER TABLE {BASELINE} SET LOGGED; DELETE FROM pgherald.checkpoints")
    db.execute("UPDATE t SET v = 'x' WHERE id = 3; DELETE FROM t WHERE id = 1")
    result = snapshots.run_watch(settings, WATCH)
    assert ops(settings, result.run_id) == [("delete", "1"), ("update", "3")]
    assert "the baseline table was made UNLOGGED" in result.notes
    assert persistence(db) == "u"
    assert record(db) == {"run": result.run_id, "rows": 2}
    again = snapshots.run_watch(settings, WATCH)
    assert again.notes == () and ops(settings, again.run_id) == []


def test_an_empty_logged_baseline_without_a_record_is_not_lost(db: Database) -> None:
    """A logged table survives crashes: empty means the result was empty."""
    settings = setup(db, rows=0)
    db.execute(f"ALTER TABLE {BASELINE} SET LOGGED; DELETE FROM pgherald.checkpoints")
    db.execute("INSERT INTO t VALUES (7, 'seven')")
    result = snapshots.run_watch(settings, WATCH)
    assert not result.baseline_lost and ops(settings, result.run_id) == [("insert", "7")]
    assert lost_errors(db) == []


def test_rows_compared_follows_from_the_kept_count(db: Database) -> None:
    """A run that keeps its baseline does not count the result: the last run's count plus
    the inserts, minus the deletes; keyed or not, it must be the result's count."""
    settings = setup(db, rows=5)
    db.execute("CREATE TABLE m (v text)")
    db.execute("INSERT INTO m VALUES ('a'), ('a'), ('b')")
    admin.add_snapshot_watch(settings, "m", table="m")  # no key: a multiset
    for round_ in range(3):
        db.execute(
            f"INSERT INTO t SELECT 100 * {round_} + i, 'n' FROM generate_series(10, 13) i;"
            f" DELETE FROM t WHERE id = (SELECT min(id) FROM t);"
            f" INSERT INTO m VALUES ('c{round_}'), ('a'); DELETE FROM m WHERE v = 'b'"
        )
        for name, table in ((WATCH, "t"), ("m", "m")):
            result = snapshots.run_watch(settings, name)
            ((rows,),) = db.execute(f"SELECT count(*) FROM {table}")
            assert result.rows_compared == rows, (name, round_)


def test_removing_a_watch_forgets_its_record_and_the_same_name_starts_afresh(
    db: Database,
) -> None:
    settings = setup(db)
    db.execute("INSERT INTO t VALUES (4, 'four')")
    assert snapshots.run_watch(settings, WATCH).inserts == 1
    admin.remove_watch(settings, WATCH)
    assert record(db) is None  # no record outlives its watch
    db.execute("DELETE FROM t")
    admin.add_snapshot_watch(settings, WATCH, table="t")
    assert record(db)["rows"] == 0
    db.execute("INSERT INTO t VALUES (7, 'seven')")
    result = snapshots.run_watch(settings, WATCH)
    assert not result.baseline_lost and result.inserts == 1
    assert lost_errors(db) == []
