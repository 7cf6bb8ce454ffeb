"""The replica sink against real PostgreSQL: a second database kept in step with the watched one.

The source is the ``db`` fixture's database; the target is a second database on the same
cluster. Events are built by hand (for the cases capture rarely produces) and really
captured by pgherald (logical capture into the change log, read back with
``ChangeLog.read`` in small batches, so transactions straddle batch boundaries). The
verdict is always SQL: the source's rows ``EXCEPT ALL`` the target's, both ways, over the
text of every column, after the target's rows were copied beside the source's.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald import admin
from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import UNCHANGED_TOAST, ChangeEvent, RowImage
from pgherald.events.model import Operation, Text
from pgherald.sinks.base import Outcome, SinkConfig, make_message
from pgherald.sinks.replica import ReplicaSink, from_config, parse_qualified
from pgherald.store.changelog import ChangeLog
from tests import capture_harness as h
from tests.conftest import Database, _drop_database, _new_database
from tests.tcp_proxy import TcpProxy

Conn = psycopg.Connection[Any]


@pytest.fixture
def target(db: Database) -> Iterator[Database]:
    """A second, empty database on the source's cluster: the replica."""
    database = _new_database(db.cluster)
    yield database
    _drop_database(database)


# -- helpers ---------------------------------------------------------------------------------


def make_sink(options: Mapping[str, Any]) -> ReplicaSink:
    return from_config(SinkConfig("replica-test", "replica", options=dict(options)))


def deliver(
    options: Mapping[str, Any], batches: Sequence[Sequence[ChangeEvent]]
) -> list[list[Outcome]]:
    """Starts a sink, sends each batch, closes it; the outcomes of each batch."""

    async def go() -> list[list[Outcome]]:
        sink = make_sink(options)
        await sink.start()
        try:
            return [await sink.send(messages(batch)) for batch in batches]
        finally:
            await sink.close()

    return asyncio.run(go())


_log_ids = itertools.count(1)


def messages(batch: Sequence[ChangeEvent]) -> list[Any]:
    return [make_message(e, next(_log_ids), "pgherald", "pgherald://test") for e in batch]


def delivered(outcomes: Sequence[Sequence[Outcome]]) -> None:
    problems = [o for batch in outcomes for o in batch if o is not None]
    assert not problems, f"{len(problems)} not delivered, first: {problems[0]!r}"


def run_query(database: Database, query: str) -> list[tuple[Any, ...]]:
    with database.connect() as conn:
        return conn.execute(query.encode()).fetchall()


def run_sql(database: Database, *statements: str, params: Sequence[Any] = ()) -> None:
    with database.connect() as conn:
        for statement in statements:
            conn.execute(statement.encode(), params or None)


def columns_of(conn: Conn, schema: str, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return [str(r[0]) for r in rows]


def differences(
    source: Database,
    target: Database,
    table: tuple[str, str],
    target_table: tuple[str, str] | None = None,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(rows only the source has, rows only the target has), compared by SQL ``EXCEPT ALL``
    over the text of each of the source's columns; the target's rows are copied into a
    temporary table beside the source's first."""
    target_table = target_table or table
    with h.canonical_connect(source.dsn) as src, h.canonical_connect(target.dsn) as tgt:
        names = columns_of(src, *table)
        assert names, f"no table {table} at the source"
        assert set(names) <= set(columns_of(tgt, *target_table)), (
            f"target lacks columns {set(names) - set(columns_of(tgt, *target_table))}"
        )
        as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) for n in names)
        src.execute(
            sql.SQL("CREATE TEMP TABLE replica_copy ({})").format(
                sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(n)) for n in names)
            )
        )
        with (
            tgt.cursor().copy(
                sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                    as_text, sql.Identifier(*target_table)
                )
            ) as out,
            src.cursor().copy("COPY replica_copy FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        only_source = src.execute(
            sql.SQL("SELECT {} FROM {} EXCEPT ALL SELECT * FROM replica_copy").format(
                as_text, sql.Identifier(*table)
            )
        ).fetchall()
        only_target = src.execute(
            sql.SQL("SELECT * FROM replica_copy EXCEPT ALL SELECT {} FROM {}").format(
                as_text, sql.Identifier(*table)
            )
        ).fetchall()
    return only_source, only_target


