"""Decoder for the messages of PostgreSQL's built-in ``pgoutput`` logical decoding plugin.

The logical source receives one pgoutput message per CopyData frame (or per row of
``pg_logical_slot_*_binary_changes``) and hands its bytes to :func:`decode`, which
returns one frozen dataclass per message. This module knows the wire format only: it
keeps no relation cache and no transaction state, so that it can be tested byte for
byte and reused by anything that reads pgoutput.

Supported: protocol version 1 (BEGIN, COMMIT, ORIGIN, RELATION, TYPE, INSERT, UPDATE,
DELETE, TRUNCATE, MESSAGE), version 2 (streaming of in-progress transactions: STREAM
START/STOP/COMMIT/ABORT and the leading xid of data messages inside a stream), version 3
(two-phase commit: BEGIN PREPARE, PREPARE, COMMIT PREPARED, ROLLBACK PREPARED, STREAM
PREPARE) and version 4 (STREAM ABORT carrying the abort LSN and time).

Why it is written the way it is: decoding INSERTs is the capture hot path (100k+ rows/s),
so it uses precompiled :class:`struct.Struct` objects with ``unpack_from`` at offsets, a
dispatch table on the first byte, and a single loop over the columns of a tuple. Bounds
are not checked before every read; instead ``struct.error``/``IndexError`` are caught
(``try`` costs nothing in Python 3.11 until something is raised) and turned into a
:class:`~pgherald.errors.DecodeError` naming the message type and the offset, plus one
explicit check per value, because slicing past the end of ``bytes`` does not fail.
Measured (``bench/bench_pgoutput.py``): about 300k six-column INSERTs/s on one core of
the development machine, as fast as a naive ``io.BytesIO`` decoder that checks nothing;
the interpreter, not the parsing, is the limit, and about a fifth of the time goes into
building the frozen dataclass.

Whether a data message carries a leading xid is not visible in the message itself: it
does exactly between STREAM START and STREAM STOP. The caller says so with ``in_stream``;
:class:`StreamState` tracks it for callers that feed every message through one place.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, TypeAlias

from pgherald.errors import DecodeError
from pgherald.events import UNCHANGED_TOAST, Unchanged

__all__ = [
    "PG_EPOCH",
    "Begin",
    "BeginPrepare",
    "Commit",
    "CommitPrepared",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Prepare",
    "Relation",
    "RelationColumn",
    "RollbackPrepared",
    "Row",
    "StreamAbort",
    "StreamCommit",
    "StreamPrepare",
    "StreamStart",
    "StreamState",
    "StreamStop",
    "Truncate",
    "TypeMsg",
    "Update",
    "Value",
    "decode",
    "decode_insert",
    "pg_timestamp",
]

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""PostgreSQL timestamps count microseconds from here."""

_ONE_US: Final = timedelta(microseconds=1)

Value: TypeAlias = str | bytes | Unchanged | None
"""One column of a tuple: text (``'t'``), binary (``'b'``), NULL (``'n'``) or unchanged TOAST."""

Row: TypeAlias = tuple[Value, ...]


def pg_timestamp(
    us: int, epoch: datetime = PG_EPOCH, delta: type[timedelta] = timedelta
) -> datetime:
    """Converts PostgreSQL's microseconds since 2000-01-01 UTC to an aware ``datetime``.

    Once per transaction on the capture path: positional arguments and locals save a
    fifth of its cost; callers never pass ``epoch`` or ``delta``."""
    return epoch + delta(0, 0, us)


