"""Trigger capture end to end, on every PostgreSQL of the matrix.

The watches use ``method = "trigger"``; capture runs in-process (``app.Capture``), plain
SQL changes the data, and the change log is compared with what the test did and with
the tables' own text output.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald import admin
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.db.sqlfiles import named_query
from pgherald.errors import WatchError
from pgherald.sources.trigger_admin import capture_triggers, wake_channel
from tests import capture_harness as h
from tests.conftest import FLAVOURS, PRIMARY, Database


def trigger_settings(db: Database, **overrides: Any) -> Settings:
    return h.settings_for(db.dsn, method="trigger", **overrides)


def install(db: Database, tables: list[str], **options: Any) -> Settings:
    return h.install(db.dsn, tables, settings=trigger_settings(db), slot=False, **options)


def run_sql(db: Database, *statements: str) -> None:
    with db.connect() as conn:
        for statement in statements:
            conn.execute(statement.encode())


def captured(db: Database, tables: list[str], work: Any, **options: Any) -> list[Any]:
    settings = install(db, tables, **options)
    with h.capturing(settings) as capture:
        work()
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    return h.stored_events(settings)


def test_each_operation_with_text_values_old_rows_and_changed_fields(db: Database) -> None:
    run_sql(
        db,
        "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric(12,2),"
        " opened timestamptz, tags text[], meta jsonb)",
    )

    def work() -> None:
        run_sql(
            db,
            "INSERT INTO acct VALUES (1, 'Ada', 10.50, '2026-01-02 03:04:05.678+01',"
            " '{a,\"b c\"}', '{\"k\": [1, 2.50]}'), (2, 'Grace', 0, NULL, NULL, NULL)",
            "UPDATE acct SET balance = balance + 1 WHERE id = 1",
            "UPDATE acct SET owner = owner WHERE id = 2",  # no real change: not captured
            "DELETE FROM acct WHERE id = 2",
            "TRUNCATE acct",
        )

    events = captured(db, ["acct"], work)
    assert [(e.op, dict(e.key)) for e in events] == [
        ("insert", {"id": "1"}),
        ("insert", {"id": "2"}),
        ("update", {"id": "1"}),
        ("delete", {"id": "2"}),
        ("truncate", {}),
    ]
    first = h.texts(events[0].new)
    # PostgreSQL's own text output under the canonical settings, as logical capture stores.
    assert first == {
        "id": "1",
        "owner": "Ada",
        "balance": "10.50",
        "opened": "2026-01-02 02:04:05.678+00",
        "tags": '{a,"b c"}',
        "meta": '{"k": [1, 2.50]}',
    }
    assert (h.texts(events[1].new) or {})["opened"] is None
    update = events[2]
    assert update.changed == ("balance",)
    assert update.old is not None and update.old.text("balance") == "10.50"
    assert update.new is not None and update.new.text("balance") == "11.50"
    assert update.old_values == "trigger"
    assert [(f.name, str(f.old), str(f.new)) for f in update.changed_fields] == [
        ("balance", "10.50", "11.50")
    ]
    assert events[3].old is not None and events[3].old.text("owner") == "Grace"
    assert {e.method for e in events} == {"trigger"}
    # One transaction's events share its xid; different transactions differ.
    assert events[0].xid == events[1].xid != events[2].xid
    assert all(e.commit_time is not None for e in events)


def test_rolled_back_work_and_savepoints_never_appear(db: Database) -> None:
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")

    def work() -> None:
        with db.connect(autocommit=False) as conn:
            conn.execute(b"INSERT INTO t VALUES (1, 'rolled back')")
            conn.rollback()
            conn.execute(b"INSERT INTO t VALUES (2, 'kept')")
            conn.execute(b"SAVEPOINT s")
            conn.execute(b"INSERT INTO t VALUES (3, 'savepoint rolled back')")
            conn.execute(b"UPDATE t SET v = 'changed in savepoint' WHERE id = 2")
            conn.execute(b"ROLLBACK TO SAVEPOINT s")
            conn.execute(b"UPDATE t SET v = 'kept too' WHERE id = 2")
            conn.commit()

    events = captured(db, ["t"], work)
    assert [(e.op, e.new.text_dict() if e.new else None) for e in events] == [
        ("insert", {"id": "2", "v": "kept"}),
        ("update", {"id": "2", "v": "kept too"}),
    ]
    assert events[1].old is not None and events[1].old.text("v") == "kept"


def test_ignored_and_unwatched_columns_do_not_make_an_update(db: Database) -> None:
    run_sql(
        db,
        "CREATE TABLE a (id int PRIMARY KEY, v text, touched timestamptz)",
        "CREATE TABLE b (id int PRIMARY KEY, v text, other text)",
    )
    settings = install(db, [])
    admin.add_watch(settings, "a", ignore_columns=["touched"])
    admin.add_watch(settings, "b", columns=["v"])
    with h.capturing(settings) as capture:
        run_sql(
            db,
            "INSERT INTO a VALUES (1, 'x', now())",
            "INSERT INTO b VALUES (1, 'x', 'y')",
            "UPDATE a SET touched = now() + interval '1 day'",  # ignored only
            "UPDATE b SET other = 'z'",  # unwatched only
            "UPDATE a SET v = 'x2', touched = now()",
            "UPDATE b SET v = 'x2', other = 'w'",
        )
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    events = h.stored_events(settings)
    assert [(e.table, e.op, e.changed) for e in events] == [
        ("a", "insert", ()),
        ("b", "insert", ()),
        ("a", "update", ("v",)),
        ("b", "update", ("v",)),
    ]
    assert events[1].new is not None and events[1].new.shape.names == ("id", "v")


def test_no_change_is_skipped_under_concurrent_writers_with_late_commits(db: Database) -> None:
    """The classic trap: a transaction takes a queue id, then commits after later ones were
    already moved. Claim-and-delete must still move it, exactly once."""
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY, writer int, n int)")
    settings = install(db, ["t"])
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            with db.connect(autocommit=False) as conn:
                for i in range(60):
                    conn.execute(b"INSERT INTO t VALUES (%s, %s, %s)", (w * 1000 + i, w, i))
                    if i % 7 == w:  # hold the queue id for a while before committing
                        time.sleep(0.03)
                    if i % 3 == 0:
                        conn.execute(b"UPDATE t SET n = n + 100 WHERE id = %s", (w * 1000 + i,))
                    if i % 11 == 0:
                        conn.execute(b"DELETE FROM t WHERE id = %s", (w * 1000 + i,))
                    conn.commit()
        except BaseException as e:
            errors.append(e)

    with h.capturing(settings) as capture:
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
        assert capture.trigger is not None and capture.trigger.drains > 5
    assert not errors
    events = h.stored_events(settings)
    with db.connect() as conn:
        queued = conn.execute(b"SELECT count(*) FROM pgherald.trigger_queue").fetchone()
        assert queued == (0,)
    assert len({e.event_id for e in events}) == len(events)
    expected = 4 * (60 + 20 + 6)
    assert len(events) == expected
    assert h.replay(events, "t") == h.table_contents(db.dsn, "public", "t", ["id"])
    # Per row, the log is in commit order (insert, then update, then delete).
    per_row: dict[str, list[str]] = {}
    for e in events:
        per_row.setdefault(e.key["id"], []).append(e.op)
    for ops in per_row.values():
        assert ops in (["insert"], ["insert", "update"], ["insert", "delete"],
                       ["insert", "update", "delete"])  # fmt: skip


def test_a_column_added_or_dropped_while_capturing_gets_a_schema_event(db: Database) -> None:
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = install(db, ["t"])
    with h.capturing(settings) as capture:
        for step in (
            "INSERT INTO t VALUES (1, 'a')",
            "ALTER TABLE t ADD COLUMN w int",
            "INSERT INTO t VALUES (2, 'b', 7)",
            "ALTER TABLE t DROP COLUMN v",
            "UPDATE t SET w = 8 WHERE id = 2",
        ):
            run_sql(db, step)
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    events = h.stored_events(settings)
    assert [e.op for e in events] == ["insert", "schema", "insert", "schema", "update"]
    assert h.texts(events[0].new) == {"id": "1", "v": "a"}
    assert events[1].meta["added"] == ["w"]
    assert h.texts(events[2].new) == {"id": "2", "v": "b", "w": "7"}
    assert events[3].meta["dropped"] == ["v"]
    assert events[4].changed == ("w",)


def test_a_row_queued_before_a_column_was_added_does_not_show_it_as_null(db: Database) -> None:
    """The queue may hold rows from before an ALTER: their shape is what they had."""
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = install(db, ["t"])
    run_sql(db, "INSERT INTO t VALUES (1, 'a')", "ALTER TABLE t ADD COLUMN w int DEFAULT 5")
    run_sql(db, "INSERT INTO t VALUES (2, 'b')")
    with h.capturing(settings) as capture:
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    events = h.stored_events(settings)
    assert [e.op for e in events] == ["insert", "schema", "insert"]
    assert h.texts(events[0].new) == {"id": "1", "v": "a"}  # not w: NULL, nor w: 5
    assert h.texts(events[2].new) == {"id": "2", "v": "b", "w": "5"}


def test_a_shape_change_while_stopped_is_noticed_on_start(db: Database) -> None:
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = install(db, ["t"])
    with h.capturing(settings) as capture:
        run_sql(db, "INSERT INTO t VALUES (1, 'a')")
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    run_sql(db, "ALTER TABLE t ADD COLUMN w int", "INSERT INTO t VALUES (2, 'b', 3)")
    with h.capturing(settings) as capture:
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    assert [e.op for e in h.stored_events(settings)] == ["insert", "schema", "insert"]


def test_watch_remove_and_uninstall_take_the_triggers_away(db: Database) -> None:
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY)", "CREATE TABLE u (id int PRIMARY KEY)")
    settings = install(db, ["t", "u"])
    with db.connect() as conn:
        assert len(capture_triggers(conn, "pgherald", "public", "t")) == 2
    run_sql(db, "INSERT INTO t VALUES (1)")
    removed = admin.remove_watch(settings, "t")
    assert removed.method == "trigger"
    with db.connect() as conn:
        assert capture_triggers(conn, "pgherald", "public", "t") == []
        assert conn.execute(b"SELECT count(*) FROM pgherald.trigger_queue").fetchone() == (0,)
        conn.execute(b"INSERT INTO t VALUES (2)")  # no trigger, no queue row, no error
    # Adding twice the same table is refused; adding again after removal works (idempotent).
    with pytest.raises(WatchError, match="already watched by 'u' with trigger capture"):
        admin.add_watch(settings, "u", name="u2")
    admin.add_watch(settings, "t")
    result = admin.uninstall(settings)
    assert sum("trigger" in r for r in result.removed) == 6  # t, u and the sentinel's
    with db.connect() as conn:
        conn.execute(b"INSERT INTO u VALUES (1)")  # writes work without pgherald
        assert capture_triggers(conn, "pgherald", "public", "u") == []


def test_a_watch_added_while_running_is_picked_up(db: Database) -> None:
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY)", "CREATE TABLE later (id int PRIMARY KEY)")
    settings = install(db, ["t"])
    with h.capturing(settings) as capture:
        assert capture.trigger is not None
        capture.trigger.reload_interval = 0.1
        admin.add_watch(settings, "later")
        run_sql(db, "INSERT INTO later VALUES (1)", "INSERT INTO t VALUES (1)")
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if {e.table for e in h.stored_events(settings)} == {"t", "later"}:
                break
            time.sleep(0.05)
    assert sorted(e.table for e in h.stored_events(settings)) == ["later", "t"]


def test_wake_up_is_armed_only_when_idle(db: Database) -> None:
    """Writers send a NOTIFY only while the drainer sleeps; the drainer then wakes at once."""
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY)")
    settings = install(db, ["t"])
    with h.capturing(settings) as capture:
        source = capture.trigger
        assert source is not None
        deadline = time.monotonic() + 10
        armed = None
        while time.monotonic() < deadline:
            with db.connect() as conn:
                armed = conn.execute(b"SELECT armed FROM pgherald.trigger_wake").fetchone()
            if armed == (True,):
                break
            time.sleep(0.05)
        assert armed == (True,)
        time.sleep(0.5)  # the timer backs off: a prompt capture now is the NOTIFY's doing
        before = source.notifies
        started = time.monotonic()
        run_sql(db, "INSERT INTO t VALUES (1)")
        while source.moved == 0 or not any(e.table == "t" for e in h.stored_events(settings)):
            assert time.monotonic() - started < 5
            time.sleep(0.005)
        assert source.notifies == before + 1
        with db.connect() as conn:
            assert conn.execute(b"SELECT armed FROM pgherald.trigger_wake").fetchone() == (False,)
    assert wake_channel("pgherald") == "pgherald_wake"
    assert len(wake_channel("x" * 63)) < 64


def test_a_long_store_schema_name_has_a_working_channel(db: Database) -> None:
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY)")
    schema = "s" * 60
    settings = h.install(db.dsn, ["t"], settings=trigger_settings(db, schema=schema), slot=False)
    with db.connect() as drainer, db.connect() as conn:
        # Armed as a sleeping drainer arms it (the lock that the trigger function tries).
        arm = named_query("trigger_capture.sql", "arm")
        assert drainer.execute(arm, {"store": schema}).fetchone() == (True,)
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(wake_channel(schema))))
        conn.execute(b"INSERT INTO t VALUES (1)")
        got = list(conn.notifies(timeout=2, stop_after=1))
        assert [n.channel for n in got] == [wake_channel(schema)]
    with h.capturing(settings) as capture:
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    assert [e.op for e in h.stored_events(settings)] == ["insert"]


def test_works_for_a_plain_table_owner_on_a_server_without_logical_wal() -> None:
    """No superuser, no REPLICATION, wal_level=replica: `auto` picks trigger, and it works."""
    cluster = EmbeddedCluster(FLAVOURS[PRIMARY], settings={"wal_level": "replica"}).start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(b"CREATE ROLE app LOGIN PASSWORD 'app' NOSUPERUSER NOREPLICATION")
            conn.execute(b"CREATE DATABASE shop OWNER app")
            conn.execute(b"CREATE ROLE clerk LOGIN NOSUPERUSER")
        dsn = cluster.dsn("shop") + " user=app"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(b"CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
            conn.execute(b"GRANT INSERT, UPDATE, DELETE, SELECT ON orders TO clerk")
        settings = h.settings_for(dsn, method="auto")
        admin.init(settings)
        added = admin.add_watch(settings, "orders")
        assert added.watch.method == "trigger"
        assert any("wal_level is 'replica'" in n for n in added.notes)
        assert any("neither REPLICATION nor superuser" in n for n in added.notes)
        # Another role writes: the SECURITY DEFINER trigger queues for it.
        with psycopg.connect(cluster.dsn("shop") + " user=clerk", autocommit=True) as conn:
            conn.execute(b"INSERT INTO orders VALUES (1, 9.99)")
            conn.execute(b"UPDATE orders SET total = 10 WHERE id = 1")
        capture = __import__("pgherald.app", fromlist=["Capture"]).Capture(settings).start()
        try:
            capture.wait_ready()
            deadline = time.monotonic() + 20
            while len(h.stored_events(settings)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            capture.close()
        events = h.stored_events(settings)
        assert [(e.op, e.new.text("total") if e.new else None) for e in events] == [
            ("insert", "9.99"),
            ("update", "10"),
        ]
    finally:
        cluster.stop(mode="immediate")


def test_hostile_names_and_a_partitioned_table(db: Database) -> None:
    """Names with quotes and % (psycopg placeholders) in the table, columns, watch and store
    schema; a partitioned table (row triggers reach the partitions, TRUNCATE is seen)."""
    run_sql(
        db,
        'CREATE TABLE "Odd ""T%s""" ("i%d" int PRIMARY KEY, "v %(x)s" text, w text)'
        ' PARTITION BY RANGE ("i%d")',
        'CREATE TABLE p1 PARTITION OF "Odd ""T%s""" FOR VALUES FROM (0) TO (100)',
    )
    settings = h.install(db.dsn, [], settings=trigger_settings(db, schema='st%s "re'), slot=False)
    admin.add_watch(settings, '"Odd ""T%s"""', name="we'ird %s", ignore_columns=["w"])
    with h.capturing(settings) as capture:
        run_sql(
            db,
            'INSERT INTO "Odd ""T%s""" VALUES (1, \'a\', \'b\')',
            'UPDATE "Odd ""T%s""" SET w = \'c\'',
            'UPDATE "Odd ""T%s""" SET "v %(x)s" = \'z\'',
            'TRUNCATE "Odd ""T%s"""',
        )
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    events = h.stored_events(settings)
    assert [(e.watch, e.table, e.op, h.texts(e.new), e.changed) for e in events] == [
        ("we'ird %s", 'Odd "T%s"', "insert", {"i%d": "1", "v %(x)s": "a", "w": "b"}, ()),
        ("we'ird %s", 'Odd "T%s"', "update", {"i%d": "1", "v %(x)s": "z", "w": "c"},
         ("v %(x)s",)),
        ("we'ird %s", 'Odd "T%s"', "truncate", None, ()),
    ]  # fmt: skip


