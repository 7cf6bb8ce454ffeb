"""Hostile identifiers through every command that takes one.

Real tables, schemas and columns with names built to break string-built SQL (quotes,
semicolons, comment markers, format placeholders, dots, commas, newlines, Unicode, names
of exactly 63 bytes) are created, watched, captured, listed and removed through the CLI.
The same strings given where they do not parse, or name nothing, are refused with one
line, and a catalog snapshot taken before and after proves that nothing changed; the
decoy tables that an injection would drop are still there at the end.
"""

from __future__ import annotations

import json
import signal

from psycopg import sql

from tests.acceptance._cli import (
    assert_fails,
    assert_ok,
    catalog_snapshot,
    cli,
    slot_active,
    start,
    wait_for,
)
from tests.conftest import Database

INJECTION = '"; DROP TABLE x; --'
BOBBY = "Robert'); DROP TABLE students;--"
SIXTY_THREE = "é" * 31 + "x"  # 63 bytes in UTF-8
assert len(SIXTY_THREE.encode()) == 63

# (schema, table, the watch name to give, or None for the default)
TABLES: list[tuple[str, str, str | None]] = [
    ("public", INJECTION, None),
    ("public", BOBBY, "'; DROP TABLE x; --"),
    ('sch"ema', 'ta"ble', None),
    ("Ünïcødé", "名前 🚀", None),
    ("public", "a" * 63, None),
    ("public", SIXTY_THREE, None),
    ("my.schema", "my.table", None),
    ("public", "comma,name", None),
    ("public", "new\nline", "newline"),
    ("public", "$1 %s %(x)s {} {0}", None),
    ("public", "UPPER Case", None),
]
COLUMNS = ["id", INJECTION, "a,b", 'Üñí "q"']


def quoted(*parts: str) -> str:
    """The name as a user types it on the command line: SQL's quoted identifiers."""
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def default_name(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


def create_hostile_tables(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("CREATE TABLE x (v int); INSERT INTO x VALUES (1)")
        conn.execute("CREATE TABLE students (v int); INSERT INTO students VALUES (1)")
        for schema, table, _ in TABLES:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(
                sql.SQL("CREATE TABLE {} ({} int PRIMARY KEY, {} text, {} text, {} text)").format(
                    sql.Identifier(schema, table), *(sql.Identifier(c) for c in COLUMNS)
                )
            )


def decoys_intact(db: Database) -> bool:
    return db.execute("SELECT (SELECT count(*) FROM x) + (SELECT count(*) FROM students)") == [(2,)]


def test_hostile_tables_and_columns_through_every_command(db: Database) -> None:
    dsn = db.dsn
    create_hostile_tables(db)
    assert_ok(cli("init", dsn=dsn))

    names = []
    for schema, table, name in TABLES:
        args = ["watch", "add", quoted(schema, table)]
        if name is not None:
            args += ["--name", name]
        added = assert_ok(cli(*args, dsn=dsn))
        assert "\n" not in added.lines[0]
        names.append(name or default_name(schema, table))
    # --columns, --ignore-columns and --key with hostile column names, on a second watch
    spare = "spare_" + "z"
    db.execute(
        sql.SQL("CREATE TABLE {} ({} int, {} text, {} text, {} text)")
        .format(sql.Identifier(spare), *(sql.Identifier(c) for c in COLUMNS))
        .as_string(None)
    )
    assert_ok(
        cli(
            "watch",
            "add",
            spare,
            "--columns",
            f"id, {quoted(INJECTION)}, {quoted('a,b')}",
            "--ignore-columns",
            quoted('Üñí "q"'),
            "--key",
            f"id,{quoted(INJECTION)}",
            "--replica-identity-full",
            dsn=dsn,
        )
    )
    names.append(spare)

    listed = json.loads(assert_ok(cli("watch", "list", "--format", "json", dsn=dsn)).stdout)
    by_name = {w["name"]: w for w in listed}
    assert set(by_name) == set(names)
    for (schema, table, _), name in zip(TABLES, names, strict=False):
        assert (by_name[name]["schema_name"], by_name[name]["table_name"]) == (schema, table)
    assert by_name[spare]["columns"] == ["id", INJECTION, "a,b"]
    assert by_name[spare]["ignore_columns"] == ['Üñí "q"']
    assert by_name[spare]["key_columns"] == ["id", INJECTION]
    text_list = assert_ok(cli("watch", "list", dsn=dsn)).lines
    assert len(text_list) == 1 + len(names)  # one line per watch, newlines escaped
    published = db.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = 'pgherald'"
    )
    assert {(str(s), str(t)) for s, t in published} == {(s, t) for s, t, _ in TABLES} | {
        ("public", spare)
    }

    # capture a change in every hostile table
    runner = start("run", dsn=dsn)
    try:
        wait_for(lambda: slot_active(db), what="pgherald run to open its slot")
        with db.connect() as conn:
            for i, (schema, table, _) in enumerate(TABLES):
                # Values as literals, not parameters: psycopg would read a "%s" inside a
                # quoted identifier of a parameterised query as a placeholder.
                conn.execute(
                    sql.SQL("INSERT INTO {} VALUES ({})").format(
                        sql.Identifier(schema, table),
                        sql.SQL(", ").join(map(sql.Literal, (i, INJECTION, "%s", "{0}"))),
                    )
                )
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (1, 'a', 'b', 'c')").format(sql.Identifier(spare))
            )

        def captured() -> int:
            return len(cli("changes", "--format", "json", dsn=dsn).lines)

        wait_for(lambda: captured() == len(TABLES) + 1, what="a change of every hostile table")
    finally:
        runner.send_signal(signal.SIGINT)
        _, err = runner.communicate(timeout=30)
    assert runner.returncode == 0, err

    for i, ((schema, table, _), name) in enumerate(zip(TABLES, names, strict=False)):
        got = assert_ok(cli("changes", "--watch", name, "--format", "json", dsn=dsn)).lines
        [event] = [json.loads(line) for line in got]
        assert (event["schema"], event["table"], event["watch"]) == (schema, table, name)
        assert event["new"] == {"id": str(i), INJECTION: INJECTION, "a,b": "%s", 'Üñí "q"': "{0}"}
        since = assert_ok(cli("changes", "--since", event["event_id"], "--limit", "1", dsn=dsn))
        assert len(since.lines) <= 1
    text = assert_ok(cli("changes", dsn=dsn)).lines
    assert len(text) == len(TABLES) + 1  # one line per change, whatever the names hold

    for name in names:
        assert_ok(cli("watch", "remove", name, dsn=dsn))
    assert not db.execute("SELECT 1 FROM pg_publication_tables WHERE pubname = 'pgherald'")
    assert decoys_intact(db)


