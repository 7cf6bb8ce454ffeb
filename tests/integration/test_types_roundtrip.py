"""Every supported type, from the server's text output to typed values, JSON and back.

One table holds a column of each type and rows of edge values. The text is fetched
raw (as pgoutput would send it) from a connection with the canonical session settings,
typed by ``TypeRegistry``, and checked against psycopg's own fetch, the JSON rules, the
JSON decoder, the own wire format, and finally the server itself: the JSON must cast
back to the very value stored.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import jsonschema
import psycopg
import pytest
from psycopg import sql
from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from pgherald.db.types import (
    CANONICAL_SESSION_SETTINGS,
    TypeRegistry,
    apply_canonical_settings,
    canonical_options,
)
from pgherald.events.formats import encode, from_pgherald_json, load_schema, to_pgherald_json
from pgherald.events.model import ChangeEvent, ColumnSpec, RowImage, RowShape
from pgherald.events.values import (
    PG_INFINITY,
    PG_NEG_INFINITY,
    PgInterval,
    PgText,
    from_json_value,
    to_json_value,
)
from tests.conftest import Database

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN price AS numeric(12,4) CHECK (VALUE >= 0);
CREATE DOMAIN small_price AS price CHECK (VALUE < 1000);
CREATE TYPE floatrange AS RANGE (subtype = float8);
CREATE TYPE pair AS (a int, b text);
"""

TEXT_WITH_CONTROLS = "emoji 😀 tab\there nl\nx ctl\x01\x1f bs\\ q'\" é"

