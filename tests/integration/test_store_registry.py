"""Watches, checkpoints, runs and errors in the store, on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from pgherald.errors import PgHeraldError, SchemaError, WatchError
from pgherald.events.model import ChangeEvent, RowImage
from pgherald.store import checkpoints, migrations, runs, watches
from pgherald.store import errors as store_errors
from pgherald.store.changelog import ChangeLog
from pgherald.store.watches import Watch
from tests.conftest import Database

SCHEMA = "pgherald"


def lone_insert() -> ChangeEvent:
    now = datetime.now(UTC)
    new = RowImage.from_texts({"id": (23, "integer")}, {"id": "1"})
    return ChangeEvent("T/1", "w", "insert", "public", "t", {"id": "1"}, None, new, (), None,
                       "1", now, now, "trigger")  # fmt: skip


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection[Any]]:
    with db.connect() as c:
        migrations.install(c, SCHEMA)
        yield c


def test_watches_round_trip(conn: psycopg.Connection[Any]) -> None:
    full = Watch(
        name="grants",
        schema_name="finance",
        table_name="grants",
        method="snapshot",
        key_columns=("id", "year"),
        columns=("id", "year", "amount"),
        ignore_columns=("updated_at",),
        options={"interval": "1h", "nested": {"a": [1, 2]}},
    )
    bare = Watch("ports", "public", "ports", "logical")
    query = Watch("joined", None, None, "snapshot", ("k",), query="SELECT 1 AS k")
    for w in (full, bare, query):
        watches.add_watch(conn, SCHEMA, w)
    listed = watches.list_watches(conn, SCHEMA)
    assert [w.name for w in listed] == ["grants", "joined", "ports"]
    got = watches.get_watch(conn, SCHEMA, "grants")
    assert got is not None
    assert got.created_at is not None
    assert (got.key_columns, got.columns, got.ignore_columns) == (
        ("id", "year"),
        ("id", "year", "amount"),
        ("updated_at",),
    )
    assert got.options == {"interval": "1h", "nested": {"a": [1, 2]}}
    assert (got.enabled, got.status, got.changes_seen, got.last_run_at) == (True, "new", 0, None)
    ports = watches.get_watch(conn, SCHEMA, "ports")
    assert ports is not None and ports.columns is None and ports.key_columns == ()
    assert watches.get_watch(conn, SCHEMA, "joined") == Watch(
        "joined", None, None, "snapshot", ("k",), query="SELECT 1 AS k",
        created_at=listed[1].created_at,
    )  # fmt: skip
    assert watches.get_watch(conn, SCHEMA, "nope") is None


def test_watch_errors_say_what_to_do(conn: psycopg.Connection[Any]) -> None:
    watches.add_watch(conn, SCHEMA, Watch("w", "public", "t", "logical"))
    with pytest.raises(WatchError, match=r"'w' already exists.*pgherald watch remove w"):
        watches.add_watch(conn, SCHEMA, Watch("w", "public", "other", "trigger"))
    with pytest.raises(WatchError, match="unknown method 'magic'"):
        watches.add_watch(conn, SCHEMA, Watch("m", "public", "t", "magic"))
    with pytest.raises(WatchError, match="name a table"):
        watches.add_watch(conn, SCHEMA, Watch("q", None, None, "snapshot"))
    with pytest.raises(WatchError, match="no watch named 'ghost'"):
        watches.remove_watch(conn, SCHEMA, "ghost")
    with pytest.raises(WatchError, match="no watch named 'ghost'"):
        watches.set_watch_enabled(conn, SCHEMA, "ghost", False)
    assert [w.name for w in watches.list_watches(conn, SCHEMA)] == ["w"]


def test_watch_activity_and_status(conn: psycopg.Connection[Any]) -> None:
    watches.add_watch(conn, SCHEMA, Watch("w", "public", "t", "logical"))
    watches.record_watch_activity(conn, SCHEMA, "w", 5, True, None)
    watches.record_watch_activity(conn, SCHEMA, "w", 2, True, None)
    w = watches.get_watch(conn, SCHEMA, "w")
    assert w is not None
    assert (w.changes_seen, w.status, w.last_error) == (7, "ok", None)
    assert w.last_run_at is not None and w.last_success_at == w.last_run_at
    watches.record_watch_activity(conn, SCHEMA, "w", 0, False, "table public.t was dropped")
    w = watches.get_watch(conn, SCHEMA, "w")
    assert w is not None and w.last_run_at is not None and w.last_success_at is not None
    assert (w.status, w.last_error, w.changes_seen) == ("error", "table public.t was dropped", 7)
    assert w.last_success_at <= w.last_run_at
    watches.record_watch_activity(conn, SCHEMA, "w", 1, True, None)
    w = watches.get_watch(conn, SCHEMA, "w")
    assert w is not None and (w.status, w.last_error, w.changes_seen) == ("ok", None, 8)
    watches.set_watch_enabled(conn, SCHEMA, "w", False)
    w = watches.get_watch(conn, SCHEMA, "w")
    assert w is not None and (w.enabled, w.status) == (False, "disabled")
    watches.set_watch_enabled(conn, SCHEMA, "w", True)
    w = watches.get_watch(conn, SCHEMA, "w")
    assert w is not None and (w.enabled, w.status) == (True, "new")
    watches.record_watch_activity(conn, SCHEMA, "removed meanwhile", 3, True, None)


def test_removing_a_watch_keeps_its_history(conn: psycopg.Connection[Any]) -> None:
    watches.add_watch(conn, SCHEMA, Watch("w", "public", "t", "logical"))
    conn.execute(b"INSERT INTO pgherald.sinks (name, kind) VALUES ('feed', 'feed')")
    conn.execute(b"INSERT INTO pgherald.subscriptions (sink, watch) VALUES ('feed', 'w')")
    run_id = runs.start_run(conn, SCHEMA, "w", "snapshot")
    watches.remove_watch(conn, SCHEMA, "w")
    assert watches.list_watches(conn, SCHEMA) == []
    subs = conn.execute(b"SELECT count(*) FROM pgherald.subscriptions").fetchone()
    assert subs == (0,)
    assert [r.id for r in runs.list_runs(conn, SCHEMA, "w")] == [run_id]


def test_checkpoints(db: Database) -> None:
    with db.connect() as c:
        migrations.install(c, SCHEMA)
        assert checkpoints.load_checkpoint(c, SCHEMA, "logical:s") is None
        checkpoints.save_checkpoint(c, SCHEMA, "logical:s", "0/16B3748")
        checkpoints.save_checkpoint(c, SCHEMA, "logical:other", "1/0")
        checkpoints.save_checkpoint(c, SCHEMA, "logical:s", "0/16B37F0")
        assert checkpoints.load_checkpoint(c, SCHEMA, "logical:s") == "0/16B37F0"
    with db.connect(autocommit=False) as c:
        checkpoints.save_checkpoint(c, SCHEMA, "logical:s", "9/0")
        assert checkpoints.load_checkpoint(c, SCHEMA, "logical:s") == "9/0"
        c.rollback()  # saved in the caller's transaction: gone with it
        assert checkpoints.load_checkpoint(c, SCHEMA, "logical:s") == "0/16B37F0"
        assert checkpoints.load_checkpoint(c, SCHEMA, "logical:other") == "1/0"


def test_runs(conn: psycopg.Connection[Any]) -> None:
    first = runs.start_run(conn, SCHEMA, "w", "snapshot")
    second = runs.start_run(conn, SCHEMA, None, "logical:slot")
    runs.finish_run(conn, SCHEMA, first, inserts=3, updates=2, deletes=1, rows_compared=1000)
    runs.finish_run(conn, SCHEMA, second, status="error", error="slot is gone")
    latest = runs.list_runs(conn, SCHEMA)
    assert [r.id for r in latest] == [second, first]
    done = latest[1]
    assert (done.status, done.inserts, done.updates, done.deletes, done.truncates) == (
        "ok",
        3,
        2,
        1,
        0,
    )
    assert done.rows_compared == 1000 and done.ended_at is not None
    assert done.ended_at >= done.started_at
    assert (latest[0].status, latest[0].error, latest[0].watch) == ("error", "slot is gone", None)
    assert [r.id for r in runs.list_runs(conn, SCHEMA, watch="w")] == [first]
    assert len(runs.list_runs(conn, SCHEMA, limit=1)) == 1
    with pytest.raises(PgHeraldError, match="run 999999 does not exist"):
        runs.finish_run(conn, SCHEMA, 999_999)


def test_errors(conn: psycopg.Connection[Any]) -> None:
    run_id = runs.start_run(conn, SCHEMA, "w", "snapshot")
    first = store_errors.record_error(conn, SCHEMA, "query failed", watch="w", run_id=run_id,
                                      source="snapshot", detail={"sqlstate": "42P01"})  # fmt: skip
    second = store_errors.record_error(conn, SCHEMA, "connection lost")
    latest = store_errors.list_errors(conn, SCHEMA)
    assert [e.id for e in latest] == [second, first]
    assert (latest[1].watch, latest[1].run_id, latest[1].source) == ("w", run_id, "snapshot")
    assert latest[1].detail == {"sqlstate": "42P01"}
    assert latest[0].detail == {} and latest[0].watch is None
    assert [e.id for e in store_errors.list_errors(conn, SCHEMA, watch="w")] == [first]


def test_using_a_store_that_is_not_installed_says_so(db: Database) -> None:
    with db.connect() as c:
        with pytest.raises(SchemaError, match=r"not installed in schema 'nowhere'.*pgherald init"):
            watches.list_watches(c, "nowhere")
        with pytest.raises(SchemaError, match="pgherald init"):
            ChangeLog(c, "nowhere").read()
        with pytest.raises(SchemaError, match="pgherald init"):
            ChangeLog(c, "nowhere").append([lone_insert()])
        with pytest.raises(SchemaError, match="pgherald init"):
            checkpoints.save_checkpoint(c, "nowhere", "s", "0/0")
