"""When a snapshot run may skip checking its key: only when the watched table guarantees it.

Checking that a key identifies one row (no NULL, no duplicate) groups the whole result,
which is most of the cost of a run over a big table that changed little. A table whose
key columns are all NOT NULL and covered by a valid unique index cannot break the key, so
the run only counts its rows. Everything else is checked: a unique index on more columns
than the key, a nullable column, a partial or expression index, a table with inheritance
children (reading the parent reads them too), views and queries; where the index would
let a duplicate or a NULL through, the check is shown to catch it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
import pytest

from pgherald import admin, snapshots
from pgherald.config import Settings
from pgherald.sources.snapshot import SnapshotComparer
from pgherald.store import watches as registry
from tests import capture_harness as h
from tests.conftest import Database


def guaranteed(settings: Settings, name: str) -> bool:
    with psycopg.connect(settings.dsn) as conn:
        watch = registry.get_watch(conn, settings.schema, name)
        assert watch is not None
        comparer = SnapshotComparer(settings.schema, lambda oids: {})
        return comparer._key_guaranteed(conn, snapshots.snapshot_watch(watch))


def add(settings: Settings, name: str, key: Sequence[str] | None = None, **kw: Any) -> None:
    added = admin.add_snapshot_watch(settings, name, key=key, **kw)
    assert any("baseline recorded" in n for n in added.notes), added.notes


@pytest.fixture
def settings(db: Database) -> Settings:
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    return settings


def test_keys_the_table_guarantees(db: Database, settings: Settings) -> None:
    db.execute(
        "CREATE TABLE pk (id int PRIMARY KEY, v text);"
        " CREATE TABLE wide (a int NOT NULL, b int NOT NULL, v text);"
        " CREATE UNIQUE INDEX ON wide (a);"
        " CREATE TABLE incl (a int NOT NULL, v text);"
        " CREATE UNIQUE INDEX ON incl (a) INCLUDE (v);"
        " CREATE TABLE parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
        " CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);"
        " CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (100) TO (200);"
        " INSERT INTO pk VALUES (1, 'a'), (2, 'b'); INSERT INTO wide VALUES (1, 1, 'a');"
        " INSERT INTO incl VALUES (1, 'a'); INSERT INTO parted VALUES (1, 'a'), (150, 'b')"
    )
    add(settings, "pk", table="pk")
    add(settings, "wide", ["a", "b"], table="wide")  # a unique index on part of the key
    add(settings, "incl", ["a"], table="incl")  # INCLUDE columns are no part of uniqueness
    add(settings, "parted", table="parted")
    for name in ("pk", "wide", "incl", "parted"):
        assert guaranteed(settings, name), name
    db.execute("INSERT INTO pk VALUES (3, 'c'); UPDATE parted SET v = 'B' WHERE id = 150")
    pk = snapshots.run_watch(settings, "pk")
    assert (pk.status, pk.inserts, pk.rows_compared) == ("ok", 1, 3)  # counted all the same
    parted = snapshots.run_watch(settings, "parted")
    assert (parted.status, parted.updates, parted.rows_compared) == ("ok", 1, 2)


def refused(settings: Settings, name: str, *fragments: str) -> None:
    result = snapshots.run_watch(settings, name)
    assert result.status == "error" and result.error is not None, result.describe()
    assert "does not identify one row" in result.error
    for fragment in fragments:
        assert fragment in result.error, (fragment, result.error)


def test_keys_the_table_does_not_guarantee_are_checked(db: Database, settings: Settings) -> None:
    db.execute(
        "CREATE TABLE wider (a int NOT NULL, b int NOT NULL);"
        " CREATE UNIQUE INDEX ON wider (a, b);"
        " CREATE TABLE nullable (a int, v text);"
        " CREATE UNIQUE INDEX ON nullable (a);"
        " CREATE TABLE partial (a int NOT NULL, live bool NOT NULL);"
        " CREATE UNIQUE INDEX ON partial (a) WHERE live;"
        " CREATE TABLE expr (a text NOT NULL);"
        " CREATE UNIQUE INDEX ON expr (lower(a));"
        " CREATE TABLE parent (id int PRIMARY KEY, v text);"
        " CREATE TABLE child () INHERITS (parent);"
        " CREATE VIEW pk_view AS SELECT * FROM parent;"
        " INSERT INTO wider VALUES (1, 1); INSERT INTO nullable VALUES (1, 'a');"
        " INSERT INTO partial VALUES (1, true); INSERT INTO expr VALUES ('a');"
        " INSERT INTO parent VALUES (1, 'a')"
    )
    add(settings, "wider", ["a"], table="wider")
    add(settings, "nullable", ["a"], table="nullable")
    add(settings, "partial", ["a"], table="partial")
    add(settings, "expr", ["a"], table="expr")
    add(settings, "parent", table="parent")
    add(settings, "view", ["id"], view="pk_view")
    add(settings, "query", ["id"], query="SELECT * FROM parent")
    for name in ("wider", "nullable", "partial", "expr", "parent", "view", "query"):
        assert not guaranteed(settings, name), name

    db.execute(
        "INSERT INTO wider VALUES (1, 2); INSERT INTO nullable VALUES (NULL, 'n');"
        " INSERT INTO partial VALUES (1, false);"
        " INSERT INTO child VALUES (1, 'in the child')"  # the parent's key, again
    )
    refused(settings, "wider", "a='1' (2 rows)")
    refused(settings, "nullable", "a=NULL")
    refused(settings, "partial", "a='1' (2 rows)")
    assert snapshots.run_watch(settings, "expr").status == "ok"  # checked, and unique
    for name in ("parent", "view", "query"):
        refused(settings, name, "id='1' (2 rows)")


def test_a_key_column_that_loses_not_null_is_checked_again(
    db: Database, settings: Settings
) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')")
    add(settings, "t", table="t")
    assert guaranteed(settings, "t")
    db.execute("ALTER TABLE t DROP CONSTRAINT t_pkey; INSERT INTO t VALUES (1, 'again')")
    assert not guaranteed(settings, "t")
    refused(settings, "t", "id='1' (2 rows)")
