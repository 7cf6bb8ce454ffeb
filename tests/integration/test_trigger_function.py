"""capture_change(), the trigger function of trigger watches: safe, cheap, and upgraded.

It is SECURITY DEFINER without a SET search_path clause (which cost every call a save and
a restore of the setting), so it must never consult the writer's search path: a writer
whose path puts its own operators, functions, types and tables before pg_catalog must not
get any of them run by the function. Its wake-up switch is an advisory lock that the
drainer holds while it sleeps (no query per row). And an installed store gets the new
function on upgrade, under the triggers already on the watched tables.
"""

from __future__ import annotations

from typing import Any, cast

import psycopg
import pytest
from psycopg import sql

from pgherald import admin
from pgherald.db.sqlfiles import named_query
from pgherald.sources.trigger_admin import capture_triggers, install_triggers, wake_channel
from pgherald.store import migrations
from tests import capture_harness as h
from tests.conftest import Database

# Everything a careless function body would find first on this path, each raising if run.
HOSTILE = """
CREATE SCHEMA evil;
CREATE FUNCTION evil.hijacked() RETURNS boolean LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$;
CREATE FUNCTION evil.eq(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT evil.hijacked()';
CREATE FUNCTION evil.eq(jsonb, jsonb) RETURNS boolean LANGUAGE sql AS 'SELECT evil.hijacked()';
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq);
CREATE OPERATOR evil.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq);
CREATE OPERATOR evil.= (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = evil.eq);
CREATE FUNCTION evil.arrow(jsonb, text) RETURNS jsonb LANGUAGE sql
    AS 'SELECT CASE WHEN evil.hijacked() THEN $1 END';
CREATE OPERATOR evil.-> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.arrow);
CREATE FUNCTION evil.minus(jsonb, text[]) RETURNS jsonb LANGUAGE sql
    AS 'SELECT CASE WHEN evil.hijacked() THEN $1 END';
CREATE OPERATOR evil.- (LEFTARG = jsonb, RIGHTARG = text[], FUNCTION = evil.minus);
CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE sql
    AS 'SELECT CASE WHEN evil.hijacked() THEN NULL::jsonb END';
CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql
    AS 'SELECT CASE WHEN evil.hijacked() THEN NULL END';
CREATE FUNCTION evil.current_setting(text, boolean) RETURNS text LANGUAGE sql
    AS 'SELECT CASE WHEN evil.hijacked() THEN $1 END';
CREATE FUNCTION evil.set_config(text, text, boolean) RETURNS text LANGUAGE sql
    AS 'SELECT CASE WHEN evil.hijacked() THEN $1 END';
CREATE FUNCTION evil.pg_try_advisory_xact_lock_shared(bigint) RETURNS boolean LANGUAGE sql
    AS 'SELECT evil.hijacked()';
CREATE FUNCTION evil.unnest(text[]) RETURNS SETOF text LANGUAGE sql
    AS 'SELECT CASE WHEN evil.hijacked() THEN $1[1] END';
CREATE DOMAIN evil.text AS int CHECK (evil.hijacked());
CREATE DOMAIN evil.jsonb AS int CHECK (evil.hijacked());
CREATE TABLE evil.trigger_queue (watch text, op text, old_row jsonb, new_row jsonb);
CREATE TABLE evil.trigger_wake (armed boolean);
"""
EVIL_PATH = b"SET search_path = evil, pg_catalog, public"
MIGRATION = next(
    m.version for m in migrations.available_migrations() if m.name == "cheaper_capture_trigger"
)
"""The migration that brought this function (its number depends on the others')."""


def arm(conn: psycopg.Connection[Any], schema: str = "pgherald") -> bool:
    """Takes the wake-up lock as the drainer does when it goes to sleep."""
    row = conn.execute(named_query("trigger_capture.sql", "arm"), {"store": schema}).fetchone()
    return bool(row and row[0])


def function_config(db: Database, schema: str = "pgherald") -> tuple[bool, list[str] | None, str]:
    with db.connect() as conn:
        row = conn.execute(
            b"SELECT p.prosecdef, p.proconfig, p.prosrc FROM pg_proc p"
            b" JOIN pg_namespace n ON n.oid = p.pronamespace"
            b" WHERE n.nspname = %s AND p.proname = 'capture_change'",
            (schema,),
        ).fetchone()
    assert row is not None
    return bool(row[0]), cast("list[str] | None", row[1]), str(row[2])


