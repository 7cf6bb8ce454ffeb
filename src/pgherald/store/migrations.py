"""Installing and upgrading the store's schema with numbered migrations.

``sql/migrations/NNNN_name.sql`` are applied in order, each once, and recorded in
``schema_version``; a fresh install is simply every migration, so the path that upgrades
users' stores is the one that every test run exercises. ``sql/schema.sql`` is the same
schema in one file, proved equal by a test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import psycopg
from psycopg import sql

from pgherald.errors import SchemaError
from pgherald.store.queries import query, read_sql
from pgherald.store.session import DEFAULT_SCHEMA, check_schema_name, in_schema

_FILE: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    filename: str

    def sql(self) -> bytes:
        return read_sql(f"migrations/{self.filename}").encode("utf-8")


def available_migrations() -> list[Migration]:
    """Every migration shipped with this version of pgherald, in order."""
    folder = resources.files("pgherald").joinpath("sql", "migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.name))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"pgherald's migrations are not numbered 1..n ({versions}): reinstall")
    return found


LATEST_VERSION: Final = len(available_migrations())


def current_version(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> int | None:
    """The installed schema's version; ``None`` when the store is not installed there."""
    check_schema_name(schema)
    exists = conn.execute(query("version_table_exists"), {"schema": schema}).fetchone()
    if not exists or not exists[0]:
        return None
    with in_schema(conn, schema):
        row = conn.execute(query("current_version")).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def migrate(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> list[int]:
    """Applies the pending migrations in one transaction; returns the versions applied.

    An advisory lock keeps two migrators of the same schema from interleaving; the second
    finds nothing left to do. A store newer than this pgherald is left alone.
    """
    check_schema_name(schema)
    applied: list[int] = []
    with in_schema(conn, schema):
        conn.execute(query("migration_lock"), {"schema": schema})
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        exists = conn.execute(query("version_table_exists"), {"schema": schema}).fetchone()
        version = 0
        if exists and exists[0]:
            row = conn.execute(query("current_version")).fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
        if version > LATEST_VERSION:
            raise SchemaError(_too_new(schema, version))
        for migration in available_migrations():
            if migration.version <= version:
                continue
            conn.execute(migration.sql())
            conn.execute(query("record_version"), {"version": migration.version})
            applied.append(migration.version)
    return applied


def install(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> None:
    """Creates the store at the latest version; harmless on an installed, current store."""
    migrate(conn, schema)


def require_current(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> None:
    """Raises ``SchemaError`` unless the store in ``schema`` is exactly this pgherald's version."""
    version = current_version(conn, schema)
    if version is None:
        raise SchemaError(
            f"pgherald's store is not installed in schema {schema!r} of this database:"
            " run `pgherald init`"
        )
    if version < LATEST_VERSION:
        raise SchemaError(
            f"pgherald's store in schema {schema!r} is at version {version}, this pgherald needs"
            f" {LATEST_VERSION}: run `pgherald migrate`"
        )
    if version > LATEST_VERSION:
        raise SchemaError(_too_new(schema, version))


def _too_new(schema: str, version: int) -> str:
    return (
        f"pgherald's store in schema {schema!r} is at version {version}, newer than this"
        f" pgherald knows ({LATEST_VERSION}): upgrade pgherald"
    )


def drop_schema(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> None:
    """Drops the store's schema and everything in it (``pgherald uninstall``)."""
    check_schema_name(schema)
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