def test_a_clean_stop_disarms_the_wake_up(db: Database) -> None:
    """Once pgherald is gone nobody listens: writers must not go on paying for NOTIFYs."""
    run_sql(db, "CREATE TABLE t (id int PRIMARY KEY)")
    settings = install(db, ["t"])
    with h.capturing(settings):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with db.connect() as conn:
                if conn.execute(b"SELECT armed FROM pgherald.trigger_wake").fetchone() == (True,):
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the drainer never went idle")
    with db.connect() as conn:
        assert conn.execute(b"SELECT armed FROM pgherald.trigger_wake").fetchone() == (False,)


def test_values_are_the_output_functions_text(db: Database) -> None:
    """The text logical capture stores (pgoutput sends the output function's text): a cast
    to text would write bool as true, drop char(n)'s padding and add /32 to an inet."""
    run_sql(db, 'CREATE TABLE o (id int PRIMARY KEY, b bool, c char(5), i inet, n cidr, q "char")')

    def work() -> None:
        run_sql(db, "INSERT INTO o VALUES (1, true, 'ab', '10.0.0.1', '10.0.0.0/8', 'x')")

    events = captured(db, ["o"], work)
    assert h.texts(events[0].new) == {
        "id": "1", "b": "t", "c": "ab   ", "i": "10.0.0.1", "n": "10.0.0.0/8", "q": "x",
    }  # fmt: skip
    assert [h.texts(events[0].new)] == list(
        h.table_contents(db.dsn, "public", "o", ["id"]).values()
    )
