"""The ``pgherald`` command, run as a subprocess against real servers: every command, its
output and its exit status, and one clear line (never a traceback) for every bad input."""

from __future__ import annotations

import itertools
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald import __version__
from pgherald.db.embedded import EmbeddedCluster, free_port
from pgherald.store import migrations
from tests.acceptance._cli import (
    assert_fails,
    assert_ok,
    catalog_snapshot,
    cli,
    require_scram,
    slot_active,
    start,
    wait_for,
)
from tests.conftest import Database

_roles = itertools.count()


@pytest.fixture
def app_db(db: Database) -> Database:
    db.execute(
        "CREATE TABLE employees (id int PRIMARY KEY, name text, salary numeric,"
        " updated_at timestamptz DEFAULT now());"
        " CREATE TABLE projects (code text PRIMARY KEY, budget numeric);"
        " CREATE TABLE nokey (a int, b text)"
    )
    return db


def json_changes(db: Database, *args: str) -> list[dict[str, Any]]:
    result = assert_ok(cli("changes", "--format", "json", *args, dsn=db.dsn))
    return [json.loads(line) for line in result.lines]


# -- the basics ------------------------------------------------------------------------------


def test_version_and_help() -> None:
    assert assert_ok(cli("--version")).stdout.strip() == f"pgherald, version {__version__}"
    assert assert_ok(cli("--version", python_m=True)).stdout.strip().endswith(__version__)
    helped = assert_ok(cli("--help")).stdout
    for command in ("init", "migrate", "uninstall", "watch", "run", "changes", "doctor", "demo"):
        assert re.search(rf"^\s+{command}\s", helped, re.MULTILINE), command
    assert "--columns" in assert_ok(cli("watch", "add", "--help")).stdout


def test_help_works_with_a_broken_configuration() -> None:
    result = cli("init", "--help", env={"PGHERALD_BATCH_SIZE": "lots"})
    assert_ok(result)
    assert_fails(cli("init", env={"PGHERALD_BATCH_SIZE": "lots"}), "PGHERALD_BATCH_SIZE")


