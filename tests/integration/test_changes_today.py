"""The dashboard's changes today per watch: counted once, then only what is new, and always
what counting from scratch gives (store/today.py)."""

from __future__ import annotations

from typing import Any

import psycopg

from pgherald.store import today
from tests import capture_harness as h
from tests.conftest import Database

SCHEMA = "pgherald"


def add(conn: psycopg.Connection[Any], watch: str, n: int, when: str = "now()") -> None:
    """``n`` events of ``watch`` captured at ``when`` (an SQL expression)."""
    conn.execute(
        f"""
        INSERT INTO pgherald.events (event_id, watch, op, schema_name, table_name, row_key,
                                     position, captured_at, method)
        SELECT 'e' || gen_random_uuid(), %s, 'insert', 'public', 't', '["1"]', 'x', {when},
               'logical'
        FROM generate_series(1, %s)
        """,
        (watch, n),
    )


def from_scratch(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT watch, count(*) FROM pgherald.events"
        " WHERE captured_at >= date_trunc('day', now()) GROUP BY watch"
    ).fetchall()
    return {str(w): int(n) for w, n in rows}


def test_counts_follow_the_log_and_only_new_events_are_read(db: Database) -> None:
    h.install(db.dsn, slot=False)
    with db.connect() as conn:
        add(conn, "a", 5)
        add(conn, "b", 3)
        add(conn, "a", 4, "date_trunc('day', now()) - interval '1 hour'")  # yesterday
        assert today.changes_today(conn, SCHEMA) == from_scratch(conn) == {"a": 5, "b": 3}
        assert today.changes_today(conn, SCHEMA, ["b", "c"]) == {"b": 3}

        add(conn, "a", 2)
        add(conn, "c", 1)
        assert today.changes_today(conn, SCHEMA) == from_scratch(conn) == {"a": 7, "b": 3, "c": 1}

        # Counted events are not read again: one removed behind its back (as a retention
        # shorter than a day would) still counts, while a new one is added.
        conn.execute("DELETE FROM pgherald.events WHERE id = (SELECT min(id) FROM pgherald.events)")
        add(conn, "b", 1)
        assert today.changes_today(conn, SCHEMA) == {"a": 7, "b": 4, "c": 1}
        assert from_scratch(conn) == {"a": 6, "b": 4, "c": 1}


def test_another_day_or_a_log_that_went_back_is_counted_afresh(db: Database) -> None:
    h.install(db.dsn, slot=False)
    with db.connect() as conn:
        conn.execute("SET TimeZone = 'Etc/GMT-14'")
        add(conn, "a", 3)
        add(conn, "a", 2, "date_trunc('day', now()) - interval '1 minute'")
        assert today.changes_today(conn, SCHEMA) == from_scratch(conn)
        # The start of "today" moves with the server's time zone: a new day, counted afresh.
        conn.execute("SET TimeZone = 'Etc/GMT+12'")
        assert today.changes_today(conn, SCHEMA) == from_scratch(conn)

        # A log that went back (emptied and its ids restarted, as after restoring an older
        # backup): counted afresh.
        conn.execute("TRUNCATE pgherald.events RESTART IDENTITY CASCADE")
        add(conn, "b", 1)
        assert today.changes_today(conn, SCHEMA) == from_scratch(conn) == {"b": 1}