def assert_same(
    source: Database,
    target: Database,
    table: tuple[str, str],
    target_table: tuple[str, str] | None = None,
) -> None:
    only_source, only_target = differences(source, target, table, target_table)
    assert not only_source and not only_target, (
        f"{table}: only at the source: {_short(only_source)}; only at the target:"
        f" {_short(only_target)}"
    )


def _short(rows: Sequence[Any]) -> str:
    return re.sub(r"'([^']{30})[^']{20,}'", r"'\1…'", repr(list(rows)[:4]))


def fingerprint(database: Database, table: tuple[str, str]) -> str:
    """The table's whole contents as one digest (in a fixed order)."""
    with h.canonical_connect(database.dsn) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} AS t"
            ).format(sql.Identifier(*table))
        ).fetchone()
    assert row is not None
    return str(row[0])


def captured_batches(settings: Any, size: int) -> list[list[ChangeEvent]]:
    """The change log as the delivery engine would hand it over: small batches in log
    order (``ChangeLog.read``), the sentinel's events left out."""
    out: list[list[ChangeEvent]] = []
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        log = ChangeLog(conn, settings.schema)
        after = 0
        while batch := log.read(after_id=after, limit=size):
            after = batch[-1].id
            events = [s.event for s in batch if s.event.watch != h.SENTINEL_WATCH]
            if events:
                out.append(events)
    return out


# -- hand-built events ----------------------------------------------------------------------------

INT4, INT8, TEXT, NUMERIC = 23, 20, 25, 1700
ACCT: Mapping[str, tuple[int, str]] = {
    "id": (INT4, "int4"),
    "owner": (TEXT, "text"),
    "balance": (NUMERIC, "numeric"),
    "note": (TEXT, "text"),
}
_event_ids = itertools.count(1)


def image(values: Mapping[str, Text], columns: Mapping[str, tuple[int, str]]) -> RowImage:
    return RowImage.from_texts({n: columns[n] for n in values}, values)


def event(
    op: Operation,
    new: Mapping[str, Text] | None = None,
    *,
    xid: int | None,
    old: Mapping[str, Text] | None = None,
    key: Mapping[str, Any] | None = None,
    table: str = "acct",
    schema: str = "public",
    columns: Mapping[str, tuple[int, str]] = ACCT,
    key_columns: Sequence[str] = ("id",),
    meta: Mapping[str, Any] | None = None,
    position: str | None = None,
) -> ChangeEvent:
    new_image = image(new, columns) if new is not None else None
    old_image = image(old, columns) if old is not None else None
    row = new if new is not None else old
    if key is None:
        key = {k: row[k] for k in key_columns} if row is not None and op != "truncate" else {}
    return ChangeEvent(
        event_id=f"hand/{next(_event_ids)}",
        watch=table,
        op=op,
        schema=schema,
        table=table,
        key=key,
        old=old_image,
        new=new_image,
        changed=(),
        xid=xid,
        position=position if position is not None else f"0/{xid or 0:X}",
        commit_time=datetime.now(UTC),
        captured_at=datetime.now(UTC),
        method="logical",
        meta=meta or {},
    )


def acct_rows(database: Database) -> list[tuple[Any, ...]]:
    with database.connect() as conn:
        return conn.execute(
            "SELECT id, owner, balance::text, note FROM acct ORDER BY id"
        ).fetchall()


ACCT_DDL = "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance numeric(12,2), note text)"


# -- configuration ---------------------------------------------------------------------------------


