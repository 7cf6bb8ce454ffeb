"""AMQP 0-9-1 frames of one ``basic.publish``, encoded directly.

The AMQP sink publishes a whole batch as one buffer (one write to the socket, not one
per message), so it encodes the frames itself rather than through aiormq's
``basic_publish``. pamqp, which aiormq uses, encodes the same bytes (the unit tests
compare them) but validates and dispatches per field, three times slower; a batch of
messages with the same few property shapes needs none of that.

Only what the sink sends is covered: a method frame ``basic.publish``, a content header
with the properties below, and the body split into frames of at most ``max_body`` bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

_FRAME_END: Final = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC_PUBLISH: Final = struct.pack(">HHH", 60, 40, 0)  # class, method, reserved ticket
_frame = struct.Struct(">BHI").pack
_header_start = struct.Struct(">HHQH").pack
_u32 = struct.Struct(">I").pack
_u64 = struct.Struct(">Q").pack

# Property flags, in the order the properties follow each other on the wire.
_CONTENT_TYPE = 0x8000
_CONTENT_ENCODING = 0x4000
_HEADERS = 0x2000
_DELIVERY_MODE = 0x1000
_MESSAGE_ID = 0x0080
_TIMESTAMP = 0x0040
_TYPE = 0x0020
_APP_ID = 0x0008


def short_string(value: str) -> bytes:
    """A length-prefixed string of at most 255 bytes (``ValueError`` beyond that)."""
    data = value.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"{value[:40]!r}... is {len(data)} bytes; at most 255 are allowed here")
    return bytes((len(data),)) + data


def long_string(value: str) -> bytes:
    data = value.encode("utf-8")
    return _u32(len(data)) + data


def string_table(table: Mapping[str, str]) -> bytes:
    """A field table of string values, keys in sorted order as pamqp writes them."""
    fields = b"".join(
        short_string(key) + b"S" + long_string(value) for key, value in sorted(table.items())
    )
    return _u32(len(fields)) + fields


def publish(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    mandatory: bool,
    max_body: int,
    content_type: str,
    content_encoding: str,
    headers: Mapping[str, str],
    persistent: bool,
    message_id: str,
    timestamp: datetime,
    type: str,
    app_id: str,
) -> bytes:
    """The frames of one publish, ready to write (``ValueError`` when a field
    does not fit: a routing key, message id or header name longer than 255 bytes)."""
    method = _BASIC_PUBLISH + short_string(exchange) + short_string(routing_key)
    method += b"\x01" if mandatory else b"\x00"
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)  # as pamqp reads a naive datetime
    # An empty string is left out, flag and all, as pamqp leaves it out.
    flags = _HEADERS | _DELIVERY_MODE | _TIMESTAMP
    props = [b""] * 8
    for i, flag, text in (
        (0, _CONTENT_TYPE, content_type),
        (1, _CONTENT_ENCODING, content_encoding),
        (4, _MESSAGE_ID, message_id),
        (6, _TYPE, type),
        (7, _APP_ID, app_id),
    ):
        if text:
            flags |= flag
            props[i] = short_string(text)
    props[2] = string_table(headers)
    props[3] = b"\x02" if persistent else b"\x01"
    props[5] = _u64(int(timestamp.timestamp()))
    header = _header_start(60, 0, len(body), flags) + b"".join(props)
    parts = [_frame(_METHOD, channel, len(method)), method, _FRAME_END]
    parts += [_frame(_HEADER, channel, len(header)), header, _FRAME_END]
    for start in range(0, len(body), max_body):
        chunk = body[start : start + max_body]
        parts += [_frame(_BODY, channel, len(chunk)), chunk, _FRAME_END]
    return b"".join(parts)