@pytest.mark.parametrize(
    "args",
    [
        ("bogus",),
        ("watch", "add"),
        ("watch", "list", "--format", "xml"),
        ("changes", "--limit", "0"),
        ("watch", "add", "t", "--method", "magic"),
        ("init", "--unknown-flag"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    result = cli(*args, dsn="host=127.0.0.1 port=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Usage:" in result.stderr


# -- install, watch, run, changes, uninstall: the whole story --------------------------------


def test_the_whole_story(app_db: Database) -> None:
    dsn = app_db.dsn
    first = assert_ok(cli("init", dsn=dsn))
    assert first.stdout.strip() == (
        f"installed pgherald's store in schema pgherald (version {migrations.LATEST_VERSION})"
    )
    again = assert_ok(cli("init", "--dsn", dsn))  # the flag also works after the command
    assert "already installed" in again.stdout
    assert "up to date" in assert_ok(cli("migrate", dsn=dsn)).stdout

    added = assert_ok(
        cli("watch", "add", "public.employees", "--ignore-columns", "updated_at", dsn=dsn)
    )
    assert (
        added.lines[0] == "added watch 'employees' on public.employees (logical capture, key: id)"
    )
    assert any("replica identity" in line and "DEFAULT" in line for line in added.lines[1:])
    full = assert_ok(
        cli(
            "watch",
            "add",
            "projects",
            "--name",
            "proj",
            "--replica-identity-full",
            "--columns",
            "code,budget",
            dsn=dsn,
        )
    )
    assert "REPLICA IDENTITY FULL" in full.stdout
    assert app_db.execute("SELECT relreplident::text FROM pg_class WHERE relname = 'projects'") == [
        ("f",)
    ]

    listed = assert_ok(cli("watch", "list", dsn=dsn)).lines
    assert listed[0].split() == [
        "NAME",
        "TABLE",
        "METHOD",
        "KEY",
        "STATUS",
        "CHANGES",
        "LAST",
        "SUCCESS",
        "NEXT",
        "RUN",
    ]
    assert [line.split()[:4] for line in listed[1:]] == [
        ["employees", "public.employees", "logical", "id"],
        ["proj", "public.projects", "logical", "code"],
    ]
    as_json = json.loads(assert_ok(cli("watch", "list", "--format", "json", dsn=dsn)).stdout)
    assert [(w["name"], w["columns"], w["ignore_columns"]) for w in as_json] == [
        ("employees", None, ["updated_at"]),
        ("proj", ["code", "budget"], []),
    ]

    runner = start("run", dsn=dsn)
    try:
        wait_for(lambda: slot_active(app_db), what="pgherald run to open its slot")
        with app_db.connect() as conn:
            conn.execute("INSERT INTO employees (id, name, salary) VALUES (1, 'Ann', 100)")
            with conn.transaction():
                conn.execute("UPDATE employees SET salary = 200, name = 'Anne' WHERE id = 1")
                conn.execute("INSERT INTO projects VALUES ('P1', 5000)")
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO employees (id, name) VALUES (99, 'rolled back')")
                    raise RuntimeError("roll back")
            except RuntimeError:
                pass
            conn.execute("UPDATE projects SET budget = 6000")
            conn.execute("DELETE FROM employees WHERE id = 1")
        wait_for(lambda: len(json_changes(app_db)) >= 5, what="five captured changes")
    finally:
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=30)
    assert runner.returncode == 0, err
    assert "Traceback" not in err

    events = json_changes(app_db)
    assert [(e["watch"], e["op"], e["key"]) for e in events] == [
        ("employees", "insert", {"id": "1"}),
        ("employees", "update", {"id": "1"}),
        ("proj", "insert", {"code": "P1"}),
        ("proj", "update", {"code": "P1"}),
        ("employees", "delete", {"id": "1"}),
    ]
    text = assert_ok(cli("changes", dsn=dsn)).lines
    assert len(text) == 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00  employees  insert  id=1", text[0])
    assert text[1].endswith("employees  update  id=1  name: Ann → Anne, salary: 100 → 200")
    assert text[3].endswith("proj  update  code=P1  budget: 5000 → 6000")
    assert text[4].endswith("employees  delete  id=1")

    # --watch, --since (event id and log id), --limit, --op
    assert [e["op"] for e in json_changes(app_db, "--watch", "proj")] == ["insert", "update"]
    since = json_changes(app_db, "--since", str(events[1]["event_id"]), "--limit", "2")
    assert [e["event_id"] for e in since] == [events[2]["event_id"], events[3]["event_id"]]
    [(third_log_id,)] = app_db.execute(
        "SELECT id FROM pgherald.events ORDER BY id OFFSET 2 LIMIT 1"
    )
    assert len(assert_ok(cli("changes", "--since", str(third_log_id), dsn=dsn)).lines) == 2
    assert [e["op"] for e in json_changes(app_db, "--op", "delete")] == ["delete"]
    assert_fails(cli("changes", "--since", "L/nope", dsn=dsn), "no event 'L/nope'")
    assert_fails(cli("changes", "--watch", "ghost", dsn=dsn), "no watch named 'ghost'")

    status = json.loads(assert_ok(cli("watch", "list", "--format", "json", dsn=dsn)).stdout)
    assert {w["name"]: w["changes_seen"] for w in status} == {"employees": 3, "proj": 2}

    removed = assert_ok(cli("watch", "remove", "proj", dsn=dsn))
    assert removed.stdout.strip() == "removed watch 'proj'"
    assert app_db.execute(
        "SELECT tablename FROM pg_publication_tables WHERE pubname = 'pgherald'"
    ) == [("employees",)]
    assert_fails(cli("watch", "remove", "proj", dsn=dsn), "no watch named 'proj'")
    assert len(json_changes(app_db, "--watch", "employees")) == 3  # history stays

    declined = cli("uninstall", dsn=dsn, input="n\n")
    assert declined.returncode == 1
    prompt, answer = (line.strip() for line in declined.stderr.strip().splitlines())
    assert prompt.startswith("Remove pgherald's store") and prompt.endswith("[y/N]:")
    assert answer.startswith("pgherald: uninstall cancelled; nothing was removed")
    assert app_db.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgherald'") == [(1,)]
    gone = assert_ok(cli("uninstall", dsn=dsn, input="y\n"))
    assert gone.lines == [
        "removed replication slot pgherald",
        "removed publication pgherald",
        "removed schema pgherald",
    ]
    snapshot = catalog_snapshot(app_db)
    assert snapshot["slots"] == [] and snapshot["publications"] == []
    assert "watches" not in snapshot
    nothing = assert_ok(cli("uninstall", "--yes", dsn=dsn))
    assert "nothing to remove" in nothing.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_cleanly_on_signals(app_db: Database, signum: int) -> None:
    assert_ok(cli("init", dsn=app_db.dsn))
    assert_ok(cli("watch", "add", "employees", dsn=app_db.dsn))
    runner = start("run", dsn=app_db.dsn)
    wait_for(lambda: slot_active(app_db), what="pgherald run to open its slot")
    runner.send_signal(signum)
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 0, err
    assert "Traceback" not in err
    assert not slot_active(app_db)


def test_watch_add_snapshot_starts_with_the_current_rows(app_db: Database) -> None:
    app_db.execute("INSERT INTO projects VALUES ('A', 1), ('B', 2), ('C', 3)")
    assert_ok(cli("init", dsn=app_db.dsn))
    added = assert_ok(cli("watch", "add", "projects", "--snapshot", dsn=app_db.dsn))
    assert "starting with a snapshot of its rows" in added.lines[0]
    runner = start("run", dsn=app_db.dsn)
    try:
        wait_for(lambda: slot_active(app_db), what="pgherald run to open its slot")
        app_db.execute("INSERT INTO projects VALUES ('D', 4)")
        wait_for(lambda: len(json_changes(app_db)) >= 4, what="three rows and an insert")
    finally:
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=30)
    assert runner.returncode == 0, err
    events = json_changes(app_db)
    assert sorted((e["op"], e["key"]["code"]) for e in events) == [
        ("insert", "D"),
        ("read", "A"),
        ("read", "B"),
        ("read", "C"),
    ]
    assert len(json_changes(app_db, "--op", "read")) == 3


def test_run_without_watches_says_what_to_do(app_db: Database) -> None:
    assert_ok(cli("init", dsn=app_db.dsn))
    assert_fails(cli("run", dsn=app_db.dsn), "pgherald watch add")


def test_environment_and_config_file(app_db: Database, tmp_path: Path) -> None:
    config = tmp_path / "herald.toml"
    config.write_text(
        f'dsn = "{app_db.dsn}"\nschema = "from_file"\n\n'
        '[[watch]]\ntable = "employees"\nignore_columns = ["updated_at"]\n'
    )
    added = assert_ok(cli("--config", str(config), "init"))
    assert "schema from_file" in added.stdout
    assert "added watch 'employees' from the configuration file" in added.stdout
    # PGHERALD_* beats the file, flags beat both
    listed = cli(
        "watch", "list", env={"PGHERALD_CONFIG": str(config), "PGHERALD_SCHEMA": "pgherald"}
    )
    assert_fails(listed, "not installed in schema 'pgherald'")
    flagged = cli(
        "watch",
        "list",
        "--schema",
        "from_file",
        env={"PGHERALD_CONFIG": str(config), "PGHERALD_SCHEMA": "pgherald"},
    )
    assert assert_ok(flagged).lines[1].startswith("employees")
    # libpq's own variables fill in an empty DSN
    pg_env = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(app_db.cluster.port),
        "PGUSER": "postgres",
        "PGDATABASE": app_db.name,
        "PGHERALD_SCHEMA": "from_file",
    }
    assert assert_ok(cli("watch", "list", env=pg_env)).lines[1].startswith("employees")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('shema = "x"\n', "unknown key 'shema'"),
        ('[[watch]]\ntable = "t"\ncolums = ["a"]\n', "unknown key 'colums'"),
        ("batch_size = 0\n", "at least 1"),
        ("dsn = \n", "not valid TOML"),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert_fails(cli("--config", str(config), "doctor"), fragment, str(config))


def test_missing_config_file(tmp_path: Path) -> None:
    assert_fails(cli("--config", str(tmp_path / "nope.toml"), "init"), "does not exist")


# -- bad input: each one line, a non-zero status, and nothing changed ---------------------------


def test_bad_watch_input_changes_nothing(app_db: Database) -> None:
    dsn = app_db.dsn
    assert_ok(cli("init", dsn=dsn))
    assert_ok(cli("watch", "add", "employees", dsn=dsn))
    before = catalog_snapshot(app_db)
    cases = [
        (("watch", "add", "no_such_table"), "no table public.no_such_table"),
        (("watch", "add", "other.employees"), "no table other.employees"),
        (("watch", "add", "projects", "--columns", "code,budgit"), "no column budgit"),
        (("watch", "add", "projects", "--ignore-columns", "nope"), "no column nope"),
        (("watch", "add", "projects", "--key", "kode"), "no column kode"),
        (("watch", "add", "nokey"), "no primary key: pass --key"),
        (("watch", "add", "nokey", "--key", "a"), "--replica-identity-full"),
        (("watch", "add", "employees"), "exists already"),
        (("watch", "add", "projects", "--columns", "code,"), "cannot read column list"),
        (("watch", "add", "my table"), "double quotes"),
        (("watch", "remove", "ghost"), "no watch named 'ghost'"),
    ]
    for args, fragment in cases:
        assert_fails(cli(*args, dsn=dsn), fragment)
        assert catalog_snapshot(app_db) == before, args


def test_unreachable_server() -> None:
    port = free_port()
    for args in (("init",), ("watch", "list"), ("changes",), ("doctor",), ("run",)):
        result = cli(*args, dsn=f"host=127.0.0.1 port={port} user=me password=Secret-123")
        line = assert_fails(result, f"127.0.0.1:{port}", "connection refused")
        assert "Secret-123" not in line


def test_unparsable_dsn_is_not_echoed() -> None:
    line = assert_fails(cli("doctor", dsn="host=x password=abc secretpart"), "not a valid libpq")
    assert "secretpart" not in line


def test_wrong_password(private_cluster: EmbeddedCluster) -> None:
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE ROLE alice LOGIN PASSWORD 'the-Right-one'")
    require_scram(private_cluster)
    base = private_cluster.dsn(user="alice")
    for args in (("init",), ("doctor",), ("watch", "list")):
        line = assert_fails(
            cli(*args, dsn=base + " password=Wrong-Pass-42"), "password authentication failed"
        )
        assert "Wrong-Pass-42" not in line and "the-Right-one" not in line
    env_line = assert_fails(
        cli("doctor", dsn=base, env={"PGPASSWORD": "Wrong-Pass-42"}),
        "password authentication failed",
    )
    assert "Wrong-Pass-42" not in env_line
    assert_fails(cli("doctor", dsn=base), "none was given")
    right = cli("doctor", dsn=base, env={"PGPASSWORD": "the-Right-one"})
    assert "Traceback" not in right.stderr
    assert "the-Right-one" not in right.stdout + right.stderr
    assert "user 'alice'" in right.stdout


def test_older_store_version(app_db: Database) -> None:
    dsn = app_db.dsn
    assert_ok(cli("init", dsn=dsn))
    assert_ok(cli("watch", "add", "employees", dsn=dsn))
    latest = migrations.LATEST_VERSION
    app_db.execute("DELETE FROM pgherald.schema_version WHERE version = %s", (latest,))
    app_db.execute("DELETE FROM pgherald.schema_version WHERE version > %s", (latest - 1,))
    before = catalog_snapshot(app_db)
    for args in (
        ("watch", "add", "projects"),
        ("watch", "list"),
        ("watch", "remove", "employees"),
        ("changes",),
        ("run",),
    ):
        assert_fails(cli(*args, dsn=dsn), f"version {latest - 1}", "pgherald migrate")
        assert catalog_snapshot(app_db) == before, args
    doctor = cli("doctor", dsn=dsn)
    assert doctor.returncode == 1
    assert "pgherald migrate" in doctor.stdout


def test_store_not_installed(app_db: Database) -> None:
    before = catalog_snapshot(app_db)
    for args in (("watch", "add", "employees"), ("watch", "list"), ("changes",), ("migrate",)):
        assert_fails(cli(*args, dsn=app_db.dsn), "pgherald init")
    assert catalog_snapshot(app_db) == before


def test_database_refusal_is_one_line(app_db: Database) -> None:
    """A privilege the server refuses mid-command is reported as PostgreSQL said it."""
    role = f"cli_role_{next(_roles)}"
    app_db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)).as_string(None))
    try:
        result = cli("init", dsn=app_db.cluster.dsn(app_db.name, user=role))
        assert_fails(result, "PostgreSQL said: permission denied")
    finally:
        app_db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)).as_string(None))


