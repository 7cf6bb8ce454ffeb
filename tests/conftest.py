"""Real PostgreSQL servers for the test suite.

Each session starts throwaway clusters (initdb into a temp dir, ``wal_level=logical``,
a free port) and stops them at the end, even when tests fail. Database tests run
against every PostgreSQL the machine offers: Debian's (the system's) and the one the
``pgserver`` wheel ships, as a version matrix. Each test gets a fresh database.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from pgherald.db.embedded import EmbeddedCluster, PgBinaries, pgserver_binaries, system_binaries


def _flavours() -> dict[str, PgBinaries]:
    found: dict[str, PgBinaries] = {}
    system = system_binaries()
    if system is not None:
        found[f"pg{system.version}"] = system
    embedded = pgserver_binaries()
    if embedded is not None and f"pg{embedded.version}" not in found:
        found[f"pg{embedded.version}"] = embedded
    if not found:
        raise RuntimeError("no PostgreSQL server binaries: run the suite through ./dev test")
    return found


FLAVOURS = _flavours()
PRIMARY = next(iter(FLAVOURS))
_counter = itertools.count()


@dataclass
class Database:
    """A fresh database on a throwaway cluster."""

    cluster: EmbeddedCluster
    name: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.name)

    @property
    def version(self) -> int:
        return self.cluster.version

    def connect(self, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn, autocommit=autocommit)

    def execute(
        self, query: str, params: tuple[object, ...] | None = None
    ) -> list[tuple[object, ...]]:
        with self.connect() as conn:
            cur = conn.execute(query.encode(), params)  # tests' own literal SQL
            return cur.fetchall() if cur.description else []


_clusters: dict[str, EmbeddedCluster] = {}


def cluster_for(flavour: str) -> EmbeddedCluster:
    """Clusters start lazily, once per session, so a run that needs one flavour starts one."""
    if flavour not in _clusters:
        _clusters[flavour] = EmbeddedCluster(FLAVOURS[flavour]).start()
    return _clusters[flavour]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for cluster in _clusters.values():
        cluster.stop()
    _clusters.clear()


def _new_database(cluster: EmbeddedCluster) -> Database:
    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return Database(cluster, name)


def _drop_slot(conn: psycopg.Connection[tuple[object, ...]], slot: str) -> None:
    """Drops a slot, ending its holder first and waiting for the walsender to let it go.

    A walsender takes a moment to exit after it is terminated; dropping at once fails with
    "slot is active", and a slot left behind (slots are cluster-wide) would trouble later tests.
    """
    deadline = time.monotonic() + 30
    while True:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE slot_name = %s AND active_pid IS NOT NULL",
            (slot,),
        )
        try:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )
            return
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _drop_database(db: Database) -> None:
    with psycopg.connect(db.cluster.dsn(), autocommit=True) as conn:
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (db.name,)
        ).fetchall():
            _drop_slot(conn, str(slot))
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(db.name)
            )
        )


@pytest.fixture(params=list(FLAVOURS))
def db(request: pytest.FixtureRequest) -> Iterator[Database]:
    """A fresh database, once on each PostgreSQL version of the matrix."""
    database = _new_database(cluster_for(request.param))
    yield database
    _drop_database(database)


@pytest.fixture
def db_primary() -> Iterator[Database]:
    """A fresh database on the primary PostgreSQL only, for heavy tests."""
    database = _new_database(cluster_for(PRIMARY))
    yield database
    _drop_database(database)


@pytest.fixture
def private_cluster() -> Iterator[EmbeddedCluster]:
    """A cluster of the test's own, for tests that restart, kill or reconfigure the server."""
    cluster = EmbeddedCluster(FLAVOURS[PRIMARY]).start()
    try:
        yield cluster
    finally:
        cluster.stop(mode="immediate")
