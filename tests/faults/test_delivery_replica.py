"""A replica kept by ``pgherald run`` through SIGKILLs ends identical to its source.

Three writer threads run a mixed workload of ROW_CHANGES (100,000) row changes on two
tables, in transactions of one to three statements of up to a few hundred rows each:
inserts (some with a large out-of-line value), updates, updates that move rows to other
keys (one table has a composite key, moved by its text part), deletes, and, half-way, one
``TRUNCATE`` of the second table while the writers go on. ``pgherald run`` (a subprocess)
captures the two tables with logical capture and delivers them to a replica sink
(``create_tables = true``) whose target is a second database on the same cluster; it is
SIGKILLed KILLS times at random moments while the writers work, and started again each
time.

The sink is added *without* ``--strictly-ordered``: the replica sink is strictly ordered
by nature, and the engine must follow the sink's own word. (It did not: it claimed a
replica's deliveries per row when the configuration did not say otherwise, so a key move
overtook an earlier update of the old key, which then put the old row back at the
target; this test found that, with 4 such ghost rows.)

At the end, every change (and the truncate) was delivered once in the store's view, and
the tables of the two databases are the same: the source's rows ``EXCEPT ALL`` the
target's, and the other way round, compared by the text of every column, are both empty.
The comparison is shown to fail on a target with one row changed, so that its pass means
something. On this 2-core machine the whole test takes 50 to 65 seconds.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald import routing_admin
from tests import capture_harness as h
from tests.conftest import Database, _drop_database, _new_database
from tests.faults import delivery_harness as d

pytestmark = pytest.mark.slow

ROW_CHANGES = 100_000
WRITERS = 3
WORKLOAD_SECONDS = 30.0
KILLS = 6
SINK = "copy"
TABLES = ("rep_a", "rep_b")
SETUP = """
CREATE TABLE rep_a (
    id bigint PRIMARY KEY, v int NOT NULL, note text, amount numeric(14, 4),
    at timestamptz, doc text
);
CREATE TABLE rep_b (
    k1 int, k2 text, payload jsonb, raw bytea, flag boolean, PRIMARY KEY (k1, k2)
);
"""


@pytest.fixture
def target(db_primary: Database) -> Iterator[Database]:
    """A second, empty database on the source's cluster: the replica."""
    database = _new_database(db_primary.cluster)
    yield database
    _drop_database(database)


