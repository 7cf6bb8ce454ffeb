"""Capture runs: one snapshot comparison, trigger queue drain or logical session each.

A run's counts and outcome are what ``pgherald status`` and the dashboard show, and
what tells a user that a nightly snapshot ran, and found nothing, rather than not ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import tuple_row

from pgherald.errors import PgHeraldError
from pgherald.store.queries import query
from pgherald.store.session import in_schema

RunStatus = Literal["running", "ok", "error", "aborted"]


@dataclass(frozen=True)
class Run:
    id: int
    watch: str | None
    source: str
    started_at: datetime
    ended_at: datetime | None
    status: str
    inserts: int
    updates: int
    deletes: int
    truncates: int
    rows_compared: int | None
    error: str | None


def start_run(conn: psycopg.Connection[Any], schema: str, watch: str | None, source: str) -> int:
    """Records that a run began (status ``running``); returns its id for ``finish_run``."""
    with in_schema(conn, schema):
        row = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("start_run"), {"watch": watch, "source": source})
            .fetchone()
        )
    assert row is not None
    return int(row[0])


def finish_run(
    conn: psycopg.Connection[Any],
    schema: str,
    run_id: int,
    *,
    status: RunStatus = "ok",
    inserts: int = 0,
    updates: int = 0,
    deletes: int = 0,
    truncates: int = 0,
    rows_compared: int | None = None,
    error: str | None = None,
) -> None:
    """Records a run's end, its counts and (for ``error``) what went wrong."""
    params = {
        "id": run_id,
        "status": status,
        "inserts": inserts,
        "updates": updates,
        "deletes": deletes,
        "truncates": truncates,
        "rows_compared": rows_compared,
        "error": error,
    }
    with in_schema(conn, schema):
        row = conn.cursor(row_factory=tuple_row).execute(query("finish_run"), params).fetchone()
    if row is None:
        raise PgHeraldError(f"run {run_id} does not exist in the store: it cannot be finished")


def list_runs(
    conn: psycopg.Connection[Any], schema: str, watch: str | None = None, limit: int = 50
) -> list[Run]:
    """The latest runs, newest first (of one watch, or of all)."""
    with in_schema(conn, schema):
        rows = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("list_runs"), {"watch": watch, "limit": limit})
            .fetchall()
        )
    return [Run(*r) for r in rows]
