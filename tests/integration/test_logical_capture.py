"""Logical capture end to end, on every PostgreSQL of the matrix.

Each test installs pgherald in a fresh database, runs capture (in-process: the same
``app.Capture`` that the demo and the API use), changes data with plain SQL, waits for
the sentinel row written after the workload, and checks what the change log holds
against what the test itself did and what the server reports (xids, commit times, WAL
positions, table contents).
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgherald import admin
from pgherald.events.model import UNCHANGED_TOAST
from pgherald.sources.logical import parse_lsn
from tests import capture_harness as h
from tests.conftest import Database


def run_sql(db: Database, *statements: str) -> None:
    with db.connect() as conn:
        for statement in statements:
            conn.execute(statement.encode())


def scalar(conn: psycopg.Connection[Any], query: str) -> str:
    row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return str(row[0])


def one_transaction(db: Database, *statements: str) -> tuple[int, datetime, datetime, int, int]:
    """Runs statements in one transaction; (xid, wall time before, after, LSN before, after)."""
    with db.connect() as conn:
        lsn_before = parse_lsn(scalar(conn, "SELECT pg_current_wal_lsn()"))
        before = datetime.now(UTC)
        with conn.transaction():
            xid = int(scalar(conn, "SELECT txid_current()"))
            for statement in statements:
                conn.execute(statement.encode())
        after = datetime.now(UTC)
        lsn_after = parse_lsn(scalar(conn, "SELECT pg_current_wal_lsn()"))
    return xid, before, after, lsn_before, lsn_after


def captured(db: Database, tables: list[str], work: Any, **options: Any) -> list[Any]:
    """Installs watches on ``tables``, runs ``work()`` under capture, returns the stored events."""
    settings = h.install(db.dsn, tables, **options)
    with h.capturing(settings) as capture:
        work()
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    return h.stored_events(settings)


def big_text() -> str:
    """About 12 kB of incompressible text: stored out of line (TOAST) by the server."""
    return secrets.token_hex(6000)


def test_insert_update_delete_captured_once_with_xid_time_and_order(db: Database) -> None:
    run_sql(db, "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric(12,2))")
    txns: list[tuple[int, datetime, datetime, int, int]] = []

    def work() -> None:
        txns.append(
            one_transaction(
                db,
                "INSERT INTO acct VALUES (1, 'Ada', 10.50), (2, 'Grace', 0)",
            )
        )
        txns.append(one_transaction(db, "UPDATE acct SET balance = balance + 1 WHERE id = 1"))
        txns.append(one_transaction(db, "DELETE FROM acct WHERE id = 2"))

    events = captured(db, ["public.acct"], work)
    assert [(e.op, dict(e.key)) for e in events] == [
        ("insert", {"id": "1"}),
        ("insert", {"id": "2"}),
        ("update", {"id": "1"}),
        ("delete", {"id": "2"}),
    ]
    assert h.texts(events[0].new) == {"id": "1", "owner": "Ada", "balance": "10.50"}
    assert h.texts(events[1].new) == {"id": "2", "owner": "Grace", "balance": "0.00"}
    assert h.texts(events[2].new) == {"id": "1", "owner": "Ada", "balance": "11.50"}
    assert events[2].changed == ("balance",)
    assert h.texts(events[3].old) == {"id": "2"}
    assert len({e.event_id for e in events}) == len(events)

    by_txn = [events[0:2], events[2:3], events[3:4]]
    positions = []
    for (xid, before, after, lsn_before, lsn_after), group in zip(txns, by_txn, strict=True):
        assert {e.xid for e in group} == {xid}
        assert len({e.position for e in group}) == 1
        assert len({e.commit_time for e in group}) == 1
        when = group[0].commit_time
        assert when is not None
        assert before - timedelta(seconds=1) <= when <= after + timedelta(seconds=1)
        position = parse_lsn(group[0].position)
        assert lsn_before <= position < lsn_after, "the commit LSN lies within the transaction"
        positions.append(position)
        assert [e.seq for e in group] == list(range(1, len(group) + 1))
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    h.assert_replay_matches(db.dsn, events, "public", "acct", ["id"])


def test_replica_identity_full_and_default_old_values(db: Database) -> None:
    run_sql(
        db,
        "CREATE TABLE full_t (id int PRIMARY KEY, a text, b int)",
        "ALTER TABLE full_t REPLICA IDENTITY FULL",
        "CREATE TABLE dflt_t (id int PRIMARY KEY, a text, b int)",
    )

    def work() -> None:
        for table in ("full_t", "dflt_t"):
            run_sql(db, f"INSERT INTO {table} VALUES (1, 'x', 1)")
            run_sql(db, f"UPDATE {table} SET a = 'y' WHERE id = 1")
            run_sql(db, f"UPDATE {table} SET b = 2, a = 'z' WHERE id = 1")
            run_sql(db, f"UPDATE {table} SET id = 5 WHERE id = 1")
            run_sql(db, f"DELETE FROM {table} WHERE id = 5")

    events = captured(db, ["public.full_t", "public.dflt_t"], work)
    full = [e for e in events if e.table == "full_t"]
    dflt = [e for e in events if e.table == "dflt_t"]
    assert (
        [e.op for e in full]
        == [e.op for e in dflt]
        == [
            "insert",
            "update",
            "update",
            "update",
            "delete",
        ]
    )
    # FULL: the server sends the whole old row.
    assert [e.old_values for e in full[1:]] == ["replica_identity"] * 4
    assert h.texts(full[1].old) == {"id": "1", "a": "x", "b": "1"}
    assert full[1].changed == ("a",)
    assert h.texts(full[2].old) == {"id": "1", "a": "y", "b": "1"}
    assert set(full[2].changed) == {"a", "b"}
    assert dict(full[3].key) == {"id": "5"}
    assert h.texts(full[3].old) == {"id": "1", "a": "z", "b": "2"}
    assert full[3].changed == ("id",)
    assert h.texts(full[4].old) == {"id": "5", "a": "z", "b": "2"}
    # DEFAULT: old values come from the change log's previous version of the row.
    assert [e.old_values for e in dflt[1:3]] == ["change_log", "change_log"]
    assert h.texts(dflt[1].old) == {"id": "1", "a": "x", "b": "1"}
    assert dflt[1].changed == ("a",)
    assert h.texts(dflt[2].old) == {"id": "1", "a": "y", "b": "1"}
    assert set(dflt[2].changed) == {"a", "b"}
    # A key change: the server sends the old key, and pgherald says where the row came from.
    assert dict(dflt[3].key) == {"id": "5"}
    assert dflt[3].meta.get("old_key") == {"id": "1"}
    assert h.texts(dflt[3].new) == {"id": "5", "a": "z", "b": "2"}
    # A delete under DEFAULT carries the key only.
    assert h.texts(dflt[4].old) == {"id": "5"}
    for table in ("full_t", "dflt_t"):
        h.assert_replay_matches(db.dsn, events, "public", table, ["id"])


def test_unchanged_toast_is_filled_from_the_log_or_marked(db: Database) -> None:
    before, early, late = big_text(), big_text(), big_text()
    run_sql(db, "CREATE TABLE doc (id int PRIMARY KEY, title text, body text)")
    with db.connect() as conn:  # a row from before the watch: the log never saw its body
        conn.execute("INSERT INTO doc VALUES (1, 'old', %s)", (before,))

    def work() -> None:
        with db.connect() as conn:
            conn.execute("INSERT INTO doc VALUES (2, 'new', %s)", (early,))
            conn.execute("UPDATE doc SET title = 'renamed' WHERE id = 2")  # body untouched
            conn.execute("UPDATE doc SET title = 'touched' WHERE id = 1")  # body unknown
            conn.execute("UPDATE doc SET body = %s WHERE id = 2", (late,))
            conn.execute("UPDATE doc SET title = 'again' WHERE id = 2")

    events = captured(db, ["public.doc"], work)
    assert [(e.op, e.key["id"]) for e in events] == [
        ("insert", "2"),
        ("update", "2"),
        ("update", "1"),
        ("update", "2"),
        ("update", "2"),
    ]
    filled = events[1]
    assert filled.new is not None and filled.new.text("body") == early
    assert filled.old is not None and filled.old.text("body") == early
    assert filled.changed == ("title",)
    assert filled.old_values == "change_log"
    marked = events[2]
    assert marked.new is not None
    assert marked.new.text("body") is UNCHANGED_TOAST, "never NULL, never made up"
    assert marked.new.text("title") == "touched"
    assert events[3].new is not None and events[3].new.text("body") == late
    assert events[4].new is not None and events[4].new.text("body") == late
    assert events[4].changed == ("title",)


def test_truncate_of_several_tables_with_cascade_is_one_event_per_table(db: Database) -> None:
    run_sql(
        db,
        "CREATE TABLE parent_t (id int PRIMARY KEY)",
        "CREATE TABLE child_t (id int PRIMARY KEY, parent int REFERENCES parent_t)",
        "CREATE TABLE other_t (id int PRIMARY KEY)",
        "CREATE TABLE unwatched_t (id int PRIMARY KEY)",
    )

    def work() -> None:
        run_sql(
            db,
            "INSERT INTO parent_t VALUES (1)",
            "INSERT INTO child_t VALUES (1, 1)",
            "INSERT INTO other_t VALUES (1)",
        )
        run_sql(db, "TRUNCATE parent_t, other_t, unwatched_t CASCADE")
        run_sql(db, "INSERT INTO other_t VALUES (2)")
        run_sql(db, "TRUNCATE other_t RESTART IDENTITY")

    events = captured(db, ["public.parent_t", "public.child_t", "public.other_t"], work)
    truncates = [e for e in events if e.op == "truncate"]
    first = [e for e in truncates if e.position == truncates[0].position]
    assert sorted(e.table for e in first) == ["child_t", "other_t", "parent_t"]
    assert all(e.meta.get("cascade") is True for e in first)
    assert len({e.event_id for e in first}) == 3
    assert len({e.xid for e in first}) == 1
    last = truncates[len(first) :]
    assert [(e.table, e.meta.get("restart_identity")) for e in last] == [("other_t", True)]
    for table in ("parent_t", "child_t", "other_t"):
        h.assert_replay_matches(db.dsn, events, "public", table, ["id"])


def test_partitioned_table_is_watched_through_its_parent(db: Database) -> None:
    run_sql(
        db,
        "CREATE TABLE measure (id int, at date, v int, PRIMARY KEY (id, at))"
        " PARTITION BY RANGE (at)",
        "CREATE TABLE measure_2023 PARTITION OF measure"
        " FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')",
        "CREATE TABLE measure_2024 PARTITION OF measure"
        " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    )

    def work() -> None:
        run_sql(
            db,
            "INSERT INTO measure VALUES (1, '2023-05-01', 1), (2, '2024-05-01', 2)",
            "UPDATE measure SET v = 10 WHERE id = 2",
            "UPDATE measure SET at = '2024-06-01' WHERE id = 1",  # moves to another partition
            "DELETE FROM measure WHERE id = 2",
        )
        # PostgreSQL publishes no TRUNCATE of a lone partition under
        # publish_via_partition_root; a TRUNCATE of the parent is one event for the parent.
        run_sql(db, "TRUNCATE measure")

    events = captured(db, ["public.measure"], work)
    assert {e.table for e in events} == {"measure"}
    assert {e.watch for e in events} == {"measure"}
    ops = [(e.op, dict(e.key)) for e in events]
    assert ops[:3] == [
        ("insert", {"id": "1", "at": "2023-05-01"}),
        ("insert", {"id": "2", "at": "2024-05-01"}),
        ("update", {"id": "2", "at": "2024-05-01"}),
    ]
    assert ops[-2] == ("delete", {"id": "2", "at": "2024-05-01"})
    # A row that moves between partitions arrives as a delete and an insert.
    assert ops[3:-2] == [
        ("delete", {"id": "1", "at": "2023-05-01"}),
        ("insert", {"id": "1", "at": "2024-06-01"}),
    ]
    assert events[-1].op == "truncate"
    assert events[-1].table == "measure"


def test_schema_changes_mid_stream_are_events_and_lose_no_rows(db: Database) -> None:
    run_sql(db, "CREATE TABLE shifty (id int PRIMARY KEY, a int, b text)")
    steps = [
        "ALTER TABLE shifty ADD COLUMN c text",
        "ALTER TABLE shifty DROP COLUMN b",
        "ALTER TABLE shifty RENAME COLUMN c TO d",
        "ALTER TABLE shifty ALTER COLUMN a TYPE bigint",
    ]

    def work() -> None:
        run_sql(db, "INSERT INTO shifty (id, a) VALUES (0, 0)")
        for i, step in enumerate(steps, start=1):
            run_sql(db, step)
            run_sql(db, f"INSERT INTO shifty (id, a) VALUES ({i}, {i})")
            run_sql(db, f"UPDATE shifty SET a = a + 100 WHERE id = {i - 1}")

    events = captured(db, ["public.shifty"], work)
    schema_events = [e for e in events if e.op == "schema"]
    assert [
        (e.meta["added"], e.meta["dropped"], e.meta["renamed"], e.meta["retyped"])
        for e in schema_events
    ] == [
        (["c"], [], [], []),
        ([], ["b"], [], []),
        ([], [], [["c", "d"]], []),
        ([], [], [], [["a", "int4", "int8"]]),
    ]
    rows = [e for e in events if e.op != "schema"]
    assert [(e.op, e.key["id"]) for e in rows] == [("insert", "0")] + [
        pair for i in range(1, 5) for pair in (("insert", str(i)), ("update", str(i - 1)))
    ]
    # Each schema event comes right before the first row change in the new shape.
    for s in schema_events:
        following = events[events.index(s) + 1]
        assert following.new is not None
        assert [c[0] for c in s.meta["columns_after"]] == list(following.new.shape.names)
    last = rows[-1]
    assert last.new is not None and last.new.column("a").type_name == "int8"
    h.assert_replay_matches(db.dsn, rows, "public", "shifty", ["id"])


def test_a_schema_change_made_while_capture_was_down_is_an_event_once(db: Database) -> None:
    run_sql(db, "CREATE TABLE moody (id int PRIMARY KEY, a int)")
    settings = h.install(db.dsn, ["public.moody"])

    def session(*statements: str) -> None:
        with h.capturing(settings) as capture:
            run_sql(db, *statements)
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))

    session("INSERT INTO moody VALUES (1, 1), (2, 2)")
    # While capture is stopped: a column is added, and a row written in the new shape.
    run_sql(db, "ALTER TABLE moody ADD COLUMN b text", "INSERT INTO moody VALUES (3, 3, 'x')")
    session()
    session("UPDATE moody SET a = 30 WHERE id = 3")  # a restart: nothing new to say
    # Renamed while stopped, and only a key-only delete follows: the schema event is
    # the only record of the new shape, and a restart must know it too.
    run_sql(db, "ALTER TABLE moody RENAME COLUMN b TO c", "DELETE FROM moody WHERE id = 1")
    session()
    session("INSERT INTO moody VALUES (4, 4, 'y')")
    events = h.stored_events(settings)
    assert [(e.op, e.key.get("id")) for e in events] == [
        ("insert", "1"),
        ("insert", "2"),
        ("schema", None),
        ("insert", "3"),
        ("update", "3"),
        ("schema", None),
        ("delete", "1"),
        ("insert", "4"),
    ]
    added, renamed = (e.meta for e in events if e.op == "schema")
    assert (added["added"], added["dropped"], added["renamed"]) == (["b"], [], [])
    assert (renamed["added"], renamed["dropped"], renamed["renamed"]) == ([], [], [["b", "c"]])
    assert [c[0] for c in renamed["columns_after"]] == ["id", "a", "c"]
    assert events[-1].new is not None and h.texts(events[-1].new) == {"id": "4", "a": "4", "c": "y"}


def test_restart_resumes_from_the_checkpoint_without_duplicates(db: Database) -> None:
    run_sql(db, "CREATE TABLE seq_t (id int PRIMARY KEY, v int)")
    settings = h.install(db.dsn, ["public.seq_t"])
    for round_ in range(3):
        with h.capturing(settings) as capture:
            run_sql(db, *(f"INSERT INTO seq_t VALUES ({round_ * 10 + i}, 0)" for i in range(5)))
            h.catch_up(settings, alive=lambda c=capture: h.capture_problem(c))
        # Changes made while capture is down are kept by the slot.
        run_sql(db, f"UPDATE seq_t SET v = v + 1 WHERE id < {round_ * 10 + 5}")
    with h.capturing(settings) as capture:
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    events = h.stored_events(settings)
    assert len({e.event_id for e in events}) == len(events)
    inserts = [e for e in events if e.op == "insert"]
    updates = [e for e in events if e.op == "update"]
    assert len(inserts) == 15
    assert len(updates) == 5 + 10 + 15
    h.assert_replay_matches(db.dsn, events, "public", "seq_t", ["id"])
    with db.connect() as conn:
        confirmed = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot,),
        ).fetchone()
    assert confirmed is not None
    last_sentinel = h.stored_events(settings, sentinels=True)[-1]
    assert parse_lsn(str(confirmed[0])) > parse_lsn(last_sentinel.position), (
        "the slot was acknowledged up to what is stored"
    )


def test_columns_are_honoured(db: Database) -> None:
    run_sql(db, "CREATE TABLE wide (id int PRIMARY KEY, a int, b int, secret text)")
    settings = h.install(db.dsn)
    admin.add_watch(settings, "public.wide", columns=("a",))
    with h.capturing(settings) as capture:
        run_sql(
            db,
            "INSERT INTO wide VALUES (1, 1, 1, 'hush')",
            "UPDATE wide SET a = 2, secret = 'x' WHERE id = 1",
            "DELETE FROM wide WHERE id = 1",
        )
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    wide = h.stored_events(settings)
    assert [e.op for e in wide] == ["insert", "update", "delete"]
    for e in wide:
        for image in (e.new, e.old):
            assert image is None or set(image.shape.names) <= {"id", "a"}
    assert h.texts(wide[0].new) == {"id": "1", "a": "1"}
    assert h.texts(wide[1].new) == {"id": "1", "a": "2"}
    assert h.texts(wide[1].old) == {"id": "1", "a": "1"}
    assert wide[1].changed == ("a",)


@pytest.mark.parametrize(
    "identity",
    [
        "full",
        "default",
    ],
)
def test_updates_of_ignored_or_unwatched_columns_only_are_not_reported(
    db: Database, identity: str
) -> None:
    run_sql(
        db,
        "CREATE TABLE noisy (id int PRIMARY KEY, a int, touched_at timestamptz)",
        f"ALTER TABLE noisy REPLICA IDENTITY {identity}",
        "CREATE TABLE narrow (id int PRIMARY KEY, a int, secret text)",
        f"ALTER TABLE narrow REPLICA IDENTITY {identity}",
    )
    settings = h.install(db.dsn)
    admin.add_watch(settings, "public.noisy", ignore_columns=("touched_at",))
    admin.add_watch(settings, "public.narrow", columns=("a",))
    with h.capturing(settings) as capture:
        run_sql(
            db,
            "INSERT INTO noisy VALUES (1, 1, now())",
            "UPDATE noisy SET touched_at = now() + interval '1 day' WHERE id = 1",
            "UPDATE noisy SET a = 2, touched_at = now() WHERE id = 1",
            "INSERT INTO narrow VALUES (1, 1, 'hush')",
            "UPDATE narrow SET secret = 'still hush' WHERE id = 1",
            "UPDATE narrow SET a = 2 WHERE id = 1",
        )
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    events = h.stored_events(settings)
    noisy = [e for e in events if e.table == "noisy"]
    assert [(e.op, e.changed) for e in noisy] == [("insert", ()), ("update", ("a",))]
    assert noisy[1].new is not None and "touched_at" in noisy[1].new.shape.names
    narrow = [e for e in events if e.table == "narrow"]
    assert [(e.op, e.changed) for e in narrow] == [("insert", ()), ("update", ("a",))]


def test_unchanged_toast_is_filled_across_a_key_change(db: Database) -> None:
    body = big_text()
    run_sql(db, "CREATE TABLE doc (id int PRIMARY KEY, title text, body text)")

    def work() -> None:
        with db.connect() as conn:
            conn.execute("INSERT INTO doc VALUES (1, 'one', %s)", (body,))
            conn.execute("UPDATE doc SET id = 2 WHERE id = 1")
            conn.execute("UPDATE doc SET title = 'two' WHERE id = 2")

    events = captured(db, ["public.doc"], work)
    ops = [(e.op, e.key["id"]) for e in events]
    assert ops == [("insert", "1"), ("update", "2"), ("update", "2")]
    assert events[1].new is not None and events[1].new.text("body") == body
    assert events[2].new is not None and events[2].new.text("body") == body


def test_two_phase_and_rolled_back_work_is_never_seen(db: Database) -> None:
    run_sql(db, "CREATE TABLE ledger (id int PRIMARY KEY, v text)")

    def work() -> None:
        with db.connect() as conn:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO ledger VALUES (1, 'rolled back')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("INSERT INTO ledger VALUES (1, 'duplicate')")
            conn.execute("ROLLBACK")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO ledger VALUES (2, 'kept')")
            conn.execute("SAVEPOINT s")
            conn.execute("INSERT INTO ledger VALUES (3, 'undone')")
            conn.execute("ROLLBACK TO SAVEPOINT s")
            conn.execute("INSERT INTO ledger VALUES (4, 'kept too')")
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO ledger VALUES (5, 'prepared')")
            conn.execute("PREPARE TRANSACTION 'p1'")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO ledger VALUES (6, 'prepared then rolled back')")
            conn.execute("PREPARE TRANSACTION 'p2'")
            conn.execute("ROLLBACK PREPARED 'p2'")
            conn.execute("COMMIT PREPARED 'p1'")

    events = captured(db, ["public.ledger"], work)
    assert [(e.op, e.key["id"]) for e in events] == [
        ("insert", "2"),
        ("insert", "4"),
        ("insert", "5"),
    ]
    assert events[0].xid == events[1].xid != events[2].xid
    h.assert_replay_matches(db.dsn, events, "public", "ledger", ["id"])


def test_capture_keeps_up_while_the_slot_advances(db: Database) -> None:
    """Acknowledged WAL is released: the slot's confirmed position follows the log."""
    run_sql(db, "CREATE TABLE tick (id int PRIMARY KEY)")
    settings = h.install(db.dsn, ["public.tick"])
    with h.capturing(settings) as capture, db.connect() as conn:
        start = conn.execute(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot,),
        ).fetchone()
        run_sql(db, *(f"INSERT INTO tick VALUES ({i})" for i in range(50)))
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
        deadline = time.monotonic() + 10
        moved = False
        while time.monotonic() < deadline and not moved:
            now = conn.execute(
                "SELECT confirmed_flush_lsn > %s FROM pg_replication_slots WHERE slot_name = %s",
                (start[0] if start else None, settings.slot),
            ).fetchone()
            moved = bool(now and now[0])
            time.sleep(0.1)
        assert moved, "the slot's confirmed_flush_lsn did not advance after events were stored"
