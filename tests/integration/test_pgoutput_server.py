"""The pgoutput decoder on bytes that real PostgreSQL servers produced.

Each test runs a known workload, reads the slot's raw messages with
``pg_logical_slot_peek_binary_changes`` and checks that the decoded sequence is exactly
the workload: message kinds, order, xids, relation shapes and every value. LSNs and
commit times are not predictable, so they are checked for consistency instead (BEGIN's
final LSN is COMMIT's LSN, times fall inside the transaction's wall-clock window).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import LiteralString

import psycopg
import pytest

from pgherald.events import UNCHANGED_TOAST
from pgherald.sources.pgoutput import (
    PG_EPOCH,
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Prepare,
    Relation,
    RelationColumn,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamState,
    StreamStop,
    Truncate,
    TypeMsg,
    Update,
    Value,
    decode,
)
from tests.conftest import Database

Conn = psycopg.Connection[tuple[object, ...]]

INT4, TEXT, BYTEA, VARCHAR, TIMESTAMPTZ = 23, 25, 17, 1043, 1184
BIG = "ü" * 6000  # 12 kB stored out of line (STORAGE EXTERNAL): TOASTed, never compressed


@pytest.fixture
def conn(db: Database) -> Iterator[Conn]:
    with db.connect() as c:
        yield c


def scalar(conn: Conn, query: LiteralString, params: tuple[object, ...] = ()) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(str(row[0]))


def oid(conn: Conn, regclass: str) -> int:
    return scalar(conn, "SELECT %s::regclass::oid::bigint", (regclass,))


def current_xid(conn: Conn) -> int:
    """The running transaction's xid (assigning one if needed), as pgoutput sends it."""
    return scalar(conn, "SELECT pg_current_xact_id()::text::bigint") & 0xFFFFFFFF


def transaction(conn: Conn, *statements: LiteralString) -> tuple[int, datetime, datetime]:
    """Runs ``statements`` in one transaction; returns its xid and a window around its commit."""
    before = datetime.now(UTC)
    with conn.transaction():
        for statement in statements:
            conn.execute(statement)
        xid = current_xid(conn)
    return xid, before, datetime.now(UTC)


def peek(conn: Conn, slot: str, *options: str) -> list[tuple[int, int, bytes]]:
    """The slot's pending messages as (LSN, xid, raw bytes), without consuming them."""
    rows = conn.execute(
        "SELECT (lsn - '0/0')::bigint, xid::text::bigint, data"
        " FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, VARIADIC %s::text[])",
        (slot, list(options)),
    ).fetchall()
    out = []
    for lsn, xid, data in rows:
        assert isinstance(data, bytes)
        out.append((int(str(lsn)), int(str(xid)), data))
    return out


def strip_positions(messages: Sequence[Message]) -> list[Message]:
    """Messages with LSNs and times zeroed, for comparing with a workload's expectation."""
    out: list[Message] = []
    for m in messages:
        if isinstance(m, Begin):
            m = replace(m, final_lsn=0, commit_time=PG_EPOCH)
        elif isinstance(m, Commit):
            m = replace(m, commit_lsn=0, end_lsn=0, commit_time=PG_EPOCH)
        elif isinstance(m, LogicalMessage):
            m = replace(m, lsn=0)
        out.append(m)
    return out


def begin(xid: int) -> Begin:
    return Begin(0, PG_EPOCH, xid)


COMMIT = Commit(0, 0, 0, PG_EPOCH)


