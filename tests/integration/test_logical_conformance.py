"""Conformance: for each SQL workload, the change log equals the truth of the same run.

Two truths, each independent of pgherald's decoder and store:

- ``test_decoding`` on a second slot created before the workload: PostgreSQL's own
  account of every committed change, in commit order, with xids and commit times, read
  under the same canonical session settings as pgherald's replication connection so the
  value texts are the same bytes. Every committed change must be in the log once, in
  order, with the same values (unchanged TOAST filled from the row's previous version,
  old rows from the replica identity or the previous version). Debian's PostgreSQL 15
  ships the plugin; the pgserver PostgreSQL 16 does not, and there this truth is skipped
  (and said so) while the others still run.
- The workload's own expectation: per table, how many inserts, updates, deletes and
  truncates it committed, and the tables' final contents, which replaying the log must
  reproduce column by column.
"""

from __future__ import annotations

import secrets
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from pgherald import admin
from pgherald.events.model import UNCHANGED_TOAST
from tests import capture_harness as h
from tests.conftest import Database
from tests.integration.test_types_roundtrip import COLUMNS, SETUP, TEXT_WITH_CONTROLS

Conn = psycopg.Connection[Any]


@dataclass
class Table:
    """A watched table of a workload: how to watch it and what the workload does to it."""

    name: str
    key: tuple[str, ...] = ("id",)
    full: bool = False
    watch: dict[str, Any] = field(default_factory=dict)
    leaves: tuple[str, ...] = ()  # partitions, as test_decoding names them
    ops: dict[str, int] = field(default_factory=dict)  # what the workload commits


@dataclass
class Workload:
    name: str
    setup: str
    tables: list[Table]
    run: Callable[[Conn], None]


def execute(conn: Conn, *statements: str, params: dict[str, Any] | None = None) -> None:
    for statement in statements:
        conn.execute(statement.encode(), params)


# -- the workloads -----------------------------------------------------------------------------


def _every_type(conn: Conn) -> None:
    cols = [name for name, _, _ in COLUMNS]
    for row in range(4):
        values = ", ".join(literals[row] for _, _, literals in COLUMNS)
        execute(
            conn,
            f"INSERT INTO every_type VALUES ({row}, {values})",
            params={"text": TEXT_WITH_CONTROLS},
        )
    execute(conn, "INSERT INTO every_type (id) VALUES (4)")
    # Every row takes the next row's values, column by column: each value is written twice.
    with conn.transaction():
        for row in range(5):
            source = (row + 1) % 4
            sets = ", ".join(f"{c} = {COLUMNS[i][2][source]}" for i, c in enumerate(cols))
            execute(
                conn,
                f"UPDATE every_type SET {sets} WHERE id = {row}",
                params={"text": TEXT_WITH_CONTROLS},
            )
    execute(conn, "UPDATE every_type SET i4 = NULL, t = NULL WHERE id = 1")
    execute(conn, "DELETE FROM every_type WHERE id IN (2, 3)")


def _toast(conn: Conn) -> None:
    big = [secrets.token_hex(5000) for _ in range(4)]
    blob = secrets.token_bytes(9000)
    for table in ("doc", "doc_full"):
        execute(
            conn,
            f"INSERT INTO {table} VALUES (1, 'one', %(a)s, %(blob)s)",
            params={"a": big[0], "blob": blob},
        )
        execute(conn, f"INSERT INTO {table} VALUES (2, 'two', 'short', NULL)")
        execute(conn, f"UPDATE {table} SET title = 'one!' WHERE id = 1")  # toast untouched
        execute(conn, f"UPDATE {table} SET body = %(b)s WHERE id = 1", params={"b": big[1]})
        execute(conn, f"UPDATE {table} SET title = 'one!!', body = body WHERE id = 1")
        execute(conn, f"UPDATE {table} SET body = %(c)s WHERE id = 2", params={"c": big[2]})
        with conn.transaction():  # several untouched-TOAST updates of one row in one batch
            for i in range(3):
                execute(conn, f"UPDATE {table} SET title = 'two-{i}' WHERE id = 2")
        execute(conn, f"UPDATE {table} SET id = 3, body = body || 'x' WHERE id = 2")
        execute(conn, f"UPDATE {table} SET title = 'three' WHERE id = 3")
        execute(conn, f"DELETE FROM {table} WHERE id = 1")
        execute(conn, f"INSERT INTO {table} VALUES (1, 'again', %(d)s, NULL)", params={"d": big[3]})
        execute(conn, f"UPDATE {table} SET title = 'again!' WHERE id = 1")