def test_options_are_validated_with_one_clear_error() -> None:
    def error(options: Mapping[str, Any]) -> str:
        with pytest.raises(ConfigError) as caught:
            make_sink(options)
        return str(caught.value)

    assert "option 'dsn' is required" in error({})
    assert "unknown option(s) 'creat_tables'" in error({"dsn": "dbname=x", "creat_tables": True})
    assert "'create_tables' must be true or false" in error(
        {"dsn": "dbname=x", "create_tables": "perhaps"}
    )
    assert "'dsn' is not a valid connection string" in error({"dsn": "host=x password"})
    message = error({"dsn": "postgresql://u:s3cret@h/db?foo=bar=baz", "schema": ""})
    assert "s3cret" not in message
    assert "table_map entry 'nodot' must be schema.table" in error(
        {"dsn": "dbname=x", "table_map": {"nodot": "a.b"}}
    )
    assert "must be schema.table" in error({"dsn": "dbname=x", "table_map": {"a.b": 'x."y'}})
    assert "'timeout' must be at least 0" in error({"dsn": "dbname=x", "timeout": -1})
    assert "'table_map' must be a table of strings" in error({"dsn": "dbname=x", "table_map": 1})

    sink = make_sink(
        {
            "dsn": "dbname=x",
            "schema": "mirror",
            "table_map": {'public."a.b"': '"tgt ""x"".y".T'},
            "create_tables": "yes",
            "add_columns": False,
        }
    )
    assert sink.strictly_ordered
    assert sink.settings.table_map == {("public", "a.b"): ('tgt "x".y', "T")}
    assert (sink.settings.create_tables, sink.settings.add_columns) == (True, False)
    assert sink.settings.schema == "mirror"


def test_parse_qualified() -> None:
    assert parse_qualified("s.t") == ("s", "t")
    assert parse_qualified("My Schema.Tab %s") == ("My Schema", "Tab %s")
    assert parse_qualified('"a.b"."c""d"') == ("a.b", 'c"d')
    for bad in ("t", "a.b.c", ".t", "s.", '"s.t', 's"x.t', '"s"x.t', ""):
        assert parse_qualified(bad) is None, bad


# -- hand-built events ----------------------------------------------------------------------------


def test_hand_built_transactions_upserts_deletes_truncate_toast_and_key_moves(
    db: Database, target: Database
) -> None:
    run_sql(target, ACCT_DDL)
    big = secrets.token_hex(3000)
    txn1 = [
        event("insert", {"id": "1", "owner": "Ada", "balance": "10.50", "note": big}, xid=100),
        event("insert", {"id": "2", "owner": "Grace", "balance": "0", "note": None}, xid=100),
        event("insert", {"id": "3", "owner": "Edsger", "balance": "3", "note": "n3"}, xid=100),
    ]
    txn2 = [  # an update of a row the target never had is an insert; a message is ignored
        event("update", {"id": "4", "owner": "Barbara", "balance": "4", "note": "n4"}, xid=101),
        event("message", None, xid=101, key={}, meta={"channel": "c", "payload": "p"}),
        # the TOAST value did not change: it must not be overwritten
        event(
            "update",
            {"id": "1", "owner": "Ada L.", "balance": "11.50", "note": UNCHANGED_TOAST},
            xid=101,
        ),
    ]
    txn3 = [  # moves 1 -> 10 with the TOAST value unchanged: it comes along from the old row
        event(
            "update",
            {"id": "10", "owner": "Ada L.", "balance": "12.00", "note": UNCHANGED_TOAST},
            xid=102,
            meta={"old_key": {"id": "1"}},
        ),
        # moves 3 -> 30, old key known from the whole old row (REPLICA IDENTITY FULL)
        event(
            "update",
            {"id": "30", "owner": "Edsger", "balance": "3", "note": "n3"},
            old={"id": "3", "owner": "Edsger", "balance": "3", "note": "n3"},
            xid=102,
        ),
        # delete by a typed key (hand-made keys need not be text); and of an absent row
        event("delete", None, old={"id": "2"}, key={"id": 2}, xid=102),
        event("delete", None, old={"id": "77"}, xid=102),
    ]
    # the last transaction straddles two batches
    txn4a = [event("insert", {"id": "5", "owner": "Niklaus", "balance": "5", "note": "x"}, xid=103)]
    txn4b = [event("update", {"id": "5", "owner": "Niklaus W.", "balance": "5"}, xid=103)]
    batches = [txn1 + txn2, txn3 + txn4a, txn4b]
    options = {"dsn": target.dsn}
    outcomes = deliver(options, batches)
    delivered(outcomes)
    expected = [
        (4, "Barbara", "4.00", "n4"),
        (5, "Niklaus W.", "5.00", "x"),  # the second update's shape lacks note: kept
        (10, "Ada L.", "12.00", big),
        (30, "Edsger", "3.00", "n3"),
    ]
    assert acct_rows(target) == expected

    # Replaying every batch, twice, changes nothing.
    delivered(deliver(options, batches + batches))
    assert acct_rows(target) == expected

    # A move whose old row is gone already (a replay) still writes the new row, and keeps
    # the target's TOAST value of the new key's row.
    delivered(deliver(options, [txn3[:1]]))
    assert acct_rows(target) == expected

    # Truncate empties the table; later events of the same batch fill it again.
    truncate = event("truncate", None, xid=104, key={})
    after = event("insert", {"id": "6", "owner": "Tony", "balance": "6", "note": None}, xid=105)
    delivered(deliver(options, [[truncate, after]]))
    assert acct_rows(target) == [(6, "Tony", "6.00", None)]


