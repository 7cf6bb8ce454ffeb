"""Appending events that a source selects in SQL, without them passing through Python.

Trigger capture's input (its queue) is in the store's own database, so its events can be
made by the server in the transaction that claims them: one ``INSERT INTO events ...
SELECT`` moves a whole batch, where building ``ChangeEvent`` objects and COPYing them
back cost more CPU than the rows' own writing (see bench/README.md, "Trigger capture").
The source writes the SELECT, which knows its input; this module writes the rest, which
knows the log: the append lock, shape ids, ids in order, idempotency by ``event_id``,
field rows, the watches' activity and the NOTIFY, as ``ChangeLog.append`` does them.

The source's SELECT yields these columns, by name: ``ord`` (the log order within the
batch), ``event_id``, ``watch``, ``op``, ``schema_name``, ``table_name``, ``row_key`` (as
``changelog.row_key_of`` makes it, byte for byte), ``key_columns``, ``shape`` (a label of
``shapes``, or NULL for an event without a row), ``old_values`` and ``new_values``
(texts in the shape's column order; an old row has the new row's shape), ``changed``
(distinct names, in shape order), ``xid``, ``position``, ``commit_time``, ``captured_at``,
``method``, ``seq``, ``old_values_source`` and ``meta``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

from psycopg import sql
from psycopg.types.json import Jsonb

from pgherald.db.sqlfiles import named_query
from pgherald.events.model import RowShape
from pgherald.store.changelog import (
    ChangeLog,
    Statement,
    enter_statements,
    shape_columns,
    shape_digest,
)
from pgherald.store.queries import query
from pgherald.store.session import transaction_for

_FILE: Final = "append_selected.sql"


@functools.lru_cache(maxsize=256)
def _digest(shape: RowShape) -> tuple[str, list[list[Any]]]:
    """The shape's digest and its stored columns (shapes are few and long-lived)."""
    columns = shape_columns(shape)
    return shape_digest(columns), columns


def append_selected(
    log: ChangeLog,
    rows: sql.Composable,
    params: Mapping[str, Any],
    shapes: Mapping[str, RowShape],
    then: Sequence[Statement] = (),
    commit: bool = False,
) -> Counter[tuple[str, str]]:
    """Inserts the events that ``rows`` selects into the log in the connection's transaction;
    returns how many were stored per (watch, method) (an ``event_id`` already in the log
    is skipped, as a replay).

    ``shapes`` are the shapes that ``rows`` names by label; they are stored first if new
    (every time: one index probe each, where a cache of ids could go stale). ``then`` and
    ``commit`` are as for ``ChangeLog.append``: the append, the caller's statements and the
    COMMIT go in one round trip. The parameters of ``rows`` must not start with
    ``selected_``.
    """
    conn = log.conn
    labels = list(shapes)
    digests = [_digest(shapes[label]) for label in labels]
    statement = sql.SQL(named_query(_FILE, "insert_selected")).format(rows=rows)
    values = {
        **params,
        "selected_labels": labels,
        "selected_digests": [digest for digest, _ in digests],
    }
    with transaction_for(conn):
        with conn.pipeline():
            for enter in enter_statements(conn, log.schema):
                conn.execute(*enter)
            conn.execute(query("append_lock"))
            if digests:
                conn.execute(
                    query("upsert_shapes"),
                    {
                        "digests": [digest for digest, _ in digests],
                        "columns": [Jsonb(columns) for _, columns in digests],
                    },
                )
            counted = conn.cursor()
            counted.execute(statement, values)
            for extra in then:
                conn.execute(*extra)
            conn.execute(query("notify_appended"), {"channel": log.channel})
            if commit:
                conn.commit()
            else:
                conn.execute(query("restore_search_path"))
        stored: Counter[tuple[str, str]] = Counter()
        for watch, method, n in counted.fetchall():
            stored[(str(watch), str(method))] += int(n)
    return stored


__all__ = ["append_selected"]
