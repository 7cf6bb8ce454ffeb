"""The store's pure parts: named query blocks, row keys, shape digests, COPY text, names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pgherald.errors import ConfigError
from pgherald.events.model import ColumnSpec, RowShape
from pgherald.store import copytext
from pgherald.store.changelog import row_key_of, shape_columns, shape_digest
from pgherald.store.queries import parse_blocks, queries
from pgherald.store.session import _code_only, check_schema_name

STORE = Path(__file__).resolve().parents[2] / "src" / "pgherald" / "store"


def test_blocks_are_split_by_name_headers() -> None:
    text = "-- preamble\n\n-- name: one\nSELECT 1\n\n-- name: two\n-- what it does\nSELECT 2;\n"
    assert parse_blocks(text) == {"one": "SELECT 1", "two": "-- what it does\nSELECT 2;"}


def test_duplicate_and_empty_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="defined twice"):
        parse_blocks("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")
    with pytest.raises(ValueError, match="empty"):
        parse_blocks("-- name: a\n\n-- name: b\nSELECT 1\n")


def test_every_query_the_store_uses_exists_and_every_block_is_used() -> None:
    source = "\n".join(p.read_text() for p in STORE.glob("*.py"))
    used = set(re.findall(r'query\("([a-z_]+)"\)', source))
    used |= set(re.findall(r'_code_only\("([a-z_]+)"\)', source))
    used |= {"read_events", "read_watch_events"}  # chosen by a conditional expression
    assert used - set(queries()) == set()
    assert set(queries()) - used == set()


def test_row_key_is_compact_json_in_key_order() -> None:
    assert row_key_of({"b": "2", "a": "x,y"}) == '["2","x,y"]'
    assert row_key_of({"id": None}) == "[null]"
    assert row_key_of({"id": 7}) == '["7"]'
    assert row_key_of({"name": 'Zoë "Z"'}) == '["Zoë \\"Z\\""]'
    assert json.loads(row_key_of({"a": "1", "b": "2"}) or "") == ["1", "2"]
    assert row_key_of({}) is None


def test_shape_digest_names_columns_types_and_order() -> None:
    a = RowShape((ColumnSpec("id", 23, "integer"), ColumnSpec("n", 25, "text")))
    same = RowShape((ColumnSpec("id", 23, "integer"), ColumnSpec("n", 25, "text")))
    swapped = RowShape((ColumnSpec("n", 25, "text"), ColumnSpec("id", 23, "integer")))
    retyped = RowShape((ColumnSpec("id", 20, "bigint"), ColumnSpec("n", 25, "text")))
    digests = {shape_digest(shape_columns(s)) for s in (a, swapped, retyped)}
    assert len(digests) == 3
    assert shape_digest(shape_columns(a)) == shape_digest(shape_columns(same))
    assert shape_columns(a) == [["id", 23, "integer"], ["n", 25, "text"]]


def test_copy_text_escapes() -> None:
    assert copytext.text(None) == "\\N"
    assert copytext.text("a\tb\nc\\d\re") == "a\\tb\\nc\\\\d\\re"
    assert copytext.text("\\N") == "\\\\N"
    assert copytext.text_array(None) == "\\N"
    assert copytext.text_array([]) == "{}"
    assert copytext.text_array(["a", None, "NULL", ""]) == '{"a",NULL,"NULL",""}'
    assert copytext.text_array(['q"', "b\\"]) == '{"q\\\\"","b\\\\\\\\"}'
    assert copytext.boolean(True) == "t"
    assert copytext.integer(None) == "\\N"


@pytest.mark.parametrize("name", ["", "a" * 64, "é" * 32, "x\x00"])
def test_impossible_schema_names(name: str) -> None:
    with pytest.raises(ConfigError, match="schema name"):
        check_schema_name(name)


def test_the_schema_name_is_composed_into_code_only() -> None:
    """A quoted name may hold a newline: inside a ``--`` comment it would end the comment."""
    code = _code_only("enter_schema")
    assert "{schema}" in code
    assert "--" not in code
    assert "SET LOCAL search_path TO {schema}" in code
    check_schema_name("é" * 31 + "a")  # 63 bytes is allowed