# (column, SQL type, four rows of SQL literals); a fifth row is NULL everywhere.
COLUMNS: list[tuple[str, str, tuple[str, str, str, str]]] = [
    ("b", "boolean", ("true", "false", "true", "false")),
    ("i2", "smallint", ("32767", "-32768", "0", "1")),
    ("i4", "integer", ("2147483647", "-2147483648", "0", "42")),
    (
        "i8",
        "bigint",
        ("9223372036854775807", "-9223372036854775808", "9007199254740991", "9007199254740992"),
    ),
    (
        "n",
        "numeric",
        ("'NaN'", "'-Infinity'", "'Infinity'", "0.000000000000000000000000000001"),
    ),
    ("nbig", "numeric(40,10)", ("12345678901234567890.0123456789", "-1.5", "0", "1e20")),
    ("f4", "real", ("'NaN'", "'-Infinity'", "'1.1'", "'-0'")),
    ("f8", "double precision", ("'Infinity'", "'-0'", "'NaN'", "'1.7976931348623157e308'")),
    ("ba", "bytea", ("'\\x00ff80fe41'", "'\\x'", "'\\x00'", "'\\xdeadbeef'")),
    ("t", "text", ("%(text)s", "''", "'NULL'", "'plain'")),
    ("vc", "varchar(20)", ("'it''s, \"q\"'", "'a\\b'", "' '", "'x'")),
    ("c", "char(5)", ("'ab'", "'abcde'", "' '", "'z'")),
    (
        "ts",
        "timestamp",
        ("'infinity'", "'-infinity'", "'2024-02-29 12:34:56.123456'", "'0001-01-01 00:00:00'"),
    ),
    (
        "tstz",
        "timestamptz",
        (
            "'-infinity'",
            "'2024-02-29 12:34:56.123456+05:30'",
            "'infinity'",
            "'1999-12-31 23:59:59.999999-08'",
        ),
    ),
    ("d", "date", ("'infinity'", "'-infinity'", "'2024-02-29'", "'0044-03-15 BC'")),
    ("tm", "time", ("'23:59:59.999999'", "'00:00:00'", "'24:00:00'", "'12:00:00.5'")),
    (
        "ttz",
        "timetz",
        ("'04:05:06+05:30'", "'23:59:59.999999-14:59'", "'00:00:00+00'", "'12:00:00.5-03'"),
    ),
    (
        "iv",
        "interval",
        (
            "'1 year 2 mons 3 days 04:05:06.789'",
            "'-1 years -2 mons +3 days -04:05:06.000001'",
            "'0'",
            "'2562047788 hours 54.775807 seconds'",
        ),
    ),
    (
        "u",
        "uuid",
        (
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
            "'00000000-0000-0000-0000-000000000000'",
            "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
            "gen_random_uuid()",
        ),
    ),
    ("j", "json", ('\'{"b": 1,  "a": [1, 2.5]}\'', "'[]'", "'\"s\"'", "'null'")),
    (
        "jb",
        "jsonb",
        (
            '\'{"é": "😀", "big": 123456789012345678901234567890,'
            ' "nested": {"arr": [1, null, true, "x"], "f": 1.5, "neg": -9007199254740993}}\'',
            "'[1, [2, [3]]]'",
            "'0'",
            "'{\"unchanged_toast\": true}'",
        ),
    ),
    ("ia", "integer[]", ("'{{1,NULL},{3,4}}'", "'{}'", "'{{{1}}}'", "'{NULL}'")),
    (
        "i8a",
        "bigint[]",
        ("'{9223372036854775807,-1}'", "'{}'", "'{9007199254740992}'", "'{NULL,0}'"),
    ),
    (
        "ta",
        "text[]",
        (
            "ARRAY['a\"b', 'c,d', 'e\\f', NULL, 'NULL', '', ' sp ', '{x}']",
            "'{}'",
            "ARRAY['😀']",
            "'{{a,b},{c,d}}'",
        ),
    ),
    ("ir", "int4range", ("'empty'", "'[1,10)'", "'(,5]'", "'[3,)'")),
    ("nr", "numrange", ("'[1.5,)'", "'(,)'", "'empty'", "'[0.000000000000000000000000000001,2]'")),
    (
        "tsr",
        "tstzrange",
        (
            "'[-infinity,2024-01-01 00:00:00+00)'",
            "'(,)'",
            "'[2024-02-29 12:00+05:30,infinity]'",
            "'empty'",
        ),
    ),
    ("dr", "daterange", ("'(,)'", "'[2024-01-01,2024-12-31]'", "'empty'", "'[-infinity,)'")),
    ("mr", "int4multirange", ("'{[1,3),[5,7)}'", "'{}'", "'{(,0)}'", "'{[1,2]}'")),
    ("fr", "floatrange", ("'[1.5,2.5)'", "'(,)'", "'empty'", "'[-Infinity,NaN]'")),
    ("fmr", "floatmultirange", ("'{[1.5,2.5)}'", "'{}'", "'{(,0)}'", "'{[1,2],[3,4]}'")),
    ("e", "mood", ("'happy'", "'sad'", "'ok'", "'happy'")),
    ("ea", "mood[]", ("'{sad,happy}'", "'{}'", "'{NULL,ok}'", "'{{sad},{ok}}'")),
    ("dm", "price", ("12.3456", "0", "99999999.9999", "0.0001")),
    ("dm2", "small_price", ("999.9999", "0", "1", "0.5")),
    ("dma", "price[]", ("'{1.5,NULL}'", "'{}'", "'{0}'", "'{{1,2},{3,4}}'")),
    ("ip", "inet", ("'192.168.1.5/24'", "'::1'", "'10.0.0.1'", "'2001:db8::1/64'")),
    ("cn", "cidr", ("'10.0.0.0/8'", "'2001:db8::/32'", "'192.168.1.0/24'", "'0.0.0.0/0'")),
    ("m", "money", ("1234.56", "-0.01", "0", "92233720368547758.07")),
    ("bt", "bit(4)", ("B'0101'", "B'0000'", "B'1111'", "B'1000'")),
    ("vb", "bit varying", ("B'101'", "B''", "B'1'", "B'0110100101'")),
    ("cp", "pair", ("ROW(1, 'a,\"b\"')", "ROW(NULL, NULL)", "ROW(-1, '')", "ROW(0, 'x')")),
    ("pt", "point", ("'(1.5,2)'", "'(0,0)'", "'(-1,1e300)'", "'(3,4)'")),
]
ROWS = 5  # four rows of values, then NULLs

