"""Snapshot watches: a full run on a 1,000,000-row table, against a hand-written FULL JOIN.

Each repetition uses a fresh database (system PostgreSQL, the cluster's default settings)
with a table of ``--rows`` rows and six columns of mixed types (int key, text,
numeric(12,2), timestamptz, boolean, date), a snapshot watch on it (``watch add
--method snapshot``: the first run records the baseline), and a copy of the table as it
was then (``floor_base``, with the same primary key). Then 1% of the rows are updated
(some change two columns, some others), 0.5% deleted and 0.5% inserted, and the tables
are vacuumed and analysed (so that neither side pays for the other's first read), and
two things are timed, in an order that alternates between repetitions:

- ``pgherald``: ``snapshots.run_watch``, exactly what ``pgherald snapshot run`` does:
  connect, lock, record the run's start, compare the table with the baseline in the
  database (one FULL JOIN into a temporary table of differences, after a pass that checks
  the key), bring the baseline up to date, make the differences events with their
  changed fields in the change log, record the run, commit;
- ``floor``: the hand-written comparison of the two tables, ``floor_base FULL OUTER JOIN
  snap_rows ON id WHERE either side is missing OR (columns) IS DISTINCT FROM
  (columns)``, its differing rows fetched by a client: the least a comparison can do,
  with nothing recorded. ``floor (count)``, the same join counted in the server, is
  printed for information.

Printed: per repetition and as medians, the seconds of each and the ratio pgherald ÷
floor (target <= 2.0), the CPU seconds of each and their ratio, the WAL that pgherald's
run wrote, and the growth of this Python process's resident memory during pgherald's run
(peak sampled every 5 ms, minus the size before): it must stay flat, as at most the
differences (in batches) come into Python, never the table. ``--profile``
adds, from one more repetition, the seconds of each of pgherald's statements (client
side: time until each returned) and EXPLAIN ANALYZE of the costly ones.

Run: ``.venv/bin/python bench/bench_snapshot.py [--rows 1000000] [--repeat 3] [--profile]``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import _common as c
from pgherald import admin, snapshots
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.db.types import CANONICAL_SESSION_SETTINGS, TypeRegistry
from pgherald.sources.snapshot import SnapshotComparer, baseline_table
from pgherald.store import watches as registry
from pgherald.store.changelog import ChangeLog

TARGET_RATIO = 2.0
TABLE = "snap_rows"
WATCH = "snap_rows"

CREATE = """
CREATE TABLE snap_rows (
    id int PRIMARY KEY,
    name text NOT NULL,
    amount numeric(12, 2),
    updated timestamptz NOT NULL,
    active boolean NOT NULL,
    due date
);
INSERT INTO snap_rows
SELECT i, 'customer-' || i || '@example.com', round((random() * 10000)::numeric, 2),
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute', i % 3 = 0,
       date '2024-01-01' + i % 365
FROM generate_series(1, {rows}) AS i;
CREATE TABLE floor_base AS SELECT * FROM snap_rows;
ALTER TABLE floor_base ADD PRIMARY KEY (id);
"""

# 1% updated (half of them in amount and active, half in name and due), 0.5% deleted,
# 0.5% inserted: residues 7, 57 and 123 of 200 are disjoint.
CHANGES = """
UPDATE snap_rows SET amount = amount + 1, active = NOT active WHERE id % 200 = 7;
UPDATE snap_rows SET name = name || '!', due = due + 1 WHERE id % 200 = 57;
DELETE FROM snap_rows WHERE id % 200 = 123;
INSERT INTO snap_rows
SELECT {rows} + i, 'new-' || i, i / 100.0, now(), true, NULL
FROM generate_series(1, {rows} / 200) AS i;
"""

FLOOR = """
SELECT b.*, c.*
FROM floor_base b
FULL OUTER JOIN snap_rows c ON b.id = c.id
WHERE b.id IS NULL OR c.id IS NULL
   OR (b.name, b.amount, b.updated, b.active, b.due)
      IS DISTINCT FROM (c.name, c.amount, c.updated, c.active, c.due)