def test_a_gap_empties_the_table_and_the_reads_after_it_refill_it(
    db: Database, target: Database
) -> None:
    """A ``gap`` (slot safety dropped the slot: changes of a range may be missing) would
    leave rows deleted in that range at the target for ever; it empties the target table,
    and the ``read`` events that follow (the source table read again) refill it."""
    run_sql(target, ACCT_DDL)
    before = [
        event("insert", {"id": "1", "owner": "Ada", "balance": "1", "note": None}, xid=200),
        event("insert", {"id": "2", "owner": "Grace", "balance": "2", "note": None}, xid=200),
    ]
    gap = event("gap", None, xid=None, key={}, position="0/C9", meta={"resnapshot": True})
    reads = [  # row 2 was deleted during the gap, row 1 changed: the table as it is now
        event("read", {"id": "1", "owner": "Ada L.", "balance": "1", "note": None}, xid=201),
        event("read", {"id": "3", "owner": "Edsger", "balance": "3", "note": None}, xid=201),
    ]
    options = {"dsn": target.dsn}
    delivered(deliver(options, [before, [gap], reads]))
    assert acct_rows(target) == [(1, "Ada L.", "1.00", None), (3, "Edsger", "3.00", None)]
    # Replayed from the start, the same.
    delivered(deliver(options, [before, [gap, *reads]]))
    assert acct_rows(target) == [(1, "Ada L.", "1.00", None), (3, "Edsger", "3.00", None)]


def test_a_data_error_fails_its_transaction_only(db: Database, target: Database) -> None:
    run_sql(target, ACCT_DDL)
    good1 = [event("insert", {"id": "1", "owner": "a", "balance": "1"}, xid=200)]
    bad = [
        event("insert", {"id": "2", "owner": "b", "balance": "2"}, xid=201),
        event("insert", {"id": "3", "owner": "c", "balance": "not a number"}, xid=201),
    ]
    good2 = [event("insert", {"id": "4", "owner": "d", "balance": "4"}, xid=202)]
    [outcomes] = deliver({"dsn": target.dsn}, [good1 + bad + good2])
    assert outcomes[0] is None and outcomes[3] is None
    for o in outcomes[1:3]:
        assert isinstance(o, PermanentSinkError), o
        assert "transaction 201 not applied" in str(o) and "22P02" in str(o)
        assert "\n" not in str(o)
    assert [r[0] for r in acct_rows(target)] == [1, 4], "the failed transaction is rolled back"

    # Trigger capture gives each event of a transaction its own position (its queue id):
    # the xid still makes them one transaction. Without an xid, the position does.
    trigger_txn = [
        event("insert", {"id": "6", "owner": "f", "balance": "6"}, xid=204, position="17"),
        event("insert", {"id": "7", "owner": "g", "balance": "x"}, xid=204, position="18"),
    ]
    no_xid = [
        event("insert", {"id": "8", "owner": "h", "balance": "8"}, xid=None, position="run 3"),
        event("insert", {"id": "9", "owner": "i", "balance": "y"}, xid=None, position="run 3"),
        event("insert", {"id": "10", "owner": "j", "balance": "10"}, xid=None, position="run 4"),
    ]
    [outcomes] = deliver({"dsn": target.dsn}, [trigger_txn + no_xid])
    assert [type(o).__name__ for o in outcomes] == ["PermanentSinkError"] * 4 + ["NoneType"]
    assert [r[0] for r in acct_rows(target)] == [1, 4, 10]

    # A value the column's typmod refuses: the cast is to numeric, the column's own check holds.
    [outcomes] = deliver(
        {"dsn": target.dsn},
        [[event("insert", {"id": "5", "owner": "e", "balance": "1e20"}, xid=203)]],
    )
    assert isinstance(outcomes[0], PermanentSinkError) and "22003" in str(outcomes[0])


