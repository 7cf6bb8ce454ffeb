"""The server-side objects logical capture owns: its publication and its replication slot.

The publication lists only the watched tables, never pgherald's own change log (which
would otherwise capture its own writes forever). Every identifier is composed with
``psycopg.sql.Identifier``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgherald.db.sqlfiles import named_query
from pgherald.errors import CaptureError, WatchError

REPLICA_IDENTITIES = {"d": "default", "n": "nothing", "f": "full", "i": "index"}


def _table(schema: str, table: str) -> sql.Composable:
    return sql.Identifier(schema, table)


def publication_tables(conn: psycopg.Connection[Any], name: str) -> set[tuple[str, str]]:
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_publication p"
        " JOIN pg_publication_rel pr ON pr.prpubid = p.oid"
        " JOIN pg_class c ON c.oid = pr.prrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = %s",
        (name,),
    ).fetchall()
    return {(str(s), str(t)) for s, t in rows}


def publication_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
        is not None
    )


def ensure_publication(
    conn: psycopg.Connection[Any], name: str, tables: Iterable[tuple[str, str]]
) -> None:
    """Creates the publication or makes its table list exactly ``tables``.

    Partitioned tables are published through their root, so a watch on the parent sees
    the changes of every partition under the parent's name.
    """
    wanted = set(tables)
    if not publication_exists(conn, name):
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} WITH (publish_via_partition_root = true)").format(
                sql.Identifier(name)
            )
        )
        current: set[tuple[str, str]] = set()
    else:
        current = publication_tables(conn, name)
    to_add = sorted(wanted - current)
    to_drop = sorted(current - wanted)
    if to_add:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(name), sql.SQL(", ").join(_table(s, t) for s, t in to_add)
            )
        )
    if to_drop:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                sql.Identifier(name), sql.SQL(", ").join(_table(s, t) for s, t in to_drop)
            )
        )


def drop_publication(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


@dataclass(frozen=True)
class SlotInfo:
    """What the server says about a replication slot, for safety checks and health reports."""

    name: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    restart_lsn: str | None
    confirmed_flush_lsn: str | None
    wal_status: str | None
    retained_bytes: int | None
    lag_bytes: int | None


def slot_info(conn: psycopg.Connection[Any], slot: str) -> SlotInfo | None:
    row = conn.execute(
        "SELECT slot_name, plugin, database, active, active_pid,"
        " restart_lsn::text, confirmed_flush_lsn::text, wal_status,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotInfo(*row)


def create_slot(conn: psycopg.Connection[Any], slot: str) -> str:
    """Creates a logical slot for pgoutput and returns its starting LSN."""
    return create_slot_at(conn, slot)[0]


def create_slot_at(conn: psycopg.Connection[Any], slot: str) -> tuple[str, datetime]:
    """Creates a logical slot for pgoutput: its consistent point and when it was reached."""
    try:
        row = conn.execute(named_query("logical.sql", "create_slot"), {"slot": slot}).fetchone()
    except psycopg.errors.ObjectNotInPrerequisiteState as e:
        raise CaptureError(
            f"cannot create replication slot {slot!r}: {e.diag.message_primary}"
            " (logical capture needs wal_level = logical; set it and restart PostgreSQL,"
            " or use --method trigger)"
        ) from e
    except psycopg.errors.InsufficientPrivilege as e:
        raise CaptureError(
            f"cannot create replication slot {slot!r}: the role needs the REPLICATION attribute"
            " (ALTER ROLE ... REPLICATION), or use --method trigger"
        ) from e
    except psycopg.errors.ConfigurationLimitExceeded as e:
        raise CaptureError(
            f"cannot create replication slot {slot!r}: all max_replication_slots are in use;"
            " drop an unused slot or raise max_replication_slots"
        ) from e
    assert row is not None
    return str(row[0]), row[1]


def drop_slot(conn: psycopg.Connection[Any], slot: str) -> bool:
    """Drops the slot if it exists (ending the session that holds it); True if it existed."""
    info = slot_info(conn, slot)
    if info is None:
        return False
    if info.active_pid is not None:
        conn.execute("SELECT pg_terminate_backend(%s)", (info.active_pid,))
    for _ in range(50):
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return True
        except psycopg.errors.ObjectInUse:
            import time

            time.sleep(0.1)
    raise CaptureError(f"replication slot {slot!r} stays in use; stop the process using it")


def replica_identity(conn: psycopg.Connection[Any], schema: str, table: str) -> str:
    row = conn.execute(
        "SELECT c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    if row is None:
        raise WatchError(f"no table {schema}.{table}")
    return REPLICA_IDENTITIES[str(row[0])]


def set_replica_identity_full(conn: psycopg.Connection[Any], schema: str, table: str) -> None:
    """Makes UPDATE and DELETE carry the whole old row, at some WAL volume cost."""
    conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(_table(schema, table)))