# What the JSON rules of the design give for some of the values above (row index, column).
EXPECTED_JSON: dict[tuple[int, str], Any] = {
    (0, "i8"): "9223372036854775807",
    (1, "i8"): "-9223372036854775808",
    (2, "i8"): 9007199254740991,
    (3, "i8"): "9007199254740992",
    (0, "n"): "NaN",
    (1, "n"): "-Infinity",
    (2, "n"): "Infinity",
    (3, "n"): "0.000000000000000000000000000001",
    (0, "nbig"): "12345678901234567890.0123456789",
    (3, "nbig"): "100000000000000000000.0000000000",
    (0, "f4"): "NaN",
    (1, "f4"): "-Infinity",
    (0, "f8"): "Infinity",
    (2, "f8"): "NaN",
    (3, "f8"): 1.7976931348623157e308,
    (0, "ba"): base64.b64encode(b"\x00\xff\x80\xfe\x41").decode(),
    (1, "ba"): "",
    (0, "t"): TEXT_WITH_CONTROLS,
    (1, "c"): "abcde",
    (0, "ts"): "infinity",
    (1, "ts"): "-infinity",
    (2, "ts"): "2024-02-29T12:34:56.123456",
    (0, "tstz"): "-infinity",
    (1, "tstz"): "2024-02-29T07:04:56.123456+00:00",
    (2, "tstz"): "infinity",
    (0, "d"): "infinity",
    (2, "d"): "2024-02-29",
    (3, "d"): {"pg_type": "date", "text": "0044-03-15 BC"},
    (0, "tm"): "23:59:59.999999",
    (2, "tm"): {"pg_type": "time without time zone", "text": "24:00:00"},
    (0, "ttz"): "04:05:06+05:30",
    (1, "ttz"): "23:59:59.999999-14:59",
    (0, "iv"): "P1Y2M3DT4H5M6.789S",
    (1, "iv"): "P-1Y-2M3DT-4H-5M-6.000001S",
    (2, "iv"): "PT0S",
    (0, "u"): "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    (0, "j"): {"b": 1, "a": [1, 2.5]},
    (0, "jb"): {
        "é": "😀",
        "big": 123456789012345678901234567890,
        "nested": {"arr": [1, None, True, "x"], "f": 1.5, "neg": -9007199254740993},
    },
    (0, "ia"): [[1, None], [3, 4]],
    (1, "ia"): [],
    (2, "ia"): [[[1]]],
    (0, "i8a"): ["9223372036854775807", -1],
    (0, "ta"): ['a"b', "c,d", "e\\f", None, "NULL", "", " sp ", "{x}"],
    (0, "ir"): {"lower": None, "upper": None, "bounds": None, "empty": True},
    (1, "ir"): {"lower": 1, "upper": 10, "bounds": "[)", "empty": False},
    (2, "ir"): {"lower": None, "upper": 6, "bounds": "()", "empty": False},
    (0, "nr"): {"lower": "1.5", "upper": None, "bounds": "[)", "empty": False},
    (0, "tsr"): {
        "lower": "-infinity",
        "upper": "2024-01-01T00:00:00+00:00",
        "bounds": "[)",
        "empty": False,
    },
    (0, "mr"): [
        {"lower": 1, "upper": 3, "bounds": "[)", "empty": False},
        {"lower": 5, "upper": 7, "bounds": "[)", "empty": False},
    ],
    (3, "fr"): {"lower": "-Infinity", "upper": "NaN", "bounds": "[]", "empty": False},
    (0, "fmr"): [{"lower": 1.5, "upper": 2.5, "bounds": "[)", "empty": False}],
    (1, "fmr"): [],
    (0, "e"): "happy",
    (0, "ea"): ["sad", "happy"],
    (0, "dm"): "12.3456",
    (0, "dma"): ["1.5000", None],
    (0, "ip"): "192.168.1.5/24",
    (1, "ip"): "::1",
    (0, "cn"): "10.0.0.0/8",
    (0, "m"): "$1,234.56",
    (0, "bt"): "0101",
    (0, "vb"): "101",
    (0, "cp"): {"pg_type": "pair", "text": '(1,"a,""b""")'},
    (0, "pt"): {"pg_type": "point", "text": "(1.5,2)"},
}