def test_missing_table_key_index_or_column_say_what_to_do(db: Database, target: Database) -> None:
    row = event("insert", {"id": "1", "owner": "a", "balance": "1"}, xid=300)
    [[missing]] = deliver({"dsn": target.dsn}, [[row]])
    assert isinstance(missing, PermanentSinkError)
    assert "target table public.acct does not exist" in str(missing)
    assert "create_tables = true" in str(missing)

    run_sql(target, "CREATE TABLE acct (id int, owner text, balance numeric)")  # no key
    [[no_index]] = deliver({"dsn": target.dsn}, [[row]])
    assert isinstance(no_index, PermanentSinkError)
    assert "no primary key or unique index on the event's key columns" in str(no_index)

    run_sql(target, "ALTER TABLE acct ADD PRIMARY KEY (id)")
    wider = event("insert", {"id": "2", "owner": "b", "balance": "2", "note": "n"}, xid=301)
    [[lacking]] = deliver({"dsn": target.dsn, "add_columns": False}, [[wider]])
    assert isinstance(lacking, PermanentSinkError)
    assert "lacks column(s) note; add them or set add_columns = true" in str(lacking)
    assert run_query(target, "SELECT count(*) FROM acct") == [(0,)], "nothing was applied"

    keyless = event("insert", {"id": "3", "owner": "c"}, xid=302, key={})
    [[no_key]] = deliver({"dsn": target.dsn}, [[keyless]])
    assert isinstance(no_key, PermanentSinkError) and "has no key" in str(no_key)

    # The same sink once the target is changed behind its back: its cached shape is re-read,
    # after a refusal, and after a statement that the cached shape made wrong.
    later = event("insert", {"id": "3", "owner": "c", "balance": "3", "note": "m"}, xid=303)

    async def go() -> list[Outcome]:
        strict = make_sink({"dsn": target.dsn, "add_columns": False})
        adding = make_sink({"dsn": target.dsn})
        await strict.start()
        await adding.start()
        try:
            first = await strict.send(messages([wider]))
            run_sql(target, "ALTER TABLE acct ADD COLUMN note text")
            second = await strict.send(messages([wider]))
            run_sql(target, "ALTER TABLE acct RENAME COLUMN note TO old_note")
            third = await adding.send(messages([later]))  # the stale statement fails once
            return first + second + third
        finally:
            await strict.close()
            await adding.close()

    first, second, third = asyncio.run(go())
    assert isinstance(first, PermanentSinkError)
    assert (second, third) == (None, None)
    with target.connect() as conn:
        assert conn.execute("SELECT id, old_note, note FROM acct ORDER BY id").fetchall() == [
            (2, "n", None),
            (3, None, "m"),
        ]