"""

FLOOR_COUNT = "SELECT count(*) FROM (" + FLOOR + ") d"  # noqa: S608 (constants)


@dataclass
class Prepared:
    cluster: EmbeddedCluster
    name: str
    settings: Settings
    baseline_seconds: float

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.settings.dsn, autocommit=True)

    def drop(self) -> None:
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(self.name)))


def prepare(cluster: EmbeddedCluster, name: str, rows: int) -> Prepared:
    """A database with the table, its baseline (timed), a copy for the floor, the changes."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    settings = Settings(dsn=cluster.dsn(name))
    admin.init(settings)
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(CREATE.format(rows=int(rows)))  # our own integer
    started = time.perf_counter()
    admin.add_snapshot_watch(settings, WATCH, table=TABLE)
    baseline_seconds = time.perf_counter() - started
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        conn.execute(CHANGES.format(rows=int(rows)))
        for table in (sql.Identifier(TABLE), sql.Identifier("floor_base"),
                      sql.Identifier("pgherald", baseline_table(WATCH))):  # fmt: skip
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
        conn.execute("CHECKPOINT")
    return Prepared(cluster, name, settings, baseline_seconds)


class PeakRss:
    """The largest resident size of this process while the block runs, sampled every 5 ms."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.before = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    @contextmanager
    def watching(self) -> Iterator[PeakRss]:
        self.before = self.peak = self.process.memory_info().rss
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 2**20


@dataclass
class Timed:
    seconds: float
    server_cpu: float
    """CPU seconds of the cluster's processes (backends, parallel workers) meanwhile."""
    client_cpu: float
    """CPU seconds of this Python process meanwhile (pgherald's Python, or the floor's client)."""
    memory_mb: float = 0.0
    """Growth of this process's resident size during the run (peak minus before)."""
    wal_mb: float = 0.0
    """WAL written by the cluster meanwhile."""
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.server_cpu + self.client_cpu


def run_pgherald(db: Prepared, rows: int, meter: c.CpuMeter) -> Timed:
    """One full run, as ``pgherald snapshot run`` does it, timed step by step."""
    memory = PeakRss()
    wal_before = wal_lsn(db)
    with meter.measuring() as cpu, memory.watching(), timer() as timings:
        started = time.perf_counter()
        result = snapshots.run_watch(db.settings, WATCH)
        seconds = time.perf_counter() - started
    wal_mb = wal_since(db, wal_before)
    expected = (rows // 200, rows // 100, rows // 200)
    got = (result.inserts, result.updates, result.deletes)
    if result.status != "ok" or got != expected:
        raise SystemExit(f"pgherald's run is wrong: {result.describe()}, expected {expected}")
    steps = steps_of(timings, seconds)
    return Timed(seconds, cpu["server"], cpu["client"], memory.growth_mb, wal_mb, steps)


def wal_lsn(db: Prepared) -> str:
    with db.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wal_since(db: Prepared, lsn: str) -> float:
    """MB of WAL inserted since ``lsn`` (by anything: nothing else writes meanwhile)."""
    with db.connect() as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)", (lsn,)
        ).fetchone()
    assert row is not None
    return float(row[0]) / 2**20


def run_floor(db: Prepared, rows: int, meter: c.CpuMeter) -> Timed:
    with meter.measuring() as cpu:
        with db.connect() as conn:
            started = time.perf_counter()
            found = conn.execute(FLOOR).fetchall()
            seconds = time.perf_counter() - started
        if len(found) != rows // 50:
            raise SystemExit(f"the floor found {len(found)} differences, not {rows // 50}")
        del found
    return Timed(seconds, cpu["server"], cpu["client"])


def run_floor_count(db: Prepared) -> float:
    with db.connect() as conn:
        started = time.perf_counter()
        conn.execute(FLOOR_COUNT).fetchone()
        return time.perf_counter() - started


# -- --profile: where pgherald's run spends its time ---------------------------------------


def _label(cursor: Any, query: Any) -> str:
    if isinstance(query, int):
        return f"fetchmany({query}) of {cursor.name}"
    if isinstance(query, bytes):
        return query.decode()
    return query if isinstance(query, str) else str(query.as_string(cursor))