@dataclass
class Fixture:
    db: Database
    conn: psycopg.Connection[Any]
    registry: TypeRegistry
    shape: RowShape
    rows: list[RowImage]
    sql_types: dict[str, str]  # column -> format_type with typmod, for casts


def _create(conn: psycopg.Connection[Any]) -> None:
    conn.execute(SETUP.encode())
    cols = ", ".join(f"{name} {typ}" for name, typ, _ in COLUMNS)
    conn.execute(f"CREATE TABLE every_type (id int PRIMARY KEY, {cols})".encode())
    for row in range(4):
        values = ", ".join(literals[row] for _, _, literals in COLUMNS)
        conn.execute(
            f"INSERT INTO every_type VALUES ({row}, {values})".encode(),
            {"text": TEXT_WITH_CONTROLS},
        )
    conn.execute(b"INSERT INTO every_type (id) VALUES (4)")


@pytest.fixture
def typed(db: Database) -> Iterator[Fixture]:
    with psycopg.connect(db.dsn, autocommit=True, options=canonical_options()) as conn:
        _create(conn)
        registry = TypeRegistry.load(conn)
        attrs = conn.execute(
            "SELECT attname, atttypid::int8, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'every_type'::regclass AND attnum > 0 AND NOT attisdropped"
            " ORDER BY attnum"
        ).fetchall()
        shape = RowShape(
            tuple(ColumnSpec(name, oid, registry.type_name(oid)) for name, oid, _ in attrs)
        )
        # Raw text, as pgoutput sends it: psycopg would refuse infinity on fetch.
        cur = conn.execute("SELECT * FROM every_type ORDER BY id")
        res = cur.pgresult
        assert res is not None
        rows = []
        for r in range(res.ntuples):
            texts = []
            for c in range(res.nfields):
                raw = res.get_value(r, c)
                texts.append(None if raw is None else bytes(raw).decode("utf-8"))
            rows.append(RowImage(shape, tuple(texts), registry))
        assert len(rows) == ROWS
        yield Fixture(db, conn, registry, shape, rows, {n: t for n, _, t in attrs})


