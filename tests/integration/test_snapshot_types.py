"""Snapshot watches on every type of the type matrix: exactly the right events, exact texts.

For each type, a table ``(id int PRIMARY KEY, v <type>)`` gets a snapshot watch (the first
run records the baseline); then one transaction changes a value (a -> b), writes a value
over NULL and NULL over a value, rewrites a value and a NULL with the same ones, deletes a
row and inserts one, and rewrites a value with its *twin*: the same value spelt another way
(``1.00`` for ``1.0``), which is often equal under the type's ``=`` while its text output
differs. The run must report exactly the right events, with the values as PostgreSQL's text
output under the canonical settings (UTC, ISO dates...): the form every source stores. A
last run after ``UPDATE ... SET v = v`` must report nothing.

The rule for twins: a snapshot reports a change when the text output changed, whatever
``=`` says (``box`` compares areas, ``jsonb``/``numeric`` compare numbers, ``interval``
counts a day as 24 hours, ``citext`` ignores case); a different spelling of the same text
output (``yes`` for ``true``, an upper-case uuid) is no change. That keeps the baseline
exactly what a reader of the table sees, and agrees with logical and trigger capture,
which store the text output of every written value.

The expected texts are written out, and each is checked against the server's own output of
its literal first, so a case that expects the wrong text fails on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald import admin, snapshots
from pgherald.config import Settings
from pgherald.events import ChangeEvent
from pgherald.events.formats import encode
from tests import capture_harness as h
from tests.conftest import FLAVOURS, Database, _drop_database, _new_database, cluster_for

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN price AS numeric(12,4) CHECK (VALUE >= 0);
CREATE DOMAIN small_price AS price CHECK (VALUE < 1000);
CREATE DOMAIN amount AS numeric;
CREATE TYPE floatrange AS RANGE (subtype = float8);
CREATE TYPE pair AS (a int, b text);
CREATE TYPE measure AS (value numeric, unit text);
"""

TEXT_WITH_CONTROLS = "emoji 😀 tab\there nl\nx ctl\x01\x1f bs\\ q'\" é"


@dataclass(frozen=True)
class Case:
    """One type: two different values, and a twin of ``a`` (SQL literals and text outputs)."""

    name: str
    type: str
    a: str
    a_text: str
    b: str
    b_text: str
    twin: str
    twin_text: str
    """Same text as ``a``: no change; other text (``=`` may still say equal): an update."""
    requires: str = ""
    """SQL that must succeed first (an extension, a collation); the case is about it."""


def case(
    name: str,
    type_: str,
    a: tuple[str, str],
    b: tuple[str, str],
    twin: tuple[str, str],
    requires: str = "",
) -> Case:  # fmt: skip
    return Case(name, type_, a[0], a[1], b[0], b[1], twin[0], twin[1], requires)


def dollar(text: str) -> str:
    assert "$v$" not in text
    return f"$v${text}$v$"


CI_COLLATION = (
    "CREATE COLLATION IF NOT EXISTS snap_ci (provider = icu, locale = 'und-u-ks-level2',"
    " deterministic = false)"
)