def _savepoints(conn: Conn) -> None:
    execute(conn, "BEGIN")
    execute(conn, "INSERT INTO sp VALUES (1, 'kept')")
    execute(conn, "SAVEPOINT a")
    execute(conn, "INSERT INTO sp VALUES (2, 'undone')")
    execute(conn, "SAVEPOINT b")
    execute(conn, "UPDATE sp SET v = 'undone too' WHERE id = 1")
    execute(conn, "ROLLBACK TO SAVEPOINT a")
    execute(conn, "INSERT INTO sp VALUES (3, 'kept')")
    execute(conn, "SAVEPOINT c")
    execute(conn, "UPDATE sp SET v = 'kept via release' WHERE id = 3")
    execute(conn, "RELEASE SAVEPOINT c")
    execute(conn, "COMMIT")
    # A subtransaction that aborts inside PL/pgSQL: its changes vanish, the rest commits.
    execute(
        conn,
        """
        DO $$
        BEGIN
            INSERT INTO sp VALUES (4, 'kept');
            BEGIN
                INSERT INTO sp VALUES (5, 'aborted');
                UPDATE sp SET v = 'aborted' WHERE id = 1;
                PERFORM 1 / 0;
            EXCEPTION WHEN division_by_zero THEN
                NULL;
            END;
            UPDATE sp SET v = 'kept after abort' WHERE id = 4;
        END $$
        """,
    )
    execute(conn, "BEGIN")
    execute(conn, "INSERT INTO sp VALUES (6, 'whole transaction rolled back')")
    execute(conn, "ROLLBACK")
    execute(conn, "DELETE FROM sp WHERE id = 3")


def _truncate(conn: Conn) -> None:
    execute(
        conn,
        "INSERT INTO tr_parent VALUES (1), (2)",
        "INSERT INTO tr_child VALUES (1, 1), (2, 2)",
        "INSERT INTO tr_other (v) VALUES ('a'), ('b')",
    )
    execute(conn, "TRUNCATE tr_parent CASCADE")
    execute(conn, "INSERT INTO tr_parent VALUES (3)")
    execute(conn, "INSERT INTO tr_child VALUES (3, 3)")
    execute(conn, "TRUNCATE tr_child, tr_other RESTART IDENTITY")
    execute(conn, "INSERT INTO tr_other (v) VALUES ('after restart')")
    with conn.transaction():
        execute(conn, "INSERT INTO tr_other (v) VALUES ('then truncated in the same transaction')")
        execute(conn, "TRUNCATE tr_other")
        execute(conn, "INSERT INTO tr_other (v) VALUES ('survivor')")


def _partitions(conn: Conn) -> None:
    execute(
        conn,
        "INSERT INTO pm VALUES (1, '2023-03-01', 'a'), (2, '2024-03-01', 'b'),"
        " (3, '2024-04-01', 'c')",
        "UPDATE pm SET v = 'b2' WHERE id = 2",
        "UPDATE pm SET at = '2024-01-15' WHERE id = 1",  # moves to another partition
        "DELETE FROM pm WHERE id = 3",
    )
    with conn.transaction():
        execute(conn, "INSERT INTO pm VALUES (4, '2023-12-31', 'd')")
        execute(conn, "UPDATE pm SET v = v || '!' WHERE at >= '2023-01-01'")
    execute(conn, "TRUNCATE pm")
    execute(conn, "INSERT INTO pm VALUES (5, '2024-12-31', 'e')")