class Writer(threading.Thread):
    """Random transactions of 1 to 3 statements on its own keys until it made ``target``
    row changes (counted by the statements' row counts)."""

    def __init__(self, dsn: str, number: int, target: int, seed: int, pace: d.Pace) -> None:
        super().__init__(name=f"replica-writer-{number}", daemon=True)
        self.dsn = dsn
        self.number = number
        self.target = target
        self.rng = random.Random(seed)
        self.pace = pace
        self.share = 1.0 / WRITERS
        self.next_id = (number + 1) * 1_000_000_000
        self.live_a: set[int] = set()
        self.live_b: set[tuple[int, str]] = set()
        self.made = 0
        self.ops: Counter[str] = Counter()
        self.error: BaseException | None = None
        self.kills_done = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while self.made < self.target:
                    allowed = self.pace.allowed() * self.share
                    if not self.kills_done.is_set():
                        allowed = min(allowed, self.target * 0.95)
                    if self.made > allowed:
                        time.sleep(0.01)
                        continue
                    with conn.transaction():
                        for _ in range(self.rng.randint(1, 3)):
                            self._statement(conn)
        except BaseException as e:  # reported by the test
            self.error = e

    def _fresh(self) -> int:
        self.next_id += 1
        return self.next_id

    def _count(self, op: str, n: int) -> None:
        self.ops[op] += n
        self.made += n

    def _statement(self, conn: psycopg.Connection[Any]) -> None:
        rng = self.rng
        kind = rng.choices(("insert", "update", "move", "delete"), weights=(3, 4, 2, 2))[0]
        if len(self.live_a) < 100 or len(self.live_b) < 100:
            kind = "insert"
        on_a = rng.random() < 0.6
        if kind == "insert":
            n = rng.randint(20, 200)
            ids = [self._fresh() for _ in range(n)]
            if on_a:
                cur = conn.execute(
                    "INSERT INTO rep_a SELECT g, g %% 1000, CASE WHEN g %% 9 <> 0 THEN md5(g::text)"
                    " END, g / 7.0, clock_timestamp(), CASE WHEN g %% 50 = 0 THEN"
                    " (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 200))"
                    " END FROM unnest(%s::bigint[]) g",
                    (ids,),
                )
                self.live_a.update(ids)
            else:
                keys = [(i % 1_000_000_000, f"k{i}") for i in ids]
                cur = conn.execute(
                    "INSERT INTO rep_b SELECT k1, k2, jsonb_build_object('k', k1, 'n', NULL),"
                    " decode(md5(k2), 'hex'), CASE WHEN k1 %% 3 = 0 THEN NULL ELSE k1 %% 2 = 0 END"
                    " FROM unnest(%s::int[], %s::text[]) AS u(k1, k2)",
                    ([k for k, _ in keys], [t for _, t in keys]),
                )
                self.live_b.update(keys)
            self._count("insert", cur.rowcount)
            return
        n = {"update": rng.randint(5, 150), "move": rng.randint(1, 80)}.get(kind) or rng.randint(
            1, 60
        )
        if on_a and self.live_a:
            chosen = rng.sample(sorted(self.live_a), min(n, len(self.live_a)))
            if kind == "update":
                cur = conn.execute(
                    "UPDATE rep_a SET v = v + 1, amount = amount * 1.01, note = %s"
                    " WHERE id = ANY(%s)",
                    (f"u{rng.randrange(10**6)}", chosen),
                )
            elif kind == "move":
                moved = [self._fresh() for _ in chosen]
                cur = conn.execute(
                    "UPDATE rep_a SET id = m.new, v = rep_a.v + 1 FROM unnest(%s::bigint[],"
                    " %s::bigint[]) AS m(old, new) WHERE rep_a.id = m.old",
                    (chosen, moved),
                )
                self.live_a.difference_update(chosen)
                self.live_a.update(moved)
            else:
                cur = conn.execute("DELETE FROM rep_a WHERE id = ANY(%s)", (chosen,))
                self.live_a.difference_update(chosen)
        elif self.live_b:
            chosen_b = rng.sample(sorted(self.live_b), min(n, len(self.live_b)))
            k1s, k2s = [k for k, _ in chosen_b], [t for _, t in chosen_b]
            if kind == "update":
                cur = conn.execute(
                    "UPDATE rep_b SET payload = payload || jsonb_build_object('u', %s),"
                    " flag = NOT flag FROM unnest(%s::int[], %s::text[]) AS u(k1, k2)"
                    " WHERE (rep_b.k1, rep_b.k2) = (u.k1, u.k2)",
                    (rng.randrange(10**6), k1s, k2s),
                )
            elif kind == "move":
                cur = conn.execute(
                    "UPDATE rep_b SET k2 = rep_b.k2 || 'm' FROM unnest(%s::int[], %s::text[])"
                    " AS u(k1, k2) WHERE (rep_b.k1, rep_b.k2) = (u.k1, u.k2)",
                    (k1s, k2s),
                )
                self.live_b.difference_update(chosen_b)
                self.live_b.update((k, t + "m") for k, t in chosen_b)
            else:
                cur = conn.execute(
                    "DELETE FROM rep_b USING unnest(%s::int[], %s::text[]) AS u(k1, k2)"
                    " WHERE (rep_b.k1, rep_b.k2) = (u.k1, u.k2)",
                    (k1s, k2s),
                )
                self.live_b.difference_update(chosen_b)
        else:
            return
        self._count(kind, cur.rowcount)


def copy_of(target_dsn: str, table: str, into: psycopg.Connection[Any]) -> list[str]:
    """Copies the target's table, every column as text, into a temporary table of the
    source's session named ``target_<table>``; the source's column names."""
    names = [
        str(r[0])
        for r in into.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            (f"public.{table}",),
        ).fetchall()
    ]
    as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) for n in names)
    copy = sql.Identifier(f"target_{table}")
    into.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(copy))
    into.execute(
        sql.SQL("CREATE TEMP TABLE {} ({})").format(
            copy, sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(n)) for n in names)
        )
    )
    with (
        h.canonical_connect(target_dsn) as tgt,
        tgt.cursor().copy(
            sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                as_text, sql.Identifier("public", table)
            )
        ) as out,
        into.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(copy)) as writing,
    ):
        for block in out:
            writing.write(block)
    return names


def differences(source_dsn: str, target_dsn: str, table: str) -> tuple[int, int, list[Any]]:
    """(rows only the source has, rows only the target has, a few of them), by ``EXCEPT
    ALL`` over the text of each column, in the source database (the target's table is
    copied beside it first)."""
    with h.canonical_connect(source_dsn) as src:
        names = copy_of(target_dsn, table, src)
        as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) for n in names)
        ours, theirs = sql.Identifier("public", table), sql.Identifier(f"target_{table}")
        only_source = src.execute(
            sql.SQL("SELECT {} FROM {} EXCEPT ALL SELECT * FROM {}").format(as_text, ours, theirs)
        ).fetchall()
        only_target = src.execute(
            sql.SQL("SELECT * FROM {} EXCEPT ALL SELECT {} FROM {}").format(theirs, as_text, ours)
        ).fetchall()
    sample = [("source", r[:3]) for r in only_source[:3]] + [
        ("target", r[:3]) for r in only_target[:3]
    ]
    return len(only_source), len(only_target), sample


