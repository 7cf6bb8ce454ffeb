"""The admin operations on a real server: install, watch registry, publication, uninstall.

The refusals matter as much as the successes: every refused ``add_watch`` must leave the
database exactly as it was (no watch, no publication change, no replica identity change).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg2
import psycopg2.extras
import pytest
from psycopg import sql

from pgherald import admin
from pgherald.config import Settings, WatchSpec
from pgherald.errors import CaptureError, SchemaError, WatchError
from pgherald.events import ChangeEvent, RowImage
from pgherald.store import migrations
from pgherald.store.changelog import ChangeLog
from tests.conftest import Database

_roles = itertools.count()

# -- names, without a database -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("employees", ("public", "employees")),
        ("HR.Employees", ("hr", "employees")),
        ("  hr . employees ", ("hr", "employees")),
        ('"My Schema"."My Table"', ("My Schema", "My Table")),
        ('"Weird ""Table"""', ("public", 'Weird "Table"')),
        ('"my schema"."Weird ""Table"""', ("my schema", 'Weird "Table"')),
        ('"a.b"."c.d"', ("a.b", "c.d")),
        ('"""; DROP TABLE x; --"', ("public", '"; DROP TABLE x; --')),
        ("Ünïcødé.名前", ("Ünïcødé", "名前")),
        ("t$1", ("public", "t$1")),
        ('"' + "é" * 31 + "x" + '"', ("public", "é" * 31 + "x")),  # 63 bytes
    ],
)
def test_parse_table_name(text: str, expected: tuple[str, str]) -> None:
    assert admin.parse_table_name(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"; DROP TABLE x; --', "double quote is not closed"),
        ("x; DROP TABLE y", "double quotes"),
        ("my table", "double quotes"),
        ("a.b.c", "write schema.table"),
        ("", "double quotes"),
        ('""', "empty name"),
        ("a.", "double quotes"),
        ("1abc", "double quotes"),
        ('"' + "é" * 32 + '"', "63-byte limit"),
        ("x" * 64, "63-byte limit"),
    ],
)
def test_parse_table_name_refuses(text: str, message: str) -> None:
    with pytest.raises(WatchError, match=message) as info:
        admin.parse_table_name(text)
    assert "\n" not in str(info.value)


def test_parse_column_list() -> None:
    assert admin.parse_column_list("a, B ,c") == ("a", "b", "c")
    assert admin.parse_column_list('"a,b", "C"') == ("a,b", "C")
    with pytest.raises(WatchError, match="listed twice"):
        admin.parse_column_list("a,A")
    with pytest.raises(WatchError):
        admin.parse_column_list("a,,b")
    with pytest.raises(WatchError):
        admin.parse_column_list("a,")


def test_show_name_quotes_only_where_needed_and_stays_on_one_line() -> None:
    assert admin.show_name("public", "employees") == "public.employees"
    assert admin.show_name("My Schema", 'a"b') == '"My Schema"."a""b"'
    assert admin.show_name("a\nb") == '"a\\x0ab"'


# -- helpers ----------------------------------------------------------------------------------


def settings_for(db: Database, **kw: Any) -> Settings:
    return Settings(dsn=db.dsn, **kw)


def snapshot(db: Database, schema: str = "pgherald") -> dict[str, Any]:
    """Everything a watch operation could change, to prove a refusal changed nothing."""
    rows = db.execute(
        "SELECT n.nspname, c.relname, c.relkind::text, c.relreplident::text"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        " ORDER BY 1, 2"
    )
    pubs = db.execute(
        "SELECT p.pubname, pr.prrelid::regclass::text FROM pg_publication p"
        " LEFT JOIN pg_publication_rel pr ON pr.prpubid = p.oid ORDER BY 1, 2"
    )
    watches: list[tuple[object, ...]] = []
    if db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)):
        with db.connect() as conn:
            watches = conn.execute(
                sql.SQL(
                    "SELECT name, schema_name, table_name, key_columns FROM {}.watches"
                    " ORDER BY name"
                ).format(sql.Identifier(schema))
            ).fetchall()
    slots = db.execute("SELECT slot_name FROM pg_replication_slots ORDER BY 1")
    return {"relations": rows, "publications": pubs, "watches": watches, "slots": slots}


