"""Helpers for driving the installed ``pgherald`` command as a user would: in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgherald.db.embedded import EmbeddedCluster
from tests.conftest import Database

PGHERALD = Path(sys.executable).with_name("pgherald")
WORKDIR = Path(tempfile.mkdtemp(prefix="pgherald-cli-"))
"""An empty working directory, so no stray ./pgherald.toml is picked up."""


@dataclass
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without PGHERALD_* and PG* variables, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PGHERALD_") and not k.startswith("PG")
    }
    env["PGPASSFILE"] = str(WORKDIR / "no-pgpass")
    env.update(extra or {})
    return env


def cli(
    *args: str,
    dsn: str | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 120,
    python_m: bool = False,
) -> Result:
    """Runs ``pgherald [--dsn DSN] ARGS`` and returns what it did."""
    command = [sys.executable, "-m", "pgherald"] if python_m else [str(PGHERALD)]
    full = ([*command, "--dsn", dsn] if dsn is not None else command) + list(args)
    done = subprocess.run(
        full,
        capture_output=True,
        text=True,
        input=input if input is not None else "",
        env=clean_env(env),
        cwd=WORKDIR,
        timeout=timeout,
        check=False,
    )
    return Result(tuple(args), done.returncode, done.stdout, done.stderr)


def start(*args: str, dsn: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Starts ``pgherald --dsn DSN ARGS`` in the background (for ``run``)."""
    return subprocess.Popen(
        [str(PGHERALD), "--dsn", dsn, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(env),
        cwd=WORKDIR,
    )


def assert_ok(result: Result) -> Result:
    assert result.returncode == 0, f"{result.args}: {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def assert_fails(result: Result, *fragments: str, code: int = 1) -> str:
    """One clear line on stderr, ``pgherald: ...``, the expected status, no traceback."""
    assert result.returncode == code, (result.args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("pgherald: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def catalog_snapshot(db: Database, schema: str = "pgherald") -> dict[str, Any]:
    """What any pgherald command could change in a database: relations, their replica
    identity, publications and their tables, slots, functions, triggers, and the registry."""
    out: dict[str, Any] = {
        "relations": db.execute(
            "SELECT n.nspname, c.relname, c.relkind::text, c.relreplident::text"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
            " ORDER BY 1, 2"
        ),
        "schemas": db.execute("SELECT nspname FROM pg_namespace ORDER BY 1"),
        "publications": db.execute(
            "SELECT p.pubname, pt.schemaname, pt.tablename FROM pg_publication p"
            " LEFT JOIN pg_publication_tables pt ON pt.pubname = p.pubname ORDER BY 1, 2, 3"
        ),
        "slots": db.execute("SELECT slot_name FROM pg_replication_slots ORDER BY 1"),
        "triggers": db.execute(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal"
            " ORDER BY 1, 2"
        ),
        "functions": db.execute(
            "SELECT n.nspname, p.proname FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ),
    }
    if db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)):
        with db.connect() as conn:
            out["watches"] = conn.execute(
                sql.SQL("SELECT * FROM {}.watches ORDER BY name").format(sql.Identifier(schema))
            ).fetchall()
            out["events"] = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.events").format(sql.Identifier(schema))
            ).fetchall()
    return out


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def slot_active(db: Database, slot: str = "pgherald") -> bool:
    rows = db.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    return bool(rows and rows[0][0])


def require_scram(cluster: EmbeddedCluster) -> None:
    """Rewrites pg_hba.conf so host connections need a SCRAM password, then reloads."""
    hba = cluster.datadir / "pg_hba.conf"
    text = re.sub(
        r"^(host\s+all\s+all\s+\S+\s+)trust\s*$",
        r"\1scram-sha-256",
        hba.read_text(),
        flags=re.MULTILINE,
    )
    hba.write_text(text)
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:  # trusted until the reload
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)
