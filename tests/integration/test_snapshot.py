"""Snapshot watches on real PostgreSQL: each run compares in the database and records only
the differences, with every changed field."""

from __future__ import annotations

from typing import Any

import pytest

from pgherald import admin, snapshots
from pgherald.config import Settings
from pgherald.errors import WatchError
from pgherald.events import ChangeEvent
from pgherald.schedule import Schedule
from pgherald.store import runs
from tests import capture_harness as h
from tests.conftest import Database


def setup(db: Database, *statements: str) -> Settings:
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    for s in statements:
        db.execute(s)
    return settings


def run(settings: Settings, name: str) -> snapshots.RunResult:
    return snapshots.run_watch(settings, name)


def events_of(settings: Settings, name: str) -> list[ChangeEvent]:
    return h.stored_events(settings, watch=name)


def summary(events: list[ChangeEvent]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for e in events:
        if e.op == "update":
            fields = {f: (e.old.text(f) if e.old else None, e.new.text(f) if e.new else None)
                      for f in e.changed}  # fmt: skip
            out.append((e.op, dict(e.key), fields))
        else:
            out.append((e.op, dict(e.key), h.texts(e.new if e.op == "insert" else e.old)))
    return out


def test_each_operation_and_nulls_on_either_side(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE emp (id int PRIMARY KEY, name text, salary numeric(10,2), boss int)",
        "INSERT INTO emp VALUES (1, 'Ada', 100, NULL), (2, 'Bob', NULL, 1), (3, 'Cy', 5, NULL)",
    )
    added = admin.add_snapshot_watch(settings, None, table="emp")
    assert added.watch.method == "snapshot" and added.watch.key_columns == ("id",)
    assert any("baseline recorded, 3 rows" in n for n in added.notes)
    assert events_of(settings, "emp") == []  # a baseline, not a flood of inserts
    db.execute(
        "UPDATE emp SET salary = 110, boss = 2 WHERE id = 1;"  # value -> value, NULL -> value
        " UPDATE emp SET salary = 7, boss = NULL WHERE id = 2;"  # NULL -> value, value -> NULL
        " UPDATE emp SET boss = NULL WHERE id = 3;"  # NULL = NULL: no change
        " DELETE FROM emp WHERE id = 3; INSERT INTO emp VALUES (4, 'Di', NULL, NULL)"
    )
    result = run(settings, "emp")
    assert (result.status, result.inserts, result.updates, result.deletes) == ("ok", 1, 2, 1)
    assert result.rows_compared == 3
    events = events_of(settings, "emp")
    assert summary(events) == [
        ("update", {"id": "1"}, {"salary": ("100.00", "110.00"), "boss": (None, "2")}),
        ("update", {"id": "2"}, {"salary": (None, "7.00"), "boss": ("1", None)}),
        ("delete", {"id": "3"}, {"id": "3", "name": "Cy", "salary": "5.00", "boss": None}),
        ("insert", {"id": "4"}, {"id": "4", "name": "Di", "salary": None, "boss": None}),
    ]
    assert {e.method for e in events} == {"snapshot"}
    assert {e.old_values for e in events if e.op == "update"} == {"snapshot"}
    assert run(settings, "emp").updates == 0  # the baseline moved on
    assert len(events_of(settings, "emp")) == 4
    with db.connect() as conn:
        recorded = runs.list_runs(conn, "pgherald", watch="emp")
    assert [(r.status, r.inserts, r.updates, r.deletes) for r in recorded] == [
        ("ok", 0, 0, 0),
        ("ok", 1, 2, 1),
        ("ok", 0, 0, 0),
    ]


def test_truncate_and_reload_reports_only_what_changed(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE imp (code text PRIMARY KEY, amount numeric, note text)",
        "INSERT INTO imp SELECT 'c' || i, i * 10, 'n' FROM generate_series(1, 2000) i",
    )
    admin.add_snapshot_watch(settings, "import", table="imp")
    db.execute(
        "BEGIN; TRUNCATE imp;"
        " INSERT INTO imp SELECT 'c' || i, i * 10, 'n' FROM generate_series(2, 2001) i;"
        " UPDATE imp SET amount = -1 WHERE code IN ('c7', 'c8'); COMMIT"
    )
    result = run(settings, "import")
    assert (result.inserts, result.updates, result.deletes) == (1, 2, 1)
    assert [(e.op, e.key["code"]) for e in events_of(settings, "import")] == [
        ("delete", "c1"),
        ("insert", "c2001"),
        ("update", "c7"),
        ("update", "c8"),
    ]


def test_composite_key_and_a_key_that_changes(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE g (a int, b text, v text, PRIMARY KEY (a, b))",
        "INSERT INTO g VALUES (1, 'x', 'one'), (1, 'y', 'two')",
    )
    admin.add_snapshot_watch(settings, "g", table="g")
    db.execute("UPDATE g SET b = 'z' WHERE b = 'y'; UPDATE g SET v = 'uno' WHERE b = 'x'")
    run(settings, "g")
    assert [(e.op, dict(e.key)) for e in events_of(settings, "g")] == [
        ("update", {"a": "1", "b": "x"}),
        ("delete", {"a": "1", "b": "y"}),
        ("insert", {"a": "1", "b": "z"}),
    ]


def test_duplicate_or_null_keys_fail_the_run_and_keep_the_baseline(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE d (k int, v text)",
        "INSERT INTO d VALUES (1, 'a'), (2, 'b')",
    )
    admin.add_snapshot_watch(settings, "d", table="d", key=["k"])
    db.execute(
        "INSERT INTO d VALUES (2, 'again'), (NULL, 'nokey'); UPDATE d SET v = 'A' WHERE k = 1"
    )
    result = run(settings, "d")
    assert result.status == "error"
    assert result.error is not None
    assert "k=NULL" in result.error and "k='2' (2 rows)" in result.error
    assert events_of(settings, "d") == []
    watch = next(w for w in admin.list_watches(settings) if w.name == "d")
    assert watch.status == "error" and watch.last_error == result.error
    db.execute("DELETE FROM d WHERE v IN ('again', 'nokey')")
    again = run(settings, "d")
    assert (again.status, again.updates) == ("ok", 1)  # compared with the old baseline
    with db.connect() as conn:
        statuses = [r.status for r in runs.list_runs(conn, "pgherald", watch="d")]
        errors = conn.execute(b"SELECT watch, message FROM pgherald.errors").fetchall()
    assert statuses == ["ok", "error", "ok"]
    assert errors == [("d", result.error)]


def test_a_shape_change_is_an_event_and_shared_columns_are_compared(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE s (id int PRIMARY KEY, a text, b int)",
        "INSERT INTO s VALUES (1, 'x', 1), (2, 'y', 2)",
    )
    admin.add_snapshot_watch(settings, "s", table="s")
    db.execute(
        "ALTER TABLE s DROP COLUMN b, ADD COLUMN c date; UPDATE s SET a = 'z' WHERE id = 2;"
        " UPDATE s SET c = '2026-01-01' WHERE id = 1"
    )
    result = run(settings, "s")
    assert result.shape_changed and result.updates == 1
    events = events_of(settings, "s")
    assert [e.op for e in events] == ["schema", "update"]
    assert events[0].meta["added"] == ["c"] and events[0].meta["dropped"] == ["b"]
    assert events[1].changed == ("a",)
    assert h.texts(events[1].new) == {"id": "2", "a": "z", "c": None}
    assert run(settings, "s").updates == 0  # the new shape is the baseline now


def test_a_multi_table_query_watch(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE emp (id int PRIMARY KEY, name text, active bool)",
        "CREATE TABLE grants (code text PRIMARY KEY, pi int REFERENCES emp)",
        "INSERT INTO emp VALUES (1, 'Ada', true), (2, 'Bob', true)",
        "INSERT INTO grants VALUES ('G1', 1), ('G2', 2)",
    )
    query = (
        "SELECT g.code, e.name AS pi_name FROM grants g JOIN emp e ON e.id = g.pi"
        " WHERE NOT e.active"
    )
    added = admin.add_snapshot_watch(settings, "orphans", query=query, key=["code"])
    assert added.watch.query == query
    db.execute("UPDATE emp SET active = false WHERE id = 2")
    run(settings, "orphans")
    events = events_of(settings, "orphans")
    assert [(e.op, e.table, h.texts(e.new)) for e in events] == [
        ("insert", "orphans", {"code": "G2", "pi_name": "Bob"})
    ]


def test_keyless_results_compare_as_a_multiset(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE m (v text, n int)",
        "INSERT INTO m VALUES ('a', 1), ('a', 1), ('b', NULL)",
    )
    added = admin.add_snapshot_watch(settings, "m", view=("public", "m"))
    assert any("identified by their content" in n for n in added.notes)
    db.execute("DELETE FROM m WHERE ctid = (SELECT min(ctid) FROM m WHERE v = 'a');"
               " INSERT INTO m VALUES ('c', 3), ('b', NULL)")  # fmt: skip
    result = run(settings, "m")
    assert (result.inserts, result.deletes) == (2, 1)
    events = events_of(settings, "m")
    assert sorted((e.op, str(h.texts(e.new or e.old))) for e in events) == sorted(
        [
            ("delete", str({"v": "a", "n": "1"})),
            ("insert", str({"v": "b", "n": None})),
            ("insert", str({"v": "c", "n": "3"})),
        ]
    )
    assert all(e.meta["identified_by"] == "content" and e.key == {} for e in events)


def test_ignored_columns_do_not_count(db: Database) -> None:
    settings = setup(
        db,
        "CREATE TABLE i (id int PRIMARY KEY, v text, modified timestamptz DEFAULT now())",
        "INSERT INTO i VALUES (1, 'a'), (2, 'b')",
    )
    admin.add_snapshot_watch(settings, "i", table="i", ignore_columns=["modified"])
    db.execute(
        "UPDATE i SET modified = now() + interval '1 hour'; UPDATE i SET v = 'B' WHERE id = 2"
    )
    run(settings, "i")
    events = events_of(settings, "i")
    assert [(e.op, e.changed) for e in events] == [("update", ("v",))]
    assert events[0].new is not None and "modified" not in events[0].new.shape


def test_a_query_that_stops_working_fails_with_the_database_message(db: Database) -> None:
    settings = setup(db, "CREATE TABLE q (id int PRIMARY KEY)", "INSERT INTO q VALUES (1)")
    admin.add_snapshot_watch(settings, "q", query="SELECT id FROM q", key=["id"])
    db.execute("ALTER TABLE q RENAME TO q2")
    result = run(settings, "q")
    assert result.status == "error"
    assert result.error is not None and 'relation "q" does not exist' in result.error
    db.execute("ALTER TABLE q2 RENAME TO q; INSERT INTO q VALUES (2)")
    assert run(settings, "q").inserts == 1


def test_bad_watches_are_refused_and_change_nothing(db: Database) -> None:
    settings = setup(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"query": "SELEC 1"}, "does not run: syntax error"),
        ({"query": "SELECT 1 AS a", "key": ["b"]}, "no column b"),
        ({"query": "SELECT 1 AS a", "ignore_columns": ["z"]}, "--ignore-columns: the query"),
        ({"table": "t", "view": "t"}, "one of a table, a view"),
        ({"table": "nope"}, "no table public.nope"),
        ({"table": "t", "key": ["id"], "ignore_columns": ["id"]}, "cannot be in --ignore"),
    ]
    for kwargs, message in cases:
        with pytest.raises(WatchError, match=message):
            admin.add_snapshot_watch(settings, "w", **kwargs)
    assert [w.name for w in admin.list_watches(settings)] == []
    with db.connect() as conn:
        tables = conn.execute(
            b"SELECT count(*) FROM pg_tables WHERE schemaname = 'pgherald'"
            b" AND tablename LIKE 'snapshot_%'"
        ).fetchone()
    assert tables == (0,)


def test_remove_drops_the_baseline_and_schedules_are_stored(db: Database) -> None:
    settings = setup(db, "CREATE TABLE t (id int PRIMARY KEY)")
    added = admin.add_snapshot_watch(settings, "t", table="t", schedule=Schedule.parse(every="15m"))
    assert added.watch.options["every"] == 900
    assert any("every 15m" in n for n in added.notes)
    admin.remove_watch(settings, "t")
    with db.connect() as conn:
        left = conn.execute(
            b"SELECT count(*) FROM pg_tables WHERE tablename LIKE 'snapshot_%'"
        ).fetchone()
    assert left == (0,)
