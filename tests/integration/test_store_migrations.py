"""The store's schema: migrations equal schema.sql, installs are safe, versions are checked."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pgherald.errors import ConfigError, SchemaError
from pgherald.store import checkpoints, migrations, watches
from pgherald.store.queries import read_sql
from tests.conftest import Database, _drop_database, _new_database

SCHEMA = "pgherald"

CATALOG_QUERIES: dict[str, str] = {
    "tables": """
        SELECT table_name, table_type FROM information_schema.tables
        WHERE table_schema = %(s)s ORDER BY 1""",
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, udt_name, is_nullable,
               column_default, character_maximum_length, numeric_precision
        FROM information_schema.columns WHERE table_schema = %(s)s ORDER BY 1, 3""",
    "constraints": """
        SELECT cl.relname, co.conname, co.contype, pg_get_constraintdef(co.oid)
        FROM pg_constraint co
        JOIN pg_class cl ON cl.oid = co.conrelid
        JOIN pg_namespace n ON n.oid = cl.relnamespace
        WHERE n.nspname = %(s)s ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = %(s)s ORDER BY 1, 2""",
    "sequences": """
        SELECT sequence_name, data_type, start_value, increment FROM information_schema.sequences
        WHERE sequence_schema = %(s)s ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), md5(p.prosrc)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = %(s)s ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(s)s AND NOT t.tgisinternal ORDER BY 1, 2""",
}


def catalog(db: Database, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    with db.connect() as conn:
        return {
            name: conn.execute(q.encode(), {"s": schema}).fetchall()
            for name, q in CATALOG_QUERIES.items()
        }


def test_migrations_give_exactly_schema_sql(db: Database) -> None:
    with db.connect() as conn:
        assert migrations.migrate(conn, SCHEMA) == list(range(1, migrations.LATEST_VERSION + 1))
    other = _new_database(db.cluster)
    try:
        with other.connect() as conn, conn.transaction():
            conn.execute(f"CREATE SCHEMA {SCHEMA}".encode())
            conn.execute(f"SET LOCAL search_path TO {SCHEMA}".encode())
            conn.execute(read_sql("schema.sql").encode())
        migrated, reference = catalog(db, SCHEMA), catalog(other, SCHEMA)
        assert {t for t, _ in reference["tables"]} == {
            "schema_version", "watches", "runs", "errors", "shapes", "events", "event_fields",
            "checkpoints", "sinks", "subscriptions", "deliveries", "trigger_queue", "trigger_wake",
            "delivery_attempts", "web_users", "web_user_watches", "web_secrets",
        }  # fmt: skip
        assert len(reference["indexes"]) > 12
        for part in CATALOG_QUERIES:
            assert migrated[part] == reference[part], part
        with other.connect() as conn:
            assert migrations.current_version(conn, SCHEMA) == migrations.LATEST_VERSION
    finally:
        _drop_database(other)


def test_install_twice_is_harmless(db: Database) -> None:
    with db.connect() as conn:
        migrations.install(conn, SCHEMA)
        watches.add_watch(conn, SCHEMA, watches.Watch("w", "public", "t", "logical", ("id",)))
        before = catalog(db, SCHEMA)
        migrations.install(conn, SCHEMA)
        assert migrations.migrate(conn, SCHEMA) == []
        assert catalog(db, SCHEMA) == before
        assert [w.name for w in watches.list_watches(conn, SCHEMA)] == ["w"]
        assert conn.execute(b"SELECT count(*) FROM pgherald.schema_version").fetchone() == (
            migrations.LATEST_VERSION,
        )
        migrations.require_current(conn, SCHEMA)


def test_concurrent_installs_do_not_collide(db: Database) -> None:
    failures: list[BaseException] = []
    barrier = threading.Barrier(3)

    def install() -> None:
        try:
            with db.connect() as conn:
                barrier.wait()
                migrations.install(conn, SCHEMA)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=install) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    with db.connect() as conn:
        assert migrations.current_version(conn, SCHEMA) == migrations.LATEST_VERSION
        versions = conn.execute(
            b"SELECT version FROM pgherald.schema_version ORDER BY version"
        ).fetchall()
        assert versions == [(v,) for v in range(1, migrations.LATEST_VERSION + 1)]


def test_install_in_callers_transaction_commits_with_it(db: Database) -> None:
    with db.connect(autocommit=False) as conn:
        migrations.install(conn, SCHEMA)
        conn.rollback()
        assert migrations.current_version(conn, SCHEMA) is None
        migrations.install(conn, SCHEMA)
        conn.commit()
    with db.connect() as conn:
        assert migrations.current_version(conn, SCHEMA) == migrations.LATEST_VERSION


