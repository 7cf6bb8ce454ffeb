"""Commit-to-stored latency of logical capture at a steady 2,000 transactions/s.

A paced writer (``pgbench --rate``, one-row INSERT transactions, several clients) runs
for a while against a watched table; pgherald captures it in the same run.

How latency is measured, on one clock: the cluster runs with ``track_commit_timestamp``,
so PostgreSQL records when each transaction committed. An event row carries the source
transaction's commit time (``commit_time``, from pgoutput's BEGIN, which is that same
commit timestamp), and the transaction that stored the event row has a commit timestamp
of its own, ``pg_xact_commit_timestamp(xmin)``. Their difference is commit-to-stored:
both are taken by the server at the same point of a commit, so nothing of the client's
clock or of polling enters it. The first seconds (connection set-up, warm caches) are
left out.

The reference, measured in the same run on a second slot: a bare Python replication
reader (psycopg2, nothing decoded but BEGIN) that notes when each COMMIT message arrives;
its commit-to-received latency is what the server and the transport cost before pgherald
does anything. Targets: p50 <= 10 ms, p99 <= 50 ms.

Run: ``.venv/bin/python bench/bench_logical_latency.py [--rate 2000] [--seconds 15]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import contextlib

from bench import _common as c
from pgherald.sources.pgoutput import Begin, decode

TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
WARM_UP_S = 2.0
CLIENTS = 8

LATENCY_SQL = """
WITH lat AS (
    SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - commit_time) * 1000 AS ms
    FROM pgherald.events
    WHERE watch = %s
      AND commit_time >= (SELECT min(commit_time) FROM pgherald.events) + %s * interval '1 s'
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
       max(ms), count(*)
FROM lat
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pgherald_run(db: c.BenchDB, rate: int, seconds: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, achieved tps) of pgherald's commit-to-stored latency."""
    with c.capturing(db) as capture:
        deadline = time.monotonic() + 30
        while not capture.source.connected.wait(0.05):
            capture.stored()  # raises if capture failed
            if time.monotonic() > deadline:
                raise TimeoutError("capture did not start")
        result = c.pgbench(db, c.INSERT_ONE, clients=CLIENTS, seconds=seconds, rate=rate)
        capture.wait_stored(c.table_rows(db), timeout=120)
    with db.connect() as conn:
        row = conn.execute(LATENCY_SQL, (c.WATCH, WARM_UP_S)).fetchone()
    assert row is not None and row[3], "no events measured"
    return float(row[0]), float(row[1]), result.tps


def reference_run(db: c.BenchDB, rate: int, seconds: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, achieved tps) of commit-to-received by a bare replication reader."""
    db.create_reference_slot()  # now: it must not hold the WAL of an earlier run
    latencies: list[float] = []
    commit_time: list[datetime] = []
    stop = threading.Event()
    conn: Any = psycopg2.connect(
        db.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    cur = conn.cursor()
    cur.start_replication(
        slot_name=c.REF_SLOT,
        decode=False,
        options={
            "proto_version": "1",
            "publication_names": db.settings.publication,
            "messages": "true",
        },
        status_interval=1,
    )

    def consume(msg: Any) -> None:
        kind = msg.payload[0]
        if kind == 0x42:  # 'B'
            begin = decode(msg.payload)
            assert isinstance(begin, Begin)
            commit_time[:] = [begin.commit_time]
        elif kind == 0x43 and commit_time:  # 'C'
            latencies.append((datetime.now(UTC) - commit_time[0]).total_seconds() * 1000)
            msg.cursor.send_feedback(flush_lsn=msg.data_start)
        if stop.is_set():
            raise psycopg2.extras.StopReplication

    def reader() -> None:
        with contextlib.suppress(psycopg2.extras.StopReplication):
            cur.consume_stream(consume, keepalive_interval=1)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        result = c.pgbench(db, c.INSERT_ONE, clients=CLIENTS, seconds=seconds, rate=rate)
        time.sleep(0.5)
    finally:
        stop.set()
        with db.connect() as other:  # a message wakes the reader, so that it sees `stop`
            other.execute("SELECT pg_logical_emit_message(false, 'bench', '')")
        thread.join(10)
        conn.close()
    skip = int(WARM_UP_S * result.tps)
    measured = latencies[skip:]
    return percentile(measured, 0.5), percentile(measured, 0.99), result.tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cluster = c.start_cluster(track_commit_timestamp="on")
    ours: list[tuple[float, float, float]] = []
    theirs: list[tuple[float, float, float]] = []
    try:
        c.say(
            f"PostgreSQL {cluster.version}, {args.rate:,} one-row transactions/s for"
            f" {args.seconds}s ({CLIENTS} pgbench clients), first {WARM_UP_S:.0f}s left out"
        )
        for rep in range(args.repeat):
            db = c.bench_db(cluster, f"latency_{rep}")
            try:
                ours.append(pgherald_run(db, args.rate, args.seconds))
                theirs.append(reference_run(db, args.rate, args.seconds))
            finally:
                db.drop()
            (p50, p99, tps), (r50, r99, rtps) = ours[-1], theirs[-1]
            c.say(
                f"  #{rep + 1}: pgherald commit-to-stored p50 {p50:6.2f} ms p99 {p99:6.2f} ms"
                f" ({tps:,.0f} tps) | bare reader commit-to-received p50 {r50:6.2f} ms"
                f" p99 {r99:6.2f} ms ({rtps:,.0f} tps)"
            )
    finally:
        cluster.stop()
    p50 = c.median([o[0] for o in ours])
    p99 = c.median([o[1] for o in ours])
    r50 = c.median([t[0] for t in theirs])
    r99 = c.median([t[1] for t in theirs])
    verdict = "ok" if p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS else "ABOVE TARGET"
    c.say(
        f"median of {args.repeat}: pgherald p50 {p50:.2f} ms, p99 {p99:.2f} ms;"
        f" bare reader p50 {r50:.2f} ms, p99 {r99:.2f} ms;"
        f" pgherald/reader p50 {p50 / r50:.1f}x, p99 {p99 / r99:.1f}x"
        f"  [target p50 <= {TARGET_P50_MS:.0f} ms, p99 <= {TARGET_P99_MS:.0f} ms: {verdict}]"
    )


if __name__ == "__main__":
    main()