def publication_tables(db: Database, name: str = "pgherald") -> set[tuple[str, str]]:
    rows = db.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,)
    )
    return {(str(s), str(t)) for s, t in rows}


def replica_identity(db: Database, qualified: str) -> str:
    rows = db.execute(
        "SELECT relreplident::text FROM pg_class WHERE oid = %s::regclass", (qualified,)
    )
    return str(rows[0][0])


@pytest.fixture
def installed(db: Database) -> Database:
    db.execute(
        "CREATE TABLE employees (id int PRIMARY KEY, name text, salary numeric,"
        " updated_at timestamptz);"
        " CREATE TABLE nokey (a int, b text);"
        " CREATE TABLE unique_key (a int NOT NULL, b text, UNIQUE (a));"
        " CREATE VIEW v AS SELECT * FROM employees;"
        ' CREATE TABLE "CamelCase" (id int PRIMARY KEY)'
    )
    admin.init(settings_for(db))
    return db


# -- install ----------------------------------------------------------------------------------


def test_init_is_harmless_twice(db: Database) -> None:
    first = admin.init(settings_for(db))
    assert first.installed
    assert first.version == migrations.LATEST_VERSION
    before = snapshot(db)
    second = admin.init(settings_for(db))
    assert not second.installed
    assert second.version == migrations.LATEST_VERSION
    assert snapshot(db) == before


def test_init_adds_declared_watches_once(db: Database) -> None:
    db.execute("CREATE TABLE employees (id int PRIMARY KEY, updated_at timestamptz)")
    settings = settings_for(
        db, watches=(WatchSpec(table="employees", ignore_columns=("updated_at",)),)
    )
    assert admin.init(settings).watches_added == ("employees",)
    assert admin.init(settings).watches_added == ()
    [w] = admin.list_watches(settings)
    assert w.ignore_columns == ("updated_at",)


def test_migrate_needs_an_installed_store_and_then_does_nothing(db: Database) -> None:
    with pytest.raises(SchemaError, match="pgherald init"):
        admin.migrate(settings_for(db))
    admin.init(settings_for(db))
    result = admin.migrate(settings_for(db))
    assert result.from_version == result.to_version == migrations.LATEST_VERSION


