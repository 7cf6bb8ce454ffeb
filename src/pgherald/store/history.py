"""Reading the change log for people: a feed sink's delivered events, a watch's, a row's
and a snapshot run's events, newest first and a page at a time (keyset paging on log ids,
so the hundredth page costs what the first does). Also the two settings people change
about presentation: a feed's token and a watch's display options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, LiteralString

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from pgherald.db.sqlfiles import named_query
from pgherald.events.model import TypedLoader
from pgherald.store.changelog import ChangeLog, StoredEvent
from pgherald.store.deliveries import notify_sinks_changed
from pgherald.store.runs import Run
from pgherald.store.session import in_schema

NEWEST: Final = 2**63 - 1
"""``before`` for the first page (every log id is below it)."""


def _q(name: str) -> LiteralString:
    return named_query("history.sql", name)


def _events(
    changelog: ChangeLog,
    name: str,
    params: Mapping[str, Any],
    loader: TypedLoader | None,
) -> list[StoredEvent]:
    with in_schema(changelog.conn, changelog.schema):
        rows = changelog.conn.cursor(row_factory=tuple_row).execute(_q(name), params).fetchall()
        return changelog.stored_events(rows, loader)


def feed_events(
    changelog: ChangeLog,
    sink: str,
    before: int = NEWEST,
    limit: int = 500,
    loader: TypedLoader | None = None,
) -> list[StoredEvent]:
    """A sink's delivered events with log ids below ``before``, newest first."""
    params = {"sink": sink, "before": before, "limit": limit}
    return _events(changelog, "feed_events", params, loader)


def watch_events(
    changelog: ChangeLog,
    watch: str,
    before: int = NEWEST,
    limit: int = 50,
    loader: TypedLoader | None = None,
) -> list[StoredEvent]:
    """A watch's events with log ids below ``before``, newest first."""
    params = {"watch": watch, "before": before, "limit": limit}
    return _events(changelog, "watch_events_newest", params, loader)


def row_events(
    changelog: ChangeLog,
    watch: str,
    row_key: str,
    before: int = NEWEST,
    limit: int = 50,
    loader: TypedLoader | None = None,
) -> list[StoredEvent]:
    """One row's events (by its stored key text) below ``before``, newest first."""
    params = {"watch": watch, "row_key": row_key, "before": before, "limit": limit}
    return _events(changelog, "row_events_newest", params, loader)


def run_events(
    changelog: ChangeLog,
    run: Run,
    after: int = 0,
    limit: int = 500,
    loader: TypedLoader | None = None,
) -> list[StoredEvent]:
    """A snapshot run's events after log id ``after``, in log order."""
    if run.watch is None:
        return []
    params = {"watch": run.watch, "position": str(run.id), "after": after, "limit": limit}
    return _events(changelog, "run_events", params, loader)


def run_event_count(conn: psycopg.Connection[Any], schema: str, run: Run) -> int:
    if run.watch is None:
        return 0
    with in_schema(conn, schema):
        row = conn.execute(
            _q("run_event_count"), {"watch": run.watch, "position": str(run.id)}
        ).fetchone()
    return int(row[0]) if row else 0


def get_run(conn: psycopg.Connection[Any], schema: str, run_id: int) -> Run | None:
    with in_schema(conn, schema):
        row = conn.cursor(row_factory=tuple_row).execute(_q("get_run"), {"id": run_id}).fetchone()
    return Run(*row) if row else None


def watch_rows(conn: psycopg.Connection[Any], schema: str, watch: str, limit: int) -> list[str]:
    """The keys of the rows among a watch's newest ``limit`` events."""
    with in_schema(conn, schema):
        rows = conn.execute(_q("watch_rows"), {"watch": watch, "limit": limit}).fetchall()
    return sorted(str(r[0]) for r in rows)


def set_feed_token(
    conn: psycopg.Connection[Any], schema: str, sink: str, token: str, *, replace: bool
) -> bool:
    """Sets a feed sink's token (``replace=False``: only where it has none); whether it did."""
    with in_schema(conn, schema):
        row = conn.execute(
            _q("set_feed_token"), {"name": sink, "token": token, "replace": replace}
        ).fetchone()
        if row is not None:
            notify_sinks_changed(conn, schema, sink)
    return row is not None


def set_watch_display(
    conn: psycopg.Connection[Any], schema: str, watch: str, display: Mapping[str, Any]
) -> bool:
    """Stores a watch's display options (empty: removes them); False if no such watch."""
    with in_schema(conn, schema):
        row = conn.execute(
            _q("set_watch_display"), {"name": watch, "display": Jsonb(dict(display))}
        ).fetchone()
    return row is not None
