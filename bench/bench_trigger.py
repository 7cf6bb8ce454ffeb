"""Trigger capture: what it costs writers, and how soon a committed change is in the log.

**Writer overhead.** Each repetition uses a fresh database (``wal_level=replica``: trigger
capture is for servers without logical decoding) with four identical tables, and runs
pgbench on each (one-row INSERT transactions, ``synchronous_commit = on``, 4 clients, as
fast as it goes), in an order that rotates between repetitions:

- ``no trigger``: a table without triggers (the baseline);
- ``pgherald``: a trigger watch (``watch add --method trigger``) while pgherald drains the
  queue into the change log, in-process as ``pgherald run`` wires it (``TriggerSource`` +
  ``ChangeLogSink``); after pgbench we note how long pgherald needed to store the last
  row (keeping TPS up by falling behind would not be fair);
- ``pg_notify trigger``: a plain row trigger that sends ``pg_notify`` with the row as its
  payload (a program LISTENs and reads them), the hand-written way;
- ``queue trigger``: a row trigger that only inserts the row as jsonb into a queue table
  (nobody drains it): the least a durable queue can cost.

Printed: median TPS of each and, per variant, the median over repetitions of its TPS ÷
the no-trigger TPS of the same repetition (target for pgherald: >= 0.8). Also the CPU per
transaction of every PostgreSQL process (backends, WAL writer, pgherald's store
connection ...) and of this process (pgherald's drainer, or the LISTENing client): on a
shared machine TPS moves with other load, CPU per transaction much less, and it says
where the writers' time went.

**Latency.** With ``track_commit_timestamp = on`` (trigger events then carry the real
commit time), ``pgbench --rate`` sends one-row INSERT transactions at 1,000/s (Poisson
arrivals, 4 clients) for 15 s while pgherald drains. Latency of an event =
``pg_xact_commit_timestamp(events.xmin) - events.commit_time``: when the store transaction
that wrote the event committed, minus when the source transaction committed, both taken
by the server's clock at the same point of a commit (as ``bench_logical_latency.py``
does). The first 2 s are left out. Reference, in the same run: a per-row ``pg_notify``
trigger and a LISTENing client noting when each notification arrives
(commit-to-notified), the fastest a hand-written setup tells anyone. Target: p99 <= 100 ms.

Run: ``.venv/bin/python bench/bench_trigger.py [--part overhead|latency|both]
[--seconds 15] [--clients 4] [--rate 1000] [--repeat 3] [--busy-poll SECONDS]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import _common as c
from pgherald import admin, app
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.db.sqlfiles import read_sql
from pgherald.sources.trigger import TriggerSettings

TARGET_RATIO = 0.8
TARGET_P99_MS = 100.0
WARM_UP_S = 2.0

NO_TRIGGER = "no trigger"
PGHERALD = "pgherald"
NOTIFY = "pg_notify trigger"
QUEUE = "queue trigger"
VARIANTS = (NO_TRIGGER, PGHERALD, NOTIFY, QUEUE)
TABLES = {
    NO_TRIGGER: "plain_rows",
    PGHERALD: "herald_rows",
    NOTIFY: "notify_rows",
    QUEUE: "queued_rows",
}
NOTIFY_CHANNEL = "bench_changes"

# The references, as people write them by hand.
REFERENCE_TRIGGERS = """
CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_changes', json_build_object(
        'table', TG_TABLE_NAME, 'operation', TG_OP, 'xid', pg_current_xact_id()::text,
        'new_record', row_to_json(NEW))::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE OR DELETE ON notify_rows
    FOR EACH ROW EXECUTE FUNCTION bench_notify();

