"""The wire formats of a change event, without a database.

Row images here are typed by a small loader for a handful of built-in OIDs; the
integration test ``test_types_roundtrip`` does the same with the real type registry and
every type.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgherald.events.formats import (
    FormatError,
    encode,
    from_pgherald_json,
    load_schema,
    to_cloudevent,
    to_debezium,
    to_format,
    to_pgherald_json,
    to_simple,
)
from pgherald.events.model import UNCHANGED_TOAST, ChangeEvent, Operation, RowImage, Text

INT8, TEXT, NUMERIC, JSONB, BYTEA, FLOAT8 = 20, 25, 1700, 3802, 17, 701
COLUMNS: Mapping[str, tuple[int, str]] = {
    "id": (INT8, "int8"),
    "name": (TEXT, "text"),
    "amount": (NUMERIC, "numeric"),
    "doc": (JSONB, "jsonb"),
    "blob": (BYTEA, "bytea"),
}


def load(type_oid: int, text: str) -> Any:
    """A loader for the few OIDs above, reading PostgreSQL's text output of each."""
    if type_oid == INT8:
        return int(text)
    if type_oid == NUMERIC:
        return Decimal(text)
    if type_oid == JSONB:
        return json.loads(text)
    if type_oid == BYTEA:
        return bytes.fromhex(text[2:])
    return text


def image(values: Mapping[str, Text]) -> RowImage:
    return RowImage.from_texts(COLUMNS, values, load)


ROW = {
    "id": "9007199254740993",
    "name": "Zoë 😀",
    "amount": "1.50",
    "doc": '{"a": [1, null], "n": null}',
    "blob": "\\x00ff",
}


def event(
    op: Operation = "update",
    old: Mapping[str, Text] | None = None,
    new: Mapping[str, Text] | None = None,
    **kw: Any,
) -> ChangeEvent:
    old_image = image(old) if old is not None else None
    new_image = image(new) if new is not None else None
    changed: tuple[str, ...] = ()
    if old_image is not None and new_image is not None:
        changed = tuple(
            n
            for n in COLUMNS
            if new_image.text(n) is not UNCHANGED_TOAST and old_image.text(n) != new_image.text(n)
        )
    row = new_image or old_image
    fields: dict[str, Any] = {
        "event_id": "L/0000000016B374D8/3",
        "watch": "orders",
        "op": op,
        "schema": "public",
        "table": "orders",
        "key": {"id": row["id"]} if row is not None else {},
        "old": old_image,
        "new": new_image,
        "changed": changed,
        "xid": 771,
        "position": "16/B374D848",
        "commit_time": datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC),
        "captured_at": datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC),
        "method": "logical",
        "seq": 3,
        "old_values": "replica_identity" if old is not None else "none",
        "meta": {"database": "shop"},
    }
    fields.update(kw)
    return ChangeEvent(**fields)


UPDATE = event(old=ROW, new={**ROW, "amount": "2.00", "blob": UNCHANGED_TOAST})


def test_own_format_has_the_documented_fields() -> None:
    data = to_pgherald_json(UPDATE)
    assert set(data) == {
        "format_version",
        "event_id",
        "watch",
        "op",
        "schema",
        "table",
        "key",
        "old",
        "new",
        "changed",
        "xid",
        "position",
        "commit_time",
        "captured_at",
        "method",
        "seq",
        "old_values",
        "types",
        "type_oids",
        "unchanged_toast",
        "meta",
        "text",
    }
    assert data["key"] == {"id": "9007199254740993"}
    assert data["new"]["amount"] == "2.00"
    assert data["new"]["blob"] == {"unchanged_toast": True}
    assert data["new"]["doc"] == {"a": [1, None], "n": None}
    assert data["changed"] == [{"name": "amount", "old": "1.50", "new": "2.00"}]
    assert data["unchanged_toast"] == ["blob"]
    assert data["types"]["amount"] == "numeric"
    assert data["commit_time"] == "2024-05-01T12:00:00.250000+00:00"