def _schema_changes(conn: Conn) -> None:
    execute(conn, "INSERT INTO sc VALUES (1, 10, 'x'), (2, 20, 'y')")
    execute(conn, "ALTER TABLE sc ADD COLUMN extra text")
    execute(conn, "INSERT INTO sc VALUES (3, 30, 'z', 'e3')")
    execute(conn, "UPDATE sc SET extra = 'e1' WHERE id = 1")
    with conn.transaction():  # a change of shape inside a transaction with rows around it
        execute(conn, "UPDATE sc SET a = a + 1 WHERE id = 2")
        execute(conn, "ALTER TABLE sc DROP COLUMN b")
        execute(conn, "UPDATE sc SET a = a + 1 WHERE id = 2")
    execute(conn, "ALTER TABLE sc RENAME COLUMN extra TO note")
    execute(conn, "UPDATE sc SET note = 'renamed' WHERE id = 3")
    execute(conn, "ALTER TABLE sc ALTER COLUMN a TYPE numeric(12,2)")
    execute(conn, "INSERT INTO sc VALUES (4, 40.5, 'n4')")
    execute(conn, "UPDATE sc SET a = a * 2, note = coalesce(note, '-')")
    execute(conn, "DELETE FROM sc WHERE id = 1")


def _identities(conn: Conn) -> None:
    for table in ("id_default", "id_full", "id_index"):
        execute(conn, f"INSERT INTO {table} (id, code, v) VALUES (1, 'c1', 'a'), (2, 'c2', 'b')")
        execute(conn, f"UPDATE {table} SET v = 'a2' WHERE id = 1")
        execute(conn, f"UPDATE {table} SET code = 'c1x' WHERE id = 1")
        execute(conn, f"UPDATE {table} SET id = 20 WHERE id = 2")
        execute(conn, f"DELETE FROM {table} WHERE id = 1")
    execute(conn, "INSERT INTO id_nokey VALUES (1, 'one'), (2, 'two')")
    execute(conn, "UPDATE id_nokey SET b = 'uno' WHERE a = 1")
    execute(conn, "DELETE FROM id_nokey WHERE a = 2")


def _multi_table(conn: Conn) -> None:
    with conn.transaction():
        execute(conn, "INSERT INTO mt_customer VALUES (1, 'Ada'), (2, 'Grace')")
        execute(conn, "INSERT INTO mt_order VALUES (10, 1, 5), (11, 2, 7)")
        execute(conn, "UPDATE mt_customer SET name = 'Ada L.' WHERE id = 1")
        execute(conn, "INSERT INTO mt_audit (what) VALUES ('two customers')")
        execute(conn, "INSERT INTO mt_order VALUES (12, 1, 1)")
    with conn.transaction():
        execute(conn, "UPDATE mt_order SET qty = qty + 1 WHERE customer = 1")
        execute(conn, "DELETE FROM mt_customer WHERE id = 1")  # cascades to its orders
        execute(conn, "INSERT INTO mt_audit (what) VALUES ('customer 1 gone')")
    with conn.transaction():
        execute(conn, "INSERT INTO mt_unwatched VALUES (1)")  # nothing watched changes here


def _two_phase(conn: Conn) -> None:
    other = psycopg.connect(conn.info.dsn, autocommit=True)
    try:
        execute(conn, "INSERT INTO tp VALUES (0, 'before')")
        execute(conn, "BEGIN")
        execute(conn, "INSERT INTO tp VALUES (1, 'prepared first, committed second')")
        execute(conn, "UPDATE tp SET v = 'x' WHERE id = 0")
        execute(conn, "PREPARE TRANSACTION 'tp_a'")
        execute(other, "INSERT INTO tp VALUES (2, 'committed between')")
        execute(conn, "BEGIN")
        execute(conn, "INSERT INTO tp VALUES (3, 'prepared, rolled back')")
        execute(conn, "PREPARE TRANSACTION 'tp_b'")
        execute(other, "COMMIT PREPARED 'tp_a'")
        execute(conn, "ROLLBACK PREPARED 'tp_b'")
        execute(conn, "BEGIN")
        execute(conn, "DELETE FROM tp WHERE id = 2")
        execute(conn, "PREPARE TRANSACTION 'tp_c'")
        execute(conn, "COMMIT PREPARED 'tp_c'")
    finally:
        other.close()


