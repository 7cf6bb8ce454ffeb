"""The AMQP sink's own frame encoding, byte for byte against pamqp's (what aiormq sends)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from pgherald.sinks import amqp_frames


def pamqp_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    mandatory: bool,
    max_body: int,
    content_type: str,
    content_encoding: str,
    headers: dict[str, str],
    persistent: bool,
    message_id: str,
    timestamp: datetime,
    type: str,
    app_id: str,
) -> bytes:
    properties = commands.Basic.Properties(
        content_type=content_type,
        content_encoding=content_encoding,
        headers=dict[str, Any](headers),
        delivery_mode=2 if persistent else 1,
        message_id=message_id,
        timestamp=timestamp,
        message_type=type,
        app_id=app_id,
    )
    frames: list[Any] = [
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    frames += [ContentBody(body[i : i + max_body]) for i in range(0, len(body), max_body)]
    return b"".join(pamqp.frame.marshal(f, channel) for f in frames)


def fields(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "channel": 1,
        "exchange": "pgherald.changes",
        "routing_key": "public.orders.insert",
        "body": b'{"op":"insert","new":{"id":1}}',
        "mandatory": True,
        "max_body": 131064,
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": {
            "Idempotency-Key": "L/0000000001A2B3C4/1",
            "pgherald-watch": "orders",
            "pgherald-operation": "insert",
            "pgherald-table": "public.orders",
        },
        "persistent": True,
        "message_id": "L/0000000001A2B3C4/1",
        "timestamp": datetime(2024, 5, 1, 12, 0, 1, 250000, tzinfo=UTC),
        "type": "insert",
        "app_id": "pgherald",
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"mandatory": False, "persistent": False, "channel": 7},
        {"body": b"x" * 100, "max_body": 30},  # split into frames, the last one short
        {"body": b"x" * 90, "max_body": 30},  # split evenly
        {"body": b""},  # no body frame at all
        {"content_type": "application/cloudevents+json"},
        {
            "routing_key": "s\u00e9.t\u00e4ble.delete",
            "headers": {"pgherald-watch": "Z\u00f6e \U0001f600"},
        },
        {"timestamp": datetime(2024, 5, 1, 12, 0, 1)},  # naive: read as UTC
        {"timestamp": datetime(2024, 5, 1, 12, 0, 1, tzinfo=timezone(timedelta(hours=5)))},
        {"headers": {}},
    ],
)
def test_the_frames_are_pamqps(changes: dict[str, Any]) -> None:
    args = fields(**changes)
    assert amqp_frames.publish(**args) == pamqp_publish(**args)


@given(
    routing_key=st.text(max_size=60),
    body=st.binary(max_size=300),
    max_body=st.integers(min_value=1, max_value=200),
    headers=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=50), max_size=5),
    message_id=st.text(max_size=60),
)
def test_any_publish_is_encoded_as_pamqp_does(
    routing_key: str, body: bytes, max_body: int, headers: dict[str, str], message_id: str
) -> None:
    args = fields(
        routing_key=routing_key,
        body=body,
        max_body=max_body,
        headers=headers,
        message_id=message_id,
    )
    assert amqp_frames.publish(**args) == pamqp_publish(**args)


@pytest.mark.parametrize("field", ["routing_key", "message_id", "exchange"])
def test_a_short_string_over_255_bytes_is_a_value_error(field: str) -> None:
    with pytest.raises(ValueError, match="at most 255"):
        amqp_frames.publish(**fields(**{field: "\u00e9" * 128}))  # 256 bytes
    amqp_frames.publish(**fields(**{field: "e" * 255}))  # fits
