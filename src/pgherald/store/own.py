"""What a console user made for themselves: their own sinks (a feed, e-mail sinks), those
sinks' subscriptions and deliveries.

Every read and write here is scoped by the owner, in SQL: a user's name is part of each
statement's condition, so a guessed sink name or delivery id of someone else matches
nothing. ``sinks.owner`` is set only by the console's self-service (``add_sink``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg
from psycopg.types.json import Jsonb

from pgherald.db.sqlfiles import named_query
from pgherald.store.deliveries import DeliveryRow, notify_sinks_changed
from pgherald.store.session import in_schema

NEWEST: Final = 2**63 - 1


def _q(name: str) -> LiteralString:
    return named_query("web.sql", name)


@dataclass(frozen=True)
class OwnSink:
    name: str
    kind: str
    options: Mapping[str, Any]
    enabled: bool
    created_at: datetime


@dataclass(frozen=True)
class OwnSubscription:
    sink: str
    watch: str
    kind: str
    options: Mapping[str, Any]
    created_at: datetime


def sinks(conn: psycopg.Connection[Any], schema: str, owner: str) -> list[OwnSink]:
    with in_schema(conn, schema):
        rows = conn.execute(_q("own_sinks"), {"owner": owner}).fetchall()
    return [OwnSink(r[0], r[1], dict(r[2] or {}), r[3], r[4]) for r in rows]


def owner_of(conn: psycopg.Connection[Any], schema: str, sink: str) -> tuple[bool, str | None]:
    """``(the sink exists, its owner)``."""
    with in_schema(conn, schema):
        row = conn.execute(_q("sink_owner"), {"name": sink}).fetchone()
    return (row is not None, row[0] if row else None)


def add_sink(
    conn: psycopg.Connection[Any],
    schema: str,
    owner: str,
    name: str,
    kind: str,
    options: Mapping[str, Any],
) -> bool:
    """Stores a sink of ``owner``; False when a sink of that name exists."""
    params = {"name": name, "kind": kind, "config": Jsonb(dict(options)), "owner": owner}
    with in_schema(conn, schema):
        added = conn.execute(_q("add_own_sink"), params).fetchone() is not None
        if added:
            notify_sinks_changed(conn, schema, name)  # running delivery serves it at once
    return added


def subscriptions(conn: psycopg.Connection[Any], schema: str, owner: str) -> list[OwnSubscription]:
    with in_schema(conn, schema):
        rows = conn.execute(_q("own_subscriptions"), {"owner": owner}).fetchall()
    return [OwnSubscription(r[0], r[1], r[2], dict(r[3] or {}), r[4]) for r in rows]


def unsubscribe(
    conn: psycopg.Connection[Any], schema: str, owner: str, sink: str, watch: str
) -> bool:
    """Removes ``owner``'s subscription of their sink ``sink`` to ``watch``; False when they
    have none such (also when the sink is someone else's)."""
    params = {"owner": owner, "sink": sink, "watch": watch}
    with in_schema(conn, schema):
        return conn.execute(_q("remove_own_subscription"), params).fetchone() is not None


def deliveries(
    conn: psycopg.Connection[Any],
    schema: str,
    owner: str,
    watches: Sequence[str] | None,
    before: int = NEWEST,
    status: str | None = None,
    limit: int = 50,
) -> tuple[list[DeliveryRow], int | None]:
    """A page of the deliveries to ``owner``'s sinks, newest first, of ``watches`` only
    (None: any), and ``before`` for the next page."""
    params = {
        "owner": owner,
        "before": before,
        "status": status,
        "watches": list(watches) if watches is not None else None,
        "limit": limit + 1,
    }
    with in_schema(conn, schema):
        rows = conn.execute(_q("page_own_deliveries"), params).fetchall()
    found = [DeliveryRow(*r) for r in rows[:limit]]
    return found, (found[-1].id if len(rows) > limit else None)


def delivery_counts(
    conn: psycopg.Connection[Any], schema: str, owner: str
) -> list[tuple[str, str, int]]:
    with in_schema(conn, schema):
        rows = conn.execute(_q("own_delivery_counts"), {"owner": owner}).fetchall()
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


__all__ = [
    "OwnSink",
    "OwnSubscription",
    "add_sink",
    "deliveries",
    "delivery_counts",
    "owner_of",
    "sinks",
    "subscriptions",
    "unsubscribe",
]
