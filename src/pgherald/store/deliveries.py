"""Recording what became of delivering an event to a sink.

The delivery engine (claims, retries, dead letters) builds on this table; in-process
consumers such as the Python API's callbacks record here what they could not deliver,
so a failure is visible in the store rather than only in a log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
        conn.execute(
            named_query("deliveries.sql", "ensure_sink"),
            {"name": name, "kind": kind, "config": Jsonb(config)},
        )


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