def test_custom_schema_and_publication(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = settings_for(db, schema="Herald Store", publication="Herald Pub")
    admin.init(settings)
    admin.add_watch(settings, "t")
    assert publication_tables(db, "Herald Pub") == {("public", "t")}
    assert [w.name for w in admin.list_watches(settings)] == ["t"]


# -- add_watch ----------------------------------------------------------------------------------


def test_add_watch_with_primary_key(installed: Database) -> None:
    settings = settings_for(installed)
    added = admin.add_watch(settings, "public.employees", ignore_columns=["updated_at"])
    w = added.watch
    assert (w.name, w.schema_name, w.table_name, w.method) == (
        "employees",
        "public",
        "employees",
        "logical",
    )
    assert w.key_columns == ("id",)
    assert w.columns is None
    assert w.ignore_columns == ("updated_at",)
    assert added.replica_identity == "default"
    assert any("DEFAULT" in note for note in added.notes)
    assert publication_tables(installed) == {("public", "employees")}


def test_initial_snapshot_is_asked_for_in_the_watch_options(installed: Database) -> None:
    settings = settings_for(installed)
    assert admin.add_watch(settings, "employees", snapshot=True).watch.options == {"snapshot": True}
    assert admin.add_watch(settings, '"CamelCase"').watch.options == {}


def test_replica_identity_full_on_request(installed: Database) -> None:
    added = admin.add_watch(settings_for(installed), "employees", replica_identity_full=True)
    assert added.replica_identity == "full"
    assert replica_identity(installed, "employees") == "f"


def test_table_without_primary_key_is_refused_with_how_to_fix(installed: Database) -> None:
    before = snapshot(installed)
    with pytest.raises(WatchError, match="no primary key: pass --key") as info:
        admin.add_watch(settings_for(installed), "nokey")
    assert "add a primary key" in str(info.value)
    assert snapshot(installed) == before


def test_key_without_identity_would_break_writes_so_it_is_refused(installed: Database) -> None:
    before = snapshot(installed)
    with pytest.raises(WatchError, match="would reject its UPDATEs and DELETEs"):
        admin.add_watch(settings_for(installed), "nokey", key=["a"])
    assert snapshot(installed) == before
    # ... and the table's writers really are unaffected
    installed.execute("INSERT INTO nokey VALUES (1, 'x'); UPDATE nokey SET b = 'y'")


def test_key_with_replica_identity_full(installed: Database) -> None:
    added = admin.add_watch(settings_for(installed), "nokey", key=["a"], replica_identity_full=True)
    assert added.watch.key_columns == ("a",)
    assert replica_identity(installed, "nokey") == "f"
    assert any("no unique index" in note for note in added.notes)
    assert ("public", "nokey") in publication_tables(installed)
    installed.execute(
        "INSERT INTO nokey VALUES (1, 'x'); UPDATE nokey SET b = 'y'; DELETE FROM nokey"
    )


def test_replica_identity_nothing_is_refused(installed: Database) -> None:
    installed.execute("ALTER TABLE employees REPLICA IDENTITY NOTHING")
    before = snapshot(installed)
    with pytest.raises(WatchError, match="REPLICA IDENTITY NOTHING"):
        admin.add_watch(settings_for(installed), "employees")
    assert snapshot(installed) == before


def test_replica_identity_index_gives_the_key(installed: Database) -> None:
    installed.execute("ALTER TABLE unique_key REPLICA IDENTITY USING INDEX unique_key_a_key")
    added = admin.add_watch(settings_for(installed), "unique_key")
    assert added.watch.key_columns == ("a",)
    assert added.replica_identity == "index"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table": "nope"}, "no table public.nope"),
        ({"table": "other.employees"}, "no table other.employees"),
        ({"table": "camelcase"}, 'did you mean public."CamelCase"'),
        ({"table": "v"}, "is a view"),
        ({"table": "employees", "columns": ["id", "nme"]}, "no column nme in table"),
        ({"table": "employees", "ignore_columns": ["Name"]}, 'no column "Name"'),
        ({"table": "employees", "key": ["idd"]}, "no column idd"),
        ({"table": "employees", "key": ["id"], "ignore_columns": ["id"]}, "key column id"),
        (
            {"table": "employees", "columns": ["name"], "ignore_columns": ["name"]},
            "both in --columns and in --ignore-columns",
        ),
        ({"table": "employees", "method": "magic"}, "unknown capture method"),
        ({"table": "employees", "name": ""}, "must not be empty"),
        ({"table": "employees", "name": "a\nb"}, "control characters"),
    ],
)
def test_refusals_change_nothing(installed: Database, kwargs: dict[str, Any], message: str) -> None:
    before = snapshot(installed)
    kwargs = dict(kwargs)  # the parameter is shared by the matrix's runs
    table = kwargs.pop("table")
    with pytest.raises(WatchError, match=message) as info:
        admin.add_watch(settings_for(installed), table, **kwargs)
    assert "\n" not in str(info.value)
    assert snapshot(installed) == before


def test_duplicate_watches_are_refused(installed: Database) -> None:
    settings = settings_for(installed)
    admin.add_watch(settings, "employees")
    before = snapshot(installed)
    with pytest.raises(WatchError, match="exists already"):
        admin.add_watch(settings, "employees", replica_identity_full=True)
    with pytest.raises(WatchError, match="already watched by 'employees'"):
        admin.add_watch(settings, "employees", name="again")
    assert snapshot(installed) == before
    assert replica_identity(installed, "employees") == "d"


def test_watch_operations_need_a_current_store(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with pytest.raises(SchemaError, match="pgherald init"):
        admin.add_watch(settings_for(db), "t")
    admin.init(settings_for(db))
    latest = migrations.LATEST_VERSION
    db.execute("DELETE FROM pgherald.schema_version WHERE version = %s", (latest,))
    db.execute("DELETE FROM pgherald.schema_version WHERE version > %s", (latest - 1,))
    before = snapshot(db)
    for operation in (
        lambda: admin.add_watch(settings_for(db), "t"),
        lambda: admin.list_watches(settings_for(db)),
        lambda: admin.remove_watch(settings_for(db), "t"),
        lambda: list(admin.read_changes(settings_for(db))),
    ):
        with pytest.raises(SchemaError, match="pgherald migrate"):
            operation()
    assert snapshot(db) == before


# -- one transaction: a late failure undoes the early steps --------------------------------------


@pytest.fixture
def role(db: Database) -> Iterator[str]:
    name = f"herald_role_{next(_roles)}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)).as_string(None))
    yield name
    db.execute(
        sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(name)).as_string(None)
    )