def same(a: Any, b: Any) -> bool:
    """Equality that holds NaN equal to NaN and tells -0.0 from 0.0."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        if a.is_nan() or b.is_nan():
            return a.is_nan() and b.is_nan()
        return a == b and str(a) == str(b)
    if isinstance(a, Range) and isinstance(b, Range):
        return (
            a.isempty == b.isempty
            and same(a.lower, b.lower)
            and same(a.upper, b.upper)
            and a.bounds == b.bounds
        )
    if isinstance(a, list | Multirange) and isinstance(b, list | Multirange):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def test_canonical_settings_are_in_force(typed: Fixture) -> None:
    for name, value in CANONICAL_SESSION_SETTINGS.items():
        row = typed.conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        assert row is not None
        assert row[0] == value


def test_typed_values_have_the_promised_python_types(typed: Fixture) -> None:
    r0, r1, r2, r3, nulls = typed.rows
    assert r0["i8"] == 2**63 - 1 and r1["i8"] == -(2**63)
    assert r0["n"].is_nan() and r1["n"] == Decimal("-Infinity")
    assert str(r3["n"]) == "1E-30" and r3["n"] == Decimal(1) / Decimal(10**30)
    assert math.isnan(r0["f4"]) and r0["f8"] == math.inf
    assert math.copysign(1, r1["f8"]) == -1.0
    assert r0["ba"] == b"\x00\xff\x80\xfe\x41"
    assert r0["t"] == TEXT_WITH_CONTROLS
    assert r0["ts"] is PG_INFINITY or r0["ts"] == PG_INFINITY
    assert r1["ts"] == PG_NEG_INFINITY and r0["d"] == PG_INFINITY
    assert r1["tstz"] == datetime(2024, 2, 29, 7, 4, 56, 123456, tzinfo=UTC)
    assert r1["tstz"].utcoffset() is not None
    assert r0["ttz"].utcoffset().total_seconds() == 5.5 * 3600
    assert r0["iv"] == PgInterval(months=14, days=3, microseconds=14_706_789_000)
    assert r1["iv"] == PgInterval(months=-14, days=3, microseconds=-14_706_000_001)
    assert r2["tm"] == PgText("time without time zone", "24:00:00")
    assert r3["d"] == PgText("date", "0044-03-15 BC")
    assert r0["ia"] == [[1, None], [3, 4]]
    assert r0["ir"] == Range(empty=True)
    assert r0["tsr"].lower == PG_NEG_INFINITY
    assert r0["fr"] == Range(1.5, 2.5, "[)")
    assert r0["e"] == "happy" and r0["ea"] == ["sad", "happy"]
    assert r0["dm"] == Decimal("12.3456") and r0["dm2"] == Decimal("999.9999")
    assert r0["dma"] == [Decimal("1.5000"), None]
    assert r0["m"] == "$1,234.56" and r0["bt"] == "0101"
    assert r0["cp"] == PgText("pair", '(1,"a,""b""")')
    assert r0["jb"]["big"] == 123456789012345678901234567890
    assert all(nulls[name] is None for name in typed.shape.names if name != "id")


def test_types_resolved_by_oid(typed: Fixture) -> None:
    names = {c.name: c.type_name for c in typed.shape.columns}
    assert names["dm"] == "numeric" and names["dm2"] == "numeric"  # domains, recursively
    assert names["dma"] == "numeric[]"
    assert names["fr"] == "range<float8>" and names["fmr"] == "multirange<float8>"
    assert names["e"] == "public.mood" and names["ea"] == "public.mood[]"
    assert names["i8"] == "int8" and names["ia"] == "int4[]"
    assert typed.registry.display_name(typed.shape.columns[typed.shape.index("e")].type_oid) in (
        "mood",
        "public.mood",
    )


def test_typed_values_equal_psycopg_where_psycopg_is_lossless(typed: Fixture) -> None:
    compared = 0
    for r, image in enumerate(typed.rows):
        for col in typed.shape.columns:
            query = sql.SQL("SELECT {} FROM every_type WHERE id = %s").format(
                sql.Identifier(col.name)
            )
            try:
                row = typed.conn.execute(query, (r,)).fetchone()
            except psycopg.DataError:
                continue  # psycopg cannot load it (infinity, BC, 24:00): ours must not fail
            assert row is not None
            theirs, ours = row[0], image[col.name]
            if isinstance(ours, PgInterval):
                continue  # psycopg's timedelta folds months into days: not lossless
            if isinstance(theirs, str) and not isinstance(ours, str):
                # psycopg has no loader for the type (custom array, range, composite).
                if isinstance(ours, PgText):
                    assert ours.text == theirs
                continue
            assert same(ours, theirs), (r, col.name, ours, theirs)
            compared += 1
    assert compared > 150


