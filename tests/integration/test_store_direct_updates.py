"""The change log's direct path for updates that carry both rows whole: the same stored
rows and field rows as the staged path, and replays that stay harmless.

Updates with both images and no unchanged TOAST value (snapshot runs, trigger capture,
REPLICA IDENTITY FULL) need nothing completed from the log, so they are COPYed straight
into ``events`` with log ids taken in advance, and their field rows inserted from Python.
These tests store the very same batches through both paths, each in a store (schema) of
its own, and compare everything stored; and replay batches, whole or in part.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald.events.model import (
    UNCHANGED_TOAST,
    ChangeEvent,
    ColumnSpec,
    OldValuesSource,
    Operation,
    RowImage,
    RowShape,
    Text,
)
from pgherald.store import changelog, checkpoints, migrations
from pgherald.store.changelog import ChangeLog
from pgherald.store.queries import query
from tests.conftest import Database

DIRECT, STAGED = "direct_store", "staged_store"
SHAPE = RowShape(
    (ColumnSpec("id", 23, "integer"), ColumnSpec("name", 25, "text"), ColumnSpec("bio", 25, "text"))
)
WIDER = RowShape((*SHAPE.columns, ColumnSpec("nick", 1043, "character varying")))
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ODD = 'quote " back \\ tab \t nl \n cr \r {brace}, comma NULL ☃'


class Events:
    def __init__(self, watch: str = "people", method: Any = "snapshot") -> None:
        self.watch = watch
        self.method = method
        self.n = 0

    def make(
        self,
        op: Operation,
        key: str | None,
        old: RowImage | None = None,
        new: RowImage | None = None,
        changed: tuple[str, ...] = (),
        old_values: OldValuesSource = "snapshot",
        meta: dict[str, Any] | None = None,
    ) -> ChangeEvent:
        self.n += 1
        return ChangeEvent(
            event_id=f"S/1/{self.n}",
            watch=self.watch,
            op=op,
            schema="public",
            table="people",
            key={"id": key} if key is not None else {},
            old=old,
            new=new,
            changed=changed,
            xid=77,
            position="1",
            commit_time=T0,
            captured_at=T0 + timedelta(seconds=1),
            method=self.method,
            seq=self.n,
            old_values=old_values if old is not None else "none",
            meta=meta or {},
        )

    def update(
        self, id_: str, old: tuple[Text, ...], new: tuple[Text, ...], *changed: str, **kw: Any
    ) -> ChangeEvent:
        old_shape = kw.pop("old_shape", SHAPE)
        new_shape = kw.pop("new_shape", SHAPE)
        return self.make(
            "update",
            id_,
            old=RowImage(old_shape, old),
            new=RowImage(new_shape, new),
            changed=changed,
            **kw,
        )


def mixed_batch(ev: Events) -> list[ChangeEvent]:
    """Every kind of whole-row update, among inserts, deletes and a truncate."""
    return [
        ev.make("insert", "1", new=RowImage(SHAPE, ("1", "ann", "b1"))),
        ev.update("1", ("1", "ann", "b1"), ("1", "anne", "b1"), "name"),
        ev.update("2", ("2", None, "x"), ("2", "bob", None), "name", "bio"),  # NULL both ways
        ev.update("3", ("3", "c", ODD), ("3", ODD, ""), "bio", "name", "bio"),  # said twice
        ev.update("4", ("4", "d", "d"), ("4", "d", "d")),  # no changed column: no field rows
        ev.update("5", ("5", "e", "e"), ("5", "e", "E"), "bio", "gone"),  # not in either row
        # A column added between the rows: the old one has no "nick".
        ev.update("6", ("6", "f", "f"), ("6", "f", "f", "Fi"), "nick", new_shape=WIDER),
        ev.update("7", ("7", "g", "g", "G"), ("7", "g", "g"), "nick", old_shape=WIDER),
        # The key changed (delete + insert for a snapshot; one update for a trigger).
        ev.update("9", ("8", "h", "h"), ("9", "h", "h"), "id", meta={"note": ["x", 1]}),
        ev.make("delete", "1", old=RowImage(SHAPE, ("1", "anne", "b1"))),
        ev.make("truncate", None),
        ev.update("10", ("10", "NULL", "\\N"), ("10", "null", "\\\\N"), "name", "bio"),
    ]


def stored(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Everything stored, with shapes by digest (their serial ids may differ)."""
    events = conn.execute(
        sql.SQL(
            "SELECT e.id, e.event_id, e.watch, e.op, e.schema_name, e.table_name, e.row_key,"
            " e.key_columns, s.digest, os.digest, e.old_values, e.new_values, e.unchanged,"
            " e.old_unchanged, e.changed, e.xid, e.position, e.commit_time, e.captured_at,"
            " e.method, e.seq, e.old_values_source, e.meta"
            " FROM {events} e LEFT JOIN {shapes} s ON s.id = e.shape_id"
            " LEFT JOIN {shapes} os ON os.id = e.old_shape_id ORDER BY e.id"
        ).format(events=sql.Identifier(schema, "events"), shapes=sql.Identifier(schema, "shapes"))
    ).fetchall()
    fields = conn.execute(
        sql.SQL(
            "SELECT e.event_id, f.column_name, f.old_value, f.new_value"
            " FROM {fields} f JOIN {events} e ON e.id = f.event_id ORDER BY e.id, 2"
        ).format(
            fields=sql.Identifier(schema, "event_fields"), events=sql.Identifier(schema, "events")
        )
    ).fetchall()
    return {"events": events, "fields": fields}


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection[Any]]:
    with db.connect() as c:
        migrations.install(c, DIRECT)
        migrations.install(c, STAGED)
        yield c