def test_failure_after_the_watch_is_stored_rolls_everything_back(
    installed: Database, role: str
) -> None:
    """The role owns its table (so it may set REPLICA IDENTITY FULL and insert the watch),
    but not the publication, so the last step fails: the first two must be undone."""
    settings = settings_for(installed)
    admin.add_watch(settings, "employees")  # creates the publication, owned by postgres
    ident = sql.Identifier(role)
    installed.execute(
        sql.SQL(
            "CREATE TABLE mine (id int); ALTER TABLE mine OWNER TO {0};"
            " GRANT USAGE ON SCHEMA pgherald TO {0};"
            " GRANT ALL ON ALL TABLES IN SCHEMA pgherald TO {0}"
        )
        .format(ident)
        .as_string(None)
    )
    before = snapshot(installed)
    as_role = Settings(dsn=installed.cluster.dsn(installed.name, user=role))
    with pytest.raises(WatchError, match="cannot update publication") as info:
        admin.add_watch(as_role, "mine", key=["id"], replica_identity_full=True, method="logical")
    assert "\n" not in str(info.value)
    assert snapshot(installed) == before
    assert replica_identity(installed, "mine") == "d"


def test_unowned_table_cannot_get_replica_identity_full(installed: Database, role: str) -> None:
    installed.execute(
        sql.SQL(
            "GRANT USAGE ON SCHEMA pgherald TO {0};"
            " GRANT ALL ON ALL TABLES IN SCHEMA pgherald TO {0}"
        )
        .format(sql.Identifier(role))
        .as_string(None)
    )
    before = snapshot(installed)
    as_role = Settings(dsn=installed.cluster.dsn(installed.name, user=role))
    with pytest.raises(WatchError, match="only the table's owner"):
        admin.add_watch(as_role, "employees", replica_identity_full=True, method="logical")
    assert snapshot(installed) == before


# -- list and remove ----------------------------------------------------------------------------


def test_remove_watch_updates_the_publication(installed: Database) -> None:
    settings = settings_for(installed)
    admin.add_watch(settings, "employees")
    admin.add_watch(settings, '"CamelCase"', name="camel")
    assert [w.name for w in admin.list_watches(settings)] == ["camel", "employees"]
    assert publication_tables(installed) == {("public", "employees"), ("public", "CamelCase")}
    removed = admin.remove_watch(settings, "camel")
    assert removed.table_name == "CamelCase"
    assert publication_tables(installed) == {("public", "employees")}
    assert [w.name for w in admin.list_watches(settings)] == ["employees"]
    with pytest.raises(WatchError, match="no watch named 'camel'"):
        admin.remove_watch(settings, "camel")


# -- uninstall ----------------------------------------------------------------------------------


def slot_names(db: Database) -> list[str]:
    return [str(r[0]) for r in db.execute("SELECT slot_name FROM pg_replication_slots")]