def _bulk(conn: Conn) -> None:
    with conn.transaction():  # larger than a batch: stored in pieces inside one store txn
        execute(conn, "INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 12000) g")
        execute(conn, "UPDATE bulk SET v = upper(v) WHERE id % 3 = 0")
        execute(conn, "DELETE FROM bulk WHERE id % 5 = 0")


WORKLOADS = [
    Workload(
        "every_type",
        SETUP
        + "CREATE TABLE every_type (id int PRIMARY KEY, "
        + ", ".join(f"{n} {t}" for n, t, _ in COLUMNS)
        + ");",
        [Table("every_type", ops={"insert": 5, "update": 6, "delete": 2})],
        _every_type,
    ),
    Workload(
        "toast",
        "CREATE TABLE doc (id int PRIMARY KEY, title text, body text, blob bytea);"
        "CREATE TABLE doc_full (id int PRIMARY KEY, title text, body text, blob bytea);"
        "ALTER TABLE doc_full REPLICA IDENTITY FULL;",
        [
            Table("doc", ops={"insert": 3, "update": 10, "delete": 1}),
            Table("doc_full", full=True, ops={"insert": 3, "update": 10, "delete": 1}),
        ],
        _toast,
    ),
    Workload(
        "savepoints",
        "CREATE TABLE sp (id int PRIMARY KEY, v text);",
        [Table("sp", ops={"insert": 3, "update": 2, "delete": 1})],
        _savepoints,
    ),
    Workload(
        "truncate",
        "CREATE TABLE tr_parent (id int PRIMARY KEY);"
        "CREATE TABLE tr_child (id int PRIMARY KEY, p int REFERENCES tr_parent);"
        "CREATE TABLE tr_other (id serial PRIMARY KEY, v text);",
        [
            Table("tr_parent", ops={"insert": 3, "truncate": 1}),
            Table("tr_child", ops={"insert": 3, "truncate": 2}),
            Table("tr_other", ops={"insert": 5, "truncate": 2}),
        ],
        _truncate,
    ),
    Workload(
        "partitions",
        "CREATE TABLE pm (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);"
        "CREATE TABLE pm_2023 PARTITION OF pm FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');"
        "CREATE TABLE pm_2024 PARTITION OF pm FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');",
        [
            Table(
                "pm",
                key=("id", "at"),
                leaves=("pm_2023", "pm_2024"),
                ops={"insert": 6, "update": 4, "delete": 2, "truncate": 1},
            )
        ],
        _partitions,
    ),
    Workload(
        "schema_changes",
        "CREATE TABLE sc (id int PRIMARY KEY, a int, b text);",
        [Table("sc", ops={"insert": 4, "update": 8, "delete": 1})],
        _schema_changes,
    ),
    Workload(
        "replica_identities",
        "CREATE TABLE id_default (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text);"
        "CREATE TABLE id_full (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text);"
        "ALTER TABLE id_full REPLICA IDENTITY FULL;"
        "CREATE TABLE id_index (id int NOT NULL, code text NOT NULL, v text);"
        "CREATE UNIQUE INDEX id_index_code ON id_index (code);"
        "ALTER TABLE id_index REPLICA IDENTITY USING INDEX id_index_code;"
        "CREATE TABLE id_nokey (a int, b text);",
        [
            Table("id_default", ops={"insert": 2, "update": 3, "delete": 1}),
            Table("id_full", full=True, ops={"insert": 2, "update": 3, "delete": 1}),
            Table("id_index", key=("code",), ops={"insert": 2, "update": 3, "delete": 1}),
            Table(
                "id_nokey",
                key=("a",),
                full=True,
                watch={"key": ("a",), "replica_identity_full": True},
                ops={"insert": 2, "update": 1, "delete": 1},
            ),
        ],
        _identities,
    ),
    Workload(
        "multi_table",
        "CREATE TABLE mt_customer (id int PRIMARY KEY, name text);"
        "CREATE TABLE mt_order (id int PRIMARY KEY,"
        " customer int REFERENCES mt_customer ON DELETE CASCADE, qty int);"
        "CREATE TABLE mt_audit (id serial PRIMARY KEY, what text);"
        "CREATE TABLE mt_unwatched (id int PRIMARY KEY);",
        [
            Table("mt_customer", ops={"insert": 2, "update": 1, "delete": 1}),
            Table("mt_order", ops={"insert": 3, "update": 2, "delete": 2}),
            Table("mt_audit", ops={"insert": 2}),
        ],
        _multi_table,
    ),
    Workload(
        "two_phase",
        "CREATE TABLE tp (id int PRIMARY KEY, v text);",
        [Table("tp", ops={"insert": 3, "update": 1, "delete": 1})],
        _two_phase,
    ),
    Workload(
        "bulk",
        "CREATE TABLE bulk (id int PRIMARY KEY, v text);",
        [Table("bulk", ops={"insert": 12000, "update": 4000, "delete": 2400})],
        _bulk,
    ),
]


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_workload_matches_the_truth(db: Database, workload: Workload) -> None:
    with db.connect() as conn:
        execute(conn, workload.setup)
    settings = h.install(db.dsn)
    for t in workload.tables:
        admin.add_watch(settings, ("public", t.name), **t.watch)
    truth_slot = "truth_" + workload.name
    has_truth = h.create_truth_slot(db.dsn, truth_slot)
    with h.capturing(settings) as capture:
        with db.connect() as conn:
            workload.run(conn)
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
    events = h.stored_events(settings)

    # Every event once; each transaction's events share xid, position and commit time.
    assert len({e.event_id for e in events}) == len(events)
    by_position: dict[str, set[tuple[Any, Any]]] = {}
    for e in events:
        by_position.setdefault(e.position, set()).add((e.xid, e.commit_time))
    assert all(len(v) == 1 for v in by_position.values())

    # The workload's own expectation: counts per table and operation, and final contents.
    for t in workload.tables:
        counted = Counter(e.op for e in events if e.table == t.name and e.op != "schema")
        assert counted == Counter(t.ops), f"{t.name}: {dict(counted)} != {t.ops}"
        h.assert_replay_matches(db.dsn, events, "public", t.name, t.key)

    if not has_truth:
        warnings.warn(
            f"PostgreSQL {db.version} has no test_decoding plugin: compared with the workload's"
            " own expected counts and final rows only",
            stacklevel=1,
        )
        return
    try:
        txns = h.truth(db.dsn, truth_slot)
    finally:
        h.drop_slot(db.dsn, truth_slot)
    watched: dict[tuple[str, str], h.Watched] = {}
    for t in workload.tables:
        for leaf in t.leaves or (t.name,):
            watched[("public", leaf)] = h.Watched(t.name, t.key, t.full)
    expected = h.expected_steps(txns, watched)
    assert expected, "the truth holds the workload"
    h.assert_same_steps(h.stored_steps(events), expected)