def _us(moment: datetime) -> int:
    return (moment - PG_EPOCH) // _ONE_US


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """``B``: a transaction starts; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_time: datetime
    xid: int

    @property
    def commit_time_us(self) -> int:
        """The commit time as sent: microseconds since 2000-01-01 UTC."""
        return _us(self.commit_time)


@dataclass(frozen=True, slots=True)
class Commit:
    """``C``: the transaction begun by the last BEGIN committed.

    ``end_lsn`` is the position to confirm to the server once everything is stored.
    """

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime

    @property
    def commit_time_us(self) -> int:
        return _us(self.commit_time)


@dataclass(frozen=True, slots=True)
class Origin:
    """``O``: the transaction was replayed from another node (replication origin ``name``)."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    """One column of a RELATION message; ``is_key`` means part of the replica identity."""

    is_key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(frozen=True, slots=True)
class Relation:
    """``R``: the shape of a table, sent before its first change and after every change of it.

    ``namespace`` is the schema name; the protocol's empty string for ``pg_catalog`` is
    given back as ``"pg_catalog"``. ``replica_identity`` is ``pg_class.relreplident``:
    ``'d'`` default (primary key), ``'n'`` nothing, ``'f'`` full, ``'i'`` index.
    """

    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class TypeMsg:
    """``Y``: the name of a non-built-in type used by a column of a following RELATION."""

    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``I``: a new row of relation ``relation_oid``, in the column order of its RELATION."""

    xid: int | None
    relation_oid: int
    new: Row


@dataclass(frozen=True, slots=True)
class Update:
    """``U``: a row changed.

    ``old_kind`` is ``'K'`` when ``old`` holds only the replica identity columns (the
    others are ``None``; sent when the key changed), ``'O'`` when ``old`` is the whole old
    row (REPLICA IDENTITY FULL), ``None`` when no old row was sent. Unchanged TOAST values
    of ``new`` are ``UNCHANGED_TOAST``.
    """

    xid: int | None
    relation_oid: int
    old_kind: str | None
    old: Row | None
    new: Row


@dataclass(frozen=True, slots=True)
class Delete:
    """``D``: a row was deleted; ``old`` is its key (``'K'``) or whole row (``'O'``)."""

    xid: int | None
    relation_oid: int
    old_kind: str
    old: Row


@dataclass(frozen=True, slots=True)
class Truncate:
    """``T``: the relations were truncated together, in one statement."""

    xid: int | None
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """``M``: written by ``pg_logical_emit_message`` (only sent with ``messages 'true'``)."""

    xid: int | None
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamStart:
    """``S``: a block of changes of the still running transaction ``xid`` follows."""

    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """``E``: the block that the last STREAM START opened ends."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    """``c``: the streamed transaction ``xid`` committed: its streamed changes count."""

    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime

    @property
    def commit_time_us(self) -> int:
        return _us(self.commit_time)


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """``A``: the streamed (sub)transaction ``subxid`` of ``xid`` aborted: drop its changes.

    ``subxid == xid`` means the whole transaction aborted. ``abort_lsn``/``abort_time``
    are sent by protocol version 4 with parallel streaming, else they are ``None``.
    """

    xid: int
    subxid: int
    abort_lsn: int | None
    abort_time: datetime | None


@dataclass(frozen=True, slots=True)
class BeginPrepare:
    """``b`` (protocol 3, two-phase): a transaction prepared as ``gid`` starts."""

    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class Prepare:
    """``P`` (protocol 3): the transaction begun by BEGIN PREPARE was prepared as ``gid``."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class CommitPrepared:
    """``K`` (protocol 3): the prepared transaction ``gid`` committed."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class RollbackPrepared:
    """``r`` (protocol 3): the prepared transaction ``gid`` was rolled back."""

    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_time: datetime
    rollback_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class StreamPrepare:
    """``p`` (protocol 3): the streamed transaction ``xid`` was prepared as ``gid``."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMsg
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)


# -- wire primitives ------------------------------------------------------------------------

_U8: Final = struct.Struct("!B")
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_I32: Final = struct.Struct("!i")
_U32_U32: Final = struct.Struct("!II")
_U64: Final = struct.Struct("!Q")
_BEGIN: Final = struct.Struct("!QqI")  # final_lsn, commit_time, xid
_COMMIT: Final = struct.Struct("!BQQq")  # flags, commit_lsn, end_lsn, commit_time
_STREAM_START: Final = struct.Struct("!IB")
_STREAM_COMMIT: Final = struct.Struct("!IBQQq")
_STREAM_ABORT_V4: Final = struct.Struct("!IIQq")
_BEGIN_PREPARE: Final = struct.Struct("!QQqI")
_PREPARE: Final = struct.Struct("!BQQqI")  # also COMMIT PREPARED and STREAM PREPARE
_ROLLBACK_PREPARED: Final = struct.Struct("!BQQqqI")
_TRUNCATE_HEAD: Final = struct.Struct("!IB")
_MESSAGE_HEAD: Final = struct.Struct("!BQ")
_COLUMN_TAIL: Final = struct.Struct("!Ii")  # type oid, type modifier