def test_create_tables_in_another_schema_with_the_events_key(
    db: Database, target: Database
) -> None:
    pair: Mapping[str, tuple[int, str]] = {
        "a": (INT8, "int8"),
        "b": (TEXT, "text"),
        "tags": (1009, "text[]"),
        "at": (1184, "timestamptz"),
        "span": (1186, "interval"),
    }
    rows: list[dict[str, Text]] = [
        {"a": "1", "b": "x", "tags": '{a,"b c",NULL}', "at": "2024-01-02 03:04:05.5+00",
         "span": "1 year 2 mons -3 days +04:05:06"},
        {"a": "1", "b": "y", "tags": None, "at": "infinity", "span": "00:00:00"},
    ]  # fmt: skip
    events = [
        event("insert", r, xid=400, table="pair", columns=pair, key_columns=("a", "b"))
        for r in rows
    ]
    delivered(deliver({"dsn": target.dsn, "create_tables": True, "schema": "mirror"}, [events]))
    with target.connect() as conn:
        types = conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'mirror.pair'::regclass AND attnum > 0 ORDER BY attnum"
        ).fetchall()
        assert types == [
            ("a", "bigint"),
            ("b", "text"),
            ("tags", "text[]"),
            ("at", "timestamp with time zone"),
            ("span", "interval"),
        ]
        primary = conn.execute(
            "SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_constraint c,"
            " unnest(c.conkey) WITH ORDINALITY AS k (attnum, n)"
            " JOIN pg_attribute a ON a.attnum = k.attnum"
            " WHERE c.conrelid = 'mirror.pair'::regclass AND c.contype = 'p'"
            " AND a.attrelid = c.conrelid"
        ).fetchone()
        assert primary == (["a", "b"],)
    with h.canonical_connect(target.dsn) as conn:
        got = conn.execute("SELECT a::text, b, tags::text, at::text, span::text FROM mirror.pair"
                           " ORDER BY b").fetchall()  # fmt: skip
    assert got == [tuple(r.values()) for r in rows]


def test_add_columns_from_a_schema_event_before_any_row_has_them(
    db: Database, target: Database
) -> None:
    run_sql(target, ACCT_DDL)
    schema_event = event(
        "schema",
        None,
        xid=500,
        key={},
        meta={
            "columns_after": [["id", "int4"], ["owner", "text"], ["extra", "int4[]"],
                              ["mood", "public.mood"]],
            "type_oids_after": [23, 25, 1007, 99999],
            "added": ["extra", "mood"],
        },
    )  # fmt: skip
    run_sql(target, "CREATE TYPE mood AS ENUM ('ok', 'sad')")
    delivered(deliver({"dsn": target.dsn}, [[schema_event]]))
    with target.connect() as conn:
        assert columns_of(conn, "public", "acct") == [
            "id", "owner", "balance", "note", "extra", "mood"
        ]  # fmt: skip
        assert conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'acct'::regclass AND attname IN ('extra', 'mood') ORDER BY attnum"
        ).fetchall() == [("integer[]",), ("mood",)]
    # add_columns = false leaves the target's shape alone
    other = event(
        "schema", None, xid=501, key={},
        meta={"columns_after": [["id", "int4"], ["more", "text"]], "type_oids_after": [23, 25]},
    )  # fmt: skip
    delivered(deliver({"dsn": target.dsn, "add_columns": False}, [[other]]))
    with target.connect() as conn:
        assert "more" not in columns_of(conn, "public", "acct")
    # a type the target does not have
    unknown = event(
        "schema", None, xid=502, key={},
        meta={"columns_after": [["id", "int4"], ["r", "range<float8>"]],
              "type_oids_after": [23, 88888]},
    )  # fmt: skip
    [[refused]] = deliver({"dsn": target.dsn}, [[unknown]])
    assert isinstance(refused, PermanentSinkError) and "r (range<float8>)" in str(refused)


