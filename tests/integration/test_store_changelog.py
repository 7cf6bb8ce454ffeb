"""The change log on a real server: idempotent appends, old values filled from the log,
field rows, faithful reads, and a 10,000-event batch in a handful of round trips."""

from __future__ import annotations

import dataclasses
import random
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import pq, sql

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
from pgherald.store import migrations
from pgherald.store.changelog import ChangeLog, StoredEvent, changes_channel
from tests.conftest import Database

SCHEMA = "pgherald"
SHAPE = RowShape(
    (
        ColumnSpec("id", 23, "integer"),
        ColumnSpec("name", 25, "text"),
        ColumnSpec("bio", 25, "text"),
    )
)
KEY_SHAPE = RowShape((ColumnSpec("id", 23, "integer"),))
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
BIG = "x" * 5000


def image(id_: str, name: Text, bio: Text, shape: RowShape = SHAPE) -> RowImage:
    return RowImage(shape, (id_, name, bio))


class Events:
    """Builds a realistic sequence of events with unique, increasing ids."""

    def __init__(self, watch: str = "people") -> None:
        self.watch = watch
        self.n = 0

    def make(
        self,
        op: Operation,
        key: str | None,
        old: RowImage | None = None,
        new: RowImage | None = None,
        changed: tuple[str, ...] = (),
        old_values: OldValuesSource = "none",
        meta: Mapping[str, Any] | None = None,
        commit_time: datetime | None = T0,
    ) -> ChangeEvent:
        self.n += 1
        return ChangeEvent(
            event_id=f"L/{self.n:016X}/1",
            watch=self.watch,
            op=op,
            schema="public",
            table="people",
            key={"id": key} if key is not None else {},
            old=old,
            new=new,
            changed=changed,
            xid=1000 + self.n,
            position=f"0/{self.n:X}",
            commit_time=commit_time,
            captured_at=T0 + timedelta(seconds=self.n),
            method="logical",
            seq=1,
            old_values=old_values,
            meta=meta or {},
        )

    def insert(self, id_: str, name: Text, bio: Text) -> ChangeEvent:
        return self.make("insert", id_, new=image(id_, name, bio))

    def update(self, id_: str, name: Text, bio: Text, **kw: Any) -> ChangeEvent:
        """An update as REPLICA IDENTITY DEFAULT sends it: no old row."""
        return self.make("update", id_, new=image(id_, name, bio), **kw)


@pytest.fixture
def conn(db: Database) -> Iterator[psycopg.Connection[Any]]:
    with db.connect() as c:
        migrations.install(c, SCHEMA)
        yield c


def key_delete(ev: Events, id_: str) -> ChangeEvent:
    """A delete as REPLICA IDENTITY DEFAULT sends it: the key columns only."""
    return ev.make("delete", id_, old=RowImage(KEY_SHAPE, (id_,)))


def only(log: ChangeLog, event_id: str) -> ChangeEvent:
    found = [s.event for s in log.read(limit=100_000) if s.event.event_id == event_id]
    assert len(found) == 1
    return found[0]


def count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM pgherald.{table}".encode()).fetchone()
    assert row is not None
    return int(row[0])


def fields(conn: psycopg.Connection[Any], event_id: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        b"SELECT f.column_name, f.old_value, f.new_value FROM pgherald.event_fields f"
        b" JOIN pgherald.events e ON e.id = f.event_id WHERE e.event_id = %s ORDER BY 1",
        (event_id,),
    ).fetchall()


