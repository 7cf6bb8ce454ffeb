"""Watches: what the user asked pgherald to watch, how, and how it is going.

A watch names a table (or view, or SQL query, or NOTIFY channel), the capture method,
the key that identifies a row across changes, the columns to keep or ignore, and
method-specific options. Its status columns are updated by capture as it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from pgherald.errors import WatchError
from pgherald.store.queries import query
from pgherald.store.session import in_schema

WatchMethod = Literal["logical", "trigger", "snapshot", "listen"]
METHODS: tuple[WatchMethod, ...] = ("logical", "trigger", "snapshot", "listen")


@dataclass(frozen=True)
class Watch:
    """One watch. ``columns=None`` keeps every column; ``created_at`` and the status
    fields are filled by the store (their values are ignored by ``add_watch``)."""

    name: str
    schema_name: str | None
    table_name: str | None
    method: str
    key_columns: tuple[str, ...] = ()
    columns: tuple[str, ...] | None = None
    ignore_columns: tuple[str, ...] = ()
    query: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    enabled: bool = True
    created_at: datetime | None = None
    last_run_at: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    changes_seen: int = 0
    status: str = "new"
    retain: str | None = None
    """How long its events are kept, as written (``pgherald.retain``); ``None``: the
    configuration's default, else forever."""

    @property
    def target(self) -> str:
        """What the watch looks at, for people: ``schema.table``, or ``query``/channel."""
        if self.table_name is not None:
            return f"{self.schema_name}.{self.table_name}" if self.schema_name else self.table_name
        channels = self.options.get("channels") or ()
        return self.query or ", ".join(f"channel {c}" for c in channels)


def _from_row(r: tuple[Any, ...]) -> Watch:
    return Watch(
        name=r[0],
        schema_name=r[1],
        table_name=r[2],
        method=r[3],
        key_columns=tuple(r[4] or ()),
        columns=tuple(r[5]) if r[5] is not None else None,
        ignore_columns=tuple(r[6] or ()),
        query=r[7],
        options=r[8] if r[8] is not None else {},
        enabled=r[9],
        created_at=r[10],
        last_run_at=r[11],
        last_success_at=r[12],
        last_error=r[13],
        changes_seen=int(r[14]),
        status=r[15],
        retain=r[16],
    )


def add_watch(conn: psycopg.Connection[Any], schema: str, watch: Watch) -> None:
    """Stores a new watch; ``WatchError`` if one of that name exists or it is malformed."""
    if not watch.name:
        raise WatchError("a watch needs a name: give one with --name")
    if watch.method not in METHODS:
        raise WatchError(
            f"watch {watch.name!r}: unknown method {watch.method!r};"
            f" use one of {', '.join(METHODS)}"
        )
    if watch.method != "listen" and watch.table_name is None and watch.query is None:
        raise WatchError(f"watch {watch.name!r}: name a table, a view or a query to watch")
    params = {
        "name": watch.name,
        "schema_name": watch.schema_name,
        "table_name": watch.table_name,
        "method": watch.method,
        "key_columns": list(watch.key_columns),
        "columns": list(watch.columns) if watch.columns is not None else None,
        "ignore_columns": list(watch.ignore_columns),
        "query": watch.query,
        "options": Jsonb(dict(watch.options)),
        "enabled": watch.enabled,
        "status": "new" if watch.enabled else "disabled",
        "retain": watch.retain,
    }
    try:
        with in_schema(conn, schema):
            row = (
                conn.cursor(row_factory=tuple_row).execute(query("insert_watch"), params).fetchone()
            )
    except pg_errors.CheckViolation as e:
        raise WatchError(f"watch {watch.name!r} is not valid: {e.diag.message_primary}") from None
    if row is None:
        raise WatchError(
            f"a watch named {watch.name!r} already exists: choose another name, or remove it"
            f" first with `pgherald watch remove {watch.name}`"
        )


def list_watches(conn: psycopg.Connection[Any], schema: str) -> list[Watch]:
    """Every watch, by name."""
    with in_schema(conn, schema):
        rows = conn.cursor(row_factory=tuple_row).execute(query("list_watches")).fetchall()
    return [_from_row(r) for r in rows]


def get_watch(conn: psycopg.Connection[Any], schema: str, name: str) -> Watch | None:
    """The watch called ``name``, or ``None``."""
    with in_schema(conn, schema):
        row = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("get_watch"), {"name": name})
            .fetchone()
        )
    return _from_row(row) if row else None


def remove_watch(conn: psycopg.Connection[Any], schema: str, name: str) -> None:
    """Removes a watch and its subscriptions; its events stay in the log (they are history).

    ``WatchError`` if there is no such watch."""
    with in_schema(conn, schema):
        row = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("delete_watch"), {"name": name})
            .fetchone()
        )
    if row is None:
        raise WatchError(f"there is no watch named {name!r}: `pgherald watch list` shows them")


def set_watch_enabled(conn: psycopg.Connection[Any], schema: str, name: str, enabled: bool) -> None:
    """Pauses or resumes a watch; ``WatchError`` if there is no such watch."""
    with in_schema(conn, schema):
        row = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("set_watch_enabled"), {"name": name, "enabled": enabled})
            .fetchone()
        )
    if row is None:
        raise WatchError(f"there is no watch named {name!r}: `pgherald watch list` shows them")


def set_watch_retain(
    conn: psycopg.Connection[Any], schema: str, name: str, retain: str | None
) -> None:
    """Sets how long a watch's events are kept (``None``: the configuration's default);
    ``WatchError`` if there is no such watch. The caller checks ``retain``
    (``pgherald.retain.check_retain``); the table only refuses an empty text."""
    with in_schema(conn, schema):
        row = (
            conn.cursor(row_factory=tuple_row)
            .execute(query("set_watch_retain"), {"name": name, "retain": retain})
            .fetchone()
        )
    if row is None:
        raise WatchError(f"there is no watch named {name!r}: `pgherald watch list` shows them")


def record_watch_activity(
    conn: psycopg.Connection[Any],
    schema: str,
    name: str,
    changes: int,
    ok: bool,
    error: str | None,
) -> None:
    """Notes that capture ran for a watch: when, whether it worked, and how many changes.

    A watch removed meanwhile is ignored: capture that was already running is not an error.
    """
    params = {"name": name, "changes": changes, "ok": ok, "error": error}
    with in_schema(conn, schema):
        conn.execute(query("record_watch_activity"), params)