def test_connection_loss_is_retryable_and_the_sink_reconnects(
    db: Database, target: Database
) -> None:
    run_sql(target, ACCT_DDL)
    port = target.cluster.port

    async def go() -> None:
        async with TcpProxy("127.0.0.1", port) as proxy:
            dsn = target.cluster.dsn(target.name).replace(f"port={port}", f"port={proxy.port}")
            sink = make_sink({"dsn": dsn, "timeout": 2})
            await sink.start()
            try:
                ok = await sink.send(messages([event("insert", {"id": "1", "owner": "a"}, xid=1)]))
                assert ok == [None]
                await proxy.cut()
                batch = [
                    event("insert", {"id": "2", "owner": "b"}, xid=2),
                    event("insert", {"id": "3", "owner": "c"}, xid=3),
                ]
                lost = await sink.send(messages(batch))
                assert all(isinstance(o, RetryableSinkError) for o in lost), lost
                assert "password" not in str(lost[0]) and "\n" not in str(lost[0])
                await proxy.restore()
                assert await sink.send(messages(batch)) == [None, None]

                # a server that hangs: the timeout makes it retryable, and it recovers
                await proxy.stall()
                started = asyncio.get_running_loop().time()
                hung = await sink.send(messages([event("insert", {"id": "4"}, xid=4)]))
                assert isinstance(hung[0], RetryableSinkError), hung
                assert "did not answer within 2 s" in str(hung[0])
                assert asyncio.get_running_loop().time() - started < 10
                await proxy.restore()
                assert await sink.send(messages([event("insert", {"id": "4"}, xid=4)])) == [None]
                assert proxy.connections_total >= 3, "the sink opened new connections"
            finally:
                await sink.close()

    asyncio.run(go())
    assert [r[0] for r in acct_rows(target)] == [1, 2, 3, 4]


# -- events captured by pgherald ------------------------------------------------------------------

CAPTURED_DDL = (
    "CREATE TABLE acct (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12,2),"
    " tags text[], doc jsonb, blob bytea, seen timestamptz, span interval, flag boolean,"
    " uid uuid, note text)",
    "CREATE TABLE pair (a int, b text, v double precision, PRIMARY KEY (a, b))",
)
SEED = (
    "INSERT INTO acct (id, owner, balance, note) SELECT i, 'seed ' || i, i * 1.5, %s"
    " FROM generate_series(1, 5) AS i"
)


def test_captured_workload_replayed_twice_equals_the_source(db: Database, target: Database) -> None:
    big = secrets.token_hex(4000)  # incompressible: stored out of line (TOAST)
    run_sql(db, *CAPTURED_DDL)
    run_sql(db, SEED, params=(big,))
    # The replica starts as a copy of the table (as an initial copy would make it); pair
    # is left for the sink to create.
    run_sql(target, CAPTURED_DDL[0])
    run_sql(target, SEED, params=(big,))
    settings = h.install(db.dsn, ["public.acct", "public.pair"])

    def work() -> None:
        with db.connect() as conn:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO acct SELECT i, 'owner ''' || i || ' ü %%s', i / 7.0,"
                    " ARRAY['x', NULL, 'y z'], jsonb_build_object('i', i, 'n', NULL),"
                    " '\\x00ff'::bytea, CASE WHEN i = 10 THEN 'infinity'"
                    " ELSE '2024-02-29 12:00:00.123456+05:30' END::timestamptz,"
                    " '1 mon -2 days 03:00',"
                    " i %% 2 = 0, md5(i::text)::uuid, CASE WHEN i %% 5 = 0 THEN %s END"
                    " FROM generate_series(10, 39) AS i",
                    (big,),
                )
            with conn.transaction():
                conn.execute(
                    "INSERT INTO pair VALUES (1, 'a', 1.5), (1, 'b', 'NaN'), (2, 'c', '-Infinity'),"
                    " (3, 'd', 1e-300)"
                )
            with conn.transaction():
                conn.execute("UPDATE acct SET balance = balance + 1 WHERE id % 3 = 0")
                conn.execute("UPDATE acct SET owner = 'changed' WHERE id = 1")  # note unchanged
            with conn.transaction():  # key moves, one of a seeded row with an unchanged TOAST
                conn.execute("UPDATE acct SET id = 1002 WHERE id = 2")
                conn.execute("UPDATE acct SET id = 1010, flag = NULL WHERE id = 10")
            with conn.transaction():  # two tables in one transaction
                conn.execute("DELETE FROM acct WHERE id IN (11, 12, 3)")
                conn.execute("UPDATE pair SET b = b || 'x' WHERE a = 1")
                conn.execute("DELETE FROM pair WHERE a = 3")
            with conn.transaction():
                conn.execute("INSERT INTO acct (id, owner) VALUES (500, 'never')")
                raise psycopg.Rollback()
            conn.execute("ALTER TABLE acct ADD COLUMN extra text")
            with conn.transaction():
                conn.execute("UPDATE acct SET extra = 'e' || id WHERE id < 20")
                conn.execute("INSERT INTO acct (id, owner, extra) VALUES (40, 'new', 'e40')")
            with conn.transaction():
                conn.execute("TRUNCATE pair")
                conn.execute("INSERT INTO pair VALUES (9, 'z', 0)")
            conn.execute("UPDATE acct SET note = 'short now' WHERE id = 4")

    with h.capturing(settings) as capture:
        work()
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    batches = captured_batches(settings, size=7)
    events = [e for b in batches for e in b]
    assert any(e.op == "schema" for e in events)
    assert any(e.op == "truncate" for e in events)
    assert any("old_key" in e.meta for e in events)
    assert any(e.new is not None and UNCHANGED_TOAST in e.new.texts for e in events), (
        "the workload should produce an unchanged TOAST value"
    )
    xids = [e.xid for e in events]
    assert any(b[-1].xid == n[0].xid for b, n in itertools.pairwise(batches)), (
        "some transaction should straddle two batches"
    )
    assert len(set(xids)) >= 8

    options = {"dsn": target.dsn, "create_tables": True}
    delivered(deliver(options, batches))
    for table in (("public", "acct"), ("public", "pair")):
        assert_same(db, target, table)
    with target.connect() as conn:
        row = conn.execute("SELECT length(note) FROM acct WHERE id = 1002").fetchone()
    assert row == (len(big),), "the moved row kept its unchanged TOAST value"
    before = [fingerprint(target, ("public", t)) for t in ("acct", "pair")]

    delivered(deliver(options, batches))  # replayed: the same tables
    assert [fingerprint(target, ("public", t)) for t in ("acct", "pair")] == before
    for table in (("public", "acct"), ("public", "pair")):
        assert_same(db, target, table)


