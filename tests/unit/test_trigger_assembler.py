"""TriggerAssembler: claimed queue rows to change events, without a database."""

from __future__ import annotations

from datetime import UTC, datetime

from pgherald.events.model import ColumnSpec, RowShape
from pgherald.sources.trigger import ClaimedRow, TriggerAssembler, TriggerWatch

WATCH = TriggerWatch("w", "public", "t", ("id",), ignore_columns=("seen",))
SHAPE = RowShape(
    (
        ColumnSpec("id", 23, "int4"),
        ColumnSpec("v", 25, "text"),
        ColumnSpec("seen", 1184, "timestamptz"),
    )
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(i: int, op: str, old: tuple[str | None, ...] = (), new: tuple[str | None, ...] = (),
        commit: datetime | None = T0, old_keys: tuple[str, ...] | None = None,
        new_keys: tuple[str, ...] | None = None) -> ClaimedRow:  # fmt: skip
    return ClaimedRow(
        i, op, 700 + i, T0, commit, old_keys, new_keys, old or (None,) * 3, new or (None,) * 3
    )


def test_operations_keys_changed_fields_and_ids() -> None:
    a = TriggerAssembler([WATCH])
    out = a.events(
        WATCH,
        SHAPE,
        [
            row(1, "insert", new=("1", "a", "x")),
            row(2, "update", old=("1", "a", "x"), new=("2", "b", "y")),
            row(3, "update", old=("2", "b", "y"), new=("2", "b", "z")),  # only ignored: dropped
            row(4, "delete", old=("2", "b", "z")),
            row(5, "truncate", commit=None),
        ],
    )
    events = [e for _, e in out]
    assert [(e.op, dict(e.key), e.changed) for e in events] == [
        ("insert", {"id": "1"}, ()),
        ("update", {"id": "2"}, ("id", "v")),
        ("delete", {"id": "2"}, ()),
        ("truncate", {}, ()),
    ]
    assert events[1].meta["old_key"] == {"id": "1"}
    assert events[1].old_values == "trigger" and events[0].old_values == "none"
    assert [e.event_id for e in events] == ["T/701/1", "T/702/2", "T/704/4", "T/705/5"]
    assert events[3].meta["commit_time"] == "transaction start"
    assert "commit_time" not in events[0].meta


def test_rows_from_before_a_shape_change_keep_their_shape_and_a_schema_event_follows() -> None:
    a = TriggerAssembler([WATCH], {"w": RowShape(SHAPE.columns[:2])})
    out = a.events(
        WATCH,
        SHAPE,
        [
            row(1, "insert", new=("1", "a", None), new_keys=("id", "v")),
            row(2, "insert", new=("2", "b", "x")),
        ],
    )
    ops = [(i, e.op) for i, e in out]
    assert ops == [(1, "insert"), (2, "schema"), (2, "insert")]
    assert out[0][1].new is not None and out[0][1].new.shape.names == ("id", "v")
    assert out[1][1].meta["added"] == ["seen"]
    assert out[1][1].event_id == "T/702/2/schema"
    saved = a.snapshot()
    a.restore({})
    assert a.shapes == {}
    a.restore(saved)
    assert a.shapes["w"] == SHAPE