def append_staged(
    log: ChangeLog, batch: list[ChangeEvent], monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> int:
    """Appends as if no update were whole: every batch with one takes the staged path."""
    with monkeypatch.context() as m:
        m.setattr(changelog, "_whole_update", lambda _e: False)
        return log.append(batch, **kw)


class Sent:
    """Which statements a connection sent (to tell the paths apart), from psycopg's own hook."""

    def __init__(self, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        original = psycopg.Cursor.execute

        def execute(cur: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            if cur.connection is conn:
                self.texts.append(query if isinstance(query, str) else repr(query))
            return original(cur, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, "execute", execute)

    def staged(self) -> bool:
        return any("pgherald_stage" in t for t in self.texts)


def test_both_paths_store_the_same_rows_and_fields(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = mixed_batch(Events())
    direct, staged = ChangeLog(conn, DIRECT), ChangeLog(conn, STAGED)
    sent = Sent(conn, monkeypatch)
    assert direct.append(batch) == len(batch)
    assert not sent.staged(), "a batch of whole-row updates must take the direct path"
    assert append_staged(staged, batch, monkeypatch) == len(batch)
    assert sent.staged()
    got, want = stored(conn, DIRECT), stored(conn, STAGED)
    assert got == want
    assert len(want["fields"]) == 12
    assert ("S/1/4", "bio", ODD, "") in want["fields"]
    assert ("S/1/6", "gone", None, None) in want["fields"]
    # Read back alike, too (a column said twice in ``changed`` is stored once).
    assert [s.event for s in direct.read()] == [s.event for s in staged.read()]
    assert [s.event for s in direct.read()][:3] == batch[:3]


def test_several_batches_in_one_transaction_and_ids_in_order(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.connect() as c:
        migrations.install(c, DIRECT)
        migrations.install(c, STAGED)
    ev = Events()
    batches = [mixed_batch(ev) for _ in range(3)]
    checkpoint = (query("save_checkpoint"), {"source": "test", "position": "42"})
    with db.connect(autocommit=False) as conn:
        direct, staged = ChangeLog(conn, DIRECT), ChangeLog(conn, STAGED)
        for batch in batches[:-1]:
            direct.append(batch, notify=False)
            append_staged(staged, batch, monkeypatch, notify=False)
        # The last with the caller's statement and the COMMIT in its final pipeline.
        direct.append(batches[-1], then=[checkpoint], commit=True)
        append_staged(staged, batches[-1], monkeypatch, then=[checkpoint], commit=True)
        got, want = stored(conn, DIRECT), stored(conn, STAGED)
        conn.commit()
        assert checkpoints.load_checkpoint(conn, DIRECT, "test") == "42"
    assert got == want
    ids = [row[0] for row in got["events"]]
    assert ids == sorted(ids) and len(ids) == 3 * len(batches[0])


def test_a_replayed_batch_is_harmless(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = Events()
    batch = mixed_batch(ev)
    log, reference = ChangeLog(conn, DIRECT), ChangeLog(conn, STAGED)
    assert log.append(batch) == len(batch)
    before = stored(conn, DIRECT)
    # The same batch again, reversed, and again in a transaction of the caller's.
    assert log.append(batch) == 0
    assert log.append(list(reversed(batch))) == 0
    with conn.transaction():
        assert log.append(batch) == 0
    assert stored(conn, DIRECT) == before
    # A replay that goes on past what was stored: only the new events, with their fields,
    # after the stored ones; and the same in a store that only ever took the staged path.
    more = [
        ev.update("1", ("1", "x", "y"), ("1", "x2", "y2"), "name", "bio"),
        ev.make("insert", "11", new=RowImage(SHAPE, ("11", "k", None))),
    ]
    sent = Sent(conn, monkeypatch)
    assert log.append(batch[3:] + more) == 2
    assert sent.staged(), "a duplicate falls back to the staged path"
    append_staged(reference, batch, monkeypatch)
    append_staged(reference, batch[3:] + more, monkeypatch)
    got = stored(conn, DIRECT)
    assert got["events"][: len(batch)] == before["events"]
    assert [r[1] for r in got["events"]] == [e.event_id for e in batch + more]
    ids = [r[0] for r in got["events"]]
    assert ids == sorted(ids)
    strip = {k: [r[1:] if k == "events" else r for r in v] for k, v in got.items()}
    want = stored(conn, STAGED)
    assert strip == {k: [r[1:] if k == "events" else r for r in v] for k, v in want.items()}
    assert ("S/1/13", "bio", "y", "y2") in got["fields"]


def test_a_replay_of_one_event_in_a_new_batch_stores_the_rest_once(
    conn: psycopg.Connection[Any],
) -> None:
    ev = Events()
    first = ev.update("1", ("1", "a", "b"), ("1", "A", "b"), "name")
    log = ChangeLog(conn, DIRECT)
    assert log.append([first]) == 1
    second = ev.update("2", ("2", "a", "b"), ("2", "a", "B"), "bio")
    assert log.append([second, first, second]) == 1
    got = stored(conn, DIRECT)
    assert [r[1] for r in got["events"]] == ["S/1/1", "S/1/2"]
    assert got["fields"] == [("S/1/1", "name", "a", "A"), ("S/1/2", "bio", "b", "B")]


def test_updates_that_need_filling_still_take_the_staged_path(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = Events(method="logical")
    log = ChangeLog(conn, DIRECT)
    log.append([ev.make("insert", "1", new=RowImage(SHAPE, ("1", "ann", "long bio")))])
    sent = Sent(conn, monkeypatch)
    toast = ev.make("update", "1", new=RowImage(SHAPE, ("1", "anne", UNCHANGED_TOAST)))
    whole = ev.update("2", ("2", "a", "b"), ("2", "A", "b"), "name")
    assert log.append([whole, toast]) == 2
    assert sent.staged()
    (filled,) = [s.event for s in log.read() if s.event.event_id == toast.event_id]
    assert filled.new == RowImage(SHAPE, ("1", "anne", "long bio"))
    assert filled.changed == ("name",)
    assert stored(conn, DIRECT)["fields"] == [
        ("S/1/3", "name", "a", "A"),  # in batch order
        ("S/1/2", "name", "ann", "anne"),
    ]
