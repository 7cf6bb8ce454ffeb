"""Recording what became of delivering an event to a sink.

The delivery engine (claims, retries, dead letters) builds on this table; in-process
consumers such as the Python API's callbacks record here what they could not deliver,
so a failure is visible in the store rather than only in a log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, LiteralString

import psycopg
from psycopg.types.json import Jsonb

from pgherald.db.sqlfiles import named_query
from pgherald.store.session import in_schema

Status = Literal["pending", "delivering", "delivered", "failed", "dead"]


@dataclass(frozen=True)
class DeliveryOutcome:
    event_id: int
    sink: str
    status: str
    attempts: int
    last_error: str | None


def ensure_sink(
    conn: psycopg.Connection[Any], schema: str, name: str, kind: str, config: dict[str, Any]
) -> None:
    """Registers a sink by name unless it exists (its settings are then left alone)."""
    with in_schema(conn, schema):
        added = conn.execute(
            named_query("deliveries.sql", "ensure_sink"),
            {"name": name, "kind": kind, "config": Jsonb(config)},
        ).fetchone()
        if added is not None:
            notify_sinks_changed(conn, schema, name)


def record_outcome(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    event_id: int,
    sink: str,
    status: Status,
    attempts: int,
    error: str | None = None,
) -> None:
    with in_schema(conn, schema):
        conn.execute(
            named_query("deliveries.sql", "record_outcome"),
            {
                "event_id": event_id,
                "sink": sink,
                "status": status,
                "attempts": attempts,
                "error": error,
            },
        )


def list_outcomes(
    conn: psycopg.Connection[Any], schema: str, sink: str | None = None
) -> list[DeliveryOutcome]:
    with in_schema(conn, schema):
        rows = conn.execute(named_query("deliveries.sql", "list_deliveries"), {"sink": sink})
        return [DeliveryOutcome(int(r[0]), r[1], r[2], int(r[3]), r[4]) for r in rows]


# -- sinks and subscriptions ---------------------------------------------------------------


@dataclass(frozen=True)
class StoredSink:
    name: str
    kind: str
    format: str
    options: dict[str, Any]
    strictly_ordered: bool
    max_attempts: int
    enabled: bool
    created_at: datetime | None = None


@dataclass(frozen=True)
class StoredSubscription:
    id: int
    sink: str
    watch: str
    filter: dict[str, Any]
    ignore_columns: tuple[str, ...]
    strictly_ordered: bool
    enabled: bool
    from_event: int = 0
    """The log id when it was made: it gets the events after it."""


def _channel(schema: str, what: str) -> str:
    channel = f"{schema}_{what}"
    if len(channel.encode("utf-8")) < 64:
        return channel
    return f"pgherald_{what}_" + hashlib.sha256(schema.encode("utf-8")).hexdigest()[:16]


def deliveries_channel(schema: str) -> str:
    """The NOTIFY channel on which the router announces new deliveries to the workers."""
    return _channel(schema, "deliveries")


def sinks_channel(schema: str) -> str:
    """The NOTIFY channel on which the store functions that change sinks say so, in their
    transaction: running delivery engines read the sinks again (``DeliveryEngine``)."""
    return _channel(schema, "sinks")


_PAYLOAD_LIMIT: Final = 7000
"""Bytes of a NOTIFY payload we fill at most (PostgreSQL takes up to 7999)."""
ALL_SINKS: Final = "*"


def wake_payload(sinks: Iterable[str]) -> str:
    """The payload of a wake-up on ``deliveries_channel``: the sinks that have new work, as
    a JSON array, or ``*`` (every sink) when the list would not fit."""
    text = json.dumps(sorted(set(sinks)), ensure_ascii=False)
    return text if len(text.encode("utf-8")) <= _PAYLOAD_LIMIT else ALL_SINKS


def woken_sinks(payload: str) -> frozenset[str] | None:
    """The sinks a wake-up names; None for every sink (``*``, or a payload that is not a
    list of names: an older router sent the number of deliveries)."""
    if not payload.startswith("["):
        return None
    try:
        names = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return frozenset(names)


def notify_deliveries(conn: psycopg.Connection[Any], schema: str, sinks: Iterable[str]) -> None:
    """Wakes the delivery workers of ``sinks`` when the caller's transaction commits."""
    names = set(sinks)
    if names:
        conn.execute("SELECT pg_notify(%s, %s)", (deliveries_channel(schema), wake_payload(names)))