def row_count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", table))
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_replica_equals_its_source_after_a_mixed_workload_with_kills(
    db_primary: Database, target: Database
) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    dsn = db_primary.dsn
    db_primary.execute(SETUP)
    settings = h.install(dsn, [f"public.{t}" for t in TABLES], method="logical")
    routing_admin.add_sink(
        settings,
        SINK,
        "replica",
        options={"dsn": target.dsn, "create_tables": True},
    )
    routing_admin.subscribe(settings, SINK, list(TABLES))
    pace = d.Pace(ROW_CHANGES, WORKLOAD_SECONDS)
    writers = [
        Writer(dsn, n, ROW_CHANGES // WRITERS + (n == 0) * (ROW_CHANGES % WRITERS), seed + n, pace)
        for n in range(WRITERS)
    ]
    proc = h.CaptureProcess(settings)
    kills = 0
    truncated_at = -1
    try:
        for w in writers:
            w.start()
        while kills < KILLS:
            proc.start()
            proc.wait_ready()
            time.sleep(rng.uniform(0.5, 3.0))
            made = sum(w.made for w in writers)
            if truncated_at < 0 and made >= ROW_CHANGES / 2:
                db_primary.execute("TRUNCATE rep_b")
                truncated_at = made
            proc.kill()
            kills += 1
            for w in writers:
                assert w.error is None, w.error
            assert any(w.is_alive() for w in writers), "the workload ended before a kill"
        for w in writers:
            w.kills_done.set()
        killed_at = time.monotonic()
        if truncated_at < 0:
            db_primary.execute("TRUNCATE rep_b")
            truncated_at = sum(w.made for w in writers)
        proc.start()
        for w in writers:
            w.join(max(1.0, 90 - (time.monotonic() - started)))
            assert not w.is_alive(), "the workload did not finish in time"
            if w.error is not None:
                raise w.error
        workload_done = time.monotonic()
        h.catch_up(
            settings, timeout=60, alive=lambda: None if proc.alive() else proc.log(), log=proc.log
        )
        d.wait_for(
            lambda: d.open_deliveries(settings) == 0,
            60,
            lambda: f"deliveries: {d.delivery_statuses(settings, SINK)}",
            lambda: None if proc.alive() else f"pgherald run died:\n{proc.log()[-3000:]}",
        )
        delivered_at = time.monotonic()
        assert proc.stop() == 0, proc.log()[-3000:]
    finally:
        for w in writers:
            w.kills_done.set()
            w.target = 0
        proc.close()

    made = sum(w.made for w in writers)
    assert made >= ROW_CHANGES
    statuses = d.delivery_statuses(settings, SINK)
    assert statuses == {"delivered": made + 1}, (statuses, made)  # every change and the truncate
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE op = 'truncate'),"
            " count(*) FILTER (WHERE meta ? 'old_key'),"
            " count(*) FILTER (WHERE cardinality(unchanged) > 0),"
            " count(DISTINCT xid) FROM pgherald.events WHERE watch = ANY(%s)",
            (list(TABLES),),
        ).fetchone()
    assert row is not None
    truncates, key_moves, unchanged_toast, transactions = (int(v) for v in row)
    assert truncates == 1 and key_moves > 0, row
    for table in TABLES:
        only_source, only_target, sample = differences(dsn, target.dsn, table)
        assert (only_source, only_target) == (0, 0), (
            f"{table}: {only_source} rows only at the source, {only_target} only at the"
            f" target: {sample}"
        )
    rows = {t: row_count(dsn, t) for t in TABLES}
    assert all(rows.values()), rows
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        conn.execute("UPDATE rep_a SET v = v + 1 WHERE id = (SELECT min(id) FROM rep_a)")
    assert differences(dsn, target.dsn, "rep_a")[:2] == (1, 1), "the comparison cannot fail"
    ops: Counter[str] = Counter()
    for w in writers:
        ops.update(w.ops)
    print(
        f"\nreplica (seed {seed}): {made} row changes {dict(ops)}, truncate after"
        f" {truncated_at}; {transactions} transactions, {key_moves} key moves, {unchanged_toast}"
        f" unchanged TOAST; {statuses['delivered']} deliveries; {kills} kills, {proc.starts}"
        f" starts; kills done {killed_at - started:.1f}s in, workload done"
        f" {workload_done - started:.1f}s, all delivered {delivered_at - workload_done:.1f}s"
        f" later; tables {rows}; {time.monotonic() - started:.1f}s in all"
    )
