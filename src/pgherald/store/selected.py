"""Appending events that a source selects in SQL, without them passing through Python.

Trigger capture's input (its queue) is in the store's own database, so its events can be
made by the server in the transaction that claims them: one ``INSERT INTO events ...
SELECT`` moves a whole batch, where building ``ChangeEvent`` objects and COPYing them
back cost more CPU than the rows' own writing (see bench/README.md, "Trigger capture").
The source writes the SELECT, which knows its input; this module writes the rest, which
knows the log: the append lock, shape ids, ids in order, field rows, the watches'
activity and the NOTIFY, as ``ChangeLog.append`` does them; an ``event_id`` the log has
already fails it, as it fails ``ChangeLog.append``'s direct path (``append_selected``).

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
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgherald.db.sqlfiles import named_query
from pgherald.events.model import RowShape
from pgherald.store.changelog import ChangeLog, Statement, shape_columns, shape_digest
from pgherald.store.queries import query
from pgherald.store.session import check_schema_name, transaction_for

_FILE: Final = "append_selected.sql"


@functools.lru_cache(maxsize=256)
def _digest(shape: RowShape) -> tuple[str, Jsonb]:
    """The shape's digest and its stored columns."""
    columns = shape_columns(shape)
    return shape_digest(columns), Jsonb(columns)


_PLACEHOLDER: Final = re.compile(r"%\(([^)]+)\)s|%%|%")


@functools.lru_cache(maxsize=64)
def _statement(
    rows: str, labels: tuple[str, ...], shapes: tuple[RowShape, ...], channel: str
) -> tuple[bytes, tuple[str, ...]]:
    """``insert_selected`` around the source's SELECT, with the shapes and the channel
    written in, rendered once with ``$n`` placeholders; and the parameter names in order.

    psycopg parses a statement for its ``%(name)s`` placeholders at every execution once it
    is over 4 kB (this one is, with a few columns); rendered here once, it goes through a
    ``RawCursor``, which sends it as it is. Comment lines are left out."""
    code = "\n".join(
        line
        for line in named_query(_FILE, "insert_selected").splitlines()
        if not line.lstrip().startswith("--")
    )
    digests = [_digest(shape) for shape in shapes]
    text = (
        sql.SQL(code)
        .format(
            rows=sql.SQL(rows),
            labels=_literal(list(labels)),
            digests=_literal([digest for digest, _ in digests]),
            columns=_literal([columns for _, columns in digests]),
            channel=_literal(channel),
        )
        .as_string()
    )
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        if match.group(1) is None:
            raise ValueError(f"a lone % in a selected statement: {text[match.start() :][:40]!r}")
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PLACEHOLDER.sub(number, text).encode("utf-8"), tuple(names)


def _literal(value: Any) -> sql.SQL:
    """A constant of the statement, ``%`` doubled as for any text with placeholders."""
    return sql.SQL(sql.Literal(value).as_string().replace("%", "%%"))


def append_selected(
    log: ChangeLog,
    rows: sql.Composable,
    params: Mapping[str, Any],
    shapes: Mapping[str, RowShape],
    then: Sequence[Statement] = (),
    commit: bool = False,
) -> Counter[tuple[str, str]]:
    """Inserts the events that the SELECT ``rows`` makes into the log, in the connection's
    transaction; returns how many were stored per (watch, method).

    An ``event_id`` that is in the log already (a replay) fails the statement with
    ``psycopg.errors.UniqueViolation``, as the direct COPY path of ``ChangeLog.append``
    does and for the same reason (no speculative insertion per row): the caller rolls
    back and appends those events through ``ChangeLog.append``, which skips them.

    ``rows`` is best an ``sql.SQL`` of text rendered once (``Composable.as_string``): the
    whole statement is then rendered once per distinct SELECT and shapes. Its parameters
    are ``params``. ``shapes`` are the shapes that it names by label; new ones are stored
    by the same statement. ``then`` and ``commit`` are as for ``ChangeLog.append``: the
    append, the caller's statements and the COMMIT go in one round trip.
    """
    conn = log.conn
    check_schema_name(log.schema)
    labels = tuple(shapes)
    statement, names = _statement(
        rows.as_string(conn), labels, tuple(shapes[label] for label in labels), log.channel
    )
    path = sql.Identifier(log.schema).as_string(conn)
    with transaction_for(conn):
        with conn.pipeline():
            if not commit:  # a COMMIT puts the caller's path back by itself
                conn.execute(query("save_search_path"))
            conn.execute(query("set_search_path"), {"path": path})
            conn.execute(query("append_lock"))
            counted = psycopg.RawCursor(conn)
            counted.execute(statement, [params[name] for name in names])
            for extra in then:
                conn.execute(*extra)
            if commit:
                conn.commit()
            else:
                conn.execute(query("restore_search_path"))
        stored: Counter[tuple[str, str]] = Counter()
        for watch, method, n in counted.fetchall():
            stored[(str(watch), str(method))] += int(n)
    return stored


__all__ = ["append_selected"]