def test_first_logical_watch_creates_the_slot_so_changes_are_kept(installed: Database) -> None:
    settings = settings_for(installed)
    assert slot_names(installed) == []
    added = admin.add_watch(settings, "employees")
    assert slot_names(installed) == ["pgherald"]
    assert any("created replication slot" in n for n in added.notes)
    installed.execute("INSERT INTO employees (id, name) VALUES (1, 'before run')")
    changes = installed.execute(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('pgherald', NULL, NULL,"
        " 'proto_version', '1', 'publication_names', 'pgherald')"
    )
    kept = changes[0][0]
    assert isinstance(kept, int) and kept >= 3  # BEGIN, RELATION, INSERT, COMMIT: kept for run


def test_a_lost_slot_is_not_recreated_behind_the_change_logs_back(installed: Database) -> None:
    settings = settings_for(installed)
    admin.add_watch(settings, "employees")
    installed.execute(
        "INSERT INTO pgherald.checkpoints (source, position) VALUES ('logical:pgherald', '0/1')"
    )
    installed.execute("SELECT pg_drop_replication_slot('pgherald')")
    installed.execute("CREATE TABLE other (id int PRIMARY KEY)")
    admin.add_watch(settings, "other")
    assert slot_names(installed) == []  # capture reports the gap; --resync accepts it


def test_uninstall_removes_everything(installed: Database) -> None:
    settings = settings_for(installed)
    admin.add_watch(settings, "employees")
    result = admin.uninstall(settings)
    assert result.removed == (
        "replication slot pgherald",
        "publication pgherald",
        "schema pgherald",
    )
    after = snapshot(installed)
    assert after["slots"] == [] and after["publications"] == []
    assert not installed.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'pgherald'")
    assert installed.execute("SELECT count(*) FROM employees") == [(0,)]
    assert admin.uninstall(settings).removed == ()


def test_uninstall_refuses_while_the_slot_is_in_use(installed: Database) -> None:
    settings = settings_for(installed)
    admin.add_watch(settings, "employees")
    before = snapshot(installed)
    replication = psycopg2.connect(
        installed.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    try:
        cur = replication.cursor()
        cur.start_replication(
            slot_name="pgherald",
            options={"proto_version": "1", "publication_names": "pgherald"},
        )
        with pytest.raises(CaptureError, match="in use by process") as info:
            admin.uninstall(settings)
        assert "pgherald run" in str(info.value)
        assert snapshot(installed) == before
    finally:
        replication.close()


def test_uninstall_keeps_a_slot_of_another_database(installed: Database) -> None:
    other = f"{installed.name}_other"
    installed.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)).as_string(None))
    try:
        with psycopg.connect(installed.cluster.dsn(other), autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('pgherald', 'pgoutput')")
        result = admin.uninstall(settings_for(installed))
        assert "schema pgherald" in result.removed
        assert result.kept and "belongs to database" in result.kept[0]
        assert installed.execute("SELECT database FROM pg_replication_slots") == [(other,)]
    finally:
        installed.execute("SELECT pg_drop_replication_slot('pgherald')")
        installed.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(other)).as_string(None))


# -- reading the change log ------------------------------------------------------------------


def event(n: int, watch: str = "employees", op: str = "insert") -> ChangeEvent:
    image = RowImage.from_texts({"id": (23, "integer")}, {"id": str(n)})
    return ChangeEvent(
        event_id=f"T/{n}",
        watch=watch,
        op=op,  # type: ignore[arg-type]
        schema="public",
        table="employees",
        key={"id": str(n)},
        old=None,
        new=image,
        changed=(),
        xid=n,
        position=str(n),
        commit_time=datetime(2024, 1, 1, tzinfo=UTC),
        captured_at=datetime(2024, 1, 1, tzinfo=UTC),
        method="trigger",
    )


def test_read_changes_pages_filters_and_resumes(installed: Database) -> None:
    settings = settings_for(installed)
    admin.add_watch(settings, "employees")
    admin.add_watch(settings, '"CamelCase"', name="camel")
    events = [event(n, "camel" if n % 3 == 0 else "employees") for n in range(1, 11)]
    with installed.connect() as conn:
        ChangeLog(conn, "pgherald").append(events)
    every = list(admin.read_changes(settings, page=3))
    assert [s.event.event_id for s in every] == [e.event_id for e in events]
    ids = [s.id for s in every]
    assert ids == sorted(ids)
    camel = list(admin.read_changes(settings, watch="camel", page=2))
    assert [s.event.event_id for s in camel] == ["T/3", "T/6", "T/9"]
    after_event = list(admin.read_changes(settings, since="T/4", limit=3, page=2))
    assert [s.event.event_id for s in after_event] == ["T/5", "T/6", "T/7"]
    after_log_id = list(admin.read_changes(settings, since=str(ids[7])))
    assert [s.event.event_id for s in after_log_id] == ["T/9", "T/10"]
    with pytest.raises(WatchError, match="no event 'T/99'"):
        list(admin.read_changes(settings, since="T/99"))
    with pytest.raises(WatchError, match="no watch named 'ghost'"):
        list(admin.read_changes(settings, watch="ghost"))