def test_protocol_1_workload_decodes_exactly(conn: Conn) -> None:
    conn.execute(
        """
        CREATE TYPE mood AS ENUM ('sad', 'happy');
        CREATE TABLE t_default (id int PRIMARY KEY, name text, big text, m mood);
        ALTER TABLE t_default ALTER COLUMN big SET STORAGE EXTERNAL;
        CREATE TABLE t_full (id int PRIMARY KEY, name text, data bytea);
        ALTER TABLE t_full REPLICA IDENTITY FULL;
        CREATE TABLE parent (id int PRIMARY KEY);
        CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
        CREATE TABLE "tablé_ü" (id int PRIMARY KEY, "nàme" varchar(64));
        CREATE PUBLICATION pub FOR ALL TABLES;
        """
    )
    conn.execute("SELECT pg_create_logical_replication_slot('s1', 'pgoutput')")
    conn.execute("SELECT pg_replication_origin_create('upstream-ü')")
    t_default, t_full = oid(conn, "t_default"), oid(conn, "t_full")
    parent, child, unicode = oid(conn, "parent"), oid(conn, "child"), oid(conn, '"tablé_ü"')
    mood = scalar(conn, "SELECT 'mood'::regtype::oid::bigint")

    windows: dict[int, tuple[datetime, datetime]] = {}

    def tx(*statements: LiteralString) -> int:
        xid, before, after = transaction(conn, *statements)
        windows[xid] = (before, after)
        return xid

    x1 = tx(
        "INSERT INTO t_default VALUES (1, 'a', repeat('ü', 6000), 'sad'), (2, NULL, 'small', NULL)"
    )
    x2 = tx("UPDATE t_default SET name = 'b' WHERE id = 1")  # big is TOASTed and untouched
    x3 = tx("UPDATE t_default SET id = 10 WHERE id = 1")  # a key change
    x4 = tx("DELETE FROM t_default WHERE id = 2")
    x5 = tx("INSERT INTO t_full VALUES (1, 'x', '\\x00ff'), (2, NULL, NULL)")
    x6 = tx("UPDATE t_full SET name = 'y' WHERE id = 1")
    x7 = tx("DELETE FROM t_full WHERE id = 2")
    x8 = tx("INSERT INTO parent VALUES (1)", "INSERT INTO child VALUES (1, 1)")
    x9 = tx("TRUNCATE parent CASCADE")  # truncates parent and, by cascade, child
    conn.execute("SELECT pg_logical_emit_message(false, 'not-tx', 'hello')")
    x10 = tx("SELECT pg_logical_emit_message(true, 'tx ✓', '\\x00ff'::bytea)")
    x11 = tx(
        "INSERT INTO t_default VALUES (3, 'kept', NULL, 'happy')",
        "SAVEPOINT s",
        "INSERT INTO t_default VALUES (4, 'rolled back', NULL, NULL)",
        "ROLLBACK TO SAVEPOINT s",
        "INSERT INTO t_default VALUES (5, 'also kept', NULL, NULL)",
    )
    x12 = tx("""INSERT INTO "tablé_ü" VALUES (1, 'héé ✓ 😀')""")
    conn.execute("SELECT pg_replication_origin_session_setup('upstream-ü')")
    x13 = tx(
        "SELECT pg_replication_origin_xact_setup('0/ABCDEF', now())",
        "INSERT INTO t_default VALUES (6, 'replayed', NULL, NULL)",
    )
    conn.execute("SELECT pg_replication_origin_session_reset()")

    rows = peek(conn, "s1", "proto_version", "1", "publication_names", "pub", "messages", "true")
    messages = [decode(data) for _, _, data in rows]

    rel_default = Relation(
        None,
        t_default,
        "public",
        "t_default",
        "d",
        (
            RelationColumn(True, "id", INT4, -1),
            RelationColumn(False, "name", TEXT, -1),
            RelationColumn(False, "big", TEXT, -1),
            RelationColumn(False, "m", mood, -1),
        ),
    )
    rel_full = Relation(
        None,
        t_full,
        "public",
        "t_full",
        "f",
        (
            RelationColumn(True, "id", INT4, -1),
            RelationColumn(True, "name", TEXT, -1),
            RelationColumn(True, "data", BYTEA, -1),
        ),
    )
    rel_parent = Relation(
        None, parent, "public", "parent", "d", (RelationColumn(True, "id", INT4, -1),)
    )
    rel_child = Relation(
        None,
        child,
        "public",
        "child",
        "d",
        (RelationColumn(True, "id", INT4, -1), RelationColumn(False, "parent_id", INT4, -1)),
    )
    rel_unicode = Relation(
        None,
        unicode,
        "public",
        "tablé_ü",
        "d",
        (RelationColumn(True, "id", INT4, -1), RelationColumn(False, "nàme", VARCHAR, 68)),
    )
    U = UNCHANGED_TOAST
    expected: list[Message] = [
        begin(x1),
        TypeMsg(None, mood, "public", "mood"),
        rel_default,
        Insert(None, t_default, ("1", "a", BIG, "sad")),
        Insert(None, t_default, ("2", None, "small", None)),
        COMMIT,
        begin(x2),
        Update(None, t_default, None, None, ("1", "b", U, "sad")),
        COMMIT,
        begin(x3),
        Update(None, t_default, "K", ("1", None, None, None), ("10", "b", U, "sad")),
        COMMIT,
        begin(x4),
        Delete(None, t_default, "K", ("2", None, None, None)),
        COMMIT,
        begin(x5),
        rel_full,
        Insert(None, t_full, ("1", "x", "\\x00ff")),
        Insert(None, t_full, ("2", None, None)),
        COMMIT,
        begin(x6),
        Update(None, t_full, "O", ("1", "x", "\\x00ff"), ("1", "y", "\\x00ff")),
        COMMIT,
        begin(x7),
        Delete(None, t_full, "O", ("2", None, None)),
        COMMIT,
        begin(x8),
        rel_parent,
        Insert(None, parent, ("1",)),
        rel_child,
        Insert(None, child, ("1", "1")),
        COMMIT,
        begin(x9),
        # TRUNCATE gives the tables new files, which makes pgoutput describe them again.
        rel_parent,
        rel_child,
        Truncate(None, (parent, child), cascade=True, restart_identity=False),
        COMMIT,
        LogicalMessage(None, False, 0, "not-tx", b"hello"),
        begin(x10),
        LogicalMessage(None, True, 0, "tx ✓", b"\x00\xff"),
        COMMIT,
        begin(x11),
        Insert(None, t_default, ("3", "kept", None, "happy")),
        Insert(None, t_default, ("5", "also kept", None, None)),
        COMMIT,
        begin(x12),
        rel_unicode,
        Insert(None, unicode, ("1", "héé ✓ 😀")),
        COMMIT,
        begin(x13),
        Origin(0xABCDEF, "upstream-ü"),
        Insert(None, t_default, ("6", "replayed", None, None)),
        COMMIT,
    ]
    assert strip_positions(messages) == expected

    # Positions and times: consistent with each other, with the rows' LSNs and the clock.
    last_end = 0
    for (row_lsn, row_xid, _), m in zip(rows, messages, strict=True):
        if isinstance(m, Begin):
            opened = m
            assert m.xid == row_xid
            before, after = windows[m.xid]
            assert before - timedelta(seconds=1) <= m.commit_time <= after + timedelta(seconds=1)
            assert m.commit_time.tzinfo is not None
        elif isinstance(m, Commit):
            assert m.flags == 0
            assert m.commit_lsn == opened.final_lsn
            assert m.commit_time == opened.commit_time
            assert m.commit_lsn < m.end_lsn == row_lsn
            assert m.commit_lsn > last_end
            last_end = m.end_lsn
        elif isinstance(m, LogicalMessage) and not m.transactional:
            assert m.lsn == row_lsn
            assert row_xid == 0
        elif isinstance(m, LogicalMessage):
            assert last_end < m.lsn <= opened.final_lsn