def test_hostile_names_captured_and_mapped(db: Database, target: Database) -> None:
    schema, table = 'Sch "ema%s', 'Ta"b %(x)s le'
    ident = sql.Identifier(schema, table).as_string(None)
    run_sql(
        db,
        f"CREATE SCHEMA {sql.Identifier(schema).as_string(None)}",
        f'CREATE TABLE {ident} ("I d" int, "v""%s" text, "50% off" numeric, PRIMARY KEY ("I d"))',
    )
    settings = h.install(db.dsn)
    admin.add_watch(settings, (schema, table), name="hostile %s")

    def work() -> None:
        with db.connect() as conn:
            for statement in (
                f"INSERT INTO {ident} SELECT i, 'v \"' || i || '%', i * 0.5"
                " FROM generate_series(1, 10) AS i",
                f'UPDATE {ident} SET "v""%s" = NULL WHERE "I d" = 2',
                f'UPDATE {ident} SET "I d" = 100 WHERE "I d" = 3',
                f'DELETE FROM {ident} WHERE "I d" = 4',
                f'ALTER TABLE {ident} ADD COLUMN "new ""col%" text[]',
                f'UPDATE {ident} SET "new ""col%" = ARRAY[\'%s\', \'"\'] WHERE "I d" < 6',
            ):
                conn.execute(statement.encode())

    with h.capturing(settings) as capture:
        work()
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    batches = captured_batches(settings, size=4)
    mapped = ('tgt %s "x', 'Dest "T%')
    options = {
        "dsn": target.dsn,
        "create_tables": True,
        "table_map": {'"Sch ""ema%s"."Ta""b %(x)s le"': '"tgt %s ""x"."Dest ""T%"'},
    }
    delivered(deliver(options, batches))
    assert_same(db, target, (schema, table), mapped)
    delivered(deliver(options, batches))
    assert_same(db, target, (schema, table), mapped)
    with target.connect() as conn:
        assert columns_of(conn, *mapped) == ["I d", 'v"%s', "50% off", 'new "col%']