@pytest.mark.parametrize(
    "ev",
    [
        UPDATE,
        event("insert", None, ROW),
        event("delete", ROW, None),
        event("truncate", None, None, key={}),
        event("read", None, ROW, commit_time=None, xid=None, method="snapshot"),
        event("insert", None, dict.fromkeys(COLUMNS)),  # all NULL
        event("insert", None, {**ROW, "doc": "null"}),  # json null, not SQL NULL
    ],
    ids=["update", "insert", "delete", "truncate", "read", "nulls", "json-null"],
)
def test_own_format_round_trip_and_schema(ev: ChangeEvent) -> None:
    data = json.loads(encode(ev, "pgherald"))
    jsonschema.Draft202012Validator(load_schema()).validate(data)
    back = from_pgherald_json(data)
    assert back == ev
    for got, want in ((back.new, ev.new), (back.old, ev.old)):
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert dict(got) == dict(want)
            assert got.unchanged_columns() == want.unchanged_columns()
    assert back.changed_fields == ev.changed_fields
    assert back.key == ev.key


def test_without_text_typed_values_still_come_back() -> None:
    data = json.loads(json.dumps(to_pgherald_json(UPDATE, with_text=False)))
    assert "text" not in data
    jsonschema.Draft202012Validator(load_schema()).validate(data)
    back = from_pgherald_json(data)
    assert back.new is not None and UPDATE.new is not None
    assert dict(back.new) == dict(UPDATE.new)
    assert back.new["id"] == 9007199254740993
    assert back.new["blob"] is UNCHANGED_TOAST


def test_a_json_object_that_looks_like_the_marker_is_data() -> None:
    ev = event("insert", None, {**ROW, "doc": '{"unchanged_toast": true}'})
    back = from_pgherald_json(to_pgherald_json(ev, with_text=False))
    assert back.new is not None
    assert back.new["doc"] == {"unchanged_toast": True}


def test_schema_rejects_what_is_not_an_event() -> None:
    validator = jsonschema.Draft202012Validator(load_schema())
    jsonschema.Draft202012Validator.check_schema(load_schema())
    data = to_pgherald_json(UPDATE)
    for broken in (
        {**data, "op": "upsert"},
        {**data, "captured_at": "yesterday"},
        {k: v for k, v in data.items() if k != "event_id"},
        {**data, "extra": 1},
    ):
        assert not validator.is_valid(broken)


def test_reading_refuses_bad_input_clearly() -> None:
    data = to_pgherald_json(UPDATE)
    with pytest.raises(FormatError, match="format version 2"):
        from_pgherald_json({**data, "format_version": 2})
    with pytest.raises(FormatError, match="'watch' is missing"):
        from_pgherald_json({k: v for k, v in data.items() if k != "watch"})
    with pytest.raises(FormatError, match="cannot decode"):
        from_pgherald_json({**data, "new": {**data["new"], "amount": [1]}})


def test_debezium_envelope() -> None:
    d = to_debezium(UPDATE)
    assert d["op"] == "u"
    assert d["before"]["amount"] == "1.50" and d["after"]["amount"] == "2.00"
    src = d["source"]
    assert src["connector"] == "pgherald" and src["name"] == "orders"
    assert (src["db"], src["schema"], src["table"]) == ("shop", "public", "orders")
    assert src["txId"] == 771
    assert src["lsn"] == 0x16B374D848
    assert src["ts_ms"] == 1714564800250
    assert d["ts_ms"] == 1714564801000
    assert isinstance(src["version"], str) and src["version"]
    assert [to_debezium(event(op, None, ROW))["op"] for op in ("insert", "read")] == ["c", "r"]
    assert to_debezium(event("delete", ROW, None))["after"] is None
    assert to_debezium(event("truncate", None, None, key={}))["op"] == "t"
    assert to_debezium(event(position="T/42"))["source"]["lsn"] is None
    with pytest.raises(FormatError, match="no Debezium form"):
        to_debezium(event("schema", None, None, key={}))


def test_cloudevent() -> None:
    ce = to_cloudevent(UPDATE, "pgherald://db.example/shop")
    assert ce["specversion"] == "1.0"
    assert ce["id"] == UPDATE.event_id
    assert ce["source"] == "pgherald://db.example/shop"
    assert ce["type"] == "io.pgherald.change.update"
    assert ce["subject"] == "public.orders"
    assert ce["time"] == "2024-05-01T12:00:00.250000+00:00"
    assert ce["datacontenttype"] == "application/json"
    assert from_pgherald_json(ce["data"]) == UPDATE
    assert to_cloudevent(event(commit_time=None), "x")["time"] == "2024-05-01T12:00:01+00:00"