CREATE TABLE bench_queue (
    id bigserial PRIMARY KEY,
    table_name text NOT NULL,
    op text NOT NULL,
    new_row jsonb,
    old_row jsonb,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    queued_at timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION bench_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_queue (table_name, op, new_row) VALUES (TG_TABLE_NAME, TG_OP, to_jsonb(NEW));
    RETURN NULL;
END
$$;
CREATE TRIGGER bench_enqueue AFTER INSERT OR UPDATE OR DELETE ON queued_rows
    FOR EACH ROW EXECUTE FUNCTION bench_enqueue();
"""

LATENCY_SQL = """
WITH lat AS (
    SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - commit_time) * 1000 AS ms
    FROM pgherald.events
    WHERE watch = %(watch)s AND NOT meta ? 'commit_time'
      AND commit_time >= (SELECT min(commit_time) FROM pgherald.events WHERE watch = %(watch)s)
                         + %(warm_up)s * interval '1 s'
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
       max(ms), count(*)
FROM lat
"""

NOTIFY_LATENCY_SQL = """
WITH got AS (
    SELECT xid, received
    FROM unnest(%(xids)s::xid8[], %(received)s::timestamptz[]) AS g(xid, received)
), lat AS (
    SELECT extract(epoch FROM received - pg_xact_commit_timestamp(
               mod(xid::text::bigint, 4294967296)::text::xid)) * 1000 AS ms,
           pg_xact_commit_timestamp(mod(xid::text::bigint, 4294967296)::text::xid) AS committed
    FROM got
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
       max(ms), count(*)
FROM lat
WHERE committed >= (SELECT min(committed) FROM lat) + %(warm_up)s * interval '1 s'
"""


def insert_one(table: str) -> str:
    """``_common.INSERT_ONE`` into ``table`` (a name of ours, not user input)."""
    return c.INSERT_ONE.replace("public.bench_rows", f"public.{table}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def trigger_db(cluster: EmbeddedCluster, name: str) -> c.BenchDB:
    """A fresh database with the four tables, pgherald's store, its trigger watch on
    ``herald_rows`` and the reference triggers."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    settings = Settings(dsn=cluster.dsn(name), method="trigger")
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        for table in TABLES.values():
            conn.execute(c.CREATE_TABLE.replace("public.bench_rows", f"public.{table}"))
        conn.execute(REFERENCE_TRIGGERS)
    admin.init(settings)
    admin.add_watch(settings, ("public", TABLES[PGHERALD]), name=TABLES[PGHERALD])
    return c.BenchDB(cluster, name, settings)


def drop_db(db: c.BenchDB) -> None:
    with psycopg.connect(db.cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db.name)))


def rows_in(db: c.BenchDB, table: str) -> int:
    with db.connect() as conn:
        found = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        ).fetchone()
    assert found is not None
    return int(found[0])


# -- pgherald draining in-process ------------------------------------------------------


class Draining(c.Capturing):
    """pgherald's trigger capture of ``db`` in a thread, as ``pgherald run`` wires it;
    ``busy_poll`` (seconds) replaces ``TriggerSettings.busy_poll`` to try other values."""

    busy_poll: float | None = None

    def __init__(self, db: c.BenchDB) -> None:
        source = app.build_trigger_source(db.settings)
        if self.busy_poll is not None:
            source.settings = dataclasses.replace(source.settings, busy_poll=self.busy_poll)
        super().__init__(db, source, app.trigger_source_name(db.settings), "pgherald-trigger")

    def start(self) -> Draining:
        super().start()
        deadline = time.monotonic() + 30
        while not self.source.connected.wait(0.05):
            self.stored()
            if time.monotonic() > deadline:
                raise TimeoutError("capture did not start")
        return self


@contextmanager
def draining(db: c.BenchDB) -> Iterator[Draining]:
    capture = Draining(db).start()
    try:
        yield capture
    finally:
        capture.close()