def test_require_current_says_what_to_run(db: Database) -> None:
    with db.connect() as conn:
        with pytest.raises(SchemaError, match=r"not installed .*run `pgherald init`"):
            migrations.require_current(conn, SCHEMA)
        conn.execute(b"CREATE SCHEMA pgherald")  # an empty schema is not an installed store
        with pytest.raises(SchemaError, match=r"run `pgherald init`"):
            migrations.require_current(conn, SCHEMA)
        migrations.install(conn, SCHEMA)
        migrations.require_current(conn, SCHEMA)

        latest = migrations.LATEST_VERSION
        conn.execute(b"DELETE FROM pgherald.schema_version WHERE version = %s", (latest,))
        conn.execute(
            b"INSERT INTO pgherald.schema_version (version) VALUES (%s) ON CONFLICT DO NOTHING",
            (latest - 1,),
        )
        assert migrations.current_version(conn, SCHEMA) == latest - 1
        with pytest.raises(SchemaError, match=r"run `pgherald migrate`") as older:
            migrations.require_current(conn, SCHEMA)
        assert f"version {latest - 1}" in str(older.value)
        assert "\n" not in str(older.value)

        conn.execute(b"INSERT INTO pgherald.schema_version (version) VALUES (%s)", (latest + 1,))
        with pytest.raises(SchemaError, match=r"newer .*upgrade pgherald"):
            migrations.require_current(conn, SCHEMA)
        with pytest.raises(SchemaError, match=r"upgrade pgherald"):
            migrations.migrate(conn, SCHEMA)


def test_drop_schema_uninstalls(db: Database) -> None:
    with db.connect() as conn:
        migrations.install(conn, SCHEMA)
        migrations.drop_schema(conn, SCHEMA)
        assert migrations.current_version(conn, SCHEMA) is None
        assert conn.execute(
            b"SELECT count(*) FROM pg_namespace WHERE nspname = %s", (SCHEMA,)
        ).fetchone() == (0,)
        migrations.drop_schema(conn, SCHEMA)  # already gone: nothing to do


HOSTILE = [
    '"; DROP TABLE x; --',
    'it\'s "quoted"',
    "x\n; DROP TABLE x; --",
    "Ünïcødé スキーマ",
    "é" * 31 + "a",  # 63 bytes, PostgreSQL's limit
    "public.x",
]


@pytest.mark.parametrize("schema", HOSTILE)
def test_hostile_schema_names_are_only_names(db: Database, schema: str) -> None:
    with db.connect() as conn:
        conn.execute(b"CREATE TABLE x (id int)")
        migrations.install(conn, schema)
        migrations.require_current(conn, schema)
        watches.add_watch(conn, schema, watches.Watch("w", "public", "x", "snapshot", ("id",)))
        checkpoints.save_checkpoint(conn, schema, "src", "0/10")
        assert checkpoints.load_checkpoint(conn, schema, "src") == "0/10"
        assert [w.name for w in watches.list_watches(conn, schema)] == ["w"]
        names = conn.execute(
            b"SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            b" WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY 1",
            (schema,),
        ).fetchall()
        assert ("events",) in names and ("watches",) in names
        assert conn.execute(b"SELECT to_regclass('public.x') IS NOT NULL").fetchone() == (True,)
        assert conn.execute(b"SELECT to_regclass('public.events')").fetchone() == (None,)
        migrations.drop_schema(conn, schema)
        assert migrations.current_version(conn, schema) is None
        assert conn.execute(b"SELECT to_regclass('public.x') IS NOT NULL").fetchone() == (True,)


@pytest.mark.parametrize("schema", ["", "a" * 64, "é" * 32, "nul\x00"])
def test_impossible_schema_names_are_refused_before_any_sql(db: Database, schema: str) -> None:
    with db.connect() as conn:
        count = b"SELECT count(*) FROM pg_namespace"
        before = conn.execute(count).fetchone()
        with pytest.raises(ConfigError, match="schema name"):
            migrations.install(conn, schema)
        assert conn.execute(count).fetchone() == before


def test_search_path_is_put_back(db: Database) -> None:
    with db.connect(autocommit=False) as conn:
        conn.execute(b"SET search_path TO public")
        conn.commit()
        migrations.install(conn, SCHEMA)
        watches.list_watches(conn, SCHEMA)
        assert conn.execute(b"SHOW search_path").fetchone() == ("public",)
        conn.commit()
        assert conn.execute(b"SHOW search_path").fetchone() == ("public",)


def test_a_store_in_another_schema_is_independent(db: Database) -> None:
    with db.connect() as conn:
        migrations.install(conn, "one")
        migrations.install(conn, "two")
        watches.add_watch(conn, "one", watches.Watch("w", "public", "t", "logical"))
        assert watches.list_watches(conn, "two") == []
        assert [w.name for w in watches.list_watches(conn, "one")] == ["w"]


def test_migrations_are_numbered_and_shipped() -> None:
    found = migrations.available_migrations()
    assert [m.version for m in found] == list(range(1, migrations.LATEST_VERSION + 1))
    assert found[0].filename == "0001_initial.sql"
    assert b"CREATE TABLE events" in found[0].sql()
