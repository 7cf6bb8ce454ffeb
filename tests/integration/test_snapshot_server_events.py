"""A snapshot run's events made by the server (``diff_events`` through ``store.selected``)
are the very events that Python makes from the same differences.

Two stores (schemas) in one database watch the same tables; one run makes its events in
the server, the other (the comparer without ``emit_selected``) in Python, over the same
changes. Everything stored must agree, but for what differs between two transactions
(xid, times): ids and keys (JSON escapes of awkward key texts), texts, changed columns,
field rows, run counts and the watches' counts of changes.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg import sql

from pgherald import admin, snapshots
from pgherald.config import Settings
from pgherald.events import ChangeEvent
from pgherald.sources.snapshot import SnapshotComparer
from tests import capture_harness as h
from tests.conftest import Database

SERVER, PYTHON = "store_server", "store_python"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
KEY = 'k\'ey "quoted" \\ back\nnl\ttab é ☃ \x01'

SETUP = [
    "CREATE TABLE acct (region text, n int, owner text, balance numeric(12, 2),"
    " seen timestamptz, tags text[], doc jsonb, flag boolean, raw bytea,"
    " PRIMARY KEY (region, n))",
    "INSERT INTO acct SELECT r, i, 'owner ' || i, i * 1.5, '2024-01-01 00:00+00'::timestamptz"
    " + i * interval '1 hour', ARRAY['a', 'b' || i], jsonb_build_object('i', i), i % 2 = 0,"
    " decode(md5(i::text), 'hex')"
    f" FROM unnest(ARRAY['north', 'south', {sql.Literal(KEY).as_string(None)}]) r,"
    " generate_series(1, 400) i",
    "CREATE TABLE plain (id int PRIMARY KEY, v text)",
    "INSERT INTO plain SELECT i, 'v' || i FROM generate_series(1, 50) i",
]

CHANGES = [
    "UPDATE acct SET balance = balance + 1 WHERE n % 7 = 0",
    "UPDATE acct SET owner = NULL, flag = NOT flag WHERE n % 11 = 1",
    "UPDATE acct SET owner = 'x', tags = tags || 'c'::text WHERE n % 13 = 2",  # value <- NULL too
    "UPDATE acct SET doc = doc || '{\"z\": [1, null]}', raw = NULL WHERE n % 17 = 3",
    "UPDATE acct SET balance = balance WHERE n % 5 = 0",  # the same again: no change
    "DELETE FROM acct WHERE n % 19 = 4",
    f"INSERT INTO acct SELECT r, 1000 + i, E'new\\n' || i, 0, NULL, '{{}}', 'null', true, ''"
    f" FROM unnest(ARRAY['north', {sql.Literal(KEY).as_string(None)}]) r,"
    " generate_series(1, 30) i",
    "UPDATE plain SET v = v || '!' WHERE id % 3 = 0",
    "DELETE FROM plain WHERE id > 45",
]


def settings(db: Database, schema: str) -> Settings:
    return h.settings_for(db.dsn, schema=schema)


def stored(db: Database, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    def rows(query: str) -> list[tuple[Any, ...]]:
        composed = sql.SQL(query).format(s=sql.Identifier(schema))
        with db.connect() as conn:
            return conn.execute(composed).fetchall()

    return {
        "events": rows(
            "SELECT e.id, e.event_id, e.watch, e.op, e.schema_name, e.table_name, e.row_key,"
            " e.key_columns, s.digest, e.old_shape_id, e.old_values, e.new_values, e.unchanged,"
            " e.old_unchanged, e.changed, e.position, e.method, e.seq, e.old_values_source,"
            " e.meta, e.commit_time = e.captured_at"
            " FROM {s}.events e LEFT JOIN {s}.shapes s ON s.id = e.shape_id ORDER BY e.id"
        ),
        "fields": rows(
            "SELECT e.event_id, f.column_name, f.old_value, f.new_value FROM {s}.event_fields f"
            " JOIN {s}.events e ON e.id = f.event_id ORDER BY e.id, f.column_name"
        ),
        "runs": rows(
            "SELECT id, watch, status, inserts, updates, deletes, rows_compared"
            " FROM {s}.runs ORDER BY id"
        ),
        "watches": rows("SELECT name, changes_seen, status FROM {s}.watches ORDER BY name"),
    }


def python_events_only(monkeypatch: pytest.MonkeyPatch) -> None:
    original = SnapshotComparer.run

    def run(self: SnapshotComparer, *args: Any, **kwargs: Any) -> Any:
        kwargs["emit_selected"] = None
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SnapshotComparer, "run", run)


def test_server_and_python_make_the_same_events(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    for statement in SETUP:
        db.execute(statement)
    for schema in (SERVER, PYTHON):
        admin.init(settings(db, schema))
        admin.add_snapshot_watch(settings(db, schema), "acct", table="acct")
        admin.add_snapshot_watch(settings(db, schema), "plain", table="plain")
    for statement in CHANGES:
        db.execute(statement)
    results = {}
    for schema in (SERVER, PYTHON):
        with monkeypatch.context() as m:
            if schema == PYTHON:
                python_events_only(m)
            results[schema] = [
                snapshots.run_watch(settings(db, schema), w) for w in ("acct", "plain")
            ]
    server, python = stored(db, SERVER), stored(db, PYTHON)
    assert len(server["events"]) > 300 and len(server["fields"]) > 300
    assert {r[3] for r in server["events"]} == {"insert", "update", "delete"}
    assert any(KEY in str(r[6]) or "\\n" in str(r[6]) for r in server["events"])
    for part in ("events", "fields", "runs", "watches"):
        assert server[part] == python[part], part
    assert [r.describe() for r in results[SERVER]] == [r.describe() for r in results[PYTHON]]

    # And the events read back alike, but for their transaction's xid and time.
    def read(schema: str) -> list[ChangeEvent]:
        return [
            dataclasses.replace(e, xid=None, commit_time=None, captured_at=T0)
            for e in h.stored_events(settings(db, schema))
        ]

    assert read(SERVER) == read(PYTHON)


def test_a_shape_change_still_makes_its_events_in_python(db: Database) -> None:
    """After a shape change the old and new rows differ in shape: the server path does not
    apply (one shape per event), and the run is as before."""
    db.execute("CREATE TABLE s (id int PRIMARY KEY, a text)")
    db.execute("INSERT INTO s VALUES (1, 'x'), (2, 'y')")
    config = settings(db, SERVER)
    admin.init(config)
    admin.add_snapshot_watch(config, "s", table="s")
    db.execute("ALTER TABLE s ADD COLUMN b int; UPDATE s SET a = 'z' WHERE id = 2")
    result = snapshots.run_watch(config, "s")
    assert result.shape_changed and result.updates == 1
    events = h.stored_events(config, watch="s")
    assert [e.op for e in events] == ["schema", "update"]
    assert events[1].old is not None and events[1].new is not None
    assert events[1].old.shape != events[1].new.shape