# -- doctor and demo ----------------------------------------------------------------------------


@pytest.fixture
def plain_role(db: Database) -> Iterator[str]:
    name = f"cli_plain_{next(_roles)}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)).as_string(None))
    yield name
    db.execute(
        sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(name)).as_string(None)
    )


def test_doctor(db: Database, plain_role: str) -> None:
    good = assert_ok(cli("doctor", dsn=db.dsn))
    assert good.lines[0].startswith("pgherald doctor: ")
    assert "  logical: possible" in good.lines
    assert "  trigger: possible" in good.lines
    assert "  snapshot: possible" in good.lines
    assert any(line.startswith("  auto picks logical capture: ") for line in good.lines)
    assert good.lines[-1] == "conclusion: capture can use logical, trigger, snapshot"
    report = json.loads(assert_ok(cli("doctor", "--format", "json", dsn=db.dsn)).stdout)
    assert report["ok"] is True and report["usable_methods"] == ["logical", "trigger", "snapshot"]
    assert report["auto"].startswith("auto picks logical capture")

    bad = cli("doctor", dsn=db.cluster.dsn(db.name, user=plain_role))
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert any("no REPLICATION attribute" in line for line in bad.lines)
    assert bad.lines[-1].startswith("conclusion: no capture method can work here")


def test_demo_runs_briefly() -> None:
    result = cli("demo", "--duration", "4", "--seed", "7", timeout=180)
    assert_ok(result)
    assert "pgherald demo:" in result.stdout
    assert re.search(r"\d+ changes committed .* \d+ captured and shown", result.stdout)