def notify_sinks_changed(conn: psycopg.Connection[Any], schema: str, name: str = "") -> None:
    """Tells running delivery engines that sinks changed, when the caller's transaction
    commits (the payload names the sink, for people watching; engines read them all)."""
    payload = name if len(name.encode("utf-8")) <= _PAYLOAD_LIMIT else ""
    conn.execute("SELECT pg_notify(%s, %s)", (sinks_channel(schema), payload))


def _q(name: str) -> LiteralString:
    return named_query("deliveries.sql", name)


def _sink_params(sink: StoredSink) -> dict[str, Any]:
    return {
        "name": sink.name,
        "kind": sink.kind,
        "format": sink.format,
        "config": Jsonb(sink.options),
        "strictly_ordered": sink.strictly_ordered,
        "max_attempts": sink.max_attempts,
    }


def add_sink(conn: psycopg.Connection[Any], schema: str, sink: StoredSink) -> bool:
    """Stores a sink; False when one of that name exists (nothing is changed then)."""
    with in_schema(conn, schema):
        row = conn.execute(_q("add_sink"), _sink_params(sink)).fetchone()
        if row is not None:
            notify_sinks_changed(conn, schema, sink.name)
    return row is not None


def list_sinks(conn: psycopg.Connection[Any], schema: str) -> list[StoredSink]:
    with in_schema(conn, schema):
        rows = conn.execute(_q("list_sinks")).fetchall()
    return [StoredSink(r[0], r[1], r[2], dict(r[3] or {}), r[4], r[5], r[6], r[7]) for r in rows]