def test_binary_values_from_a_real_server(conn: Conn) -> None:
    """With ``binary 'true'`` values come in each type's send format: check a few by hand."""
    conn.execute(
        """
        CREATE TABLE b (i int4 PRIMARY KEY, t text, raw bytea, n int8, ts timestamptz, big text);
        ALTER TABLE b ALTER COLUMN big SET STORAGE EXTERNAL;
        CREATE PUBLICATION pub FOR TABLE b;
        """
    )
    conn.execute("SELECT pg_create_logical_replication_slot('s2', 'pgoutput')")
    transaction(
        conn,
        "INSERT INTO b VALUES (-7, 'héé', '\\x00ff10', NULL,"
        " '2024-05-17 12:34:56.123456+00', repeat('x', 5000))",
        "UPDATE b SET t = 'new' WHERE i = -7",
    )
    rows = peek(conn, "s2", "proto_version", "1", "publication_names", "pub", "binary", "true")
    messages = [decode(data) for _, _, data in rows]
    inserts = [m for m in messages if isinstance(m, Insert)]
    updates = [m for m in messages if isinstance(m, Update)]
    ts_us = (datetime(2024, 5, 17, 12, 34, 56, 123456, tzinfo=UTC) - PG_EPOCH) // timedelta(
        microseconds=1
    )
    assert [i.new for i in inserts] == [
        (
            struct.pack("!i", -7),
            "héé".encode(),
            b"\x00\xff\x10",
            None,
            struct.pack("!q", ts_us),
            b"x" * 5000,
        )
    ]
    # Within one transaction the TOAST value is not yet "unchanged" on disk: it is resent.
    assert [u.new[:2] for u in updates] == [(struct.pack("!i", -7), b"new")]
    assert [type(m).__name__ for m in messages] == [
        "Begin",
        "Relation",
        "Insert",
        "Update",
        "Commit",
    ]


