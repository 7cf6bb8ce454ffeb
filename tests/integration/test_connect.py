"""Connections follow libpq's conventions and fail with one clear line, never with a password."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgherald.db.connect import connect
from pgherald.db.embedded import EmbeddedCluster, free_port
from pgherald.errors import ConfigError, ConnectionFailed
from tests.conftest import Database

PASSWORD = "Tr1cky pass'word\\ with €"


@dataclass
class PasswordServer:
    """A cluster whose TCP connections need a SCRAM password, and a role that has one."""

    cluster: EmbeddedCluster
    role: str = "alice"

    def dsn(self, **extra: str) -> str:
        base = f"host=127.0.0.1 port={self.cluster.port} dbname=postgres user={self.role}"
        return make_conninfo(base, **extra)


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
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:  # still trusted: reload
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)


@pytest.fixture
def password_server(private_cluster: EmbeddedCluster) -> PasswordServer:
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE ROLE alice LOGIN PASSWORD {}").format(
                psycopg.sql.Literal(PASSWORD)
            )
        )
    require_scram(private_cluster)
    return PasswordServer(private_cluster)


def assert_one_clear_line(error: Exception, *secrets: str) -> str:
    text = str(error)
    assert "\n" not in text
    assert text.startswith("cannot connect to PostgreSQL at ")
    for secret in secrets:
        assert secret not in text
    return text


def test_the_right_password_connects(password_server: PasswordServer) -> None:
    with connect(password_server.dsn(password=PASSWORD)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)


def test_wrong_password_is_one_line_without_the_password(password_server: PasswordServer) -> None:
    wrong = "not-the-Password-42"
    with pytest.raises(ConnectionFailed) as info:
        connect(password_server.dsn(password=wrong))
    text = assert_one_clear_line(info.value, wrong, PASSWORD)
    assert "password authentication failed" in text
    assert "'alice'" in text
    assert f"127.0.0.1:{password_server.cluster.port}" in text


def test_wrong_password_in_a_uri(password_server: PasswordServer) -> None:
    port = password_server.cluster.port
    with pytest.raises(ConnectionFailed) as info:
        connect(f"postgresql://alice:hunter2-wrong@127.0.0.1:{port}/postgres")
    assert "password authentication failed" in assert_one_clear_line(info.value, "hunter2")


def test_missing_password_says_where_to_put_one(
    password_server: PasswordServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(ConnectionFailed) as info:
        connect(password_server.dsn())
    assert "~/.pgpass" in assert_one_clear_line(info.value)


def test_password_from_pgpassword(
    password_server: PasswordServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with connect(password_server.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)


def test_password_from_pgpass_file(
    password_server: PasswordServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pgpass = tmp_path / "pgpass"
    escaped = PASSWORD.replace("\\", "\\\\").replace(":", "\\:")
    pgpass.write_text(f"127.0.0.1:{password_server.cluster.port}:*:alice:{escaped}\n")
    pgpass.chmod(0o600)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    with connect(password_server.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)


def test_pg_environment_variables_fill_in_the_dsn(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(db.cluster.port))
    monkeypatch.setenv("PGUSER", "postgres")
    monkeypatch.setenv("PGDATABASE", db.name)
    with connect("") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (db.name,)


def test_unknown_database(db: Database) -> None:
    with pytest.raises(ConnectionFailed) as info:
        connect(db.cluster.dsn("no_such_database"))
    text = assert_one_clear_line(info.value)
    assert "'no_such_database'" in text
    assert "does not exist" in text


def test_unknown_role(db: Database) -> None:
    with pytest.raises(ConnectionFailed) as info:
        connect(db.cluster.dsn(db.name, user="nobody_here"))
    assert "role does not exist" in assert_one_clear_line(info.value)


def test_unreachable_server() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionFailed) as info:
        connect(f"host=127.0.0.1 port={port} password=abc-secret-1")
    text = assert_one_clear_line(info.value, "abc-secret-1")
    assert f"127.0.0.1:{port}" in text
    assert "connection refused" in text


def test_unparsable_dsn_is_a_config_error_that_quotes_nothing() -> None:
    with pytest.raises(ConfigError) as info:
        connect("host=x password=abc secretpart")
    assert "secretpart" not in str(info.value)


def test_application_name_is_a_fallback(db: Database) -> None:
    with connect(db.dsn) as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("pgherald",)
    with connect(db.dsn + " application_name=mine") as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("mine",)


def test_autocommit_and_settings_object(db: Database) -> None:
    from pgherald.config import Settings

    with connect(Settings(dsn=db.dsn), autocommit=True) as conn:
        assert conn.autocommit
    with connect(db.dsn) as conn:
        assert not conn.autocommit
