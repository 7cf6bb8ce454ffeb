"""Errors worth keeping: what failed, when, in which watch and run, with details.

Logs scroll away; a row here is what the dashboard and ``pgherald status`` show a
user who asks why a watch is red.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from pgherald.store.queries import query
from pgherald.store.session import in_schema


@dataclass(frozen=True)
class StoredError:
    id: int
    occurred_at: datetime
    watch: str | None
    run_id: int | None
    source: str | None
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict)


def record_error(
    conn: psycopg.Connection[Any],
    schema: str,
    message: str,
    *,
    watch: str | None = None,
    run_id: int | None = None,
    source: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Stores an error (in the caller's transaction, if any); returns its id."""
    params = {
        "watch": watch,
        "run_id": run_id,
        "source": source,
        "message": message,
        "detail": Jsonb(dict(detail or {}), dumps=_dumps),
    }
    with in_schema(conn, schema):
        row = conn.cursor(row_factory=tuple_row).execute(query("insert_error"), params).fetchone()
    assert row is not None
    return int(row[0])


def list_errors(
    conn: psycopg.Connection[Any], schema: str, watch: str | None = None, limit: int = 50
) -> list[StoredError]:
    """The latest errors, newest first (of one watch, or of all)."""
    with in_schema(conn, schema):
        rows = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("list_errors"), {"watch": watch, "limit": limit})
            .fetchall()
        )
    return [StoredError(*r) for r in rows]


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)
