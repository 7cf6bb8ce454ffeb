"""The pgoutput decoder, on bytes built by hand and by a small encoder of the tests' own.

The hand-built buffers spell the wire format out byte by byte (from PostgreSQL's
"Logical Replication Message Formats"), so that the decoder and the test-side encoder
cannot share one misunderstanding unnoticed; the encoder then lets hypothesis try many
well-formed messages, and every prefix of each must fail cleanly.
"""

from __future__ import annotations

import dataclasses
import struct
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgherald.errors import DecodeError
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
    Row,
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
    decode_insert,
    pg_timestamp,
)

# -- a test-side encoder ---------------------------------------------------------------


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _us(moment: datetime) -> int:
    return (moment - PG_EPOCH) // timedelta(microseconds=1)


def _row(values: Row) -> bytes:
    out = [struct.pack("!H", len(values))]
    for v in values:
        if v is None:
            out.append(b"n")
        elif v is UNCHANGED_TOAST:
            out.append(b"u")
        elif isinstance(v, str):
            raw = v.encode()
            out.append(b"t" + struct.pack("!I", len(raw)) + raw)
        else:
            assert isinstance(v, bytes)
            out.append(b"b" + struct.pack("!I", len(v)) + v)
    return b"".join(out)


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack("!I", xid)


def encode(m: Message) -> bytes:
    """The bytes pgoutput sends for ``m`` (with a leading xid where ``m.xid`` is set)."""
    match m:
        case Begin():
            return b"B" + struct.pack("!QqI", m.final_lsn, _us(m.commit_time), m.xid)
        case Commit():
            return b"C" + struct.pack("!BQQq", m.flags, m.commit_lsn, m.end_lsn, _us(m.commit_time))
        case Origin():
            return b"O" + struct.pack("!Q", m.commit_lsn) + _s(m.name)
        case Relation():
            namespace = "" if m.namespace == "pg_catalog" else m.namespace
            cols = b"".join(
                struct.pack("!B", int(c.is_key))
                + _s(c.name)
                + struct.pack("!Ii", c.type_oid, c.type_modifier)
                for c in m.columns
            )
            return (
                b"R"
                + _xid(m.xid)
                + struct.pack("!I", m.oid)
                + _s(namespace)
                + _s(m.name)
                + m.replica_identity.encode()
                + struct.pack("!H", len(m.columns))
                + cols
            )
        case TypeMsg():
            namespace = "" if m.namespace == "pg_catalog" else m.namespace
            return b"Y" + _xid(m.xid) + struct.pack("!I", m.oid) + _s(namespace) + _s(m.name)
        case Insert():
            return b"I" + _xid(m.xid) + struct.pack("!I", m.relation_oid) + b"N" + _row(m.new)
        case Update():
            old = b"" if m.old is None else (m.old_kind or "").encode() + _row(m.old)
            return b"U" + _xid(m.xid) + struct.pack("!I", m.relation_oid) + old + b"N" + _row(m.new)
        case Delete():
            return (
                b"D"
                + _xid(m.xid)
                + struct.pack("!I", m.relation_oid)
                + m.old_kind.encode()
                + _row(m.old)
            )
        case Truncate():
            flags = int(m.cascade) | 2 * int(m.restart_identity)
            return (
                b"T"
                + _xid(m.xid)
                + struct.pack(
                    f"!IB{len(m.relation_oids)}I", len(m.relation_oids), flags, *m.relation_oids
                )
            )
        case LogicalMessage():
            return (
                b"M"
                + _xid(m.xid)
                + struct.pack("!BQ", int(m.transactional), m.lsn)
                + _s(m.prefix)
                + struct.pack("!I", len(m.content))
                + m.content
            )
        case StreamStart():
            return b"S" + struct.pack("!IB", m.xid, int(m.first_segment))
        case StreamStop():
            return b"E"
        case StreamCommit():
            return b"c" + struct.pack(
                "!IBQQq", m.xid, m.flags, m.commit_lsn, m.end_lsn, _us(m.commit_time)
            )
        case StreamAbort():
            out = b"A" + struct.pack("!II", m.xid, m.subxid)
            if m.abort_lsn is not None:
                assert m.abort_time is not None
                out += struct.pack("!Qq", m.abort_lsn, _us(m.abort_time))
            return out
        case BeginPrepare():
            return (
                b"b"
                + struct.pack("!QQqI", m.prepare_lsn, m.end_lsn, _us(m.prepare_time), m.xid)
                + _s(m.gid)
            )
        case Prepare() | StreamPrepare():
            tag = b"P" if isinstance(m, Prepare) else b"p"
            return (
                tag
                + struct.pack(
                    "!BQQqI", m.flags, m.prepare_lsn, m.end_lsn, _us(m.prepare_time), m.xid
                )
                + _s(m.gid)
            )
        case CommitPrepared():
            return (
                b"K"
                + struct.pack("!BQQqI", m.flags, m.commit_lsn, m.end_lsn, _us(m.commit_time), m.xid)
                + _s(m.gid)
            )
        case RollbackPrepared():
            return (
                b"r"
                + struct.pack(
                    "!BQQqqI",
                    m.flags,
                    m.prepare_end_lsn,
                    m.rollback_end_lsn,
                    _us(m.prepare_time),
                    _us(m.rollback_time),
                    m.xid,
                )
                + _s(m.gid)
            )
    raise AssertionError(f"no encoder for {m!r}")


