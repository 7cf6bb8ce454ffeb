"""The condition language means what SQL means: PostgreSQL itself is the oracle.

Random conditions over a table of int, numeric, float8, text, bool, date, timestamp and
timestamptz columns are evaluated twice: by pgherald on the rows typed as a source types
them (raw text through the ``TypeRegistry``), and by PostgreSQL running the condition's
normal form as a ``SELECT``. The two must agree row by row, NULL (unknown) included.

Only conditions PostgreSQL accepts are generated (a literal of the column's type); where
pgherald answers unknown instead of failing, SQL has no answer to compare with. The
condition is spliced into SQL here, in a test, because that is the point: the language
is a subset of SQL's, and pgherald itself never does so.
"""

from __future__ import annotations

import random
from typing import Any

import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from pgherald.db.types import TypeRegistry, canonical_options
from pgherald.events.model import ColumnSpec, RowImage, RowShape
from pgherald.routing.conditions import parse
from tests.conftest import Database

# column -> (SQL type, values stored, literals PostgreSQL reads as the column's type)
COLUMNS: dict[str, tuple[str, list[Any], list[str]]] = {
    "a": (
        "int",
        [None, -2, 0, 1, 2, 5, 2147483647],
        ["-2", "0", "1", "1.0", "2.50", "5", "0.1", "1E+3", "'5'", "'-2'"],
    ),
    "n": (
        "numeric",
        [None, "-2.5", "0", "1", "1.0", "2.50", "5", "0.1", "NaN", "Infinity", "-Infinity"],
        ["-2.5", "0", "1", "2.5", "5", "0.1", "1E+3", "'NaN'", "'Infinity'", "'-2.5'"],
    ),
    "f": (
        "float8",
        [None, "-2.5", "0", "0.1", "1", "2.5", "NaN", "Infinity", "-Infinity", "1e300"],
        ["-2.5", "0", "0.1", "1", "2.50", "5", "1E+300", "'NaN'", "'-Infinity'", "'0.1'"],
    ),
    "s": (
        'text COLLATE "C"',
        [None, "", "a", "A", "ab", "a_b", "a%b", "b", "B a", "it's", "é"],
        ["''", "'a'", "'A'", "'ab'", "'b'", "'B a'", "'it''s'", "'é'", "'a%b'"],
    ),
    "Mixed Case": (
        'text COLLATE "C"',
        [None, "", "a", "ab", "b", "z"],
        ["''", "'a'", "'ab'", "'b'", "'z'"],
    ),
    "b": ("bool", [None, True, False], ["true", "false", "'t'", "'off'"]),
    "d": (
        "date",
        [None, "2024-03-01", "2024-03-02", "2023-12-31", "infinity", "-infinity"],
        ["'2024-03-01'", "'2024-03-02'", "'2024-03-01 18:00'", "'infinity'", "'-infinity'"],
    ),
    "ts": (
        "timestamptz",
        [
            None,
            "2024-03-01 00:00+00",
            "2024-03-01 12:00+00",
            "2024-03-01 14:00+02",
            "2024-03-02 00:00+05",
            "infinity",
            "-infinity",
        ],
        [
            "'2024-03-01'",
            "'2024-03-01 12:00'",
            "'2024-03-01 14:00+02'",
            "'2024-03-01T12:00:00Z'",
            "'2024-03-01 19:00+05'",
            "'infinity'",
        ],
    ),
    "lts": (
        "timestamp",
        [None, "2024-03-01 00:00", "2024-03-01 12:00", "2024-03-02 00:00", "infinity"],
        ["'2024-03-01'", "'2024-03-01 12:00'", "'2024-03-01 12:00:00.5'", "'infinity'"],
    ),
}
GROUPS = [["a", "n", "f"], ["s", "Mixed Case"], ["b"], ["d", "ts", "lts"]]
ROWS = 80


def ident(name: str) -> str:
    return name if name.islower() and " " not in name else '"' + name.replace('"', '""') + '"'