@contextmanager
def timer() -> Iterator[list[tuple[str, float]]]:
    """Records (what, seconds until it returned) of every statement this process sends, and
    of the steps of a run that are more than one statement (appending a batch to the change
    log, committing); a step's own statements are not recorded apart."""
    timings: list[tuple[str, float]] = []
    patched: list[tuple[Any, str, Callable[..., Any]]] = []
    depth = [0]

    def wrap(owner: Any, name: str, label: Callable[[Any, Any], str]) -> None:
        original = getattr(owner, name)

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                depth[0] -= 1
                if depth[0] == 0:
                    timings.append((label(self, args[0] if args else None), spent))

        setattr(owner, name, timed)
        patched.append((owner, name, original))

    wrap(psycopg.Cursor, "execute", _label)
    wrap(psycopg.ServerCursor, "execute", _label)
    wrap(psycopg.ServerCursor, "fetchmany", _label)
    wrap(psycopg.Connection, "commit", lambda _c, _a: "COMMIT")
    wrap(ChangeLog, "append", lambda _c, events: f"ChangeLog.append({len(events)} events)")
    wrap(snapshots, "append_selected", lambda _log, _rows: "append_selected (events)")
    try:
        yield timings
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


STEPS = (
    ("key check / row count", ("-- One pass", "SELECT count(*) FROM")),
    ("FULL JOIN into the difference table", ("CREATE TEMP TABLE pgherald_diff",)),
    ("baseline: delete + insert", ('DELETE FROM "pgherald"', 'INSERT INTO "pgherald"')),
    ("reading the differences", ("fetchmany", "SELECT op, changed", "SELECT op, count(*)")),
    ("appending events to the change log", ("ChangeLog.append", "append_selected")),
    ("COMMIT", ("COMMIT",)),
)
OTHER = "other statements (watch, lock, run record...)"
PYTHON = "Python between statements (making events...)"


def steps_of(timings: list[tuple[str, float]], total: float) -> dict[str, float]:
    """Seconds per step of a run, from ``timer``'s records."""
    out = dict.fromkeys([name for name, _ in STEPS] + [OTHER, PYTHON], 0.0)
    for text, spent in timings:
        head = text.lstrip()
        while head.startswith("--") and "\n" in head:
            if any(head.startswith(p) for _, ps in STEPS for p in ps):
                break
            head = head.split("\n", 1)[1].lstrip()
        name = next((n for n, ps in STEPS if any(head.startswith(p) for p in ps)), OTHER)
        out[name] += spent
    out[PYTHON] = total - sum(spent for _, spent in timings)
    return out