def in_stream(m: Message) -> bool:
    return getattr(m, "xid", None) is not None and isinstance(
        m, Relation | TypeMsg | Insert | Update | Delete | Truncate | LogicalMessage
    )


# -- hand-built bytes, one per message type ----------------------------------------------

T0 = datetime(2024, 5, 17, 12, 34, 56, 123456, tzinfo=UTC)
T0_US = 769_264_496_123_456  # SELECT extract(epoch from T0 - '2000-01-01 UTC') * 1e6


def test_timestamp_conversion_matches_postgresql_epoch() -> None:
    assert pg_timestamp(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_timestamp(T0_US) == T0
    assert pg_timestamp(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert pg_timestamp(T0_US).tzinfo is UTC


def test_begin() -> None:
    data = bytes.fromhex("420000000116b2c0d80002bba459079e40000002f1")
    assert struct.unpack("!q", bytes.fromhex("0002bba459079e40"))[0] == T0_US
    msg = decode(data)
    assert msg == Begin(final_lsn=0x116B2C0D8, commit_time=T0, xid=753)
    assert isinstance(msg, Begin)
    assert msg.commit_time_us == T0_US


def test_commit() -> None:
    data = b"C\x00" + bytes.fromhex("0000000116b2c0d80000000116b2c1080002bba459079e40")
    msg = decode(data)
    assert msg == Commit(flags=0, commit_lsn=0x116B2C0D8, end_lsn=0x116B2C108, commit_time=T0)
    assert isinstance(msg, Commit)
    assert msg.commit_time_us == T0_US


def test_origin() -> None:
    data = b"O" + bytes.fromhex("00000000deadbeef") + "nœud-1".encode() + b"\0"
    assert decode(data) == Origin(commit_lsn=0xDEADBEEF, name="nœud-1")


def test_relation_v1_with_unicode_names_and_key_columns() -> None:
    data = (
        b"R"
        + bytes.fromhex("00004001")  # oid 16385
        + b"public\0"
        + "tablé_ü".encode()
        + b"\0"
        + b"f"
        + bytes.fromhex("0003")
        + b"\x01id\0"
        + bytes.fromhex("00000017ffffffff")  # int4, typmod -1
        + b"\x00"
        + "nàme".encode()
        + b"\0"
        + bytes.fromhex("0000041300000044")  # varchar(64): typmod 68
        + b"\x00blob\0"
        + bytes.fromhex("00000011ffffffff")  # bytea
    )
    assert decode(data) == Relation(
        xid=None,
        oid=16385,
        namespace="public",
        name="tablé_ü",
        replica_identity="f",
        columns=(
            RelationColumn(True, "id", 23, -1),
            RelationColumn(False, "nàme", 1043, 68),
            RelationColumn(False, "blob", 17, -1),
        ),
    )


def test_relation_v2_in_stream_without_columns_in_pg_catalog() -> None:
    data = b"R" + bytes.fromhex("000004d200004001") + b"\0" + b"empty\0" + b"n" + b"\0\0"
    assert decode(data, in_stream=True) == Relation(
        xid=1234, oid=16385, namespace="pg_catalog", name="empty", replica_identity="n", columns=()
    )


def test_type_both_versions() -> None:
    body = bytes.fromhex("00004002") + b"public\0mood\0"
    assert decode(b"Y" + body) == TypeMsg(None, 16386, "public", "mood")
    assert decode(b"Y\x00\x00\x00\x07" + body, in_stream=True) == TypeMsg(
        7, 16386, "public", "mood"
    )


def test_insert_all_value_kinds() -> None:
    body = (
        bytes.fromhex("00004001")
        + b"N"
        + bytes.fromhex("0005")
        + b"t\x00\x00\x00\x0242"
        + b"n"
        + b"u"
        + b"b\x00\x00\x00\x03\x00\xff\x10"
        + b"t\x00\x00\x00\x05h\xc3\xa9\xc3\xa9"
    )
    expected_new = ("42", None, UNCHANGED_TOAST, b"\x00\xff\x10", "héé")
    msg = decode(b"I" + body)
    assert msg == Insert(xid=None, relation_oid=16385, new=expected_new)
    assert isinstance(msg, Insert)
    assert msg.new[2] is UNCHANGED_TOAST
    streamed = decode(b"I\x00\x00\x10\x00" + body, in_stream=True)
    assert streamed == Insert(xid=4096, relation_oid=16385, new=expected_new)


def test_insert_of_empty_row_and_empty_strings() -> None:
    assert decode(b"I\x00\x00\x00\x01N\x00\x00") == Insert(None, 1, ())
    empty = b"I\x00\x00\x00\x01N\x00\x02t\x00\x00\x00\x00b\x00\x00\x00\x00"
    assert decode(empty) == Insert(None, 1, ("", b""))


def test_input_may_be_memoryview_or_bytearray() -> None:
    data = b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x01x"
    assert decode(memoryview(data)) == decode(bytearray(data)) == Insert(None, 1, ("x",))
    assert decode(memoryview(b"--" + data)[2:]) == Insert(None, 1, ("x",))


def test_update_without_old_with_key_and_with_full_old_row() -> None:
    new = b"N\x00\x02t\x00\x00\x00\x011u"
    assert decode(b"U\x00\x00\x00\x09" + new) == Update(None, 9, None, None, ("1", UNCHANGED_TOAST))
    key = b"K\x00\x02t\x00\x00\x00\x010n"
    assert decode(b"U\x00\x00\x00\x09" + key + new) == Update(
        None, 9, "K", ("0", None), ("1", UNCHANGED_TOAST)
    )
    old = b"O\x00\x02t\x00\x00\x00\x010t\x00\x00\x00\x03old"
    assert decode(b"U\x00\x00\x00\x05\x00\x00\x00\x09" + old + new, in_stream=True) == Update(
        5, 9, "O", ("0", "old"), ("1", UNCHANGED_TOAST)
    )


def test_delete_key_and_full() -> None:
    assert decode(b"D\x00\x00\x00\x09K\x00\x02t\x00\x00\x00\x017n") == Delete(
        None, 9, "K", ("7", None)
    )
    assert decode(b"D\x00\x00\x00\x03\x00\x00\x00\x09O\x00\x01n", in_stream=True) == Delete(
        3, 9, "O", (None,)
    )


def test_truncate_flags_and_relations() -> None:
    data = b"T" + bytes.fromhex("00000002010000400100004005")
    assert decode(data) == Truncate(None, (16385, 16389), cascade=True, restart_identity=False)
    data = b"T" + bytes.fromhex("0000002a000000010200004001")
    assert decode(data, in_stream=True) == Truncate(42, (16385,), False, True)
    assert decode(b"T\x00\x00\x00\x00\x03") == Truncate(None, (), True, True)


def test_logical_message() -> None:
    data = b"M\x01" + bytes.fromhex("0000000001000000") + b"pre\0\x00\x00\x00\x03\x00\x01\xff"
    assert decode(data) == LogicalMessage(None, True, 0x1000000, "pre", b"\x00\x01\xff")
    data = b"M\x00\x00\x00\x09\x00" + bytes.fromhex("0000000001000000") + b"\0\x00\x00\x00\x00"
    assert decode(data, in_stream=True) == LogicalMessage(9, False, 0x1000000, "", b"")


def test_stream_control_messages() -> None:
    assert decode(b"S\x00\x00\x02\xf1\x01") == StreamStart(753, True)
    assert decode(b"S\x00\x00\x02\xf1\x00") == StreamStart(753, False)
    assert decode(b"E") == StreamStop()
    commit = b"c\x00\x00\x02\xf1\x00" + bytes.fromhex(
        "0000000116b2c0d80000000116b2c1080002bba459079e40"
    )
    msg = decode(commit)
    assert msg == StreamCommit(753, 0, 0x116B2C0D8, 0x116B2C108, T0)
    assert isinstance(msg, StreamCommit)
    assert msg.commit_time_us == T0_US
    assert decode(b"A\x00\x00\x02\xf1\x00\x00\x02\xf2") == StreamAbort(753, 754, None, None)
    v4 = b"A\x00\x00\x02\xf1\x00\x00\x02\xf1" + bytes.fromhex("0000000116b2c0d80002bba459079e40")
    assert decode(v4) == StreamAbort(753, 753, 0x116B2C0D8, T0)


def test_two_phase_messages() -> None:
    lsns = bytes.fromhex("0000000116b2c0d80000000116b2c108")
    t0 = bytes.fromhex("0002bba459079e40")
    xid = b"\x00\x00\x02\xf1"
    assert decode(b"b" + lsns + t0 + xid + b"gid-1\0") == BeginPrepare(
        0x116B2C0D8, 0x116B2C108, T0, 753, "gid-1"
    )
    assert decode(b"P\x00" + lsns + t0 + xid + b"gid-1\0") == Prepare(
        0, 0x116B2C0D8, 0x116B2C108, T0, 753, "gid-1"
    )
    assert decode(b"K\x00" + lsns + t0 + xid + b"gid-1\0") == CommitPrepared(
        0, 0x116B2C0D8, 0x116B2C108, T0, 753, "gid-1"
    )
    assert decode(b"p\x00" + lsns + t0 + xid + b"gid-1\0") == StreamPrepare(
        0, 0x116B2C0D8, 0x116B2C108, T0, 753, "gid-1"
    )
    t1 = bytes.fromhex("0002bba459079e41")
    assert decode(b"r\x00" + lsns + t0 + t1 + xid + b"gid-1\0") == RollbackPrepared(
        0, 0x116B2C0D8, 0x116B2C108, T0, T0 + timedelta(microseconds=1), 753, "gid-1"
    )


def test_messages_are_frozen_and_slotted() -> None:
    begin = decode(encode(Begin(1, T0, 2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(begin, "xid", 3)  # noqa: B010 - what a caller's typo would do
    assert not hasattr(begin, "__dict__")


# -- malformed input ---------------------------------------------------------------------

SAMPLES: list[tuple[Message, bool]] = [
    (Begin(0x116B2C0D8, T0, 753), False),
    (Commit(0, 1, 2, T0), False),
    (Origin(77, "node"), False),
    (
        Relation(None, 16385, "public", "t", "d", (RelationColumn(True, "id", 23, -1),)),
        False,
    ),
    (Relation(5, 16385, "s", "tablé", "f", ()), True),
    (TypeMsg(None, 16386, "public", "mood"), False),
    (TypeMsg(5, 16386, "public", "mood"), True),
    (Insert(None, 16385, ("1", None, UNCHANGED_TOAST, b"\x01", "é")), False),
    (Insert(5, 16385, ("1", "x")), True),
    (Update(None, 16385, None, None, ("1", UNCHANGED_TOAST)), False),
    (Update(None, 16385, "K", ("0", None), ("1", "b")), False),
    (Update(5, 16385, "O", ("0", "a"), ("1", "b")), True),
    (Delete(None, 16385, "K", ("1", None)), False),
    (Delete(5, 16385, "O", ("1", "a")), True),
    (Truncate(None, (1, 2), True, False), False),
    (Truncate(5, (1,), False, True), True),
    (LogicalMessage(None, False, 10, "p", b"xyz"), False),
    (LogicalMessage(5, True, 10, "p", b"xyz"), True),
    (StreamStart(5, True), False),
    (StreamCommit(5, 0, 1, 2, T0), False),
    (StreamAbort(5, 6, None, None), False),
    (BeginPrepare(1, 2, T0, 5, "g"), False),
    (Prepare(0, 1, 2, T0, 5, "g"), False),
    (CommitPrepared(0, 1, 2, T0, 5, "g"), False),
    (RollbackPrepared(0, 1, 2, T0, T0, 5, "g"), False),
    (StreamPrepare(0, 1, 2, T0, 5, "g"), False),
]


@pytest.mark.parametrize(("message", "streamed"), SAMPLES, ids=lambda v: type(v).__name__)
def test_samples_round_trip(message: Message, streamed: bool) -> None:
    assert decode(encode(message), in_stream=streamed) == message


@pytest.mark.parametrize(("message", "streamed"), SAMPLES, ids=lambda v: type(v).__name__)
def test_every_prefix_raises_decode_error(message: Message, streamed: bool) -> None:
    data = encode(message)
    for end in range(len(data)):
        with pytest.raises(DecodeError, match=r"(message at offset \d+|empty)"):
            decode(data[:end], in_stream=streamed)


def test_v4_stream_abort_prefixes_raise_except_the_v2_form() -> None:
    """A 9-byte prefix of a version-4 STREAM ABORT is a whole version-2 one, by design."""
    data = encode(StreamAbort(5, 6, 100, T0))
    for end in range(len(data)):
        if end == 9:
            assert decode(data[:end]) == StreamAbort(5, 6, None, None)
            continue
        with pytest.raises(DecodeError):
            decode(data[:end])


@pytest.mark.parametrize(("message", "streamed"), SAMPLES, ids=lambda v: type(v).__name__)
def test_trailing_bytes_raise(message: Message, streamed: bool) -> None:
    with pytest.raises(DecodeError, match="unexpected bytes after the message"):
        decode(encode(message) + b"\0", in_stream=streamed)


def test_error_names_type_and_offset() -> None:
    data = encode(Insert(None, 16385, ("abc", "defgh")))
    with pytest.raises(
        DecodeError,
        match=r"^malformed pgoutput INSERT message at offset 21: truncated: "
        r"the message ends at byte 24",
    ):
        decode(data[:-2])
    with pytest.raises(DecodeError, match=r"unknown pgoutput message type 'Z' at offset 0"):
        decode(b"Z\x00")
    with pytest.raises(DecodeError, match="empty pgoutput message"):
        decode(b"")


def test_bad_tuple_kind_is_reported_with_its_offset() -> None:
    data = b"I\x00\x00\x00\x01N\x00\x02nx"
    with pytest.raises(DecodeError, match=r"INSERT message at offset 9: unknown tuple value kind"):
        decode(data)


def test_bad_markers() -> None:
    with pytest.raises(DecodeError, match=r"INSERT message at offset 5: expected new tuple"):
        decode(b"I\x00\x00\x00\x01K\x00\x00")
    with pytest.raises(DecodeError, match=r"UPDATE message at offset 5: expected new tuple"):
        decode(b"U\x00\x00\x00\x01X\x00\x00")
    with pytest.raises(DecodeError, match=r"DELETE message at offset 5: expected old tuple"):
        decode(b"D\x00\x00\x00\x01N\x00\x00")


def test_invalid_utf8_is_an_error_not_replaced() -> None:
    with pytest.raises(DecodeError, match=r"offset 14: text value is not valid UTF-8"):
        decode(b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x02a\xff")
    with pytest.raises(DecodeError, match=r"ORIGIN message at offset 9: string is not valid"):
        decode(b"O" + bytes(8) + b"\xc3\0")


def test_wrong_stream_flag_is_detected() -> None:
    """A caller that loses track of STREAM START/STOP gets an error, not shifted columns."""
    streamed = encode(Insert(5, 16385, ("1", "x")))
    with pytest.raises(DecodeError, match=r"decoded as outside a stream"):
        decode(streamed, in_stream=False)
    plain = encode(Insert(None, 16385, ("1", "x")))
    with pytest.raises(DecodeError, match=r"decoded as inside a stream"):
        decode(plain, in_stream=True)


def test_timestamp_out_of_range_is_a_decode_error() -> None:
    data = b"B" + struct.pack("!QqI", 1, 2**62, 3)
    with pytest.raises(DecodeError, match=r"BEGIN message.*out of range"):
        decode(data)


# -- StreamState -------------------------------------------------------------------------


def test_stream_state_tracks_stream_blocks() -> None:
    state = StreamState()
    # (message, inside a stream block when it arrives, the block's xid after it)
    sequence: list[tuple[Message, bool, int | None]] = [
        (Begin(10, T0, 700), False, None),
        (Insert(None, 1, ("a",)), False, None),
        (Commit(0, 10, 11, T0), False, None),
        (StreamStart(701, True), False, 701),
        (Relation(701, 1, "public", "t", "d", (RelationColumn(True, "id", 23, -1),)), True, 701),
        (Insert(701, 1, ("b",)), True, 701),
        (StreamStop(), True, None),
        (Insert(None, 1, ("interleaved",)), False, None),
        (StreamStart(701, False), False, 701),
        (Delete(701, 1, "K", ("b",)), True, 701),
        (StreamStop(), True, None),
        (StreamAbort(701, 702, None, None), False, None),
        (StreamCommit(701, 0, 20, 21, T0), False, None),
    ]
    for message, inside, xid in sequence:
        assert state.in_stream is inside, message
        assert state.decode(encode(message)) == message
        assert state.xid == xid
    assert not state.in_stream


# -- property test -----------------------------------------------------------------------

_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)
_times = st.integers(-(2**55), 2**57).map(pg_timestamp)  # ±1141 years, +4567 years
_names = st.text(st.characters(codec="utf-8", exclude_characters="\0"))
_namespaces = _names.filter(bool)
_values: st.SearchStrategy[Value] = st.one_of(
    st.none(),
    st.just(UNCHANGED_TOAST),
    st.text(st.characters(codec="utf-8")),
    st.binary(),
)
_rows = st.lists(_values, max_size=12).map(tuple)
_xids = st.one_of(st.none(), _u32)
_columns = st.builds(RelationColumn, st.booleans(), _names, _u32, st.integers(-(2**31), 2**31 - 1))

_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Begin, _u64, _times, _u32),
    st.builds(Commit, st.integers(0, 255), _u64, _u64, _times),
    st.builds(Origin, _u64, _names),
    st.builds(
        Relation,
        _xids,
        _u32,
        _namespaces,
        _names,
        st.sampled_from("dnfi"),
        st.lists(_columns, max_size=8).map(tuple),
    ),
    st.builds(TypeMsg, _xids, _u32, _namespaces, _names),
    st.builds(Insert, _xids, _u32, _rows),
    st.builds(Update, _xids, _u32, st.just(None), st.just(None), _rows),
    st.builds(Update, _xids, _u32, st.sampled_from("KO"), _rows, _rows),
    st.builds(Delete, _xids, _u32, st.sampled_from("KO"), _rows),
    st.builds(Truncate, _xids, st.lists(_u32, max_size=6).map(tuple), st.booleans(), st.booleans()),
    st.builds(LogicalMessage, _xids, st.booleans(), _u64, _names, st.binary()),
    st.builds(StreamStart, _u32, st.booleans()),
    st.just(StreamStop()),
    st.builds(StreamCommit, _u32, st.integers(0, 255), _u64, _u64, _times),
    st.builds(StreamAbort, _u32, _u32, st.none(), st.none()),
    st.builds(StreamAbort, _u32, _u32, _u64, _times),
    st.builds(BeginPrepare, _u64, _u64, _times, _u32, _names),
    st.builds(Prepare, st.integers(0, 255), _u64, _u64, _times, _u32, _names),
    st.builds(CommitPrepared, st.integers(0, 255), _u64, _u64, _times, _u32, _names),
    st.builds(RollbackPrepared, st.integers(0, 255), _u64, _u64, _times, _times, _u32, _names),
    st.builds(StreamPrepare, st.integers(0, 255), _u64, _u64, _times, _u32, _names),
)


@settings(max_examples=400, deadline=None)
@given(_messages)
def test_well_formed_messages_decode_to_what_was_encoded(message: Message) -> None:
    data = encode(message)
    assert decode(data, in_stream=in_stream(message)) == message


@settings(max_examples=200, deadline=None)
@given(_messages, st.data())
def test_any_truncation_raises_decode_error(message: Message, data: st.DataObject) -> None:
    raw = encode(message)
    end = data.draw(st.integers(0, len(raw) - 1))
    if isinstance(message, StreamAbort) and end == 9:
        return  # a whole version-2 STREAM ABORT, see above
    with pytest.raises(DecodeError):
        decode(raw[:end], in_stream=in_stream(message))


_rows = st.lists(
    st.one_of(st.none(), st.just(UNCHANGED_TOAST), st.text(max_size=20), st.binary(max_size=8)),
    max_size=6,
).map(tuple)


@settings(max_examples=300, deadline=None)
@given(st.builds(Insert, st.none(), st.integers(0, 2**32 - 1), _rows), st.data())
def test_decode_insert_agrees_with_decode(message: Insert, data: st.DataObject) -> None:
    """The capture loop's in-place INSERT reader: the same row, the same errors."""
    raw = encode(message)
    assert decode_insert(raw) == (message.relation_oid, message.new)
    end = data.draw(st.integers(0, len(raw) - 1))
    damaged = data.draw(st.sampled_from([raw[:end], raw + b"\x00", raw[:5] + b"X" + raw[6:]]))
    with pytest.raises(DecodeError) as from_decode:
        decode(damaged)
    if len(damaged) > 0 and damaged[0] == ord("I"):
        with pytest.raises(DecodeError) as in_place:
            decode_insert(damaged)
        assert str(in_place.value) == str(from_decode.value)
