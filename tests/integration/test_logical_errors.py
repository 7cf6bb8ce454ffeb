"""Logical capture refuses clearly: one line that says what is wrong and how to fix it.

Each case is set up on a real server the way it happens to people (a server left at
``wal_level=replica``, a role without REPLICATION, every slot taken, a slot dropped by
someone else, another program streaming the slot), and ``pgherald run`` is run as a
user runs it.
It must stop with exit status 1 and one ``pgherald: ...`` line, and never loop or leave
a half-made slot behind.
"""

from __future__ import annotations

import subprocess
import time

import psycopg
import psycopg2
import psycopg2.extras
import pytest
from psycopg import sql

from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.errors import CaptureError
from tests import capture_harness as h
from tests.conftest import Database

RUN_TIMEOUT = 60.0


def run_once(settings: object, *args: str, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    """Runs ``pgherald run`` to its end; (exit status, the ``pgherald:`` error line)."""
    proc = h.CaptureProcess(settings, *args)  # type: ignore[arg-type]
    try:
        proc.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(
                f"pgherald run kept going instead of failing:\n{proc.log()[-2000:]}"
            ) from None
        lines = [line for line in proc.log().splitlines() if line.startswith("pgherald: ")]
        assert len(lines) == 1, f"expected one error line, got:\n{proc.log()[-2000:]}"
        assert "Traceback" not in proc.log(), proc.log()[-3000:]
        return code, lines[0]
    finally:
        proc.close()


def make_database(cluster: EmbeddedCluster, name: str = "app") -> Database:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return Database(cluster, name)


def install(dsn: str, **options: bool) -> Settings:
    """The store and a watch on ``public.t``, with logical capture asked for by name (the
    default, ``auto``, would choose trigger capture where logical capture cannot work)."""
    return h.install(dsn, ["public.t"], settings=h.settings_for(dsn, method="logical"), **options)


def slots(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [str(r[0]) for r in conn.execute("SELECT slot_name FROM pg_replication_slots")]


def test_wal_level_replica_is_refused_with_how_to_fix(private_cluster: EmbeddedCluster) -> None:
    private_cluster.set(wal_level="replica")
    private_cluster.restart("fast")
    db = make_database(private_cluster)
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = install(db.dsn, slot=False)
    with pytest.raises(CaptureError, match="wal_level = logical"):
        h.ensure_slot(settings)
    code, line = run_once(settings)
    assert code == 1
    assert "wal_level" in line and "logical" in line and "restart" in line, line
    assert slots(db.dsn) == []


@pytest.fixture
def plain_role(private_cluster: EmbeddedCluster) -> tuple[Database, str]:
    """A database owned by a role that can log in and own tables but has no REPLICATION."""
    role = "app_owner"
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    db = make_database(private_cluster)
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE app OWNER TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(role)))
    return db, private_cluster.dsn("app", user=role)


def test_role_without_replication_cannot_create_the_slot(plain_role: tuple[Database, str]) -> None:
    db, dsn = plain_role
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = install(dsn, slot=False)
    with pytest.raises(CaptureError, match="REPLICATION"):
        h.ensure_slot(settings)
    code, line = run_once(settings)
    assert code == 1
    assert "REPLICATION" in line, line
    assert slots(db.dsn) == []


def test_role_without_replication_cannot_stream_from_an_existing_slot(
    plain_role: tuple[Database, str],
) -> None:
    """A superuser made the slot; the role that runs capture still may not stream."""
    db, dsn = plain_role
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = install(dsn, slot=False)
    h.ensure_slot(h.settings_for(db.dsn))  # as the superuser
    started = time.monotonic()
    code, line = run_once(settings)
    assert code == 1
    assert "REPLICATION" in line, line
    assert time.monotonic() - started < 30, "refused at once, not after retrying"


def test_no_free_slot_says_which_setting_to_change(private_cluster: EmbeddedCluster) -> None:
    private_cluster.set(max_replication_slots="2")
    private_cluster.restart("fast")
    db = make_database(private_cluster)
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with db.connect() as conn:
        for name in ("someone_else_1", "someone_else_2"):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    settings = install(db.dsn, slot=False)
    with pytest.raises(CaptureError, match="max_replication_slots"):
        h.ensure_slot(settings)
    code, line = run_once(settings)
    assert code == 1
    assert "max_replication_slots" in line, line
    assert sorted(slots(db.dsn)) == ["someone_else_1", "someone_else_2"]


def test_slot_dropped_behind_our_back_is_refused_until_resync(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = install(db.dsn)
    with h.capturing(settings) as capture:
        db.execute("INSERT INTO t VALUES (1)")
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    h.drop_slot(db.dsn, settings.slot)
    db.execute("INSERT INTO t VALUES (2)")  # made while no slot kept it: lost

    code, line = run_once(settings)
    assert code == 1
    assert "--resync" in line and settings.slot in line and "no longer exists" in line, line
    assert settings.slot not in slots(db.dsn), "never silently recreated"
    # The same refusal in-process.
    with pytest.raises(CaptureError, match="--resync"), h.capturing(settings):
        pass
    assert settings.slot not in slots(db.dsn)

    proc = h.CaptureProcess(settings, "--resync").start()
    try:
        proc.wait_ready()
        # The resync reads the table again; once that is done, capture goes on.
        deadline = time.monotonic() + RUN_TIMEOUT
        while (
            db.execute(
                "SELECT 1 FROM pgherald.checkpoints"
                " WHERE source = 'snapshot:t' AND position = 'done'"
            )
            == []
            and time.monotonic() < deadline
        ):
            assert proc.alive(), proc.log()[-2000:]
            time.sleep(0.1)
        db.execute("INSERT INTO t VALUES (3)")
        h.catch_up(settings, alive=lambda: None if proc.alive() else proc.log()[-2000:])
    finally:
        assert proc.stop() == 0, proc.log()[-2000:]
        proc.close()
    events = h.stored_events(settings)
    assert [(e.op, e.key.get("id")) for e in events] == [
        ("insert", "1"),
        ("gap", None),  # the range in which changes were lost, said in the log itself
        ("read", "1"),  # the table read again: row 2, made while no slot kept it, is there
        ("read", "2"),
        ("insert", "3"),  # and capture goes on from the new slot
    ]
    gap = events[1]
    assert gap.meta["resnapshot"] is True and "--resync" in gap.meta["reason"]
    assert "no longer exists" in gap.meta["reason"]


def test_slot_in_use_by_another_program(db_primary: Database) -> None:
    """Another program streams pgherald's slot: pgherald waits a while for it to let go
    (a previous leader's walsender lingers for a moment after it died), then says the slot
    is in use and stops. A second pgherald of the same change log is no such program: it
    stands by (``tests/faults/test_failover.py``)."""
    db = db_primary  # it waits ~10 s for the slot: one server version is enough
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = install(db.dsn)
    holder = psycopg2.connect(
        db.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    try:
        holder.cursor().start_replication(
            slot_name=settings.slot,
            options={"proto_version": "1", "publication_names": settings.publication},
        )
        code, line = run_once(settings)
        assert code == 1
        assert "in use" in line and settings.slot in line, line
    finally:
        holder.close()
    h.wait_released(settings)
    proc = h.CaptureProcess(settings).start()
    try:
        proc.wait_ready()
        db.execute("INSERT INTO t VALUES (1)")
        h.catch_up(settings, alive=lambda: None if proc.alive() else proc.log()[-2000:])
    finally:
        assert proc.stop() == 0, proc.log()[-2000:]
        proc.close()
    assert [e.key["id"] for e in h.stored_events(settings)] == ["1"]