def test_hostile_strings_that_name_nothing_change_nothing(db: Database) -> None:
    dsn = db.dsn
    create_hostile_tables(db)
    assert_ok(cli("init", dsn=dsn))
    assert_ok(cli("watch", "add", quoted("public", INJECTION), dsn=dsn))
    before = catalog_snapshot(db)
    cases: list[tuple[tuple[str, ...], str]] = [
        (("watch", "add", INJECTION), "double quote is not closed"),
        (("watch", "add", BOBBY), "double quotes"),
        (("watch", "add", "x; DROP TABLE x"), "double quotes"),
        (("watch", "add", "x --"), "double quotes"),
        (("watch", "add", "public.x.students"), "write schema.table"),
        (("watch", "add", quoted("public", "x; DROP TABLE x")), "no table"),
        (("watch", "add", quoted("no schema", "x")), 'no table "no schema".x'),
        (("watch", "add", quoted("a" * 64)), "63-byte limit"),
        (("watch", "add", quoted("é" * 32)), "63-byte limit"),
        (("watch", "add", quoted("new\nline")), "control characters"),
        (("watch", "add", "x", "--columns", INJECTION), "double quote is not closed"),
        (("watch", "add", "x", "--columns", quoted("v; DROP TABLE x")), "no column"),
        (("watch", "add", "x", "--key", "v, DROP TABLE x"), "double quotes"),
        (("watch", "add", "x", "--ignore-columns", quoted(INJECTION)), "no column"),
        (("watch", "remove", "'; DROP TABLE x; --"), "no watch named"),
        (("watch", "remove", INJECTION + "x"), "no watch named"),
        (("changes", "--watch", "'; DROP TABLE x; --"), "no watch named"),
        (("changes", "--since", "'; DROP TABLE x; --"), "no event"),
        (("--schema", INJECTION, "watch", "list"), "not installed"),
        (("--schema", "a" * 64, "watch", "list"), "63"),
        (("--slot", "a" * 64, "watch", "list"), "63-byte"),
    ]
    for args, fragment in cases:
        line = assert_fails(cli(*args, dsn=dsn), fragment)
        assert "\n" not in line
        assert catalog_snapshot(db) == before, args
    assert decoys_intact(db)


def test_hostile_store_schema_and_publication_names(db: Database) -> None:
    dsn = db.dsn
    create_hostile_tables(db)
    schema = '"; DROP SCHEMA public CASCADE; -- %s %(x)s'
    publication = "pub'; DROP TABLE x; --"
    flags = ("--schema", schema, "--publication", publication)
    assert "installed" in assert_ok(cli(*flags, "init", dsn=dsn)).stdout
    assert_ok(cli(*flags, "watch", "add", quoted("public", BOBBY), "--name", "bobby", dsn=dsn))
    assert db.execute(
        "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (publication,)
    ) == [(BOBBY,)]
    assert db.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(1,)]
    listed = assert_ok(cli(*flags, "watch", "list", "--format", "json", dsn=dsn)).stdout
    assert [w["name"] for w in json.loads(listed)] == ["bobby"]
    doctor = assert_ok(cli(*flags, "doctor", dsn=dsn))
    assert "[ok  ] store: installed" in doctor.stdout
    removed = assert_ok(cli(*flags, "uninstall", "--yes", dsn=dsn)).lines
    assert removed == [
        "removed replication slot pgherald",  # created by the first logical watch
        f"removed publication {publication}",
        f"removed schema {quoted(schema)}",
    ]
    assert not db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
    assert db.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'public'") == [(1,)]
    assert decoys_intact(db)