def remove_sink(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    """Removes a sink (its subscriptions and deliveries go with it); False when there is
    none. A delivery engine sending a batch to it holds that batch's rows: this waits for
    the batch to be recorded."""
    with in_schema(conn, schema):
        removed = conn.execute(_q("remove_sink"), {"name": name}).fetchone() is not None
        if removed:
            notify_sinks_changed(conn, schema, name)
    return removed


def update_sink(conn: psycopg.Connection[Any], schema: str, sink: StoredSink) -> bool:
    """Replaces a sink's definition and enabled flag; False when there is no such sink."""
    with in_schema(conn, schema):
        row = conn.execute(
            _q("update_sink"), {**_sink_params(sink), "enabled": sink.enabled}
        ).fetchone()
        if row is not None:
            notify_sinks_changed(conn, schema, sink.name)
    return row is not None


def subscribe(
    conn: psycopg.Connection[Any],
    schema: str,
    sink: str,
    watch: str,
    filter: Mapping[str, Any],
    ignore_columns: Sequence[str],
) -> int:
    """Subscribes (or re-subscribes, replacing the filter); returns the subscription id."""
    with in_schema(conn, schema):
        row = conn.execute(
            _q("subscribe"),
            {
                "sink": sink,
                "watch": watch,
                "filter": Jsonb(dict(filter)),
                "ignore_columns": list(ignore_columns),
            },
        ).fetchone()
    assert row is not None
    return int(row[0])


def unsubscribe(conn: psycopg.Connection[Any], schema: str, sink: str, watch: str) -> bool:
    with in_schema(conn, schema):
        return (
            conn.execute(_q("unsubscribe"), {"sink": sink, "watch": watch}).fetchone() is not None
        )


def list_subscriptions(conn: psycopg.Connection[Any], schema: str) -> list[StoredSubscription]:
    with in_schema(conn, schema):
        rows = conn.execute(_q("list_subscriptions")).fetchall()
    return [
        StoredSubscription(
            int(r[0]), r[1], r[2], dict(r[3] or {}), tuple(r[4] or ()), r[5], r[6], int(r[7])
        )
        for r in rows
    ]


# -- the delivery queue ------------------------------------------------------------------------


def insert_deliveries(
    conn: psycopg.Connection[Any],
    schema: str,
    rows: Sequence[tuple[int, str, str]],
) -> None:
    """``(log id, sink, order key)`` rows, in one statement; duplicates are ignored."""
    if not rows:
        return
    events, sinks, keys = (list(c) for c in zip(*rows, strict=True))
    with in_schema(conn, schema):
        conn.execute(_q("insert_deliveries"), {"events": events, "sinks": sinks, "keys": keys})


@dataclass(frozen=True, slots=True)
class RoutingRow:
    """An event as the router sees it when no subscription tests row values."""

    id: int
    watch: str
    op: str
    key: dict[str, Any]
    """Key column -> the key's text, as ``ChangeLog`` gives an event's key."""
    changed: tuple[str, ...]


def routing_events(
    conn: psycopg.Connection[Any], schema: str, after_id: int, limit: int
) -> list[RoutingRow]:
    """Events after log id ``after_id`` in log order, without their rows."""
    with in_schema(conn, schema):
        rows = conn.execute(_q("routing_events"), {"after_id": after_id, "limit": limit})
        return [
            RoutingRow(
                int(r[0]),
                r[1],
                r[2],
                dict(zip(r[4], json.loads(r[3]), strict=True)) if r[3] is not None else {},
                tuple(r[5] or ()),
            )
            for r in rows.fetchall()
        ]


@dataclass(frozen=True)
class Claimed:
    """A claimed delivery: its id, its attempts so far, and the event row (as read_events)."""

    id: int
    attempts: int
    event_row: tuple[Any, ...]


def claim(
    conn: psycopg.Connection[Any], schema: str, sink: str, limit: int, strict: bool
) -> list[Claimed]:
    """Locks a batch of due deliveries in the caller's transaction (see the SQL's notes)."""
    with in_schema(conn, schema):
        rows = conn.execute(
            _q("claim_strict" if strict else "claim_deliveries"), {"sink": sink, "limit": limit}
        ).fetchall()
    return [Claimed(int(r[0]), int(r[1]), tuple(r[2:])) for r in rows]


def due_sinks(conn: psycopg.Connection[Any], schema: str, sinks: Mapping[str, bool]) -> set[str]:
    """Which of ``sinks`` (name -> strictly ordered) have a delivery a claim would take now."""
    if not sinks:
        return set()
    names = list(sinks)
    with in_schema(conn, schema):
        rows = conn.execute(
            _q("due_sinks"), {"sinks": names, "strict": [sinks[n] for n in names]}
        ).fetchall()
    return {str(r[0]) for r in rows}


def next_due(conn: psycopg.Connection[Any], schema: str, sink: str) -> float | None:
    """Seconds until the sink's next delivery that waits for its time (a retry) is due."""
    with in_schema(conn, schema):
        row = conn.execute(_q("next_due"), {"sink": sink}).fetchone()
    return float(row[0]) if row is not None and row[0] is not None else None


def record(
    conn: psycopg.Connection[Any],
    schema: str,
    outcomes: Sequence[tuple[int, Status, float, str | None]],
) -> None:
    """``(delivery id, new status, seconds until the next attempt, error)`` of a batch."""
    if not outcomes:
        return
    ids, statuses, delays, errs = (list(c) for c in zip(*outcomes, strict=True))
    with in_schema(conn, schema):
        conn.execute(
            _q("record_deliveries"),
            {"ids": ids, "statuses": statuses, "delays": delays, "errors": errs},
        )


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    log_id: int
    event_id: str
    watch: str
    op: str
    sink: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime


def list_deliveries(
    conn: psycopg.Connection[Any],
    schema: str,
    sink: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[DeliveryRow]:
    with in_schema(conn, schema):
        rows = conn.execute(
            _q("deliveries_listing"), {"sink": sink, "status": status, "limit": limit}
        ).fetchall()
    return [DeliveryRow(*r) for r in rows]


def retry(
    conn: psycopg.Connection[Any], schema: str, ids: Sequence[int] | None, sink: str | None
) -> list[int]:
    """Puts dead or failed deliveries back in line (all of a sink's, or these ids)."""
    with in_schema(conn, schema):
        rows = conn.execute(
            _q("retry_deliveries"), {"ids": list(ids) if ids else None, "sink": sink}
        ).fetchall()
        notify_deliveries(conn, schema, {str(r[1]) for r in rows})
    return [int(r[0]) for r in rows]


def discard(conn: psycopg.Connection[Any], schema: str, ids: Sequence[int]) -> list[int]:
    """Gives up open deliveries by hand (they become dead, with a note)."""
    with in_schema(conn, schema):
        rows = conn.execute(_q("discard_deliveries"), {"ids": list(ids)}).fetchall()
    return [int(r[0]) for r in rows]


def counts(conn: psycopg.Connection[Any], schema: str) -> list[tuple[str, str, int]]:
    with in_schema(conn, schema):
        return [(r[0], r[1], int(r[2])) for r in conn.execute(_q("delivery_counts")).fetchall()]