@st.composite
def predicates(draw: st.DrawFn) -> str:
    group = draw(st.sampled_from(GROUPS))
    column = draw(st.sampled_from(group))
    x = ident(column)

    def other() -> str:
        """A literal of the column's type, a column it compares with, or null."""
        choice = draw(st.integers(0, 9))
        if choice == 0:
            return "null"
        if choice <= 2:
            return ident(draw(st.sampled_from(group)))
        return draw(st.sampled_from(COLUMNS[column][2]))

    kinds = ["compare", "compare", "in", "between", "null"]
    if group[0] == "s":
        kinds += ["like"] * 4
    if group[0] == "b":
        kinds += ["bare"] * 2
    kind = draw(st.sampled_from(kinds))
    negated = draw(st.sampled_from(["", "not "]))
    if kind == "compare":
        op = draw(st.sampled_from(["=", "!=", "<>", "<", "<=", ">", ">="]))
        left, right = x, other()
        if right == "null" or draw(st.booleans()):
            return f"{left} {op} {right}"
        return f"{right} {op} {left}"
    if kind == "null":
        return f"{x} is {negated}null"
    if kind == "in":
        items = [other() for _ in range(draw(st.integers(1, 4)))]
        return f"{x} {negated}in ({', '.join(items)})"
    if kind == "between":
        return f"{x} {negated}between {other()} and {other()}"
    if kind == "like":
        # A stored value with some characters made wildcards, so that patterns often match.
        base = draw(st.sampled_from([v for v in COLUMNS["s"][1] if v is not None]))
        pieces = [
            draw(st.sampled_from([ch, ch, "_", "%", "\\" + ch])) if ch != "'" else "''"
            for ch in base
        ]
        pieces = draw(st.sampled_from([[], ["%"]])) + pieces + draw(st.sampled_from([[], ["%"]]))
        op = draw(st.sampled_from(["like", "ilike"]))
        return f"{x} {negated}{op} '{''.join(pieces)}'"
    return f"{negated}b"


conditions = st.recursive(
    predicates(),
    lambda inner: st.one_of(
        st.builds("({}) and ({})".format, inner, inner),
        st.builds("({}) or ({})".format, inner, inner),
        st.builds("not ({})".format, inner),
    ),
    max_leaves=6,
)


def test_conditions_agree_with_postgresql(db: Database) -> None:
    generator = random.Random(20240301)
    names = list(COLUMNS)
    with psycopg.connect(db.dsn, autocommit=True, options=canonical_options()) as conn:
        columns = ", ".join(f"{ident(n)} {COLUMNS[n][0]}" for n in names)
        conn.execute(f"CREATE TABLE t (id int PRIMARY KEY, {columns})".encode())
        casts = ", ".join(f"%s::{COLUMNS[n][0].split()[0]}" for n in names)
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO t VALUES (%s, {casts})".encode(),
                [[i, *(generator.choice(COLUMNS[n][1]) for n in names)] for i in range(ROWS)],
            )
        registry = TypeRegistry.load(conn)
        attrs = conn.execute(
            "SELECT attname, atttypid::int8 FROM pg_attribute"
            " WHERE attrelid = 't'::regclass AND attnum > 0 ORDER BY attnum"
        ).fetchall()
        shape = RowShape(tuple(ColumnSpec(n, oid, registry.type_name(oid)) for n, oid in attrs))
        result = conn.execute("SELECT * FROM t ORDER BY id").pgresult
        assert result is not None
        rows = [
            RowImage(
                shape,
                tuple(
                    None if (raw := result.get_value(r, c)) is None else bytes(raw).decode()
                    for c in range(result.nfields)
                ),
                registry,
            )
            for r in range(result.ntuples)
        ]
        assert len(rows) == ROWS

        @settings(max_examples=300, deadline=None, database=None)
        @given(conditions)
        def agree(text: str) -> None:
            condition = parse(text)
            query = f"SELECT id, ({condition}) FROM t ORDER BY id"
            expected = conn.execute(query.encode()).fetchall()
            got = [(row["id"], condition.evaluate(row)) for row in rows]
            assert got == expected, str(condition)

        agree()

        # The evidence is not vacuous: all three answers occur.
        mixed = parse("a > 1 or s like 'a%' or ts >= '2024-03-01 12:00'")
        assert {mixed.evaluate(row) for row in rows} == {True, False, None}