# fmt: off
CASES: list[Case] = [
    case("bool", "boolean", ("true", "t"), ("false", "f"), ("'yes'", "t")),
    case("int2", "smallint", ("32767", "32767"), ("-32768", "-32768"), ("'+032767'", "32767")),
    case("int4", "integer", ("2147483647", "2147483647"), ("-2147483648", "-2147483648"),
         ("' 2147483647 '", "2147483647")),
    case("int8", "bigint", ("9223372036854775807", "9223372036854775807"),
         ("-9223372036854775808", "-9223372036854775808"),
         ("'9223372036854775807'", "9223372036854775807")),
    # numeric: 1.0 = 1.00, but the scale is part of the value a reader sees.
    case("numeric", "numeric", ("1.0", "1.0"), ("'NaN'", "NaN"), ("1.00", "1.00")),
    case("numeric_nan", "numeric", ("'NaN'", "NaN"), ("0.000000000000000000000000000001",
         "0.000000000000000000000000000001"), ("'nan'", "NaN")),
    case("numeric_inf", "numeric", ("'Infinity'", "Infinity"), ("'-Infinity'", "-Infinity"),
         ("'inf'", "Infinity")),
    case("numeric_typmod", "numeric(40,10)", ("12345678901234567890.0123456789",
         "12345678901234567890.0123456789"), ("-1.5", "-1.5000000000"),
         ("12345678901234567890.01234567890", "12345678901234567890.0123456789")),
    case("real", "real", ("'1.1'", "1.1"), ("'NaN'", "NaN"), ("'1.10'", "1.1")),
    case("real_inf", "real", ("'-Infinity'", "-Infinity"), ("'Infinity'", "Infinity"),
         ("'-inf'", "-Infinity")),
    # -0 = 0 for floats, but it prints as -0.
    case("real_zero", "real", ("'0'", "0"), ("'NaN'", "NaN"), ("'-0'", "-0")),
    case("float8", "double precision", ("'1.7976931348623157e308'", "1.7976931348623157e+308"),
         ("'NaN'", "NaN"), ("'17976931348623157e292'", "1.7976931348623157e+308")),
    case("float8_inf", "double precision", ("'Infinity'", "Infinity"),
         ("'-Infinity'", "-Infinity"), ("'inf'", "Infinity")),
    case("float8_zero", "double precision", ("'-0'", "-0"), ("'5e-324'", "5e-324"), ("'0'", "0")),
    case("bytea", "bytea", ("'\\x00ff80fe41'", "\\x00ff80fe41"), ("'\\x'", "\\x"),
         ("'\\000\\377\\200\\376A'::bytea", "\\x00ff80fe41")),
    case("text", "text", (dollar(TEXT_WITH_CONTROLS), TEXT_WITH_CONTROLS), ("''", ""),
         ("E'emoji \\U0001F600 tab\\there nl\\nx ctl\\x01\\x1f bs\\\\ q''\" \\u00e9'",
          TEXT_WITH_CONTROLS)),
    case("varchar", "varchar(20)", ("'it''s, \"q\"'", "it's, \"q\""), ("' '", " "),
         ("'it''s, \"q\"'::text", "it's, \"q\"")),
    # char(n) pads to n: its text output has the blanks (a cast to text would drop them).
    case("char", "char(5)", ("'ab'", "ab   "), ("'abcde'", "abcde"), ("'ab '", "ab   ")),
    # Unpadded bpchar: = ignores trailing blanks, its text output keeps them.
    case("bpchar", "bpchar", ("'a'", "a"), ("'b'", "b"), ("'a  '", "a  ")),
    case("timestamp", "timestamp", ("'infinity'", "infinity"),
         ("'2024-02-29 12:34:56.123456'", "2024-02-29 12:34:56.123456"),
         ("'Infinity'", "infinity")),
    case("timestamp_bc", "timestamp", ("'0001-01-01 00:00:00 BC'", "0001-01-01 00:00:00 BC"),
         ("'-infinity'", "-infinity"), ("'0001-01-01 BC'", "0001-01-01 00:00:00 BC")),
    # The same instant written in another zone is the same timestamptz: no change.
    case("timestamptz", "timestamptz", ("'2024-02-29 12:34:56.123456+05:30'",
         "2024-02-29 07:04:56.123456+00"), ("'-infinity'", "-infinity"),
         ("'2024-02-29 02:04:56.123456-05'", "2024-02-29 07:04:56.123456+00")),
    case("date", "date", ("'2024-02-29'", "2024-02-29"), ("'0044-03-15 BC'", "0044-03-15 BC"),
         ("'02/29/2024'", "2024-02-29")),
    case("date_inf", "date", ("'infinity'", "infinity"), ("'-infinity'", "-infinity"),
         ("'Infinity'", "infinity")),
    case("time", "time", ("'24:00:00'", "24:00:00"), ("'12:00:00.5'", "12:00:00.5"),
         ("'24:00'", "24:00:00")),
    # timetz keeps its zone: the same instant in another zone prints (and compares) otherwise.
    case("timetz", "timetz", ("'04:05:06+05:30'", "04:05:06+05:30"),
         ("'23:59:59.999999-14:59'", "23:59:59.999999-14:59"),
         ("'03:35:06+05'", "03:35:06+05")),
    # interval: 1 day = 24 hours under =, but not the same text.
    case("interval", "interval", ("'1 day'", "1 day"), ("'-1 years -2 mons +3 days"
         " -04:05:06.000001'", "-1 years -2 mons +3 days -04:05:06.000001"),
         ("'24 hours'", "24:00:00")),
    case("interval_same", "interval", ("'1 year 2 mons'", "1 year 2 mons"), ("'0'", "00:00:00"),
         ("'14 months'", "1 year 2 mons")),
    case("uuid", "uuid", ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
         "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), ("'00000000-0000-0000-0000-000000000000'",
         "00000000-0000-0000-0000-000000000000"), ("'{A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11}'",
         "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    # json keeps its text as written, and has no =.
    case("json", "json", ("'{\"b\": 1,  \"a\": [1, 2.5]}'", "{\"b\": 1,  \"a\": [1, 2.5]}"),
         ("'null'", "null"), ("'{\"b\":1,\"a\":[1,2.5]}'", "{\"b\":1,\"a\":[1,2.5]}")),
    # jsonb: 1.0 = 1.00 inside, but the text shows the scale.
    case("jsonb", "jsonb", ("'{\"a\": 1.0}'", "{\"a\": 1.0}"), ("'[1, [2, [3]]]'", "[1, [2, [3]]]"),
         ("'{\"a\":1.00}'", "{\"a\": 1.00}")),
    case("jsonb_order", "jsonb", ("'{\"é\": \"😀\", \"big\": 123456789012345678901234567890}'",
         "{\"é\": \"😀\", \"big\": 123456789012345678901234567890}"), ("'\"null\"'", "\"null\""),
         ("'{\"big\":123456789012345678901234567890,\"é\":\"😀\"}'",
          "{\"é\": \"😀\", \"big\": 123456789012345678901234567890}")),
    case("int4_array", "integer[]", ("'{{1,NULL},{3,4}}'", "{{1,NULL},{3,4}}"), ("'{}'", "{}"),
         ("'{{1,null},{3, 4}}'", "{{1,NULL},{3,4}}")),
    case("int8_array", "bigint[]", ("'{9223372036854775807,-1}'", "{9223372036854775807,-1}"),
         ("'{NULL}'", "{NULL}"), ("ARRAY[9223372036854775807,-1]", "{9223372036854775807,-1}")),
    case("text_array", "text[]", ("ARRAY['a\"b', 'c,d', 'e\\f', NULL, 'NULL', '', ' sp ', '{x}']",
         "{\"a\\\"b\",\"c,d\",\"e\\\\f\",NULL,\"NULL\",\"\",\" sp \",\"{x}\"}"), ("'{}'", "{}"),
         ("'{\"a\\\"b\",c\\,d,\"e\\\\f\",NULL,\"NULL\",\"\",\" sp \",\"{x}\"}'",
          "{\"a\\\"b\",\"c,d\",\"e\\\\f\",NULL,\"NULL\",\"\",\" sp \",\"{x}\"}")),
    case("numeric_array", "numeric[]", ("'{1.0,NULL}'", "{1.0,NULL}"), ("'{}'", "{}"),
         ("'{1.00,NULL}'", "{1.00,NULL}")),
    case("int4range", "int4range", ("'[1,10)'", "[1,10)"), ("'empty'", "empty"),
         ("'[1,9]'", "[1,10)")),
    case("numrange", "numrange", ("'[1.0,2)'", "[1.0,2)"), ("'(,)'", "(,)"),
         ("'[1.00,2)'", "[1.00,2)")),
    case("tstzrange", "tstzrange", ("'[-infinity,2024-01-01 00:00:00+00)'",
         "[-infinity,\"2024-01-01 00:00:00+00\")"), ("'empty'", "empty"),
         ("'[-infinity,2024-01-01 01:00:00+01)'", "[-infinity,\"2024-01-01 00:00:00+00\")")),
    case("daterange", "daterange", ("'[2024-01-01,2024-12-31]'", "[2024-01-01,2025-01-01)"),
         ("'(,)'", "(,)"), ("'[2024-01-01,2025-01-01)'", "[2024-01-01,2025-01-01)")),
    case("int4multirange", "int4multirange", ("'{[1,3),[5,7)}'", "{[1,3),[5,7)}"),
         ("'{}'", "{}"), ("'{[5,7),[1,2],[2,2]}'", "{[1,3),[5,7)}")),
    case("floatrange", "floatrange", ("'[1.5,2.5)'", "[1.5,2.5)"),
         ("'[-Infinity,NaN]'", "[-Infinity,NaN]"), ("'[1.50,2.50)'", "[1.5,2.5)")),
    case("enum", "mood", ("'happy'", "happy"), ("'sad'", "sad"), ("'happy'::mood", "happy")),
    case("enum_array", "mood[]", ("'{sad,happy}'", "{sad,happy}"), ("'{NULL,ok}'", "{NULL,ok}"),
         ("ARRAY['sad','happy']::mood[]", "{sad,happy}")),
    case("domain", "price", ("12.3456", "12.3456"), ("0", "0.0000"), ("12.34560", "12.3456")),
    case("domain_of_domain", "small_price", ("999.9999", "999.9999"), ("0.5", "0.5000"),
         ("'999.99990'", "999.9999")),
    case("domain_numeric", "amount", ("1.0", "1.0"), ("2", "2"), ("1.00", "1.00")),
    case("domain_array", "price[]", ("'{1.5,NULL}'", "{1.5000,NULL}"), ("'{}'", "{}"),
         ("'{1.50000,NULL}'", "{1.5000,NULL}")),
    case("composite", "pair", ("ROW(1, 'a,\"b\"')", "(1,\"a,\"\"b\"\"\")"),
         ("ROW(NULL, NULL)", "(,)"), ("'(1,\"a,\\\"b\\\"\")'", "(1,\"a,\"\"b\"\"\")")),
    # Records compare numerics by =: (1.0,kg) = (1.00,kg), but the text differs.
    case("composite_numeric", "measure", ("ROW(1.0, 'kg')", "(1.0,kg)"), ("ROW(2, 'g')", "(2,g)"),
         ("ROW(1.00, 'kg')", "(1.00,kg)")),
    case("inet", "inet", ("'10.0.0.1'", "10.0.0.1"), ("'2001:db8::1/64'", "2001:db8::1/64"),
         ("'10.0.0.1/32'", "10.0.0.1")),
    case("cidr", "cidr", ("'10.0.0.0/8'", "10.0.0.0/8"), ("'2001:db8::/32'", "2001:db8::/32"),
         ("'10/8'", "10.0.0.0/8")),
    case("macaddr", "macaddr", ("'08:00:2b:01:02:03'", "08:00:2b:01:02:03"),
         ("'00:00:00:00:00:00'", "00:00:00:00:00:00"), ("'08002b010203'", "08:00:2b:01:02:03")),
    case("money", "money", ("1234.56", "$1,234.56"), ("-0.01", "-$0.01"),
         ("'1234.560'", "$1,234.56")),
    case("bit", "bit(4)", ("B'0101'", "0101"), ("B'0000'", "0000"), ("X'5'", "0101")),
    case("varbit", "bit varying", ("B'101'", "101"), ("B''", ""), ("'101'::varbit", "101")),
    case("point", "point", ("'(1.5,2)'", "(1.5,2)"), ("'(-1,1e300)'", "(-1,1e+300)"),
         ("'1.50, 2.0'", "(1.5,2)")),
    case("lseg", "lseg", ("'[(0,0),(1,1)]'", "[(0,0),(1,1)]"), ("'[(1,1),(0,0)]'",
         "[(1,1),(0,0)]"), ("'(0,0),(1,1)'", "[(0,0),(1,1)]")),
    case("line", "line", ("'{1,-1,0}'", "{1,-1,0}"), ("'{0,1,5}'", "{0,1,5}"),
         ("'[(0,0),(1,1)]'", "{1,-1,0}")),
    # box = compares areas: a box of the same area elsewhere is a change.
    case("box", "box", ("'(0,0),(1,1)'", "(1,1),(0,0)"), ("'(2,2),(3,5)'", "(3,5),(2,2)"),
         ("'(0,0),(2,0.5)'", "(2,0.5),(0,0)")),
    case("box_corners", "box", ("'(0,0),(1,1)'", "(1,1),(0,0)"), ("'(2,2),(3,5)'", "(3,5),(2,2)"),
         ("'(1,0),(0,1)'", "(1,1),(0,0)")),
    # path = compares the number of points.
    case("path", "path", ("'[(0,0),(1,1)]'", "[(0,0),(1,1)]"), ("'((0,0),(1,1),(2,0))'",
         "((0,0),(1,1),(2,0))"), ("'[(5,5),(6,6)]'", "[(5,5),(6,6)]")),
    case("polygon", "polygon", ("'((0,0),(1,1),(1,0))'", "((0,0),(1,1),(1,0))"),
         ("'((0,0))'", "((0,0))"), ("'(0,0),(1,1),(1,0)'", "((0,0),(1,1),(1,0))")),
    # circle = compares areas too.
    case("circle", "circle", ("'<(0,0),1>'", "<(0,0),1>"), ("'<(1,1),2>'", "<(1,1),2>"),
         ("'<(5,5),1>'", "<(5,5),1>")),
    case("xml", "xml", ("'<a>x</a>'", "<a>x</a>"), ("'<b/>'", "<b/>"),
         ("'<a >x</a>'", "<a >x</a>"), requires="SELECT '<a/>'::xml"),
    # Case-insensitive equality: a change of case is a change of what a reader sees.
    case("citext", "citext", ("'Ada'", "Ada"), ("'Bob'", "Bob"), ("'ADA'", "ADA"),
         requires="CREATE EXTENSION IF NOT EXISTS citext"),
    case("text_nondeterministic", "text COLLATE snap_ci", ("'Ada'", "Ada"), ("'Bob'", "Bob"),
         ("'ADA'", "ADA"), requires=CI_COLLATION),
]
# fmt: on


@dataclass
class Shared:
    """One database per PostgreSQL of the matrix for the module: a table per case in it."""

    db: Database
    settings: Settings
    flavour: str


@pytest.fixture(scope="module", params=list(FLAVOURS))
def shared(request: pytest.FixtureRequest) -> Iterator[Shared]:
    database = _new_database(cluster_for(request.param))
    try:
        settings = h.settings_for(database.dsn)
        admin.init(settings)
        database.execute(SETUP)
        yield Shared(database, settings, request.param)
    finally:
        _drop_database(database)


def write(shared: Shared, *statements: str) -> None:
    """Under the canonical settings, so that literals parse the same on every server."""
    with h.canonical_connect(shared.db.dsn) as conn, conn.transaction():
        for s in statements:
            conn.execute(s.encode())


def output_of(shared: Shared, literal: str, type_: str) -> str | None:
    """The server's text output of ``literal`` as ``type_``, untouched by any loader."""
    with h.canonical_connect(shared.db.dsn) as conn:
        query = sql.SQL("SELECT ({})::{} AS v").format(sql.SQL(literal), sql.SQL(type_))
        value = h.raw_rows(conn, query)[0]["v"]
    assert value is None or isinstance(value, str)
    return value


def available(shared: Shared, requirement: str) -> bool:
    if not requirement:
        return True
    try:
        write(shared, requirement)
    except psycopg.Error:
        return False
    return True


def summary(events: list[ChangeEvent]) -> list[tuple[Any, ...]]:
    return [(e.op, dict(e.key), e.changed, h.texts(e.old), h.texts(e.new)) for e in events]


def row(id_: int, value: str | None) -> dict[str, str | None]:
    return {"id": str(id_), "v": value}


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_changes_of_each_type_are_exact(shared: Shared, c: Case) -> None:
    if not available(shared, c.requires):
        # Only where the server lacks it (pgserver's PostgreSQL has no citext, ICU or XML):
        # the same statement must then fail on its own, not because of anything of ours.
        with pytest.raises(psycopg.Error, match=r"citext|ICU|xml|XML"):
            write(shared, c.requires)
        return
    for literal, text in ((c.a, c.a_text), (c.b, c.b_text), (c.twin, c.twin_text)):
        assert output_of(shared, literal, c.type) == text, (literal, "expected text is wrong")
    table = f"t_{c.name}"
    write(
        shared,
        f"CREATE TABLE {table} (id int PRIMARY KEY, v {c.type})",
        f"INSERT INTO {table} VALUES (1, {c.a}), (2, NULL), (3, {c.b}), (4, {c.a}),"
        f" (5, NULL), (6, {c.a}), (7, {c.b})",
    )
    added = admin.add_snapshot_watch(shared.settings, table, table=table)
    assert any("baseline recorded, 7 rows" in n for n in added.notes), added.notes

    write(
        shared,
        f"UPDATE {table} SET v = {c.b} WHERE id = 1",  # a -> b
        f"UPDATE {table} SET v = {c.a} WHERE id = 2",  # NULL -> a
        f"UPDATE {table} SET v = NULL WHERE id = 3",  # b -> NULL
        f"UPDATE {table} SET v = {c.a} WHERE id = 4",  # a -> a: the same value again
        f"UPDATE {table} SET v = NULL WHERE id = 5",  # NULL -> NULL
        f"UPDATE {table} SET v = {c.twin} WHERE id = 6",  # a -> its twin
        f"DELETE FROM {table} WHERE id = 7",
        f"INSERT INTO {table} VALUES (8, {c.a})",
    )
    result = snapshots.run_watch(shared.settings, table)
    twin_changes = c.twin_text != c.a_text
    expected: list[tuple[Any, ...]] = [
        ("update", {"id": "1"}, ("v",), row(1, c.a_text), row(1, c.b_text)),
        ("update", {"id": "2"}, ("v",), row(2, None), row(2, c.a_text)),
        ("update", {"id": "3"}, ("v",), row(3, c.b_text), row(3, None)),
    ]
    if twin_changes:
        expected.append(("update", {"id": "6"}, ("v",), row(6, c.a_text), row(6, c.twin_text)))
    expected += [
        ("delete", {"id": "7"}, (), row(7, c.b_text), None),
        ("insert", {"id": "8"}, (), None, row(8, c.a_text)),
    ]
    assert (result.status, result.error) == ("ok", None)
    events = h.stored_events(shared.settings, watch=table)
    assert summary(events) == expected
    assert (result.inserts, result.updates, result.deletes, result.rows_compared) == (
        1,
        3 + twin_changes,
        1,
        7,
    )
    assert not result.shape_changed
    for e in events:
        assert e.method == "snapshot" and e.table == table
        encode(e, "pgherald")  # every value goes out as JSON

    # What the log says is what the table holds, text for text.
    truth = h.table_contents(shared.db.dsn, "public", table, ["id"])
    assert {k[0]: r["v"] for k, r in truth.items()} == {
        "1": c.b_text,
        "2": c.a_text,
        "3": None,
        "4": c.a_text,
        "5": None,
        "6": c.twin_text,
        "8": c.a_text,
    }

    # Writing every value again changes nothing, and neither does the twin written back
    # where the text is the same.
    write(shared, f"UPDATE {table} SET v = v", f"UPDATE {table} SET v = {c.a} WHERE id = 4")
    again = snapshots.run_watch(shared.settings, table)
    assert (again.status, again.inserts, again.updates, again.deletes) == ("ok", 0, 0, 0)
    assert not again.shape_changed
    assert len(h.stored_events(shared.settings, watch=table)) == len(expected)


# -- keys ------------------------------------------------------------------------------------


def keyed(db: Database, ddl: str, rows: str, key: str) -> Settings:
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    db.execute(f"{ddl}; INSERT INTO k VALUES {rows}")
    admin.add_snapshot_watch(settings, "k", table="k", key=[key])
    return settings


def key_summary(settings: Settings) -> list[tuple[Any, ...]]:
    events = h.stored_events(settings, watch="k")
    return sorted(
        (e.op, e.key["k"], e.changed, h.texts(e.old), h.texts(e.new)) for e in events
    )  # fmt: skip


def test_a_json_key_has_no_equality_and_is_compared_by_text(db: Database) -> None:
    # json has no = at all: its texts identify rows, so two spellings are two rows.
    settings = keyed(
        db,
        "CREATE TABLE k (k json, v int)",
        """('{"a": 1}', 1), ('{"a":1}', 2), ('[1]', 3)""",
        "k",
    )
    db.execute(
        """UPDATE k SET v = 20 WHERE k::text = '{"a":1}';"""
        " DELETE FROM k WHERE k::text = '[1]'; INSERT INTO k VALUES ('[2]', 4);"
        """ UPDATE k SET k = '{"a":  1}' WHERE k::text = '{"a": 1}'"""  # a key that changes
    )
    result = snapshots.run_watch(settings, "k")
    assert (result.status, result.inserts, result.updates, result.deletes) == ("ok", 2, 1, 2)
    assert key_summary(settings) == sorted(
        [
            ("delete", "[1]", (), {"k": "[1]", "v": "3"}, None),
            ("insert", "[2]", (), None, {"k": "[2]", "v": "4"}),
            ("delete", '{"a": 1}', (), {"k": '{"a": 1}', "v": "1"}, None),
            ("insert", '{"a":  1}', (), None, {"k": '{"a":  1}', "v": "1"}),
            ("update", '{"a":1}', ("v",), {"k": '{"a":1}', "v": "2"}, {"k": '{"a":1}', "v": "20"}),
        ]
    )
    assert snapshots.run_watch(settings, "k").updates == 0


def test_a_point_key_is_compared_by_text_and_duplicates_are_found_by_text(db: Database) -> None:
    # point has no btree = (only ~=): keys match by their text output.
    settings = keyed(db, "CREATE TABLE k (k point, v text)", "('(1,2)', 'a'), ('(3,4)', 'b')", "k")
    db.execute("UPDATE k SET v = 'A' WHERE k ~= '(1,2)'; UPDATE k SET k = '(3,5)' WHERE v = 'b'")
    result = snapshots.run_watch(settings, "k")
    assert (result.status, result.inserts, result.updates, result.deletes) == ("ok", 1, 1, 1)
    assert key_summary(settings) == [
        ("delete", "(3,4)", (), {"k": "(3,4)", "v": "b"}, None),
        ("insert", "(3,5)", (), None, {"k": "(3,5)", "v": "b"}),
        ("update", "(1,2)", ("v",), {"k": "(1,2)", "v": "a"}, {"k": "(1,2)", "v": "A"}),
    ]
    db.execute("INSERT INTO k VALUES ('(1.0,2.00)', 'again')")  # the same text: a duplicate
    failed = snapshots.run_watch(settings, "k")
    assert failed.status == "error" and failed.error is not None
    assert "k='(1,2)' (2 rows)" in failed.error


def test_boxes_of_equal_area_are_different_keys(db: Database) -> None:
    # box = compares areas: by that, these two keys would be one and the same.
    settings = keyed(
        db,
        "CREATE TABLE k (k box, v int)",
        "('(0,0),(1,1)', 1), ('(0,0),(2,0.5)', 2)",
        "k",
    )
    db.execute("UPDATE k SET v = 3 WHERE k ~= '(0,0),(2,0.5)'")
    result = snapshots.run_watch(settings, "k")
    assert (result.status, result.inserts, result.updates, result.deletes) == ("ok", 0, 1, 0)
    assert key_summary(settings) == [
        (
            "update",
            "(2,0.5),(0,0)",
            ("v",),
            {"k": "(2,0.5),(0,0)", "v": "2"},
            {"k": "(2,0.5),(0,0)", "v": "3"},
        )
    ]


def test_a_numeric_key_that_changes_only_its_scale_is_an_update_of_the_key(db: Database) -> None:
    # 1.0 = 1.00: the same row by the key's own =, whose key now reads 1.00.
    settings = keyed(
        db, "CREATE TABLE k (k numeric PRIMARY KEY, v text)", "(1.0, 'a'), (2, 'b')", "k"
    )
    db.execute("UPDATE k SET k = 1.00 WHERE k = 1")
    result = snapshots.run_watch(settings, "k")
    assert (result.status, result.inserts, result.updates, result.deletes) == ("ok", 0, 1, 0)
    assert key_summary(settings) == [
        ("update", "1.00", ("k",), {"k": "1.0", "v": "a"}, {"k": "1.00", "v": "a"})
    ]
    assert snapshots.run_watch(settings, "k").updates == 0


# -- the other paths: keyless results and initial rows -----------------------------------------


def test_keyless_results_and_initial_rows_carry_the_text_output(db: Database) -> None:
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    db.execute(
        "CREATE TABLE m (b bool, c char(3), i inet, n numeric);"
        " INSERT INTO m VALUES (true, 'x', '10.0.0.1', 1.0)"
    )
    admin.add_snapshot_watch(settings, "bag", view=("public", "m"))
    admin.add_snapshot_watch(settings, "first", query="SELECT * FROM m", key=["i"],
                             initial_events=True)  # fmt: skip
    [read] = h.stored_events(settings, watch="first")
    row = {"b": "t", "c": "x  ", "i": "10.0.0.1", "n": "1.0"}
    assert (read.op, dict(read.key), h.texts(read.new)) == ("read", {"i": "10.0.0.1"}, row)
    db.execute("UPDATE m SET n = 1.00; INSERT INTO m VALUES (false, 'yz', '::1', NULL)")
    result = snapshots.run_watch(settings, "bag")
    assert (result.inserts, result.deletes) == (2, 1)
    events = h.stored_events(settings, watch="bag")
    assert sorted((e.op, str(h.texts(e.new or e.old))) for e in events) == sorted(
        [
            ("delete", str(row)),
            ("insert", str({**row, "n": "1.00"})),
            ("insert", str({"b": "f", "c": "yz ", "i": "::1", "n": None})),
        ]
    )