def test_append_is_idempotent(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    batch = [
        ev.insert("1", "ann", "b1"),
        ev.insert("2", "bob", "b2"),
        ev.make(
            "update",
            "1",
            old=image("1", "ann", "b1"),
            new=image("1", "anne", "b1"),
            changed=("name",),
            old_values="replica_identity",
        ),
        key_delete(ev, "2"),
        ev.make("truncate", None),
    ]
    log = ChangeLog(conn, SCHEMA)
    assert log.append(batch) == 5
    counts = (count(conn, "events"), count(conn, "event_fields"), count(conn, "shapes"))
    assert counts == (5, 1, 2)
    assert log.append(batch) == 0
    assert log.append(list(reversed(batch))) == 0
    assert (count(conn, "events"), count(conn, "event_fields"), count(conn, "shapes")) == counts
    # A replay that goes on past what was stored adds only the new part, in order.
    more = [ev.insert("3", "cy", "b3")]
    assert log.append(batch + more) == 1
    assert [s.event.event_id for s in log.read()] == [e.event_id for e in batch + more]


def test_a_duplicate_within_a_batch_is_stored_once(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    first = ev.insert("1", "ann", "b1")
    log = ChangeLog(conn, SCHEMA)
    assert log.append([first, first, ev.insert("2", "bob", "b2"), first]) == 2
    assert count(conn, "events") == 2


def test_append_in_callers_transaction_rolls_back_with_it(db: Database) -> None:
    with db.connect() as c:
        migrations.install(c, SCHEMA)
    ev = Events()
    with db.connect(autocommit=False) as conn:
        log = ChangeLog(conn, SCHEMA)
        # A new shape is stored in the same transaction and disappears with it...
        assert log.append([ev.insert("1", "ann", "b1")]) == 1
        conn.rollback()
        assert log.last_id() == 0
        # ...and the same ChangeLog must not rely on it afterwards.
        assert log.append([ev.insert("2", "bob", "b2")]) == 1
        conn.commit()
        (stored,) = log.read()
        assert stored.event.new == image("2", "bob", "b2")
        assert stored.event.new is not None and stored.event.new.shape == SHAPE
        # Two appends in one transaction each see only their own batch.
        assert log.append([ev.insert("3", "cy", "b3")]) == 1
        assert log.append([ev.insert("4", "di", "b4")]) == 1
        conn.commit()
        assert len(log.read()) == 3


def test_old_values_filled_from_the_log(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    log.append([ev.insert("1", "ann", "b1"), ev.insert("2", "bob", "b2")])
    upd = ev.update("1", "anne", "b1")
    assert log.append([upd]) == 1
    got = only(log, upd.event_id)
    assert got.old == image("1", "ann", "b1")
    assert got.new == image("1", "anne", "b1")
    assert got.changed == ("name",)
    assert got.old_values == "change_log"
    assert fields(conn, upd.event_id) == [("name", "ann", "anne")]


def test_old_values_filled_within_one_batch(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    log.append([ev.insert("9", "zed", "z")])  # another row's history must not leak in
    ins = ev.insert("1", "ann", "b1")
    u1 = ev.update("1", "anne", "b1")
    u2 = ev.update("1", "anne", "bio 2")
    other = ev.update("9", "zed", "zz")
    assert log.append([ins, u1, other, u2]) == 4
    first, second = only(log, u1.event_id), only(log, u2.event_id)
    assert first.old == image("1", "ann", "b1")
    assert first.changed == ("name",)
    assert second.old == image("1", "anne", "b1")
    assert second.changed == ("bio",)
    assert second.old_values == "change_log"
    assert only(log, other.event_id).old == image("9", "zed", "z")
    assert fields(conn, u2.event_id) == [("bio", "b1", "bio 2")]


def test_unchanged_toast_filled_from_the_log_and_chained(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    log.append([ev.insert("1", "ann", BIG)])
    u1 = ev.update("1", "anne", UNCHANGED_TOAST)
    log.append([u1])
    got = only(log, u1.event_id)
    assert got.new == image("1", "anne", BIG)
    assert got.old == image("1", "ann", BIG)
    assert got.changed == ("name",)
    assert got.old_values == "change_log"
    # The next one finds the value in the filled version, stored or in the same batch.
    u2 = ev.update("1", "annie", UNCHANGED_TOAST)
    u3 = ev.update("1", "an", UNCHANGED_TOAST)
    log.append([u2, u3])
    assert only(log, u2.event_id).new == image("1", "annie", BIG)
    assert only(log, u3.event_id).new == image("1", "an", BIG)
    assert only(log, u3.event_id).old == image("1", "annie", BIG)


def test_unchanged_toast_kept_marked_without_a_previous_version(
    conn: psycopg.Connection[Any],
) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    upd = ev.update("7", "gil", UNCHANGED_TOAST)
    assert log.append([upd]) == 1
    got = only(log, upd.event_id)
    assert got.new == image("7", "gil", UNCHANGED_TOAST)
    assert got.new is not None and got.new.unchanged_columns() == ("bio",)
    assert got.old is None
    assert got.old_values == "none"
    assert fields(conn, upd.event_id) == []
    # Still unknown later: a later update cannot find it either, but learns the name.
    upd2 = ev.update("7", "gill", UNCHANGED_TOAST)
    log.append([upd2])
    later = only(log, upd2.event_id)
    assert later.new == image("7", "gill", UNCHANGED_TOAST)
    assert later.old == image("7", "gil", UNCHANGED_TOAST)
    assert later.changed == ("name",)


def test_a_delete_ends_the_rows_history(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    log.append([ev.insert("1", "old", "OLD BIO")])
    upd = ev.update("1", "new", UNCHANGED_TOAST)
    log.append([key_delete(ev, "1"), ev.insert("1", "mid", "NEW BIO"), upd])
    got = only(log, upd.event_id)
    assert got.new == image("1", "new", "NEW BIO")
    assert got.old == image("1", "mid", "NEW BIO")
    # After a stored delete, an update (however unlikely) has no previous version.
    log.append([key_delete(ev, "1")])
    orphan = ev.update("1", "ghost", UNCHANGED_TOAST)
    log.append([orphan])
    assert only(log, orphan.event_id).old is None
    assert only(log, orphan.event_id).new == image("1", "ghost", UNCHANGED_TOAST)


def test_full_old_row_fills_unchanged_toast_itself(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    upd = ev.make(
        "update",
        "3",
        old=image("3", "cy", BIG),
        new=image("3", "cyd", UNCHANGED_TOAST),
        changed=("name",),
        old_values="replica_identity",
    )
    log.append([upd])
    got = only(log, upd.event_id)
    assert got.new == image("3", "cyd", BIG)
    assert got.old == image("3", "cy", BIG)
    assert got.old_values == "replica_identity"
    assert fields(conn, upd.event_id) == [("name", "cy", "cyd")]


def test_a_key_change_is_not_filled_from_another_rows_history(
    conn: psycopg.Connection[Any],
) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    # Row 2 existed and was moved to key 5 earlier; key 2 now has stale history.
    log.append([ev.insert("2", "two", "TWO")])
    moved = ev.update("2", "one", UNCHANGED_TOAST, meta={"old_key": {"id": "1"}})
    log.append([moved])
    got = only(log, moved.event_id)
    assert got.new == image("2", "one", UNCHANGED_TOAST)
    assert got.old is None
    assert got.meta == {"old_key": {"id": "1"}}


def moved(ev: Events, id_: str, old_id: str, name: Text, bio: Text) -> ChangeEvent:
    """An update that moved row ``old_id`` to key ``id_``, as REPLICA IDENTITY DEFAULT sends it."""
    return ev.update(id_, name, bio, meta={"old_key": {"id": old_id}})


def test_a_key_change_is_filled_from_the_rows_history_under_its_old_key(
    conn: psycopg.Connection[Any],
) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    log.append([ev.insert("1", "one", BIG), ev.insert("5", "five", "FIVE")])
    # Stored history under the old key; the new key's own (stale) history is not used.
    log.append([ev.update("1", "uno", UNCHANGED_TOAST), key_delete(ev, "5")])
    to_5 = moved(ev, "5", "1", "uno", UNCHANGED_TOAST)
    after = ev.update("5", "cinco", UNCHANGED_TOAST)
    log.append([to_5, after])
    got = only(log, to_5.event_id)
    assert got.new == image("5", "uno", BIG)
    assert got.old is None and got.old_values == "none"
    assert got.meta == {"old_key": {"id": "1"}}
    later = only(log, after.event_id)
    assert later.new == image("5", "cinco", BIG)
    assert later.old == image("5", "uno", BIG)
    assert later.changed == ("name",)
    # Chains of moves within one batch, and a stored move to carry on from.
    to_6, to_7 = moved(ev, "6", "5", "seis", UNCHANGED_TOAST), moved(ev, "7", "6", "x", None)
    to_8 = moved(ev, "8", "7", "ocho", UNCHANGED_TOAST)
    log.append([to_6, ev.update("6", "six", UNCHANGED_TOAST), to_7, to_8])
    assert only(log, to_6.event_id).new == image("6", "seis", BIG)
    assert only(log, to_7.event_id).new == image("7", "x", None)
    assert only(log, to_8.event_id).new == image("8", "ocho", None)
    to_10 = moved(ev, "10", "8", "diez", UNCHANGED_TOAST)
    log.append([to_10])
    assert only(log, to_10.event_id).new == image("10", "diez", None)


def test_a_key_change_is_not_filled_across_a_delete_or_from_before_a_move(
    conn: psycopg.Connection[Any],
) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    log.append([ev.insert("1", "one", "ONE"), ev.insert("2", "two", "TWO")])
    gone = moved(ev, "3", "1", "three", UNCHANGED_TOAST)
    # Row 2 moves away to 4; row 9 (never seen) moves to 2; an update of 2 follows.
    away = moved(ev, "4", "2", "four", UNCHANGED_TOAST)
    into = moved(ev, "2", "9", "nine", UNCHANGED_TOAST)
    upd = ev.update("2", "nueve", UNCHANGED_TOAST)
    log.append([key_delete(ev, "1"), gone, away, into, upd])
    assert only(log, gone.event_id).new == image("3", "three", UNCHANGED_TOAST)
    assert only(log, away.event_id).new == image("4", "four", "TWO")
    assert only(log, into.event_id).new == image("2", "nine", UNCHANGED_TOAST)
    # The update's previous version is the moved row, not what key 2 held before it.
    assert only(log, upd.event_id).new == image("2", "nueve", UNCHANGED_TOAST)
    assert only(log, upd.event_id).old == image("2", "nine", UNCHANGED_TOAST)


def test_filling_works_by_column_name_across_a_schema_change(
    conn: psycopg.Connection[Any],
) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    narrow = RowShape((ColumnSpec("name", 25, "text"), ColumnSpec("id", 23, "integer")))
    log.append([ev.make("insert", "1", new=RowImage(narrow, ("ann", "1")))])
    # A column was added (and the old ones reordered) before this update.
    upd = ev.update("1", "anne", "new bio")
    log.append([upd])
    got = only(log, upd.event_id)
    assert got.old == image("1", "ann", UNCHANGED_TOAST)  # bio did not exist: not known
    assert got.changed == ("name",)
    assert got.old_values == "change_log"
    assert fields(conn, upd.event_id) == [("name", "ann", "anne")]


def test_field_rows_for_updates(conn: psycopg.Connection[Any]) -> None:
    ev = Events()
    log = ChangeLog(conn, SCHEMA)
    upd = ev.make(
        "update",
        "4",
        old=image("4", "dan", None),
        new=image("4", "dana", "now set"),
        changed=("name", "bio", "name"),
        old_values="trigger",
    )
    log.append([ev.insert("5", "eve", "e"), upd])
    assert fields(conn, upd.event_id) == [("bio", None, "now set"), ("name", "dan", "dana")]
    assert count(conn, "event_fields") == 2


def test_read_gives_back_what_was_appended(conn: psycopg.Connection[Any]) -> None:
    wide = RowShape(
        (
            ColumnSpec("id", 23, "integer"),
            ColumnSpec("doc", 3802, "jsonb"),
            ColumnSpec("at", 1184, "timestamp with time zone"),
            ColumnSpec("tags", 1009, "text[]"),
        )
    )
    ev = Events()
    batch = [
        ev.insert("1", "ann", "b1"),
        ev.make(
            "update",
            "1",
            old=image("1", "ann", "b1"),
            new=image("1", 'Ann ☃ "quoted" \\ back\nslash', None),
            changed=("name", "bio"),
            old_values="replica_identity",
            meta={"note": ["x", 1, None]},
        ),
        ev.make("insert", "2", new=RowImage(wide, ("2", '{"a": [1, 2]}', "infinity", "{a,NULL}"))),
        # No old row and no previous version: stored as sent, the TOAST value still unknown.
        ev.make("update", "20", new=RowImage(wide, ("20", None, "-infinity", UNCHANGED_TOAST))),
        ev.make("read", "3", new=image("3", "", "NULL"), commit_time=None),
        key_delete(ev, "1"),
        ev.make("delete", "3", old=image("3", "", "NULL"), old_values="replica_identity"),
        ev.make("truncate", None, meta={"cascade": True, "restart_identity": False}),
        ev.make("schema", None, meta={"added": ["nickname"]}),
    ]
    batch[3] = dataclasses.replace(batch[3], xid=None, seq=7, method="trigger")
    log = ChangeLog(conn, SCHEMA)
    log.append(batch)
    stored = ChangeLog(conn, SCHEMA).read()  # a fresh instance: shapes come from the store
    assert [s.event for s in stored] == batch
    assert [s.id for s in stored] == sorted(s.id for s in stored)
    for got, sent in zip(stored, batch, strict=True):
        for g, s in ((got.event.old, sent.old), (got.event.new, sent.new)):
            assert (g.shape if g else None) == (s.shape if s else None)
        assert got.event.commit_time == sent.commit_time
        assert got.event.captured_at == sent.captured_at
    assert stored[3].event.new is not None
    assert stored[3].event.new.text("tags") is UNCHANGED_TOAST


def test_read_filters_and_pages(conn: psycopg.Connection[Any]) -> None:
    people, pets = Events("people"), Events("pets")
    pets.n = 1000
    log = ChangeLog(conn, SCHEMA)
    batch: list[ChangeEvent] = []
    for i in range(10):
        batch.append(people.insert(str(i), f"p{i}", None))
        batch.append(pets.insert(str(i), f"q{i}", None))
    batch.append(key_delete(people, "3"))
    log.append(batch)
    assert log.last_id() == max(s.id for s in log.read())
    page1 = log.read(limit=7)
    page2 = log.read(after_id=page1[-1].id, limit=100)
    assert [s.event for s in page1 + page2] == batch
    assert [s.event for s in log.read(watch="pets")] == [e for e in batch if e.watch == "pets"]
    assert [s.event.event_id for s in log.read(op="delete")] == [batch[-1].event_id]
    assert log.read(watch="people", op="delete")[0].event.key == {"id": "3"}
    assert log.read(watch="nobody") == []
    found = log.find_id(batch[5].event_id)
    assert found is not None and only_id(log, found).event == batch[5]
    assert log.find_id("no such id") is None

    def ints(type_oid: int, text: str) -> Any:
        return int(text) if type_oid == 23 else text

    typed = log.read(watch="pets", limit=1, loader=ints)[0].event.new
    assert typed is not None and typed["id"] == 0 and typed["name"] == "q0"
    untyped = log.read(watch="pets", limit=1)[0].event.new
    assert untyped is not None and untyped["id"] == "0"
    assert log.last_shape("people") == SHAPE  # the key-only image of the last delete is not
    assert log.last_shape("nobody") is None


def only_id(log: ChangeLog, log_id: int) -> StoredEvent:
    (stored,) = log.read(after_id=log_id - 1, limit=1)
    return stored


class StatementCounter:
    """Counts the messages this client sends, from libpq's own protocol trace."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.file = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in __exit__)

    def __enter__(self) -> StatementCounter:
        self.conn.pgconn.trace(self.file.fileno())
        self.conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.pgconn.untrace()

    def close(self) -> None:
        self.file.close()

    def sent(self) -> dict[str, int]:
        self.file.seek(0)
        out: dict[str, int] = {}
        for line in self.file:
            parts = line.split("\t")
            if len(parts) > 2 and parts[0] == "F":
                name = parts[2].split(" ")[0].strip()
                out[name] = out.get(name, 0) + 1
        return out


def _big_batch(n_rows: int, updates_per_row: int, fill: bool) -> list[ChangeEvent]:
    ev = Events()
    batch: list[ChangeEvent] = []
    for i in range(n_rows):
        batch.append(ev.insert(str(i), f"name {i}", f"bio {i}"))
    for u in range(updates_per_row):
        for i in range(n_rows):
            if fill:
                batch.append(ev.update(str(i), f"name {i}.{u}", UNCHANGED_TOAST))
            else:
                batch.append(
                    ev.make(
                        "update",
                        str(i),
                        old=image(str(i), f"name {i}", f"bio {i}"),
                        new=image(str(i), f"name {i}.{u}", f"bio {i}"),
                        changed=("name",),
                        old_values="replica_identity",
                    )
                )
    return batch


@pytest.mark.parametrize("fill", [False, True], ids=["full-rows", "filled-from-log"])
def test_ten_thousand_events_in_a_handful_of_round_trips(db_primary: Database, fill: bool) -> None:
    with db_primary.connect(autocommit=False) as conn:
        migrations.install(conn, SCHEMA)
        conn.commit()
        log = ChangeLog(conn, SCHEMA)
        log.append(_big_batch(1, 1, fill))  # warm up: the staging table exists once
        conn.rollback()
        batch = _big_batch(2000, 4, fill)
        assert len(batch) == 10_000
        with StatementCounter(conn) as counter:
            started = time.perf_counter()
            assert log.append(batch) == 10_000
            conn.commit()
            elapsed = time.perf_counter() - started
        sent = counter.sent()
        counter.close()
        # Filled from the log (the staged path): BEGIN, the append lock with the staging
        # set-up, COPY and COMMIT are simple queries; each statement of the pipeline is
        # one Bind (shapes, filling, insert, the wake-up NOTIFY, search path). Full rows
        # (the direct path): a pipeline of BEGIN, search path, lock, savepoint, shapes and
        # the log ids; COPY; a pipeline of field rows, savepoint, NOTIFY, search path.
        statements = sent.get("Query", 0) + sent.get("Bind", 0)
        round_trips = sent.get("Query", 0) + sent.get("Sync", 0) + sent.get("CopyDone", 0)
        print(
            f"\nappend of 10,000 events ({'filled from the log' if fill else 'full rows'}):"
            f" {10_000 / elapsed:,.0f} events/s, {statements} statements, messages {sent}"
        )
        assert statements <= (9 if fill else 14), sent
        assert round_trips <= 6, sent
        last = only(log, batch[-1].event_id)
        assert last.new == image("1999", "name 1999.3", "bio 1999")
        assert last.old == image("1999", "name 1999.2" if fill else "name 1999", "bio 1999")
        assert count(conn, "event_fields") == 8000


def test_the_changes_channel_fits_any_schema_name() -> None:
    assert changes_channel("pgherald") == "pgherald_changes"
    for long_name in ("s" * 63, "é" * 31, "s" * 56, "s" * 55 + "x"):
        channel = changes_channel(long_name)
        assert len(channel.encode("utf-8")) < 64
    assert changes_channel("s" * 63) != changes_channel("s" * 62 + "t")
    assert len(changes_channel("s" * 55).encode()) == 63  # still readable


def _listener(db: Database, schema: str = SCHEMA) -> psycopg.Connection[Any]:
    conn = db.connect()
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(changes_channel(schema))))
    return conn


def _payloads(listener: psycopg.Connection[Any], timeout: float = 0.3) -> list[int]:
    return [int(n.payload) for n in listener.notifies(timeout=timeout)]


def test_one_notification_per_appending_transaction_after_it_commits(db: Database) -> None:
    with db.connect() as c:
        migrations.install(c, SCHEMA)
    ev = Events()
    with _listener(db) as listener, db.connect(autocommit=False) as conn:
        log = ChangeLog(conn, SCHEMA)
        log.append([ev.insert("1", "ann", "b1")])
        log.append([ev.update("1", "anne", "b1")])  # the staged path
        assert _payloads(listener) == [], "nothing is announced before the commit"
        conn.commit()
        last = log.last_id()
        assert _payloads(listener) == [last - 1, last]  # one per append (notify=True)
        # A transaction in several batches: notify=False but for the last, which may be empty.
        log.append([ev.insert("2", "bob", "b2")], notify=False)
        log.append([ev.update("2", "bobby", "b2")], notify=False)
        log.append([], commit=True)
        assert _payloads(listener) == [log.last_id()]
        # Rolled back: nothing; nothing appended: nothing.
        log.append([ev.insert("3", "cy", "b3")])
        conn.rollback()
        log.append([], commit=True)
        assert _payloads(listener) == []


def test_a_long_schema_name_is_announced_on_its_hashed_channel(db: Database) -> None:
    schema = "é" * 31  # 62 bytes: "<schema>_changes" would be too long a channel name
    with db.connect() as c:
        migrations.install(c, schema)
    with _listener(db, schema) as listener, db.connect() as conn:
        ChangeLog(conn, schema).append([Events().insert("1", "ann", "b1")])
        assert _payloads(listener) == [ChangeLog(conn, schema).last_id()]


def test_concurrent_appenders_make_ids_visible_in_order(db: Database) -> None:
    """Two appenders in slow, interleaved transactions; a reader tailing ``id > last``
    must see every event exactly once, in id order, and a LISTENer one wake-up per
    transaction, after it committed."""
    with db.connect() as c:
        migrations.install(c, SCHEMA)
    appended: dict[str, list[str]] = {"a": [], "b": []}
    seen: list[StoredEvent] = []
    with db.connect() as reader:
        tail = ChangeLog(reader, SCHEMA)

        def poll() -> None:
            last = seen[-1].id if seen else 0
            for stored in tail.read(after_id=last, limit=100_000):
                assert stored.id > last
                seen.append(stored)
                last = stored.id

        # The plain case, step by step: A appends and stays open; B appends and commits.
        a, b = db.connect(autocommit=False), db.connect(autocommit=False)
        with a, b, _listener(db) as listener:
            ev_a, ev_b = Events("a"), Events("b")
            ev_b.n = 100
            # The shape committed first: B must not wait for A's new shape row instead.
            ChangeLog(a, SCHEMA).append([ev_a.insert("0", "a", "a")])
            a.commit()
            poll()
            assert _payloads(listener) == [seen[0].id]
            first = [ev_a.insert(str(i), "a", "a") for i in range(3)]
            ChangeLog(a, SCHEMA).append(first)
            second = [ev_b.insert(str(i), "b", "b") for i in range(3)]

            def b_appends() -> None:
                ChangeLog(b, SCHEMA).append(second)
                b.commit()

            other = threading.Thread(target=b_appends)
            other.start()
            other.join(0.5)
            poll()  # B must not be visible yet: A's lower ids are still to commit
            early = _payloads(listener, 0.1)
            a.commit()
            other.join(10)
            poll()
            assert [s.event.event_id for s in seen[1:]] == [e.event_id for e in first + second]
            assert early == []
            assert _payloads(listener) == [seen[3].id, seen[6].id]

        # And under load: many short transactions from both sides, mixing direct COPYs and
        # staged batches, each held open a random moment before it commits.
        failures: list[BaseException] = []
        notified: list[int] = []
        txn_max: list[int] = []

        def appender(name: str, seed: int) -> None:
            rng = random.Random(seed)
            ev = Events(f"w{name}")
            ev.n = 10_000 * seed
            try:
                with db.connect(autocommit=False) as conn:
                    log = ChangeLog(conn, SCHEMA)
                    for t in range(25):
                        batch = [ev.insert(f"{t}.{i}", name, "x") for i in range(rng.randint(1, 5))]
                        if rng.random() < 0.4:
                            batch.append(ev.update(f"{t}.0", name + "!", "x"))
                        log.append(batch)
                        time.sleep(rng.uniform(0, 0.02))
                        conn.commit()
                        appended[name] += [e.event_id for e in batch]
                        txn_max.append(max(tail_ids(conn, batch)))
            except BaseException as e:  # reported by the main thread
                failures.append(e)

        def tail_ids(conn: psycopg.Connection[Any], batch: list[ChangeEvent]) -> list[int]:
            rows = conn.execute(
                b"SELECT id FROM pgherald.events WHERE event_id = ANY(%s)",
                ([e.event_id for e in batch],),
            ).fetchall()
            conn.commit()
            return [int(r[0]) for r in rows]

        with _listener(db) as listener:
            threads = [
                threading.Thread(target=appender, args=(n, i + 1)) for i, n in enumerate("ab")
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                poll()
                notified.extend(_payloads(listener, 0.005))
            for t in threads:
                t.join()
            poll()
            notified.extend(_payloads(listener))
        assert not failures, failures
        got = [s.event.event_id for s in seen[7:]]
        assert sorted(got) == sorted(appended["a"] + appended["b"]), "each event exactly once"
        assert len(got) == len(set(got))
        assert [s.id for s in seen] == sorted(s.id for s in seen)
        assert notified == sorted(txn_max), "one wake-up per transaction, in commit order"