def test_a_hostile_search_path_runs_nothing_of_the_writers(db: Database) -> None:
    with db.connect() as conn:
        conn.execute(
            b"CREATE TABLE t (id int PRIMARY KEY, v text, touched int);"
            b" CREATE TABLE u (id int PRIMARY KEY, v text, other text)"
        )
    settings = h.install(db.dsn, [], settings=h.settings_for(db.dsn, method="trigger"), slot=False)
    admin.add_watch(settings, "t", ignore_columns=["touched"])
    admin.add_watch(settings, "u", columns=["v"])
    secdef, config, _ = function_config(db)
    assert secdef and config is None  # SECURITY DEFINER, no SET clause
    with db.connect() as conn:
        conn.execute(HOSTILE.encode())
        conn.execute(b"UPDATE pgherald.trigger_wake SET armed = true")
    with db.connect() as conn:
        conn.execute(EVIL_PATH)
        # The path does what it should: an unqualified = finds the writer's operator.
        with pytest.raises(psycopg.errors.RaiseException, match="hijacked"):
            conn.execute(b"SELECT 'a'::pg_catalog.text = 'b'::pg_catalog.text")
        conn.execute(EVIL_PATH)
        conn.execute(b"CREATE TEMP TABLE trigger_queue (watch pg_catalog.text, op pg_catalog.text)")
        for statement in (
            b"INSERT INTO public.t VALUES (1, 'a', 0), (2, 'b', 0)",
            b"UPDATE public.t SET v = 'c' WHERE id = 1",
            b"UPDATE public.t SET touched = 1 WHERE id = 2",  # only ignored: not queued
            b"INSERT INTO public.u VALUES (1, 'a', 'x')",
            b"UPDATE public.u SET v = 'b', other = 'y'",
            b"UPDATE public.u SET other = 'z'",  # only unwatched: not queued
            b"DELETE FROM public.t WHERE id = 2",
            b"TRUNCATE public.u",
        ):
            conn.execute(statement)
        assert conn.execute(b"SELECT count(*) FROM evil.trigger_queue").fetchone() == (0,)
        assert conn.execute(b"SELECT count(*) FROM pg_temp.trigger_queue").fetchone() == (0,)
    with db.connect() as conn:
        queued = conn.execute(
            b"SELECT watch, op FROM pgherald.trigger_queue ORDER BY id"
        ).fetchall()
    assert queued == [
        ("t", "insert"),
        ("t", "insert"),
        ("t", "update"),
        ("u", "insert"),
        ("u", "update"),
        ("t", "delete"),
        ("u", "truncate"),
    ]


def test_writers_notify_only_while_the_drainer_holds_the_wake_up_lock(db: Database) -> None:
    with db.connect() as conn:
        conn.execute(b"CREATE TABLE t (id int PRIMARY KEY)")
    settings = h.install(
        db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"), slot=False
    )
    with (
        db.connect() as drainer,
        db.connect() as listener,
        db.connect(autocommit=False) as writer,
    ):
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(wake_channel(settings.schema))))

        def notified() -> int:
            return len(list(listener.notifies(timeout=0.5)))

        writer.execute(b"INSERT INTO t VALUES (1)")
        writer.commit()
        assert notified() == 0  # the drainer is busy (or gone): nothing is sent
        assert arm(drainer)
        writer.execute(b"INSERT INTO t VALUES (2)")
        writer.execute(b"INSERT INTO t VALUES (3)")
        writer.commit()
        assert notified() == 1
        # A savepoint rolled back takes its NOTIFY with it; the next row sends it again.
        writer.execute(b"SAVEPOINT s")
        writer.execute(b"INSERT INTO t VALUES (4)")
        writer.execute(b"ROLLBACK TO SAVEPOINT s")
        writer.execute(b"INSERT INTO t VALUES (5)")
        writer.commit()
        assert notified() == 1
        drainer.execute(named_query("trigger_capture.sql", "disarm"), {"store": "pgherald"})
        # While a writer is between its first captured row and its end, the drainer cannot
        # arm: what it queued is not committed yet, and it would send no NOTIFY.
        writer.execute(b"INSERT INTO t VALUES (6)")
        assert not arm(drainer)
        writer.commit()
        assert notified() == 0
        assert arm(drainer)
    with db.connect() as conn:
        assert conn.execute(b"SELECT count(*) FROM pgherald.trigger_queue").fetchone() == (5,)


def test_an_upgraded_store_gets_the_new_function_under_its_triggers(db: Database) -> None:
    """A store installed before the migration, with a capture trigger on a table, is
    migrated: the trigger calls the new body, and changes are queued on."""
    with db.connect() as conn:
        conn.execute(b"CREATE TABLE t (id int PRIMARY KEY, v text)")
        older = [m for m in migrations.available_migrations() if m.version < MIGRATION]
        with conn.transaction():
            conn.execute(b"CREATE SCHEMA pgherald")
            conn.execute(b"SET LOCAL search_path TO pgherald")
            for m in older:
                conn.execute(m.sql())
                conn.execute(b"INSERT INTO schema_version (version) VALUES (%s)", (m.version,))
        install_triggers(conn, "pgherald", "t", "public", "t")
        conn.execute(b"INSERT INTO t VALUES (1, 'a')")
    _, config, before = function_config(db)
    assert config is not None and "advisory" not in before  # the old one, with SET
    with db.connect() as conn:
        assert migrations.migrate(conn) == list(range(MIGRATION, migrations.LATEST_VERSION + 1))
    _, config, after = function_config(db)
    assert config is None and "pg_try_advisory_xact_lock_shared" in after
    with db.connect() as conn:
        conn.execute(b"UPDATE t SET v = 'b'")
        assert conn.execute(
            b"SELECT watch, op FROM pgherald.trigger_queue ORDER BY id"
        ).fetchall() == [("t", "insert"), ("t", "update")]
        assert capture_triggers(conn, "pgherald", "public", "t") == [
            "pgherald_capture",
            "pgherald_capture_truncate",
        ]


def test_the_function_is_the_same_in_a_store_with_another_name(db: Database) -> None:
    """Store names are in the body (qualified names, the channel, the setting): a hostile
    one stays a name, and installs and upgrades give one body per store."""
    schema = 'st%s "re'
    settings = h.install(
        db.dsn, [], settings=h.settings_for(db.dsn, method="trigger", schema=schema), slot=False
    )
    _, config, body = function_config(db, schema)
    assert config is None and wake_channel(schema) in body
    with db.connect() as conn:
        conn.execute(b"CREATE TABLE u (id int PRIMARY KEY)")
    admin.add_watch(settings, "u")
    with db.connect() as drainer, db.connect() as listener, db.connect() as writer:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(wake_channel(schema))))
        assert arm(drainer, schema)
        writer.execute(b"INSERT INTO u VALUES (1)")
        assert len(list(listener.notifies(timeout=5, stop_after=1))) == 1
