"""The assembler turns decoded pgoutput messages into change events, without any I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import pytest

from pgherald.errors import CaptureError
from pgherald.events import UNCHANGED_TOAST
from pgherald.sources.logical import (
    LogicalWatch,
    TransactionAssembler,
    describe_shape_change,
    format_lsn,
    parse_lsn,
)
from pgherald.sources.pgoutput import (
    Begin,
    Delete,
    Insert,
    Relation,
    RelationColumn,
    Truncate,
    Update,
)

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
TYPES = {23: "integer", 25: "text", 1700: "numeric"}


def type_names(oids: Iterable[int]) -> Mapping[int, str]:
    return TYPES


def relation(*cols: tuple[str, int], oid: int = 1000, ident: str = "d") -> Relation:
    return Relation(
        None,
        oid,
        "public",
        "emp",
        ident,
        tuple(RelationColumn(name == "id", name, t, -1) for name, t in cols),
    )


def assembler(**watch: object) -> TransactionAssembler:
    w = LogicalWatch(name="emp", schema="public", table="emp", key_columns=("id",), **watch)  # type: ignore[arg-type]
    asm = TransactionAssembler([w], type_names)
    asm.begin(Begin(final_lsn=0x1_0000_00A0, commit_time=T0, xid=42))
    return asm


BASE = relation(("id", 23), ("name", 25), ("salary", 1700), ("notes", 25))


def test_insert_event_carries_transaction_identity_and_stable_id() -> None:
    asm = assembler()
    assert list(asm.relation(BASE)) == []
    ev = asm.insert(Insert(None, 1000, ("1", "Ada", "100.50", None)))
    assert ev is not None
    assert ev.event_id == "L/00000001000000A0/1"
    assert (ev.op, ev.watch, ev.xid, ev.position, ev.commit_time) == (
        "insert",
        "emp",
        42,
        "1/A0",
        T0,
    )
    assert ev.key == {"id": "1"}
    assert ev.new is not None and ev.new.text("salary") == "100.50" and ev.new["notes"] is None
    assert ev.new.column("salary").type_name == "numeric"
    second = asm.insert(Insert(None, 1000, ("2", "Bob", "1", None)))
    assert second is not None and second.event_id.endswith("/2") and second.seq == 2


def test_full_identity_update_computes_changes_and_fills_unchanged_toast() -> None:
    asm = assembler()
    list(asm.relation(BASE))
    ev = asm.update(
        Update(
            None, 1000, "O", ("1", "Ada", "100", "long text"), ("1", "Ada", "120", UNCHANGED_TOAST)
        )
    )
    assert ev is not None
    assert ev.changed == ("salary",)
    assert ev.old_values == "replica_identity"
    assert ev.new is not None and ev.new.text("notes") == "long text"
    assert [(f.name, f.old, f.new) for f in ev.changed_fields] == [("salary", "100", "120")]


def test_update_touching_only_ignored_columns_is_dropped() -> None:
    asm = assembler(ignore_columns=("notes",))
    list(asm.relation(BASE))
    same = asm.update(Update(None, 1000, "O", ("1", "A", "1", "x"), ("1", "A", "1", "y")))
    assert same is None
    real = asm.update(Update(None, 1000, "O", ("1", "A", "1", "x"), ("1", "B", "1", "y")))
    assert real is not None and real.changed == ("name",)


def test_default_identity_update_has_no_old_row_but_keeps_unchanged_marker() -> None:
    asm = assembler()
    list(asm.relation(BASE))
    ev = asm.update(Update(None, 1000, None, None, ("1", "Ada", "120", UNCHANGED_TOAST)))
    assert ev is not None and ev.old is None and ev.changed == ()
    assert ev.new is not None and ev.new.text("notes") is UNCHANGED_TOAST
    assert ev.new.unchanged_columns() == ("notes",)


def test_key_change_records_old_key() -> None:
    asm = assembler()
    list(asm.relation(BASE))
    ev = asm.update(Update(None, 1000, "K", ("1", None, None, None), ("9", "Ada", "1", None)))
    assert ev is not None and ev.key == {"id": "9"} and ev.meta["old_key"] == {"id": "1"}


def test_delete_with_default_identity_keeps_only_the_key() -> None:
    asm = assembler()
    list(asm.relation(BASE))
    ev = asm.delete(Delete(None, 1000, "K", ("7", None, None, None)))
    assert ev is not None and ev.op == "delete" and ev.key == {"id": "7"}
    assert ev.old is not None and list(ev.old) == ["id"]


def test_column_subset_projects_rows_and_keeps_the_key() -> None:
    asm = assembler(columns=("salary",))
    list(asm.relation(BASE))
    ev = asm.insert(Insert(None, 1000, ("1", "Ada", "100", "n")))
    assert ev is not None and ev.new is not None and list(ev.new) == ["id", "salary"]


def test_shape_change_mid_stream_is_an_event_of_its_own() -> None:
    asm = assembler()
    list(asm.relation(BASE))
    changed = relation(("id", 23), ("full_name", 25), ("salary", 25), ("notes", 25), ("dept", 25))
    events = list(asm.relation(changed))
    assert len(events) == 1 and events[0].op == "schema"
    meta = events[0].meta
    assert meta["renamed"] == [["name", "full_name"]]
    assert meta["added"] == ["dept"] and meta["dropped"] == []
    assert meta["retyped"] == [["salary", "numeric", "text"]]
    # The same relation again (e.g. after a reconnect) is not a change.
    assert list(asm.relation(changed)) == []


def test_a_seeded_shape_makes_the_first_relation_a_schema_change_if_it_differs() -> None:
    asm = assembler()
    list(asm.relation(BASE))
    stored = asm.relations[1000].shape
    restarted = assembler()
    restarted.seed_shape("public", "emp", stored)
    assert list(restarted.relation(BASE)) == []  # what the log holds already: no event
    again = assembler()
    again.seed_shape("public", "emp", stored)
    added = relation(("id", 23), ("name", 25), ("salary", 1700), ("notes", 25), ("dept", 25))
    (event,) = again.relation(added)
    assert event.op == "schema" and event.meta["added"] == ["dept"]
    assert event.meta["type_oids_after"] == [23, 25, 1700, 25, 25]
    assert list(again.relation(added)) == []


def test_missing_key_column_is_a_clear_error() -> None:
    asm = assembler()
    with pytest.raises(CaptureError, match="key column"):
        list(asm.relation(relation(("name", 25))))


def test_truncate_makes_one_event_per_watched_table() -> None:
    asm = assembler()
    list(asm.relation(BASE))
    events = list(asm.truncate(Truncate(None, (1000, 2000), True, False)))
    assert [e.op for e in events] == ["truncate"] and events[0].meta["cascade"] is True


def test_unwatched_relations_are_ignored() -> None:
    asm = assembler()
    other = Relation(None, 5, "public", "other", "d", (RelationColumn(True, "id", 23, -1),))
    assert list(asm.relation(other)) == []
    assert asm.insert(Insert(None, 5, ("1",))) is None


def test_lsn_text_round_trip() -> None:
    for lsn in (0, 1, 0x16B3748, 0xFFFFFFFF_FFFFFFFF):
        assert parse_lsn(format_lsn(lsn)) == lsn
    assert format_lsn(0x1_0000_00A0) == "1/A0"


def test_describe_shape_change_without_rename() -> None:
    before = relation(("id", 23), ("a", 25))
    after = relation(("id", 23), ("b", 23))
    asm = assembler()
    list(asm.relation(before))
    b = asm.relations[1000].shape
    list(asm.relation(after))
    a = asm.relations[1000].shape
    meta = describe_shape_change(b, a)
    assert meta["added"] == ["b"] and meta["dropped"] == ["a"] and meta["renamed"] == []