def test_json_encoding_follows_the_rules(typed: Fixture) -> None:
    for (r, name), expected in EXPECTED_JSON.items():
        column = typed.shape.columns[typed.shape.index(name)]
        got = to_json_value(typed.rows[r][name], column.type_name)
        assert same(got, expected), (r, name, got, expected)
    for image in typed.rows:
        for col in typed.shape.columns:
            encoded = to_json_value(image[col.name], col.type_name)
            if not col.type_name.startswith("json"):
                # No bare float NaN/inf, no unsafe integers anywhere in the JSON.
                json.dumps(encoded, allow_nan=False)
                _assert_safe_numbers(encoded)


def _assert_safe_numbers(value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        assert abs(value) <= 2**53 - 1
    elif isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, list):
        for v in value:
            _assert_safe_numbers(v)
    elif isinstance(value, dict):
        for v in value.values():
            _assert_safe_numbers(v)


def test_json_decodes_to_equal_values(typed: Fixture) -> None:
    for image in typed.rows:
        for col in typed.shape.columns:
            value = image[col.name]
            wire = json.loads(json.dumps(to_json_value(value, col.type_name)))
            back = from_json_value(col.type_name, wire)
            assert same(back, value), (col.name, value, back)
            # format_type spellings decode the same way as pg_type ones.
            display = typed.registry.display_name(col.type_oid)
            if col.name not in ("dm", "dm2", "dma", "fr", "fmr"):  # domains, custom ranges
                assert same(from_json_value(display, wire), value), (display, value)


def _event(typed: Fixture, r: int) -> ChangeEvent:
    old = typed.rows[r - 1] if r > 0 else None
    new = typed.rows[r]
    changed = (
        tuple(n for n in typed.shape.names if old.texts[old.shape.index(n)] != new.text(n))
        if old is not None
        else ()
    )
    return ChangeEvent(
        event_id=f"L/{r:016X}/0",
        watch="every",
        op="update" if old is not None else "insert",
        schema="public",
        table="every_type",
        key={"id": new["id"]},
        old=old,
        new=new,
        changed=changed,
        xid=1000 + r,
        position=f"0/{r:X}",
        commit_time=datetime(2024, 1, 1, tzinfo=UTC),
        captured_at=datetime(2024, 1, 1, 0, 0, 1, 123456, tzinfo=UTC),
        method="logical",
        seq=r,
        old_values="replica_identity" if old is not None else "none",
        meta={"database": typed.db.name},
    )


def test_own_format_round_trip_is_equal_and_valid(typed: Fixture) -> None:
    validator = jsonschema.Draft202012Validator(load_schema())
    for r in range(ROWS):
        event = _event(typed, r)
        data = json.loads(encode(event, "pgherald"))
        validator.validate(data)
        back = from_pgherald_json(data)
        assert back == event
        for image, original in ((back.new, event.new), (back.old, event.old)):
            if original is None:
                assert image is None
                continue
            assert image is not None
            for name in original.shape.names:
                assert same(image[name], original[name]), (r, name)
        assert [f.name for f in back.changed_fields] == list(event.changed)
        for a, b in zip(back.changed_fields, event.changed_fields, strict=True):
            assert same(a.old, b.old) and same(a.new, b.new), (r, a.name)
        # Without PostgreSQL's text, typed values still come back equal.
        lean = from_pgherald_json(json.loads(json.dumps(to_pgherald_json(event, with_text=False))))
        assert lean.new is not None and event.new is not None
        for name in event.new.shape.names:
            assert same(lean.new[name], event.new[name]), (r, name)
        for fmt in ("debezium", "cloudevents", "simple"):
            json.loads(encode(event, fmt), parse_constant=_no_constants)


def _no_constants(name: str) -> None:
    raise AssertionError(f"JSON holds {name}")


def _cast_param(col: ColumnSpec, value: Any) -> tuple[str, str] | None:
    """The SQL that casts the JSON value back, and its parameter; None where it cannot."""
    if value is None:
        return None
    if col.type_name in ("json", "jsonb"):
        return "%s::jsonb", json.dumps(value)
    if isinstance(value, dict) and value.keys() == {"pg_type", "text"}:
        return "%s::{type}", value["text"]
    if isinstance(value, list | dict):
        return None  # arrays and ranges have no JSON input syntax in PostgreSQL
    if col.type_name == "bytea":
        return "decode(%s, 'base64')", value
    return "%s::{type}", value if isinstance(value, str) else json.dumps(value)