def comparison_statements(db: Prepared) -> list[str]:
    """The statements of one comparison (``SnapshotComparer.run``, events dropped), run in
    a transaction that is rolled back: what EXPLAIN ANALYZE is then asked about."""
    with psycopg.connect(db.settings.dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        found = registry.get_watch(conn, db.settings.schema, WATCH)
        assert found is not None
        types = TypeRegistry.load(conn)

        def type_names(oids: Any) -> dict[int, str]:
            return {oid: types.type_name(oid) for oid in oids}

        comparer = SnapshotComparer(db.settings.schema, type_names)
        with timer() as timings:
            comparer.run(
                conn, snapshots.snapshot_watch(found), 0, lambda _: None, datetime.now(UTC)
            )
        conn.rollback()
    return [text for text, _ in timings if not text.startswith("fetchmany")]


def explain(db: Prepared, statements: list[str], over: float = 0.02) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of each statement, in order, in one rolled-back transaction;
    the plans of those that took more than ``over`` seconds are printed."""
    with psycopg.connect(db.settings.dsn) as conn:
        for name, value in CANONICAL_SESSION_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        for statement in statements:
            if "%s" in statement or "%(" in statement:
                continue  # catalog look-ups with parameters (and the settings, done above)
            head = statement.lstrip()
            while head.startswith("--"):  # the named queries' comments
                head = head.split("\n", 1)[1] if "\n" in head else ""
            if not head.upper().startswith(("SELECT", "WITH", "CREATE TEMP", "DELETE", "INSERT")):
                conn.execute(statement)
                continue
            started = time.perf_counter()
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + head).fetchall()
            spent = time.perf_counter() - started
            if spent > over:
                c.say(f"\n  {spent:.3f} s: {' '.join(head.split())[:200]}")
                for (line,) in plan:
                    c.say(f"      {line}")
        conn.rollback()


def profile(cluster: EmbeddedCluster, rows: int) -> None:
    db = prepare(cluster, "bench_snapshot_profile", rows)
    try:
        c.say("\nprofile: EXPLAIN ANALYZE of the comparison's statements over 20 ms")
        explain(db, comparison_statements(db))
        c.say("\n  and of the floor:")
        explain(db, [FLOOR], over=0)
    finally:
        db.drop()


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rows = args.rows - args.rows % 200
    changes = rows // 50
    cluster = c.start_cluster()
    meter = c.CpuMeter(cluster)
    try:
        herald: list[Timed] = []
        floor: list[Timed] = []
        counted, ratios, cpu_ratios = [], [], []
        for rep in range(args.repeat):
            db = prepare(cluster, f"bench_snapshot_{rep}", rows)
            try:
                if rep % 2 == 0:
                    run = run_pgherald(db, rows, meter)
                    ref = run_floor(db, rows, meter)
                else:
                    ref = run_floor(db, rows, meter)
                    run = run_pgherald(db, rows, meter)
                count_s = run_floor_count(db)
            finally:
                db.drop()
            herald.append(run)
            floor.append(ref)
            counted.append(count_s)
            ratios.append(run.seconds / ref.seconds)
            cpu_ratios.append(run.cpu / ref.cpu)
            c.say(
                f"rep {rep + 1}: pgherald {run.seconds:.3f} s (CPU: server {run.server_cpu:.2f} s,"
                f" Python {run.client_cpu:.2f} s; RSS +{run.memory_mb:.1f} MB;"
                f" WAL {run.wal_mb:.0f} MB),"
                f" floor {ref.seconds:.3f} s (CPU: server {ref.server_cpu:.2f} s, client"
                f" {ref.client_cpu:.2f} s), floor (count) {count_s:.3f} s;"
                f" ratio {ratios[-1]:.2f}, CPU ratio {cpu_ratios[-1]:.2f}"
                f" [baseline recorded in {db.baseline_seconds:.2f} s]"
            )
        if herald:

            def med(values: list[float]) -> float:
                return c.median(values)

            c.say(
                f"\n{rows:,} rows, {rows // 100:,} updated, {rows // 200:,} deleted,"
                f" {rows // 200:,} inserted; medians of {args.repeat}:"
            )
            c.say(
                f"  pgherald full run  {med([r.seconds for r in herald]):.3f} s"
                f"  (CPU {med([r.cpu for r in herald]):.2f} s)"
            )
            c.say(
                f"  floor (FULL JOIN)  {med([r.seconds for r in floor]):.3f} s"
                f"  (CPU {med([r.cpu for r in floor]):.2f} s)"
            )
            c.say(f"  floor (count only) {med(counted):.3f} s")
            ratio = med(ratios)
            verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
            c.say(f"  ratio pgherald / floor: {ratio:.2f} (target <= {TARGET_RATIO}: {verdict})")
            c.say(f"  CPU ratio pgherald / floor: {med(cpu_ratios):.2f}")
            c.say(
                f"  pgherald's RSS growth: max {max(r.memory_mb for r in herald):.1f} MB;"
                f" its Python CPU: {med([r.client_cpu for r in herald]):.2f} s;"
                f" WAL per run: {med([r.wal_mb for r in herald]):.0f} MB"
            )
            c.say("  pgherald's run, step by step (medians):")
            for name in herald[0].steps:
                spent = med([r.steps[name] for r in herald])
                per_change = f"  ({spent / changes * 1e6:.0f} us per change)"
                c.say(f"    {spent:6.3f} s  {name}{per_change if 'change log' in name else ''}")
        if args.profile:
            profile(cluster, rows)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