def _streaming_workload(db: Database, conn: Conn) -> tuple[int, int, int]:
    """A big committed transaction with a rolled-back savepoint, interleaved with a small
    one, then a big aborted one. Returns (big xid, small xid, aborted xid)."""
    conn.execute(
        """
        CREATE TABLE big (id int PRIMARY KEY, payload text);
        CREATE TABLE small (id int PRIMARY KEY);
        CREATE PUBLICATION pub FOR ALL TABLES;
        """
    )
    conn.execute("SELECT pg_create_logical_replication_slot('s3', 'pgoutput')")
    with db.connect() as other, conn.transaction():
        conn.execute("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 3000) g")
        small_xid, _, _ = transaction(other, "INSERT INTO small VALUES (1)")
        conn.execute("SAVEPOINT s")
        conn.execute("INSERT INTO big SELECT g, 'doomed' FROM generate_series(100001, 103000) g")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("INSERT INTO big VALUES (0, 'last')")
        big_xid = current_xid(conn)
    with conn.transaction():
        conn.execute("INSERT INTO big SELECT g, 'aborted' FROM generate_series(200001, 203000) g")
        aborted_xid = current_xid(conn)
        raise psycopg.Rollback()
    # An abort is not flushed, and the slot functions read only flushed WAL: a checkpoint
    # flushes it and adds nothing that pgoutput sends.
    conn.execute("CHECKPOINT")
    return big_xid, small_xid, aborted_xid


@pytest.mark.parametrize(("proto", "streaming"), [("2", "on"), ("4", "parallel")])
def test_streamed_transactions_decode_completely(
    db: Database, conn: Conn, proto: str, streaming: str
) -> None:
    if proto == "4" and db.version < 16:
        pytest.skip("protocol version 4 (parallel streaming) needs PostgreSQL 16")
    big_xid, small_xid, aborted_xid = _streaming_workload(db, conn)
    # Decoding happens in the backend that calls the slot function, so a SET here makes
    # pgoutput stream every transaction bigger than 64 kB instead of spilling it.
    conn.execute("SET logical_decoding_work_mem = '64kB'")
    rows = peek(
        conn, "s3", "proto_version", proto, "publication_names", "pub", "streaming", streaming
    )

    state = StreamState()
    pending: dict[int, list[tuple[int, Insert]]] = {}  # top xid -> (xid, row) streamed so far
    committed: list[Value] = []
    outside: list[Message] = []
    segments: dict[int, list[bool]] = {}
    aborts: list[StreamAbort] = []
    for _, _, data in rows:
        was_in_stream = state.in_stream
        m = state.decode(data)
        if isinstance(m, StreamStart):
            assert not was_in_stream
            segments.setdefault(m.xid, []).append(m.first_segment)
        elif isinstance(m, StreamStop):
            assert was_in_stream
        elif was_in_stream:
            assert state.xid is not None
            assert isinstance(m, Insert | Relation), m
            assert m.xid is not None
            if isinstance(m, Insert):
                pending.setdefault(state.xid, []).append((m.xid, m))
        elif isinstance(m, StreamAbort):
            aborts.append(m)
            if m.subxid == m.xid:
                pending.pop(m.xid)
            else:
                pending[m.xid] = [(x, i) for x, i in pending[m.xid] if x != m.subxid]
        elif isinstance(m, StreamCommit):
            assert m.xid == big_xid
            assert m.commit_lsn < m.end_lsn
            committed += [i.new[1] for _, i in pending.pop(m.xid)]
        else:
            outside.append(m)

    assert not state.in_stream
    assert pending == {}
    # Both big transactions were streamed in several blocks, the first marked as such.
    for xid in (big_xid, aborted_xid):
        assert len(segments[xid]) > 3
        assert segments[xid] == [True] + [False] * (len(segments[xid]) - 1)
    # The small transaction came whole, between two blocks of the big one.
    small = oid(conn, "small")
    assert strip_positions(outside) == [
        begin(small_xid),
        Relation(None, small, "public", "small", "d", (RelationColumn(True, "id", INT4, -1),)),
        Insert(None, small, ("1",)),
        COMMIT,
    ]
    # What committed is exactly what the big transaction kept.
    assert committed == [f"row {i}" for i in range(1, 3001)] + ["last"]
    # One abort of the savepoint's subtransaction, one of the whole aborted transaction.
    assert [(a.xid, a.subxid == a.xid) for a in aborts] == [(big_xid, False), (aborted_xid, True)]
    for a in aborts:
        if proto == "4":
            assert a.abort_lsn is not None and a.abort_lsn > 0
            assert a.abort_time is not None and a.abort_time.tzinfo is not None
        else:
            assert (a.abort_lsn, a.abort_time) == (None, None)


