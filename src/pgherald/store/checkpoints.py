"""Where each capture source got to, saved with the events it covers.

A source's position is saved in the same transaction as the batch of events that
completes it, so after a crash the log and the checkpoint agree: capture resumes from
the checkpoint and the replayed events are ones the log already skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from pgherald.store.queries import query
from pgherald.store.session import in_schema


def load_checkpoint(conn: psycopg.Connection[Any], schema: str, source: str) -> str | None:
    """The last saved position of ``source`` (e.g. ``logical:<slot>``), or ``None``."""
    with in_schema(conn, schema):
        row = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("load_checkpoint"), {"source": source})
            .fetchone()
        )
    return str(row[0]) if row else None


def save_checkpoint(conn: psycopg.Connection[Any], schema: str, source: str, position: str) -> None:
    """Saves ``source``'s position in the caller's transaction (it commits, not us)."""
    with in_schema(conn, schema):
        conn.execute(query("save_checkpoint"), {"source": source, "position": position})


def delete_checkpoint(conn: psycopg.Connection[Any], schema: str, source: str) -> None:
    """Forgets ``source``'s position in the caller's transaction (what it kept went away)."""
    with in_schema(conn, schema):
        conn.execute(query("delete_checkpoint"), {"source": source})


def last_commit_time(
    conn: psycopg.Connection[Any], schema: str, watches: Sequence[str]
) -> datetime | None:
    """The commit time of the newest event stored for any of ``watches`` (None if none).

    Logical capture dates the start of a gap with it: the change log is complete up to
    that commit, whatever happened to the slot since.
    """
    with in_schema(conn, schema):
        row = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("last_commit_time"), {"watches": list(watches)})
            .fetchone()
        )
    return row[0] if row else None