def test_truth_parser_reads_test_decoding_lines() -> None:
    """The parser that the truth rests on, on lines as test_decoding prints them."""
    [c] = h.parse_change(
        'table public."odd ""t""": UPDATE: old-key: id[integer]:1 new-tuple:'
        " id[integer]:2 t[text]:'it''s new-tuple: x' b[boolean]:true"
        " bt[bit(4)]:B'0101' n[numeric]:NaN z[text]:null u[text]:unchanged-toast-datum"
        " a[integer[]]:'{1,2}'"
    )
    assert (c.schema, c.table, c.op) == ("public", 'odd "t"', "update")
    assert c.old == {"id": "1"}
    assert c.new == {
        "id": "2",
        "t": "it's new-tuple: x",
        "b": "t",
        "bt": "0101",
        "n": "NaN",
        "z": None,
        "u": UNCHANGED_TOAST,
        "a": "{1,2}",
    }
    many = h.parse_change("table public.a, s.b: TRUNCATE: restart_seqs cascade")
    assert [(c.schema, c.table, c.flags) for c in many] == [
        ("public", "a", ("restart_seqs", "cascade")),
        ("s", "b", ("restart_seqs", "cascade")),
    ]
    [d] = h.parse_change("table public.t: DELETE: (no-tuple-data)")
    assert d.old is None and d.op == "delete"
