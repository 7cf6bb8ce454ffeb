"""Delivery throughput with 1, 2 and 4 ``pgherald deliver`` worker processes (to RabbitMQ).

Delivery workers share a sink's work through ``FOR UPDATE SKIP LOCKED`` claims, so more
processes (on one machine or several) should deliver more, until something they share
runs out: the database, the broker, or the machine's cores. This measures how far that
goes here.

**The backlog.** Per repetition and worker count, a fresh database: N one-row
transactions are committed, captured (logical capture in-process) and routed (the
``Router`` in-process), so that N deliveries wait in ``deliveries`` for the ``amqp``
sink (a durable fanout exchange of the run's own, persistent mandatory messages,
publisher confirms; the bench's queue bound to it). They are made not due yet (their
``next_attempt_at`` an hour ahead), so that the workers can start and connect first.

**The measurement.** K ``pgherald deliver --sink rabbit`` processes start; once every
one listens for work (its engine's control connection is open), the backlog is made due
(one UPDATE and the router's NOTIFY) and the clock starts; each worker then opens its
sink's connections (to the database and to RabbitMQ), as it would for the first work
after an idle spell. events/s = N / seconds until ``deliveries`` says
N were delivered (each confirmed by the broker) and the bench's queue holds N messages
(read with a passive declare, which costs nothing per message). Also printed: each
worker's CPU time (how the work was shared; ``psutil``), the workers' CPU per event, and
how busy the machine's cores were meanwhile.

The worker counts' order rotates between repetitions; the median of the repetitions and
its ratio to one worker's median are printed per count.

Run: ``.venv/bin/python bench/bench_delivery_workers.py [--rows 20000] [--workers 1,2,4]
[--repeat 3]``. RabbitMQ must listen on 127.0.0.1:5672 (guest/guest), as for the sink
tests (``.ci/services``), or give ``--amqp-url``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import psutil

from bench import _common as c
from bench.bench_delivery import DEFAULT_URL, PGHERALD, SINK, Broker, add_amqp_sink
from pgherald.db.embedded import EmbeddedCluster
from pgherald.delivery.router import Router
from pgherald.store.deliveries import deliveries_channel


@dataclass(frozen=True)
class Run:
    workers: int
    rows: int
    seconds: float
    cpu: list[float]
    """Each worker's CPU seconds while it delivered."""
    busy: float
    """The machine's cores' busy share meanwhile (0..1)."""

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def backlog(cluster: EmbeddedCluster, name: str, rows: int, url: str, exchange: str) -> c.BenchDB:
    """A fresh database whose change log holds ``rows`` events, routed to the amqp sink and
    waiting, not due yet."""
    db = c.bench_db(cluster, name)
    add_amqp_sink(db, url, exchange)
    c.run_workload(db, c.SINGLE_ROW_TRANSACTIONS, rows)
    capturing = c.Capturing(db)
    router = Router(db.settings)
    stop = threading.Event()
    routing = threading.Thread(target=router.run, args=(stop,), daemon=True)
    capturing.start()
    routing.start()
    try:
        deadline = time.monotonic() + 600
        while router.routed_events < rows:
            capturing.stored()  # raises if capture failed
            if not routing.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"routed {router.routed_events} of {rows}")
            time.sleep(0.05)
    finally:
        stop.set()
        routing.join(30)
        capturing.close()
    with db.connect() as conn:
        conn.execute(
            "UPDATE pgherald.deliveries SET next_attempt_at = now() + interval '1 hour'"
            " WHERE status = 'pending'"
        )
        found = conn.execute("SELECT count(*) FROM pgherald.deliveries").fetchone()
        assert found is not None and found[0] == rows, found
        conn.execute("VACUUM ANALYZE pgherald.deliveries")
    return db


def workers_connected(db: c.BenchDB, procs: list[subprocess.Popen[bytes]]) -> None:
    """Waits until every worker's delivery engine listens for work (its control connection
    is open; a sink's own connections open when it has work)."""
    deadline = time.monotonic() + 60
    with db.connect() as conn:
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a worker ended with {p.returncode}")
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                ("pgherald-delivery",),
            ).fetchone()
            if row and row[0] >= len(procs):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{row[0] if row else 0} delivery connections of {len(procs)}")
            time.sleep(0.05)