def test_two_phase_messages_from_a_real_server(conn: Conn) -> None:
    conn.execute(
        """
        CREATE TABLE tp (id int PRIMARY KEY, payload text);
        CREATE PUBLICATION pub FOR ALL TABLES;
        """
    )
    conn.execute("SELECT pg_create_logical_replication_slot('s4', 'pgoutput', false, true)")
    tp = oid(conn, "tp")
    xids: list[int] = []
    finishes = (
        ("g-ü", psycopg.sql.SQL("COMMIT PREPARED {}")),
        ("g2", psycopg.sql.SQL("ROLLBACK PREPARED {}")),
    )
    for gid, finish in finishes:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO tp VALUES (%s, %s)", (len(xids) + 1, gid))
        xids.append(current_xid(conn))
        conn.execute(psycopg.sql.SQL("PREPARE TRANSACTION {}").format(psycopg.sql.Literal(gid)))
        conn.execute(finish.format(psycopg.sql.Literal(gid)))
    conn.execute("BEGIN")
    conn.execute("INSERT INTO tp SELECT g, 'big' FROM generate_series(100, 3100) g")
    xids.append(current_xid(conn))
    conn.execute("PREPARE TRANSACTION 'g3'")
    conn.execute("COMMIT PREPARED 'g3'")

    conn.execute("SET logical_decoding_work_mem = '64kB'")
    rows = peek(
        conn,
        "s4",
        "proto_version",
        "3",
        "publication_names",
        "pub",
        "two_phase",
        "on",
        "streaming",
        "on",
    )
    state = StreamState()
    messages = [state.decode(data) for _, _, data in rows]
    control = [
        m for m in messages if not isinstance(m, Insert | Relation | StreamStart | StreamStop)
    ]
    shapes = [(type(m).__name__, getattr(m, "gid", None), getattr(m, "xid", None)) for m in control]
    assert shapes == [
        ("BeginPrepare", "g-ü", xids[0]),
        ("Prepare", "g-ü", xids[0]),
        ("CommitPrepared", "g-ü", xids[0]),
        ("BeginPrepare", "g2", xids[1]),
        ("Prepare", "g2", xids[1]),
        ("RollbackPrepared", "g2", xids[1]),
        ("StreamPrepare", "g3", xids[2]),
        ("CommitPrepared", "g3", xids[2]),
    ]
    bp1, p1, cp1, bp2, p2, rp2, sp3, cp3 = control
    assert isinstance(bp1, BeginPrepare) and isinstance(p1, Prepare)
    assert isinstance(cp1, CommitPrepared) and isinstance(rp2, RollbackPrepared)
    assert isinstance(bp2, BeginPrepare) and isinstance(p2, Prepare)
    assert isinstance(sp3, StreamPrepare) and isinstance(cp3, CommitPrepared)
    assert (bp1.prepare_lsn, bp1.end_lsn, bp1.prepare_time) == (
        p1.prepare_lsn,
        p1.end_lsn,
        p1.prepare_time,
    )
    assert cp1.commit_lsn == p1.end_lsn < cp1.end_lsn
    assert cp1.commit_time >= p1.prepare_time
    assert rp2.prepare_end_lsn == p2.end_lsn < rp2.rollback_end_lsn
    assert rp2.prepare_time == p2.prepare_time <= rp2.rollback_time
    assert cp3.commit_lsn == sp3.end_lsn
    inserts = [m for m in messages if isinstance(m, Insert)]
    assert [m.new for m in inserts[:2]] == [("1", "g-ü"), ("2", "g2")]
    assert [m.xid for m in inserts[:2]] == [None, None]
    assert [m.new for m in inserts[2:]] == [(str(g), "big") for g in range(100, 3101)]
    assert {m.xid for m in inserts[2:]} == {xids[2]}
    assert all(m.relation_oid == tp for m in inserts)