_NAMES: Final[dict[int, str]] = {
    ord("B"): "BEGIN",
    ord("C"): "COMMIT",
    ord("O"): "ORIGIN",
    ord("R"): "RELATION",
    ord("Y"): "TYPE",
    ord("I"): "INSERT",
    ord("U"): "UPDATE",
    ord("D"): "DELETE",
    ord("T"): "TRUNCATE",
    ord("M"): "MESSAGE",
    ord("S"): "STREAM START",
    ord("E"): "STREAM STOP",
    ord("c"): "STREAM COMMIT",
    ord("A"): "STREAM ABORT",
    ord("b"): "BEGIN PREPARE",
    ord("P"): "PREPARE",
    ord("K"): "COMMIT PREPARED",
    ord("r"): "ROLLBACK PREPARED",
    ord("p"): "STREAM PREPARE",
}


class _Malformed(Exception):
    """Raised inside the decoders with the offset; ``decode`` adds the message's name."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason, offset)
        self.reason = reason
        self.offset = offset


def _truncated(buf: bytes, offset: int) -> _Malformed:
    return _Malformed(f"truncated: the message ends at byte {len(buf)}", offset)


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    """Reads a NUL-terminated UTF-8 string at ``pos``; returns it and the offset after it."""
    end = buf.find(b"\0", pos)
    if end < 0:
        raise _Malformed("unterminated string", pos)
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as e:
        raise _Malformed(f"string is not valid UTF-8 ({e.reason})", pos + e.start) from None


def _tuple(
    buf: bytes,
    pos: int,
    unpack_u16: Callable[[bytes, int], tuple[int]] = _U16.unpack_from,
    unpack_u32: Callable[[bytes, int], tuple[int]] = _U32.unpack_from,
    unchanged: Unchanged = UNCHANGED_TOAST,
) -> tuple[Row, int]:
    """Reads TupleData at ``pos``: Int16 column count, then one kind byte (+ value) each.

    This is the innermost loop of capture, hence the inlined branches ordered by
    frequency, the one bounds check per value and the default arguments (locals are
    faster to reach than globals); callers never pass them.
    """
    size = len(buf)
    try:
        (count,) = unpack_u16(buf, pos)
        pos += 2
        values: list[Value] = []
        append = values.append
        for _ in range(count):
            kind = buf[pos]
            if kind == 116:  # 't': Int32 length, then text
                (length,) = unpack_u32(buf, pos + 1)
                pos += 5
                end = pos + length
                if end > size:
                    raise _truncated(buf, pos)
                append(buf[pos:end].decode())
                pos = end
            elif kind == 110:  # 'n': NULL
                append(None)
                pos += 1
            elif kind == 117:  # 'u': unchanged TOASTed value
                append(unchanged)
                pos += 1
            elif kind == 98:  # 'b': Int32 length, then the type's binary form
                (length,) = unpack_u32(buf, pos + 1)
                pos += 5
                end = pos + length
                if end > size:
                    raise _truncated(buf, pos)
                append(buf[pos:end])
                pos = end
            else:
                raise _Malformed(f"unknown tuple value kind {kind!r} ({chr(kind)!r})", pos)
    except (struct.error, IndexError):
        raise _truncated(buf, pos) from None
    except UnicodeDecodeError as e:
        raise _Malformed(f"text value is not valid UTF-8 ({e.reason})", pos + e.start) from None
    return tuple(values), pos


def _xid_and_oid(buf: bytes, in_stream: bool) -> tuple[int | None, int, int]:
    if in_stream:
        xid, oid = _U32_U32.unpack_from(buf, 1)
        return xid, oid, 9
    return None, _U32.unpack_from(buf, 1)[0], 5


def _leading_xid(buf: bytes, in_stream: bool) -> tuple[int | None, int]:
    if in_stream:
        return _U32.unpack_from(buf, 1)[0], 5
    return None, 1


def _expect(buf: bytes, pos: int, wanted: bytes, what: str) -> None:
    got = buf[pos]
    if got not in wanted:
        expected = " or ".join(repr(chr(c)) for c in wanted)
        raise _Malformed(f"expected {what} marker {expected}, got {chr(got)!r}", pos)


# -- one decoder per message type: (buf, in_stream) -> (message, end offset) ---------------

_Decoded: TypeAlias = tuple[Message, int]


def _begin(buf: bytes, in_stream: bool) -> _Decoded:
    final_lsn, time_us, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(final_lsn, pg_timestamp(time_us), xid), 1 + _BEGIN.size


def _commit(buf: bytes, in_stream: bool) -> _Decoded:
    flags, commit_lsn, end_lsn, time_us = _COMMIT.unpack_from(buf, 1)
    return Commit(flags, commit_lsn, end_lsn, pg_timestamp(time_us)), 1 + _COMMIT.size


def _origin(buf: bytes, in_stream: bool) -> _Decoded:
    (lsn,) = _U64.unpack_from(buf, 1)
    name, pos = _cstring(buf, 9)
    return Origin(lsn, name), pos


def _namespace(buf: bytes, pos: int) -> tuple[str, int]:
    namespace, pos = _cstring(buf, pos)
    return namespace or "pg_catalog", pos


def _relation(buf: bytes, in_stream: bool) -> _Decoded:
    xid, oid, pos = _xid_and_oid(buf, in_stream)
    namespace, pos = _namespace(buf, pos)
    name, pos = _cstring(buf, pos)
    identity = chr(buf[pos])
    (count,) = _U16.unpack_from(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column_name, pos = _cstring(buf, pos + 1)
        type_oid, type_modifier = _COLUMN_TAIL.unpack_from(buf, pos)
        pos += 8
        columns.append(RelationColumn(bool(flags & 1), column_name, type_oid, type_modifier))
    return Relation(xid, oid, namespace, name, identity, tuple(columns)), pos


def _type(buf: bytes, in_stream: bool) -> _Decoded:
    xid, oid, pos = _xid_and_oid(buf, in_stream)
    namespace, pos = _namespace(buf, pos)
    name, pos = _cstring(buf, pos)
    return TypeMsg(xid, oid, namespace, name), pos


def _insert(buf: bytes, in_stream: bool) -> _Decoded:
    if in_stream:
        xid, oid = _U32_U32.unpack_from(buf, 1)
        pos = 9
    else:
        xid = None
        (oid,) = _U32.unpack_from(buf, 1)
        pos = 5
    if buf[pos] != 78:  # 'N'
        _expect(buf, pos, b"N", "new tuple")
    new, pos = _tuple(buf, pos + 1)
    return Insert(xid, oid, new), pos


def decode_insert(buf: bytes) -> tuple[int, Row]:
    """An INSERT outside a stream as ``(relation oid, new row)``, checked as :func:`decode`
    checks it, without building an :class:`Insert`: the capture hot path (one per row)."""
    try:
        (oid,) = _U32.unpack_from(buf, 1)
        if buf[5] != 78:  # 'N'
            _expect(buf, 5, b"N", "new tuple")
        new, end = _tuple(buf, 6)
    except _Malformed as e:
        raise _error(buf, e.reason, e.offset, False) from None
    except (struct.error, IndexError):
        raise _error(
            buf, f"truncated: the message ends at byte {len(buf)}", len(buf), False
        ) from None
    if end != len(buf):
        raise _error(buf, f"{len(buf) - end} unexpected bytes after the message", end, False)
    return oid, new


def _update(buf: bytes, in_stream: bool) -> _Decoded:
    xid, oid, pos = _xid_and_oid(buf, in_stream)
    marker = buf[pos]
    old_kind: str | None = None
    old: Row | None = None
    if marker == 75 or marker == 79:  # 'K' key columns, 'O' whole old row
        old_kind = chr(marker)
        old, pos = _tuple(buf, pos + 1)
    _expect(buf, pos, b"N", "new tuple")
    new, pos = _tuple(buf, pos + 1)
    return Update(xid, oid, old_kind, old, new), pos


def _delete(buf: bytes, in_stream: bool) -> _Decoded:
    xid, oid, pos = _xid_and_oid(buf, in_stream)
    _expect(buf, pos, b"KO", "old tuple")
    old_kind = chr(buf[pos])
    old, pos = _tuple(buf, pos + 1)
    return Delete(xid, oid, old_kind, old), pos


def _truncate(buf: bytes, in_stream: bool) -> _Decoded:
    xid, pos = _leading_xid(buf, in_stream)
    count, flags = _TRUNCATE_HEAD.unpack_from(buf, pos)
    pos += _TRUNCATE_HEAD.size
    end = pos + 4 * count
    if end > len(buf):
        raise _truncated(buf, pos)
    oids = struct.unpack_from(f"!{count}I", buf, pos)
    return Truncate(xid, oids, bool(flags & 1), bool(flags & 2)), end


def _message(buf: bytes, in_stream: bool) -> _Decoded:
    xid, pos = _leading_xid(buf, in_stream)
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, pos)
    prefix, pos = _cstring(buf, pos + _MESSAGE_HEAD.size)
    (length,) = _U32.unpack_from(buf, pos)
    pos += 4
    end = pos + length
    if end > len(buf):
        raise _truncated(buf, pos)
    return LogicalMessage(xid, bool(flags & 1), lsn, prefix, buf[pos:end]), end


def _stream_start(buf: bytes, in_stream: bool) -> _Decoded:
    xid, first = _STREAM_START.unpack_from(buf, 1)
    return StreamStart(xid, first == 1), 1 + _STREAM_START.size


def _stream_stop(buf: bytes, in_stream: bool) -> _Decoded:
    return StreamStop(), 1


def _stream_commit(buf: bytes, in_stream: bool) -> _Decoded:
    xid, flags, commit_lsn, end_lsn, time_us = _STREAM_COMMIT.unpack_from(buf, 1)
    return (
        StreamCommit(xid, flags, commit_lsn, end_lsn, pg_timestamp(time_us)),
        1 + _STREAM_COMMIT.size,
    )


def _stream_abort(buf: bytes, in_stream: bool) -> _Decoded:
    # Protocol 4 with parallel streaming appends the abort LSN and time. Nothing else in
    # the message says which variant it is, but a message is always exactly one frame,
    # so its length does.
    if len(buf) == 1 + _STREAM_ABORT_V4.size:
        xid, subxid, lsn, time_us = _STREAM_ABORT_V4.unpack_from(buf, 1)
        return StreamAbort(xid, subxid, lsn, pg_timestamp(time_us)), len(buf)
    xid, subxid = _U32_U32.unpack_from(buf, 1)
    return StreamAbort(xid, subxid, None, None), 1 + _U32_U32.size


def _begin_prepare(buf: bytes, in_stream: bool) -> _Decoded:
    prepare_lsn, end_lsn, time_us, xid = _BEGIN_PREPARE.unpack_from(buf, 1)
    gid, pos = _cstring(buf, 1 + _BEGIN_PREPARE.size)
    return BeginPrepare(prepare_lsn, end_lsn, pg_timestamp(time_us), xid, gid), pos


def _prepare_fields(buf: bytes) -> tuple[int, int, int, datetime, int, str, int]:
    flags, lsn, end_lsn, time_us, xid = _PREPARE.unpack_from(buf, 1)
    gid, pos = _cstring(buf, 1 + _PREPARE.size)
    return flags, lsn, end_lsn, pg_timestamp(time_us), xid, gid, pos


def _prepare(buf: bytes, in_stream: bool) -> _Decoded:
    flags, lsn, end_lsn, moment, xid, gid, pos = _prepare_fields(buf)
    return Prepare(flags, lsn, end_lsn, moment, xid, gid), pos


def _commit_prepared(buf: bytes, in_stream: bool) -> _Decoded:
    flags, lsn, end_lsn, moment, xid, gid, pos = _prepare_fields(buf)
    return CommitPrepared(flags, lsn, end_lsn, moment, xid, gid), pos


def _stream_prepare(buf: bytes, in_stream: bool) -> _Decoded:
    flags, lsn, end_lsn, moment, xid, gid, pos = _prepare_fields(buf)
    return StreamPrepare(flags, lsn, end_lsn, moment, xid, gid), pos


def _rollback_prepared(buf: bytes, in_stream: bool) -> _Decoded:
    flags, prepare_end, rollback_end, prepare_us, rollback_us, xid = _ROLLBACK_PREPARED.unpack_from(
        buf, 1
    )
    gid, pos = _cstring(buf, 1 + _ROLLBACK_PREPARED.size)
    return (
        RollbackPrepared(
            flags,
            prepare_end,
            rollback_end,
            pg_timestamp(prepare_us),
            pg_timestamp(rollback_us),
            xid,
            gid,
        ),
        pos,
    )


_DECODERS: Final[dict[int, Callable[[bytes, bool], _Decoded]]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("S"): _stream_start,
    ord("E"): _stream_stop,
    ord("c"): _stream_commit,
    ord("A"): _stream_abort,
    ord("b"): _begin_prepare,
    ord("P"): _prepare,
    ord("K"): _commit_prepared,
    ord("r"): _rollback_prepared,
    ord("p"): _stream_prepare,
}


def decode(data: bytes | bytearray | memoryview, in_stream: bool = False) -> Message:
    """Decodes one pgoutput message (one CopyData payload, without the XLogData header).

    ``in_stream`` must be true exactly between STREAM START and STREAM STOP, where
    RELATION, TYPE, INSERT, UPDATE, DELETE, TRUNCATE and MESSAGE start with the xid of
    the streamed transaction. Raises :class:`DecodeError` for anything malformed:
    truncated, unknown type, bad tuple kind, invalid UTF-8 or bytes left over.
    """
    buf = data if type(data) is bytes else bytes(data)
    if not buf:
        raise DecodeError("empty pgoutput message: expected at least a message type byte")
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        raise DecodeError(
            f"unknown pgoutput message type {chr(buf[0])!r} at offset 0"
            " (is the slot's output plugin pgoutput, and the protocol version one we know?)"
        )
    try:
        message, end = decoder(buf, in_stream)
    except _Malformed as e:
        raise _error(buf, e.reason, e.offset, in_stream) from None
    except (struct.error, IndexError):
        raise _error(
            buf, f"truncated: the message ends at byte {len(buf)}", len(buf), in_stream
        ) from None
    except OverflowError as e:  # a timestamp outside datetime's range
        raise _error(buf, f"value out of range ({e})", 1, in_stream) from None
    if end != len(buf):
        raise _error(buf, f"{len(buf) - end} unexpected bytes after the message", end, in_stream)
    return message


def _error(buf: bytes, reason: str, offset: int, in_stream: bool) -> DecodeError:
    name = _NAMES[buf[0]]
    hint = ""
    if buf[0] in _XID_TYPES:
        hint = " (decoded as inside a stream)" if in_stream else " (decoded as outside a stream)"
    return DecodeError(f"malformed pgoutput {name} message at offset {offset}: {reason}{hint}")


_XID_TYPES: Final = frozenset(ord(c) for c in "RYIUDTM")


class StreamState:
    """Feeds messages to :func:`decode`, knowing whether they are inside a stream.

    Between STREAM START and STREAM STOP (protocol 2+) data messages carry the xid of
    the streamed transaction; outside they do not. Call :meth:`decode` for every message
    in order; ``xid`` is the transaction of the open stream block, or ``None``.
    """

    __slots__ = ("in_stream", "xid")

    def __init__(self) -> None:
        self.in_stream = False
        self.xid: int | None = None

    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        message = decode(data, self.in_stream)
        if isinstance(message, StreamStart):
            self.in_stream = True
            self.xid = message.xid
        elif isinstance(message, StreamStop):
            self.in_stream = False
            self.xid = None
        return message