class Listening:
    """A client LISTENing on the reference trigger's channel, noting when each
    notification arrived (and the xid it names)."""

    def __init__(self, db: c.BenchDB) -> None:
        self.conn = psycopg.connect(db.dsn, autocommit=True, application_name="bench-listener")
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        self.stop = threading.Event()
        self.got: list[tuple[str, float]] = []  # (payload, time received)
        self.thread = threading.Thread(target=self._run, name="listener", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for n in self.conn.notifies(timeout=0.2):
                self.got.append((n.payload, time.time()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.conn.close()


# -- writer overhead ---------------------------------------------------------------------


class ServerCpu:
    """CPU seconds used by the cluster's processes (live ones, and those that ended).

    A backend that exits between two readings is counted live in the first and among the
    postmaster's reaped children in the second, so differences stay right.
    """

    def __init__(self, cluster: EmbeddedCluster) -> None:
        pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
        self.postmaster = psutil.Process(pid)

    def seconds(self) -> float:
        t = self.postmaster.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for child in self.postmaster.children(recursive=True):
            try:
                ct = child.cpu_times()
            except psutil.Error:
                continue  # ended just now: the next reading has it among the reaped
            total += float(ct.user + ct.system)
        return total


class CpuByProcess:
    """Where the cluster's CPU went during a run, by kind of process, sampled twice a second.

    Kinds come from the process title (``postgres: walwriter`` ...) and, for client
    backends, from the pids of pgherald's own connections (``application_name``) looked up
    once when the run starts; every other client backend is a writer (pgbench's). A process
    that ends is counted up to its last sample; the rest of what it used (under half a
    second's worth) shows as ``ended``. The sampler's own CPU is kept out of this process's.
    """

    INTERVAL = 0.5

    def __init__(self, cpu: ServerCpu, dsn: str) -> None:
        self.cpu = cpu
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid, application_name FROM pg_stat_activity"
                " WHERE application_name LIKE 'pgherald%%' OR application_name = 'bench-listener'"
            ).fetchall()
        self.named = {int(pid): str(app) for pid, app in rows}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kind: dict[int, str] = {}
        self.own_cpu = 0.0
        self.stop_event = threading.Event()
        self.total_before = cpu.seconds()
        self._sample()
        self.first = dict(self.last)
        self.thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self.thread.start()

    def _classify(self, proc: psutil.Process) -> str:
        if proc.pid in self.named:
            return self.named[proc.pid]
        title = " ".join(proc.cmdline())
        for kind in ("walwriter", "autovacuum", "checkpointer", "background writer"):
            if kind in title:
                return kind
        if "[local]" in title or "127.0.0.1" in title or "(" in title:
            return "writers' backends"
        return "other"

    def _sample(self) -> None:
        for child in self.cpu.postmaster.children(recursive=True):
            try:
                t = child.cpu_times()
                if child.pid not in self.kind:
                    self.kind[child.pid] = self._classify(child)
            except psutil.Error:
                continue
            self.last[child.pid] = float(t.user + t.system)

    def _run(self) -> None:
        started = time.thread_time()
        while not self.stop_event.wait(self.INTERVAL):
            self._sample()
        self.own_cpu = time.thread_time() - started

    def finish(self) -> dict[str, float]:
        """Seconds of CPU per kind of process since the start (and ``ended``: the rest)."""
        self.stop_event.set()
        self.thread.join(10)
        self._sample()
        total = self.cpu.seconds() - self.total_before
        out: dict[str, float] = {}
        for pid, last in self.last.items():
            kind = self.kind.get(pid, "other")
            out[kind] = out.get(kind, 0.0) + last - self.first.get(pid, 0.0)
        out["ended"] = total - sum(out.values())
        return out


@dataclass
class OverheadRun:
    tps: float
    transactions: int
    server_cpu: float  # seconds, every PostgreSQL process
    client_cpu: float  # seconds of this process (pgherald's drainer, or the listener)
    lag: float = 0.0  # seconds pgherald needed after pgbench to store every row
    by_process: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds by kind

    def per_tx(self, seconds: float) -> float:
        return 1e6 * seconds / max(self.transactions, 1)


def overhead_run(
    db: c.BenchDB, cpu: ServerCpu, variant: str, clients: int, seconds: int
) -> OverheadRun:
    script = insert_one(TABLES[variant])
    with contextlib.ExitStack() as stack:
        capture = stack.enter_context(draining(db)) if variant == PGHERALD else None
        if variant == NOTIFY:
            stack.callback(Listening(db).close)
        before = rows_in(db, TABLES[variant])
        already = capture.stored() if capture else 0
        drains = capture.source.drains if capture else 0
        sampler = CpuByProcess(cpu, db.dsn)
        server, client = cpu.seconds(), time.process_time()
        result = c.pgbench(db, script, clients=clients, seconds=seconds)
        ended = time.perf_counter()
        inserted = rows_in(db, TABLES[variant]) - before
        lag = capture.wait_stored(already + inserted) - ended if capture else 0.0
        by_process = sampler.finish()
        run = OverheadRun(
            result.tps,
            inserted,
            cpu.seconds() - server,
            time.process_time() - client - sampler.own_cpu,
            lag,
            by_process,
        )
        if capture:
            drains = capture.source.drains - drains
            c.say(
                f"     pgherald: {drains / seconds:.0f} drains/s, {inserted / max(drains, 1):.0f}"
                f" rows per drain, {capture.source.notifies} wake-ups"
            )
    return run


def overhead(repeat: int, clients: int, seconds: int) -> None:
    cluster = c.start_cluster(wal_level="replica")
    cpu = ServerCpu(cluster)
    runs: dict[str, list[OverheadRun]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    try:
        c.say(
            f"writer overhead: PostgreSQL {cluster.version} (wal_level=replica), pgbench one-row"
            f" inserts, {clients} clients, {seconds}s per run, synchronous_commit=on; {load()}"
        )
        for rep in range(repeat):
            db = trigger_db(cluster, f"trigger_overhead_{rep}")
            try:
                for variant in order:
                    runs[variant].append(overhead_run(db, cpu, variant, clients, seconds))
            finally:
                drop_db(db)
            ours = runs[PGHERALD][-1]
            c.say(
                f"  #{rep + 1} ({', '.join(order)}): "
                + " | ".join(f"{v} {runs[v][-1].tps:7,.0f} tps" for v in VARIANTS)
                + f" | pgherald caught up {ours.lag:.2f}s after; {load()}"
            )
            order = order[1:] + order[:1]
    finally:
        cluster.stop()
    tps = {v: [r.tps for r in runs[v]] for v in VARIANTS}
    ratios = {
        v: c.median([t / b for t, b in zip(tps[v], tps[NO_TRIGGER], strict=True)]) for v in VARIANTS
    }
    c.say("CPU per transaction (median): PostgreSQL's processes + this process (drainer/listener)")
    for v in VARIANTS:
        server = c.median([r.per_tx(r.server_cpu) for r in runs[v]])
        client = c.median([r.per_tx(r.client_cpu) for r in runs[v]])
        c.say(f"  {v:18s} {server:5.0f} µs + {client:3.0f} µs")
    c.say("  the PostgreSQL part by process (median µs per transaction):")
    for v in VARIANTS:
        kinds = sorted({k for r in runs[v] for k in r.by_process})
        parts = [
            (k, c.median([r.per_tx(r.by_process.get(k, 0.0)) for r in runs[v]])) for k in kinds
        ]
        c.say(f"    {v:18s} " + ", ".join(f"{k} {us:.0f}" for k, us in parts))
    verdict = "ok" if ratios[PGHERALD] >= TARGET_RATIO else "BELOW TARGET"
    c.say(
        f"median of {repeat}: "
        + ", ".join(f"{v} {c.median(tps[v]):,.0f} tps" for v in VARIANTS)
        + "; median ratio to no trigger: "
        + ", ".join(f"{v} {ratios[v]:.2f}" for v in VARIANTS if v != NO_TRIGGER)
        + f" (pgherald caught up {c.median([r.lag for r in runs[PGHERALD]]):.2f}s after pgbench)"
        + f"  [target pgherald/no trigger >= {TARGET_RATIO}: {verdict}]"
    )


# -- the trigger function alone -------------------------------------------------------------

MIGRATION_2 = "migrations/0002_trigger_capture.sql"
FUNCTION_COST = {
    NO_TRIGGER: TABLES[NO_TRIGGER],
    QUEUE: TABLES[QUEUE],
    "capture_change of migration 2": "herald_v2_rows",
    "capture_change (installed)": TABLES[PGHERALD],
}


def install_migration_2_function(db: c.BenchDB) -> None:
    """The trigger function as migration 2 shipped it (a ``SET search_path`` clause, the
    wake-up switch read at every row), as ``capture_change_v2``, on a table of its own:
    the reference for what the installed one saves."""
    text = read_sql(MIGRATION_2)
    body = text[text.index("DO $install$") : text.index("END\n$install$;") + len("END\n$install$;")]
    body = body.replace("%1$I.capture_change()", "%1$I.capture_change_v2()")
    table = FUNCTION_COST["capture_change of migration 2"]
    with db.connect() as conn:
        conn.execute(c.CREATE_TABLE.replace("public.bench_rows", f"public.{table}"))
        with conn.transaction():
            conn.execute("SET LOCAL search_path TO pgherald")
            conn.execute(body.encode())
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER capture_v2 AFTER INSERT OR UPDATE OR DELETE ON {}"
                " FOR EACH ROW EXECUTE FUNCTION pgherald.capture_change_v2({}, '{{}}', '')"
            ).format(sql.Identifier(table), sql.Literal(table))
        )
        # As while pgherald drains a busy queue: writers send no NOTIFY.
        conn.execute("UPDATE pgherald.trigger_wake SET armed = false")


def backend_cpu(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    t = psutil.Process(int(row[0])).cpu_times()
    return float(t.user + t.system)


def function_cost(repeat: int, transactions: int, rows: int) -> None:
    """CPU per transaction (one-row transactions in a server-side loop) and per row (one
    big INSERT) of each trigger, in the writer's own backend, without a drainer."""
    cluster = c.start_cluster(wal_level="replica")
    per_tx: dict[str, list[float]] = {v: [] for v in FUNCTION_COST}
    per_row: dict[str, list[float]] = {v: [] for v in FUNCTION_COST}
    order = list(FUNCTION_COST)
    try:
        c.say(
            f"trigger function alone: PostgreSQL {cluster.version}, {transactions:,} one-row"
            f" transactions and one {rows:,}-row INSERT per table, synchronous_commit=off,"
            f" CPU of the writer's backend; {load()}"
        )
        db = trigger_db(cluster, "trigger_function_cost")
        install_migration_2_function(db)
        try:
            with db.connect() as conn:
                conn.execute("SET synchronous_commit = off")
                for _ in range(repeat):
                    for variant in order:
                        table = FUNCTION_COST[variant]
                        loop = c.SINGLE_ROW_TRANSACTIONS.replace(
                            "public.bench_rows", f"public.{table}"
                        )
                        before = backend_cpu(conn)
                        conn.execute((loop % transactions).encode())
                        per_tx[variant].append(1e6 * (backend_cpu(conn) - before) / transactions)
                        big = c.ONE_TRANSACTION.replace("public.bench_rows", f"public.{table}")
                        before = backend_cpu(conn)
                        conn.execute((big % rows).encode())
                        per_row[variant].append(1e6 * (backend_cpu(conn) - before) / rows)
                        conn.execute("TRUNCATE pgherald.trigger_queue, bench_queue")
                    order = order[1:] + order[:1]
        finally:
            drop_db(db)
    finally:
        cluster.stop()
    c.say(f"median of {repeat} (µs of the writer's backend): per one-row transaction | per row")
    base_tx, base_row = c.median(per_tx[NO_TRIGGER]), c.median(per_row[NO_TRIGGER])
    for variant in FUNCTION_COST:
        tx, row = c.median(per_tx[variant]), c.median(per_row[variant])
        c.say(
            f"  {variant:32s} {tx:6.1f} (+{tx - base_tx:5.1f})"
            f" | {row:5.1f} (+{row - base_row:5.1f})"
        )


# -- latency ------------------------------------------------------------------------------


def pgherald_latency(
    db: c.BenchDB, rate: int, clients: int, seconds: int
) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, max ms, achieved tps) of commit-to-stored."""
    table = TABLES[PGHERALD]
    before = rows_in(db, table)
    with draining(db) as capture:
        already = capture.stored()
        result = c.pgbench(db, insert_one(table), clients=clients, seconds=seconds, rate=rate)
        capture.wait_stored(already + rows_in(db, table) - before, timeout=120)
        drains, notifies = capture.source.drains, capture.source.notifies
    with db.connect() as conn:
        row = conn.execute(LATENCY_SQL, {"watch": table, "warm_up": WARM_UP_S}).fetchone()
        assert row is not None and row[3], "no events measured"
        untracked = conn.execute(
            "SELECT count(*) FROM pgherald.events WHERE watch = %s AND meta ? 'commit_time'",
            (table,),
        ).fetchone()
    assert untracked == (0,), "events without a real commit time: is track_commit_timestamp on?"
    c.say(f"     pgherald: {int(row[3]):,} events measured, {drains:,} drains, {notifies} wake-ups")
    return float(row[0]), float(row[1]), float(row[2]), result.tps


def notify_latency(
    db: c.BenchDB, rate: int, clients: int, seconds: int
) -> tuple[float, float, float, float]:
    """(p50 ms, p99 ms, max ms, achieved tps) of commit-to-notified (a LISTENing client)."""
    listener = Listening(db)
    try:
        table = TABLES[NOTIFY]
        result = c.pgbench(db, insert_one(table), clients=clients, seconds=seconds, rate=rate)
        deadline = time.monotonic() + 30
        while len(listener.got) < result.transactions and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        listener.close()
    with db.connect() as conn:
        row = conn.execute(
            NOTIFY_LATENCY_SQL,
            {
                "xids": [json.loads(payload)["xid"] for payload, _ in listener.got],
                "received": [datetime.fromtimestamp(t, UTC) for _, t in listener.got],
                "warm_up": WARM_UP_S,
            },
        ).fetchone()
    assert row is not None and row[3], "no notifications measured"
    return float(row[0]), float(row[1]), float(row[2]), result.tps


def latency(repeat: int, clients: int, seconds: int, rate: int) -> None:
    cluster = c.start_cluster(wal_level="replica", track_commit_timestamp="on")
    ours: list[tuple[float, float, float, float]] = []
    theirs: list[tuple[float, float, float, float]] = []
    try:
        c.say(
            f"latency: PostgreSQL {cluster.version}, {rate:,} one-row transactions/s for"
            f" {seconds}s ({clients} pgbench clients), first {WARM_UP_S:.0f}s left out; {load()}"
        )
        for rep in range(repeat):
            db = trigger_db(cluster, f"trigger_latency_{rep}")
            try:
                if rep % 2 == 0:
                    ours.append(pgherald_latency(db, rate, clients, seconds))
                    theirs.append(notify_latency(db, rate, clients, seconds))
                else:
                    theirs.append(notify_latency(db, rate, clients, seconds))
                    ours.append(pgherald_latency(db, rate, clients, seconds))
            finally:
                drop_db(db)
            (p50, p99, top, tps), (r50, r99, rtop, rtps) = ours[-1], theirs[-1]
            c.say(
                f"  #{rep + 1}: pgherald commit-to-stored p50 {p50:6.2f} ms p99 {p99:6.2f} ms"
                f" max {top:6.1f} ms ({tps:,.0f} tps) | pg_notify commit-to-notified p50"
                f" {r50:6.2f} ms p99 {r99:6.2f} ms max {rtop:6.1f} ms ({rtps:,.0f} tps); {load()}"
            )
    finally:
        cluster.stop()
    p50 = c.median([o[0] for o in ours])
    p99 = c.median([o[1] for o in ours])
    r50 = c.median([t[0] for t in theirs])
    r99 = c.median([t[1] for t in theirs])
    verdict = "ok" if p99 <= TARGET_P99_MS else "ABOVE TARGET"
    c.say(
        f"median of {repeat}: pgherald p50 {p50:.2f} ms, p99 {p99:.2f} ms; pg_notify p50"
        f" {r50:.2f} ms, p99 {r99:.2f} ms; pgherald/pg_notify p50 {p50 / r50:.1f}x,"
        f" p99 {p99 / r99:.1f}x; p99 / target {p99 / TARGET_P99_MS:.2f}"
        f"  [target p99 <= {TARGET_P99_MS:.0f} ms: {verdict}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=("overhead", "latency", "both", "function"), default="both"
    )
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--busy-poll",
        type=float,
        default=None,
        help="seconds between drains while changes keep coming (default: TriggerSettings')",
    )
    args = parser.parse_args()
    Draining.busy_poll = args.busy_poll
    poll = args.busy_poll if args.busy_poll is not None else TriggerSettings(dsn="").busy_poll
    c.say(f"pgherald drains every {poll * 1000:.0f} ms while busy (busy_poll)")
    if args.part in ("overhead", "both"):
        overhead(args.repeat, args.clients, args.seconds)
    if args.part in ("latency", "both"):
        latency(args.repeat, args.clients, args.seconds, args.rate)
    if args.part == "function":
        function_cost(max(args.repeat, 5), transactions=10_000, rows=20_000)


if __name__ == "__main__":
    main()
