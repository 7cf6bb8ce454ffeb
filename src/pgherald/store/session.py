"""Running the store's SQL inside its schema, whatever that schema is called.

The store lives in a schema the user names (default ``pgherald``), and its SQL files
use unqualified names, so every use of the store runs ``SET LOCAL search_path`` with
the name quoted by ``psycopg.sql.Identifier``. The caller's path is put back afterwards,
because the capture pipeline writes the change log inside transactions that also do
other work, whose unqualified names must keep meaning what they meant.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Final, LiteralString

import psycopg
from psycopg import pq, sql

from pgherald.errors import ConfigError, SchemaError
from pgherald.store.queries import query

DEFAULT_SCHEMA: Final = "pgherald"
_MAX_IDENTIFIER_BYTES: Final = 63


def check_schema_name(schema: str) -> None:
    """Rejects names PostgreSQL would silently truncate or cannot store, before any SQL runs."""
    if not schema:
        raise ConfigError("the store's schema name is empty: set --schema to a name")
    if "\x00" in schema:
        raise ConfigError("the store's schema name contains a NUL character: choose another")
    if len(schema.encode("utf-8")) > _MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"the store's schema name is longer than {_MAX_IDENTIFIER_BYTES} bytes, PostgreSQL's"
            " limit for names: choose a shorter one"
        )


@functools.cache
def _code_only(name: str) -> LiteralString:
    """A block without its comment lines: a name composed into a comment could end it."""
    lines = [line for line in query(name).splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines)


def enter_sql(schema: str, then: LiteralString | None = None) -> sql.Composed:
    """SQL that sets the store's search path (and runs ``then`` in the same round trip)."""
    check_schema_name(schema)
    enter = sql.SQL(_code_only("enter_schema")).format(schema=sql.Identifier(schema))
    parts: list[sql.Composable] = [enter]
    if then is not None:
        parts.append(sql.SQL(then))
    return sql.Composed(parts)


RESTORE: Final = query("restore_search_path")


@contextlib.contextmanager
def transaction_for(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """The caller's transaction if it has one coming; a transaction of our own in autocommit.

    A transaction-local setting needs a transaction, and a caller who manages its own
    transaction decides when it commits, so nothing here commits in that case.
    """
    if conn.autocommit:
        with conn.transaction():
            yield
    else:
        yield


@contextlib.contextmanager
def store_errors(schema: str) -> Iterator[None]:
    """Turns "relation does not exist" into the one-line fix: the store is not installed."""
    try:
        yield
    except psycopg.errors.UndefinedTable:
        raise SchemaError(
            f"pgherald's store is not installed in schema {schema!r} of this database:"
            " run `pgherald init`"
        ) from None


@contextlib.contextmanager
def in_schema(conn: psycopg.Connection[Any], schema: str) -> Iterator[None]:
    """Runs the block with the store's schema as ``search_path``; see ``transaction_for``.

    In a psycopg pipeline it enters with two single statements, as a pipeline cannot carry
    the two statements of ``enter_sql`` in one: store functions can then ride in a
    caller's pipeline (delivery's claims and routing batches), costing no round trip of
    their own unless they read."""
    statement = enter_sql(schema)
    if conn.info.pipeline_status != pq.PipelineStatus.OFF:
        path = sql.Identifier(schema).as_string(conn)
        with store_errors(schema), transaction_for(conn):
            conn.execute(query("save_search_path"))
            conn.execute(query("set_search_path"), {"path": path})
            yield
            conn.execute(RESTORE)  # not after an error: the pipeline is aborted then
        return
    with store_errors(schema), transaction_for(conn):
        conn.execute(statement)
        try:
            yield
        finally:
            if conn.info.transaction_status == pq.TransactionStatus.INTRANS:
                conn.execute(RESTORE)
