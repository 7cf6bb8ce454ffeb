"""The fixture's servers are what the rest of the suite relies on: check their settings."""

from __future__ import annotations

from tests.conftest import Database


def test_database_is_logical_and_fresh(db: Database) -> None:
    rows = db.execute(
        "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int,"
        " current_setting('max_wal_senders')::int"
    )
    assert rows == [("logical", 20, 20)]
    assert db.execute("SELECT count(*) FROM pg_class WHERE relname = 'employees'") == [(0,)]
    assert db.execute("SELECT current_user") == [("postgres",)]


def test_server_does_not_run_as_root(db: Database) -> None:
    import os

    pid = int((db.cluster.datadir / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{pid}").st_uid != 0
