"""The doctor's conclusions on real servers, each set up to lack one thing capture needs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from pgherald import admin, doctor
from pgherald.config import Settings, WatchSpec
from pgherald.db.embedded import EmbeddedCluster
from pgherald.store import migrations
from tests.conftest import Database

_roles = itertools.count()


def verdict(report: doctor.DoctorReport, method: str) -> doctor.MethodVerdict:
    return next(m for m in report.methods if m.method == method)


def check(report: doctor.DoctorReport, name: str) -> doctor.Check:
    return next(c for c in report.checks if c.name == name)


@pytest.fixture
def role(db: Database) -> Iterator[str]:
    """A plain login role: no superuser, no REPLICATION, no CREATE on the database."""
    name = f"doctor_role_{next(_roles)}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)).as_string(None))
    yield name
    db.execute(
        sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(name)).as_string(None)
    )


def test_superuser_on_a_logical_server(db: Database) -> None:
    settings = Settings(dsn=db.dsn)
    report = doctor.diagnose(settings)
    assert report.server_version.split()[0].split(".")[0] == str(db.version)
    assert verdict(report, "logical").usable
    assert report.ok
    assert check(report, "store").status == "warn"  # not installed yet
    assert "pgherald init" in check(report, "store").detail
    assert check(report, "role").detail.endswith("is a superuser")
    assert "password" not in report.target

    admin.init(settings)
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    admin.add_watch(settings, "t")
    report = doctor.diagnose(settings)
    assert check(report, "store").status == "ok"
    assert check(report, "watch 't'").status == "ok"
    assert "replica identity default" in check(report, "watch 't'").detail
    assert report.usable_methods == ("logical", "trigger", "snapshot")
    assert report.auto.startswith("auto picks logical capture: wal_level is 'logical'")
    assert all(c.status != "fail" for c in report.checks)
    as_dict = report.to_dict()
    assert as_dict["ok"] is True
    assert as_dict["usable_methods"] == ["logical", "trigger", "snapshot"]


def test_plain_role_without_create_cannot_capture(db: Database, role: str) -> None:
    report = doctor.diagnose(Settings(dsn=db.cluster.dsn(db.name, user=role)))
    logical = verdict(report, "logical")
    assert not logical.possible
    assert any("no REPLICATION attribute" in r for r in logical.reasons)
    assert any("lacks CREATE on database" in r for r in logical.reasons)
    for method in ("trigger", "snapshot"):
        assert not verdict(report, method).possible
    assert not report.ok
    assert check(report, "role").status == "warn"
    assert "ALTER ROLE" in check(report, "role").detail
    assert check(report, "database").status == "warn"
    lines = doctor.render(report)
    assert lines[-1].startswith("conclusion: no capture method")


def test_role_with_create_but_no_replication(db: Database, role: str) -> None:
    db.execute(
        sql.SQL("GRANT CREATE ON DATABASE {} TO {}")
        .format(sql.Identifier(db.name), sql.Identifier(role))
        .as_string(None)
    )
    report = doctor.diagnose(Settings(dsn=db.cluster.dsn(db.name, user=role)))
    assert verdict(report, "logical").reasons == (f"role {role!r} has no REPLICATION attribute",)
    assert verdict(report, "trigger").usable
    assert report.auto == (
        f"auto picks trigger capture: role {role!r} has neither REPLICATION nor superuser"
    )
    assert f"  {report.auto}" in doctor.render(report)
    assert verdict(report, "snapshot").usable


def test_replication_role_that_does_not_own_the_watched_table(db: Database, role: str) -> None:
    ident = sql.Identifier(role)
    db.execute(
        sql.SQL("ALTER ROLE {0} REPLICATION; GRANT CREATE ON DATABASE {1} TO {0};")
        .format(ident, sql.Identifier(db.name))
        .as_string(None)
        + "CREATE TABLE theirs (id int PRIMARY KEY)"
    )
    settings = Settings(
        dsn=db.cluster.dsn(db.name, user=role), watches=(WatchSpec(table="theirs"),)
    )
    report = doctor.diagnose(settings)
    assert verdict(report, "logical").reasons == (
        "role does not own public.theirs (needed to publish it)",
    )
    table = check(report, "watch 'theirs'")
    assert table.status == "warn"
    assert f"not owned by {role!r}" in table.detail
    # owning it fixes it
    db.execute(sql.SQL("ALTER TABLE theirs OWNER TO {}").format(ident).as_string(None))
    assert verdict(doctor.diagnose(settings), "logical").usable


def test_declared_watch_on_a_missing_table(db: Database) -> None:
    report = doctor.diagnose(Settings(dsn=db.dsn, watches=(WatchSpec(table="ghost"),)))
    assert check(report, "watch 'ghost'").status == "fail"
    assert "watched table public.ghost does not exist" in verdict(report, "logical").reasons


def test_store_of_an_older_version(db: Database) -> None:
    settings = Settings(dsn=db.dsn)
    admin.init(settings)
    latest = migrations.LATEST_VERSION
    db.execute("DELETE FROM pgherald.schema_version WHERE version = %s", (latest,))
    db.execute("DELETE FROM pgherald.schema_version WHERE version > %s", (latest - 1,))
    report = doctor.diagnose(settings)
    store = check(report, "store")
    assert store.status == "fail"
    assert "pgherald migrate" in store.detail
    assert not report.ok
    assert any("pgherald migrate" in r for r in verdict(report, "logical").reasons)


def test_wal_level_replica_and_no_free_slot(private_cluster: EmbeddedCluster) -> None:
    private_cluster.set(wal_level="replica", max_replication_slots="1")
    private_cluster.restart()
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_physical_replication_slot('someone_else')")
    report = doctor.diagnose(Settings(dsn=private_cluster.dsn()))
    reasons = verdict(report, "logical").reasons
    assert "wal_level is 'replica', not 'logical'" in reasons
    assert "no free replication slot (1 of 1 in use)" in reasons
    assert check(report, "wal_level").status == "warn"
    assert "ALTER SYSTEM SET wal_level = logical" in check(report, "wal_level").detail
    assert check(report, "replication slots").status == "warn"
    assert report.usable_methods == ("trigger", "snapshot")
    assert report.auto.startswith("auto picks trigger capture: wal_level is 'replica'")


def test_existing_slot_of_pgherald_needs_no_free_one(private_cluster: EmbeddedCluster) -> None:
    private_cluster.set(max_replication_slots="1")
    private_cluster.restart()
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('pgherald', 'pgoutput')")
    report = doctor.diagnose(Settings(dsn=private_cluster.dsn()))
    assert verdict(report, "logical").usable
    assert "slot 'pgherald' inactive" in check(report, "replication slots").detail