def test_server_casts_the_json_back_to_the_stored_value(typed: Fixture) -> None:
    checked = 0
    for r, image in enumerate(typed.rows):
        for col in typed.shape.columns:
            encoded = to_json_value(image[col.name], col.type_name)
            cast = _cast_param(col, encoded)
            if cast is None:
                continue
            expr, param = cast
            stored: sql.Composable = sql.Identifier(col.name)
            if col.type_name == "json":
                stored = sql.SQL("{}::jsonb").format(stored)
            query = sql.SQL(
                "SELECT (" + expr.replace("{type}", "{t}") + ")::text = {c}::text FROM every_type"
                " WHERE id = %s"
            ).format(t=sql.SQL(typed.sql_types[col.name]), c=stored)
            row = typed.conn.execute(query, (param, r)).fetchone()
            assert row is not None
            assert row[0] is True, (r, col.name, param)
            checked += 1
    assert checked > 120


def test_registry_needs_no_connection_after_load(typed: Fixture) -> None:
    typed.conn.close()
    image = typed.rows[0].with_loader(typed.registry)
    assert image["iv"] == PgInterval(14, 3, 14_706_789_000)
    assert image["fr"] == Range(1.5, 2.5, "[)")


def test_refresh_learns_types_created_later(db: Database) -> None:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        apply_canonical_settings(conn)
        registry = TypeRegistry.load(conn)
        conn.execute(
            b"CREATE TYPE later AS ENUM ('x', 'y');"
            b" CREATE DOMAIN later_amount AS numeric(6,2);"
            b" CREATE TYPE later_range AS RANGE (subtype = numeric)"
        )
        rows = conn.execute(
            "SELECT t.oid::int8, t.typarray::int8 FROM pg_type t"
            " WHERE t.typname IN ('later', 'later_amount', 'later_range') ORDER BY t.typname"
        ).fetchall()
        (enum_oid, enum_arr), (dom_oid, dom_arr), (rng_oid, _) = rows
        wanted = {enum_oid, enum_arr, dom_oid, dom_arr, rng_oid}
        assert registry.missing(wanted) == wanted
        assert registry(dom_oid, "1.50") == PgText(f"oid:{dom_oid}", "1.50")
        registry.refresh([enum_arr, dom_arr, rng_oid])  # the elements come along
        assert registry.missing(wanted) == set()
        assert registry(enum_arr, "{x,NULL,y}") == ["x", None, "y"]
        assert registry(dom_oid, "1.50") == Decimal("1.50")
        assert registry(dom_arr, "{1.50}") == [Decimal("1.50")]
        assert registry(rng_oid, "[1.5,2)") == Range(Decimal("1.5"), Decimal("2"), "[)")
        assert registry.type_name(rng_oid) == "range<numeric>"


def test_what_psycopg_cannot_read_stays_text(db: Database) -> None:
    with psycopg.connect(db.dsn, autocommit=True, options=canonical_options()) as conn:
        registry = TypeRegistry.load(conn)
        row = conn.execute(
            "SELECT '1 2'::int2vector::text, 'int2vector'::regtype::oid::int8"
        ).fetchone()
        assert row is not None
        text, oid = row
        # int2vector has an element type but is no array: its text is not array syntax.
        assert registry.type_name(oid) == "int2vector"
        assert registry(oid, text) == PgText("int2vector", "1 2")
        # A text the loader cannot read is passed on, named, rather than raised lazily.
        assert registry(1007, "{1,2") == PgText("integer[]", "{1,2")
        assert registry(1007, "{1,2}") == [1, 2]
        assert registry(999_999_999, "x") == PgText("oid:999999999", "x")