def test_simple_shape() -> None:
    s = to_simple(UPDATE)
    assert s["operation"] == "UPDATE"
    assert (s["schema"], s["table"]) == ("public", "orders")
    assert s["old_record"]["amount"] == "1.50" and s["new_record"]["amount"] == "2.00"
    assert to_simple(event("insert", None, ROW))["old_record"] is None
    assert to_simple(event("read", None, ROW))["operation"] == "INSERT"
    assert to_simple(event("truncate", None, None, key={}))["operation"] == "TRUNCATE"
    with pytest.raises(FormatError, match="no simple form"):
        to_simple(event("schema", None, None, key={}))


@pytest.mark.parametrize("fmt", ["pgherald", "debezium", "cloudevents", "simple"])
def test_encode_is_compact_utf8_json(fmt: Any) -> None:
    raw = encode(UPDATE, fmt)
    assert "Zoë 😀" in raw.decode("utf-8")  # written as UTF-8, not escaped
    compact = json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False)
    assert raw == compact.encode("utf-8")


def test_encode_refuses_unknown_formats_and_non_json_numbers() -> None:
    with pytest.raises(FormatError, match="unknown event format 'avro'"):
        encode(UPDATE, "avro")  # type: ignore[arg-type]
    nan_doc = RowImage.from_texts({"doc": (JSONB, "jsonb")}, {"doc": "1e400"}, load)
    ev = dataclasses.replace(event("insert", None, ROW), new=nan_doc, key={})
    with pytest.raises(FormatError, match="cannot be written as JSON"):
        encode(ev, "pgherald")


_TEXTS = st.text(st.characters(codec="utf-8", exclude_characters="\0"))


@given(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    _TEXTS,
    st.decimals(allow_nan=True, allow_infinity=True, places=None).filter(lambda d: not d.is_snan()),
    st.binary(),
)
def test_any_row_round_trips_through_the_wire(
    ident: int, name: str, amount: Decimal, blob: bytes
) -> None:
    texts = {
        "id": str(ident),
        "name": name,
        "amount": format(amount, "f"),
        "doc": json.dumps({"name": name, "n": ident}),
        "blob": "\\x" + blob.hex(),
    }
    ev = event("insert", None, texts)
    back = from_pgherald_json(json.loads(encode(ev, "pgherald")))
    assert back == ev
    assert back.new is not None
    assert back.new["id"] == ident and back.new["name"] == name and back.new["blob"] == blob
    assert back.new["amount"].is_nan() if amount.is_nan() else back.new["amount"] == amount


@given(
    st.integers(),
    _TEXTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True, places=None).filter(lambda d: not d.is_snan()),
    st.sampled_from(["pgherald", "debezium", "cloudevents", "simple"]),
)
def test_encode_writes_what_the_standard_library_writes(
    big: int, name: str, ratio: float, amount: Decimal, fmt: Any
) -> None:
    """Events without json content are written by orjson (``encode``): the same JSON as
    ``json.dumps`` of the same data, and the same bytes when no float has an exponent."""
    shape: dict[str, tuple[int, str]] = {
        "id": (INT8, "int8"),
        "name": (TEXT, "text"),
        "ratio": (FLOAT8, "float8"),
        "amount": (NUMERIC, "numeric"),
    }
    texts = {"id": str(big), "name": name, "ratio": repr(ratio), "amount": format(amount, "f")}
    row = RowImage.from_texts(
        shape, texts, lambda oid, t: float(t) if oid == FLOAT8 else load(oid, t)
    )
    ev = dataclasses.replace(event("insert", None, ROW), new=row, key={"id": row["id"]})
    raw = encode(ev, fmt)
    data = to_format(ev, fmt)
    std = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert json.loads(raw) == json.loads(std)
    if "e" not in repr(ratio):
        assert raw == std.encode("utf-8")