def deliver(db: c.BenchDB, broker: Broker, rows: int, workers: int) -> Run:
    command = [str(PGHERALD), "deliver", "--sink", SINK, "--dsn", db.dsn, "--log-level", "warning"]
    procs = [subprocess.Popen(command, env=c._client_env()) for _ in range(workers)]
    watched = [psutil.Process(p.pid) for p in procs]
    try:
        workers_connected(db, procs)
        time.sleep(0.5)  # past their start-up: the first claims found nothing due
        cpu_before = [w.cpu_times() for w in watched]
        psutil.cpu_percent()  # starts the machine's busy count
        with db.connect() as conn:
            conn.execute("UPDATE pgherald.deliveries SET next_attempt_at = now()")
            started = time.perf_counter()
            conn.execute("SELECT pg_notify(%s, %s)", (deliveries_channel("pgherald"), SINK))
            deadline = time.monotonic() + 600
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM pgherald.deliveries WHERE status = 'delivered'"
                ).fetchone()
                if row and row[0] >= rows and broker.depth() >= rows:
                    seconds = time.perf_counter() - started
                    break
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"a worker ended with {p.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{row[0] if row else 0} of {rows} delivered")
                time.sleep(0.02)
        busy = psutil.cpu_percent() / 100.0
        cpu = [
            (after.user + after.system) - (before.user + before.system)
            for before, after in zip(cpu_before, (w.cpu_times() for w in watched), strict=True)
        ]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    with db.connect() as conn:
        found = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*),"
            " (SELECT count(*) FROM pgherald.delivery_attempts)"
            " FROM pgherald.deliveries"
        ).fetchone()
    assert found is not None and found[0] == found[1] == rows, found
    assert found[2] == rows, f"{found[2]} attempts for {rows} deliveries: something was sent twice"
    assert broker.depth() == rows, f"{broker.depth()} messages in the queue for {rows} events"
    return Run(workers, rows, seconds, cpu, busy)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--amqp-url", default=DEFAULT_URL)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up (workers, cluster) on kill
    counts = [int(n) for n in args.workers.split(",")]
    cluster = c.start_cluster()
    runs: dict[int, list[Run]] = {n: [] for n in counts}
    try:
        c.say(
            f"PostgreSQL {cluster.version}; RabbitMQ at {args.amqp_url.split('@')[-1]};"
            f" {os.cpu_count()} cores; a backlog of {args.rows:,} routed events per run,"
            f" delivered by {', '.join(map(str, counts))} `pgherald deliver` processes"
        )
        for rep in range(args.repeat):
            order = counts[rep % len(counts) :] + counts[: rep % len(counts)]
            for n in order:
                exchange = f"pgherald-bench-{uuid.uuid4().hex[:8]}"
                broker = Broker(args.amqp_url, exchange, queue=True)
                db: c.BenchDB | None = None
                try:
                    db = backlog(cluster, f"workers_{rep}_{n}", args.rows, args.amqp_url, exchange)
                    run = deliver(db, broker, args.rows, n)
                finally:
                    broker.close()
                    if db is not None:
                        db.drop()
                runs[n].append(run)
                c.say(
                    f"  #{rep + 1} {n} worker(s): {run.rate:8,.0f} events/s ({run.seconds:.2f}s);"
                    f" workers' CPU {' + '.join(f'{s:.1f}' for s in run.cpu)} s ="
                    f" {sum(run.cpu) / args.rows * 1e6:.0f} us/event; cores"
                    f" {run.busy * 100:.0f}% busy; load average {os.getloadavg()[0]:.1f}"
                )
        base = c.median([r.rate for r in runs[counts[0]]])
        c.say(f"delivery to RabbitMQ by worker processes (median of {args.repeat}):")
        for n in counts:
            rate = c.median([r.rate for r in runs[n]])
            per_event = c.median([sum(r.cpu) / args.rows * 1e6 for r in runs[n]])
            busy = c.median([r.busy for r in runs[n]])
            c.say(
                f"  {n} worker(s): {rate:8,.0f} events/s, {rate / base:.2f}x of {counts[0]};"
                f" workers' CPU {per_event:.0f} us/event; cores {busy * 100:.0f}% busy"
            )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
