"""Installing and removing the capture triggers of trigger watches.

The trigger function itself (``capture_change``) belongs to the store's schema and comes
with its migrations; what is here puts it on a table, with the watch's name and columns as
its arguments, and takes it off again. ``CREATE OR REPLACE TRIGGER`` makes installing
idempotent, so ``watch add`` can be repeated and a changed column list simply replaces the
arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgherald.db.sqlfiles import ident, named_query

_FILE = "trigger_capture.sql"


def _q(name: str) -> sql.SQL:
    return sql.SQL(named_query(_FILE, name))


def wake_channel(store: str) -> str:
    """The NOTIFY channel the triggers of the store in ``store`` wake pgherald on.

    Channel names are at most 63 bytes; long schema names get a digest instead. The
    migration computes the same name in SQL (``0002_trigger_capture.sql``).
    """
    if len(store.encode("utf-8")) <= 40:
        return f"{store}_wake"
    return "pgherald_wake_" + hashlib.md5(store.encode("utf-8")).hexdigest()[:16]


def trigger_names(store: str) -> tuple[str, str]:
    """The row and the truncate trigger's names: one pair per store on a watched table."""
    prefix = store if len(store.encode("utf-8")) <= 40 else "pgherald_" + _digest(store)
    return f"{prefix}_capture", f"{prefix}_capture_truncate"


def _digest(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()[:16]


def text_array_literal(items: Sequence[str]) -> str:
    """A ``text[]`` literal of ``items``, every element quoted (trigger arguments are strings)."""
    quoted = ('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return "{" + ",".join(quoted) + "}"


def install_triggers(
    conn: psycopg.Connection[Any],
    store: str,
    watch: str,
    schema: str,
    table: str,
    *,
    ignore_columns: Sequence[str] = (),
    watched_columns: Sequence[str] | None = None,
) -> tuple[str, str]:
    """Puts (or replaces) the watch's row and truncate triggers on ``schema.table``.

    ``watched_columns`` (with the key columns) limits which columns make an UPDATE count;
    ``None`` means every column but the ignored ones. Returns the triggers' names.
    """
    row_name, truncate_name = trigger_names(store)
    args = {
        "table": sql.Identifier(schema, table),
        "function": sql.Identifier(store, "capture_change"),
        "watch": sql.Literal(watch),
        "ignored": sql.Literal(text_array_literal(ignore_columns)),
        "watched": sql.Literal(
            text_array_literal(watched_columns) if watched_columns is not None else ""
        ),
    }
    conn.execute(_q("install_row_trigger").format(trigger=sql.Identifier(row_name), **args))
    conn.execute(
        _q("install_truncate_trigger").format(trigger=sql.Identifier(truncate_name), **args)
    )
    return row_name, truncate_name


def capture_triggers(
    conn: psycopg.Connection[Any], store: str, schema: str, table: str
) -> list[str]:
    """The names of this store's capture triggers on ``schema.table`` (none if it is gone)."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(
        named_query(_FILE, "find_capture_triggers"),
        {"table": sql.Identifier(schema, table).as_string(conn), "store": store},
    ).fetchall()
    return [r[0] for r in rows]


def forget_queued(conn: psycopg.Connection[Any], store: str, watch: str) -> int:
    """Deletes what ``watch`` queued and nobody moved yet (the watch is being removed)."""
    cur = conn.execute(
        _q("forget_watch").format(queue=ident(store, "trigger_queue")), {"watch": watch}
    )
    return cur.rowcount


def remove_triggers(
    conn: psycopg.Connection[Any], store: str, schema: str, table: str
) -> list[str]:
    """Drops this store's capture triggers from ``schema.table``; returns what it dropped."""
    dropped = []
    for name in capture_triggers(conn, store, schema, table):
        conn.execute(
            sql.SQL("DROP TRIGGER {} ON {}").format(
                sql.Identifier(name), sql.Identifier(schema, table)
            )
        )
        dropped.append(name)
    return dropped


def queue_depth(conn: psycopg.Connection[Any], store: str) -> tuple[int, datetime | None]:
    """How many changes wait in the trigger queue, and when the oldest was made."""
    row = conn.execute(
        _q("queue_depth").format(queue=sql.Identifier(store, "trigger_queue"))
    ).fetchone()
    assert row is not None
    return int(row[0]), row[1]
