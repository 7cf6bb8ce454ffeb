"""Trigger capture's two ways of making events agree, byte for byte.

The drainer makes most batches' events in the server (``TriggerSource._selected``: one
``INSERT ... SELECT`` from the claimed queue rows) and the rest in Python
(``TriggerAssembler``: rows queued before a column was added, shape changes). The Python
path is the reference: the same queue, drained once each way, must leave the same rows in
``events`` and ``event_fields`` (everything but the log id and the capture time), and the
same watch activity.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from pgherald import admin, app
from pgherald.config import Settings
from pgherald.sources.trigger import TriggerSource
from pgherald.store.changelog import row_key_of
from tests import capture_harness as h
from tests.conftest import Database

EVENTS = """
SELECT e.event_id, e.watch, e.op, e.schema_name, e.table_name, e.row_key, e.key_columns,
       s.columns, os.columns, e.old_values, e.new_values, e.unchanged, e.old_unchanged,
       e.changed, e.xid, e.position, e.commit_time, e.method, e.seq, e.old_values_source,
       e.meta
FROM pgherald.events e
LEFT JOIN pgherald.shapes s ON s.id = e.shape_id
LEFT JOIN pgherald.shapes os ON os.id = e.old_shape_id
WHERE e.watch <> %s
ORDER BY e.id
"""
FIELDS = """
SELECT e.event_id, f.column_name, f.old_value, f.new_value
FROM pgherald.event_fields f JOIN pgherald.events e ON e.id = f.event_id
ORDER BY e.id, f.column_name
"""
WATCHES = "SELECT name, changes_seen, status FROM pgherald.watches ORDER BY name"

# Texts that JSON and COPY escape, and some that they must not.
ODD = [
    "plain", 'quo"te', "back\\slash", "tab\there", "new\nline", "ctl\x01\x1f", "é ü ß", "😀 ok",
    "", "null",
]  # fmt: skip


def drained(settings: Settings, in_sql: bool, timeout: float = 60.0) -> TriggerSource:
    """Drains the queue with a source of its own (SQL path or Python path) until empty."""
    source = app.build_trigger_source(settings)
    source.in_sql = in_sql
    sink = app.ChangeLogSink(settings.dsn, settings.schema, app.trigger_source_name(settings))
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            source.run(sink, stop)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        with psycopg.connect(settings.dsn, autocommit=True) as conn:
            while True:
                assert not errors, errors
                left = conn.execute("SELECT count(*) FROM pgherald.trigger_queue").fetchone()
                if (
                    left == (0,)
                    and source.moved
                    and not conn.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgherald-store'"
                        " AND state = 'idle in transaction'"
                    ).fetchone()
                ):
                    break
                assert time.monotonic() < deadline, "the queue was not drained in time"
                time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
        sink.close()
    assert not errors, errors
    return source


def log_rows(settings: Settings) -> tuple[list[Any], list[Any], list[Any]]:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        return (
            conn.execute(EVENTS, (h.SENTINEL_WATCH,)).fetchall(),
            conn.execute(FIELDS).fetchall(),
            conn.execute(WATCHES).fetchall(),
        )


def both_ways(db: Database, settings: Settings) -> tuple[Any, Any]:
    """The log after draining the current queue in SQL, then after draining the very same
    queue (ids, xids and all) in Python; asserts which path each drain took."""
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE saved_queue AS SELECT * FROM pgherald.trigger_queue")
        queued = conn.execute("SELECT count(*) FROM saved_queue").fetchone()
        assert queued is not None and queued[0] > 0
    source = drained(settings, in_sql=True)
    assert source.moved == source.moved_in_sql == queued[0]
    in_sql = log_rows(settings)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM pgherald.event_fields")
        conn.execute("DELETE FROM pgherald.events")
        conn.execute("UPDATE pgherald.watches SET changes_seen = 0, status = 'new'")
        conn.execute("INSERT INTO pgherald.trigger_queue SELECT * FROM saved_queue")
        conn.execute("DROP TABLE saved_queue")
    source = drained(settings, in_sql=False)
    assert source.moved == queued[0] and source.moved_in_sql == 0
    return in_sql, log_rows(settings)


@pytest.fixture
def settings(db: Database) -> Settings:
    with db.connect() as conn:
        conn.execute(
            b"CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric(12,2),"
            b" opened timestamptz, tags text[], meta jsonb, b bool, c char(4), i inet,"
            b" f float8, d date, span interval, raw bytea, touched timestamptz)"
        )
        conn.execute(b"CREATE TABLE pair (a text, b text, v text, PRIMARY KEY (a, b))")
        conn.execute(b"CREATE TABLE narrow (id int PRIMARY KEY, v text, other text)")
    settings = h.install(db.dsn, [], settings=h.settings_for(db.dsn, method="trigger"), slot=False)
    admin.add_watch(settings, "acct", ignore_columns=["touched"])
    admin.add_watch(settings, "pair")
    admin.add_watch(settings, "narrow", columns=["v"])
    return settings


def test_the_server_makes_the_events_python_makes(db: Database, settings: Settings) -> None:
    with db.connect() as conn:
        conn.execute(
            b"INSERT INTO acct VALUES (1, 'Ada', 10.50, '2026-01-02 03:04:05.678+01',"
            b" '{a,\"b c\"}', '{\"k\": [1, 2.50]}', true, 'ab', '10.0.0.1', 0.1, '2026-02-03',"
            b" '1 day 02:03:04', '\\x00ff', now()),"
            b" (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
        )
        for n, text in enumerate(ODD):
            conn.execute(b"INSERT INTO pair VALUES (%s, %s, %s)", (text, str(n), text))
        conn.execute(b"INSERT INTO narrow VALUES (1, 'x', 'y'), (2, 'x', 'y')")
        with conn.transaction():
            conn.execute(b"UPDATE acct SET balance = balance + 1, b = NOT b WHERE id = 1")
            conn.execute(b"UPDATE acct SET touched = now() + interval '1 day'")  # ignored only
            conn.execute(b"UPDATE acct SET owner = 'Grace', f = 1e-300 WHERE id = 2")
        conn.execute(b"UPDATE acct SET id = 3 WHERE id = 2")  # a new key: meta old_key
        conn.execute(b"UPDATE pair SET b = b || '!' WHERE a = %s", (ODD[1],))
        conn.execute(b"UPDATE pair SET v = NULL WHERE a = %s", (ODD[3],))
        conn.execute(b"UPDATE narrow SET other = 'z'")  # unwatched only: no event
        conn.execute(b"UPDATE narrow SET v = 'w', other = 'q' WHERE id = 2")
        conn.execute(b"DELETE FROM pair WHERE a = %s", (ODD[5],))
        conn.execute(b"DELETE FROM acct WHERE id = 3")
        conn.execute(b"TRUNCATE narrow")
    in_sql, in_python = both_ways(db, settings)
    events, fields, activity = in_sql
    assert events == in_python[0]
    assert fields == in_python[1]
    assert activity == in_python[2]
    # And they are what the test did: the comparison is not of two empty logs.
    ops = [(e[1], e[2]) for e in events]
    assert ops.count(("acct", "update")) == 3 and ops.count(("narrow", "update")) == 1
    assert ("narrow", "truncate") in ops and ops.count(("pair", "insert")) == len(ODD)
    moved = next(e for e in events if e[1] == "acct" and e[2] == "update" and e[6] == ["id"]
                 and e[10][0] == "3")  # fmt: skip
    assert moved[20]["old_key"] == {"id": "2"}
    assert {f[1] for f in fields} >= {"balance", "b", "owner", "f", "id", "v"}
    # Row keys are the change log's own (rows are matched by them).
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        keys = conn.execute(
            b"SELECT row_key, new_values[1], new_values[2] FROM pgherald.events"
            b" WHERE watch = 'pair' AND op = 'insert' ORDER BY id"
        ).fetchall()
    assert [k for k, _, _ in keys] == [row_key_of({"a": a, "b": b}) for _, a, b in keys]
    assert [a for _, a, _ in keys] == ODD


def test_a_batch_python_must_make_is_made_in_python(db: Database, settings: Settings) -> None:
    """A row queued before a column was added keeps its shape, and the next gets a schema
    event: the drain that holds them goes the Python way, the ones after in SQL again."""
    with db.connect() as conn:
        conn.execute(b"CREATE TABLE grow (id int PRIMARY KEY, v text)")
    admin.add_watch(settings, "grow")
    with db.connect() as conn:
        conn.execute(b"INSERT INTO grow VALUES (1, 'a')")
        conn.execute(b"ALTER TABLE grow ADD COLUMN w int DEFAULT 5")
        conn.execute(b"INSERT INTO grow VALUES (2, 'b')")
    source = drained(settings, in_sql=True)
    assert source.moved == 2 and source.moved_in_sql == 0
    with db.connect() as conn:
        conn.execute(b"INSERT INTO grow VALUES (3, 'c')")
    with h.capturing(settings) as capture:
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
        assert capture.trigger is not None and capture.trigger.moved_in_sql >= 1
    events = h.stored_events(settings, watch="grow")
    assert [(e.op, h.texts(e.new)) for e in events] == [
        ("insert", {"id": "1", "v": "a"}),
        ("schema", None),
        ("insert", {"id": "2", "v": "b", "w": "5"}),
        ("insert", {"id": "3", "v": "c", "w": "5"}),
    ]


def test_a_replayed_queue_row_is_stored_once(db: Database, settings: Settings) -> None:
    """Queue rows that were moved already (the queue restored from a backup, say) have event
    ids the log has: the server's INSERT fails on them, and the Python path skips them."""
    with db.connect() as conn:
        conn.execute(b"INSERT INTO narrow VALUES (1, 'a', 'b'), (2, 'c', 'd')")
        conn.execute(b"CREATE TABLE saved_queue AS SELECT * FROM pgherald.trigger_queue")
    first = drained(settings, in_sql=True)
    assert first.moved == first.moved_in_sql == 2
    before, _, _ = log_rows(settings)
    with db.connect() as conn:
        conn.execute(b"INSERT INTO pgherald.trigger_queue SELECT * FROM saved_queue")
        conn.execute(b"INSERT INTO narrow VALUES (3, 'e', 'f')")  # one new row among them
    again = drained(settings, in_sql=True)
    assert again.moved == 3 and again.moved_in_sql == 0
    after, _, _ = log_rows(settings)
    assert after[:2] == before and len(after) == 3 and after[2][10] == ["3", "e"]
