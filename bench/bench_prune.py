"""Pruning the change log: pgherald's batched prune against one big DELETE and against what
partitioning the events table by month would buy (dropping whole partitions).

Each repetition fills two fresh databases with the same synthetic year
(``tests/retention_data.fill_year``: ``--events`` events over 365 days, two field rows per
update, deliveries and attempts, runs and errors; watches ``orders`` (logical, 90d),
``audit`` and ``nightly`` (90d), a removed one under the default 30d), then times, while a
writer appends one event per transaction to the change log (``ChangeLog.append``, about
every 2 ms) and notes each append's latency:

- ``batched``: ``pruning.prune``, exactly what ``pgherald prune`` and the daemon's job do
  (1,000 events per transaction by default, ``--batch-size``);
- ``one DELETE``: on the second database, the same events by one statement per watch
  (older than the cutoff, no open delivery) with their field rows and deliveries, the
  attempts by their key's cascade: the simplest thing, one long transaction;
- ``partition drop``: on a third database, the events copied into a table
  partitioned by month (``captured_at``, same indexes), then the partitions wholly older
  than 90 days detached and dropped; and, because every lookup of a row's latest version
  (what capture does to complete an update from the log) must then visit every
  partition, the time of 2,000 such lookups in each layout.

Printed: events/s and rows/s of each (rows: events + field rows + deliveries +
attempts), the writer's p50/p99/max append latency during each and while idle, and the
lookup times. The machine is shared and has 2 cores: compare figures of the same run.

Run: ``.venv/bin/python bench/bench_prune.py [--events 300000] [--batch-size 1000] [--repeat 1]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tests.retention_data import SINK, Writer, fill_year

from bench import _common as c
from pgherald import pruning
from pgherald.config import Settings
from pgherald.db.embedded import EmbeddedCluster
from pgherald.store import checkpoints, migrations, watches

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
WATCHES = (("orders", "logical"), ("audit", "trigger"), ("nightly", "snapshot"))
ROWS = (
    "SELECT (SELECT count(*) FROM pgherald.events) + (SELECT count(*) FROM pgherald.event_fields)"
    " + (SELECT count(*) FROM pgherald.deliveries)"
    " + (SELECT count(*) FROM pgherald.delivery_attempts)"
)


def make_db(cluster: EmbeddedCluster, name: str, events: int) -> str:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = cluster.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.install(conn)
        for watch, method in WATCHES:
            watches.add_watch(
                conn,
                "pgherald",
                watches.Watch(watch, "public", watch, method, ("id",), retain="90d"),
            )
        fill_year(conn, NOW, events)
        conn.execute(
            "INSERT INTO pgherald.subscriptions (sink, watch) VALUES (%s, 'orders')", (SINK,)
        )
        last = conn.execute("SELECT max(id) FROM pgherald.events").fetchone()
        assert last is not None
        checkpoints.save_checkpoint(conn, "pgherald", "router", str(last[0]))
        conn.execute("VACUUM ANALYZE")
    return dsn


def rows_of(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(ROWS.encode()).fetchone()
    assert row is not None
    return int(row[0])


def latencies(values: list[float]) -> str:
    if not values:
        return "no appends"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
        f" max {ordered[-1] * 1000:.1f} ms ({len(ordered)} appends)"
    )


def with_writer(dsn: str, work: Callable[[], Any]) -> tuple[float, list[float]]:
    """Runs ``work`` while the writer appends; its seconds and the writer's latencies
    (those of the appends that started after the writer had warmed up)."""
    writer = Writer(dsn, NOW)
    writer.start()
    mark = writer.appended
    started = time.monotonic()
    try:
        work()
    finally:
        seconds = time.monotonic() - started
        writer.finish()
    if writer.error is not None:
        raise RuntimeError(writer.error)
    return seconds, writer.latencies[mark:]


def idle_writer(dsn: str, seconds: float = 5.0) -> list[float]:
    _, lat = with_writer(dsn, lambda: time.sleep(seconds))
    return lat


ONE_DELETE = """
WITH doomed AS (
    DELETE FROM pgherald.events e
    WHERE e.watch = %(watch)s AND e.captured_at < %(cutoff)s
      AND NOT EXISTS (SELECT FROM pgherald.deliveries d
                      WHERE d.event_id = e.id AND d.status IN ('pending', 'delivering', 'failed'))
    RETURNING e.id
), fields AS (
    DELETE FROM pgherald.event_fields f USING doomed WHERE f.event_id = doomed.id
), sent AS (
    DELETE FROM pgherald.deliveries d USING doomed WHERE d.event_id = doomed.id
)
SELECT count(*) FROM doomed
"""


def one_delete(dsn: str) -> int:
    cutoffs = {"orders": 90, "audit": 90, "nightly": 90, "gone": 30}
    deleted = 0
    with psycopg.connect(dsn) as conn:  # one transaction
        for watch, days in cutoffs.items():
            row = conn.execute(
                ONE_DELETE.encode(), {"watch": watch, "cutoff": NOW - timedelta(days=days)}
            ).fetchone()
            deleted += row[0] if row else 0
        conn.commit()
    return deleted


PARTITIONED = """
CREATE TABLE pgherald.events_by_month (LIKE pgherald.events INCLUDING DEFAULTS)
    PARTITION BY RANGE (captured_at);
CREATE INDEX ON pgherald.events_by_month (watch, row_key, id);
CREATE INDEX ON pgherald.events_by_month (watch, id);
CREATE INDEX ON pgherald.events_by_month (captured_at);
"""


def partitioned_copy(dsn: str) -> list[tuple[str, datetime]]:
    """The events in a table partitioned by month; each partition's name and upper bound."""
    parts: list[tuple[str, datetime]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in PARTITIONED.strip().split(";\n"):
            conn.execute(statement.encode())
        start = datetime(NOW.year - 1, NOW.month, 1, tzinfo=UTC)
        for i in range(14):
            lower = _month(start, i)
            upper = _month(start, i + 1)
            name = f"events_m{i:02d}"
            conn.execute(
                sql.SQL(
                    "CREATE TABLE pgherald.{} PARTITION OF pgherald.events_by_month"
                    " FOR VALUES FROM ({}) TO ({})"
                ).format(sql.Identifier(name), sql.Literal(lower), sql.Literal(upper))
            )
            parts.append((name, upper))
        conn.execute("INSERT INTO pgherald.events_by_month SELECT * FROM pgherald.events")
        conn.execute("VACUUM ANALYZE pgherald.events_by_month")
    return parts


def _month(start: datetime, add: int) -> datetime:
    month = start.month - 1 + add
    return start.replace(year=start.year + month // 12, month=month % 12 + 1)


def drop_partitions(dsn: str, parts: list[tuple[str, datetime]]) -> int:
    cutoff = NOW - timedelta(days=90)
    dropped = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, upper in parts:
            if upper > cutoff:
                break
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM pgherald.{}").format(sql.Identifier(name))
            ).fetchone()
            assert row is not None
            dropped += int(row[0])
            conn.execute(
                sql.SQL("ALTER TABLE pgherald.events_by_month DETACH PARTITION pgherald.{}").format(
                    sql.Identifier(name)
                )
            )
            conn.execute(sql.SQL("DROP TABLE pgherald.{}").format(sql.Identifier(name)))
    return dropped


LATEST = """
SELECT count(p.id)
FROM unnest(%s::text[]) AS k(row_key)
CROSS JOIN LATERAL (
    SELECT e.id FROM pgherald.{table} e
    WHERE e.watch = 'orders' AND e.row_key = k.row_key
      AND e.op IN ('insert', 'update', 'delete', 'read')
    ORDER BY e.id DESC LIMIT 1
) AS p
"""


def lookups(dsn: str, table: str, keys: list[str]) -> float:
    """Seconds per latest-version lookup, set-wise in one statement as ``fill_from_log``
    looks up the rows of a batch (best of five)."""
    statement = sql.SQL(LATEST).format(table=sql.Identifier(table))
    best = float("inf")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(5):
            started = time.perf_counter()
            conn.execute(statement, (keys,)).fetchall()
            best = min(best, time.perf_counter() - started)
    return best / len(keys)


def repetition(cluster: EmbeddedCluster, i: int, events: int, batch_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    a = make_db(cluster, f"prune_batched_{i}", events)
    b = make_db(cluster, f"prune_other_{i}", events)
    out["idle"] = idle_writer(a)

    before = rows_of(a)
    settings = Settings(dsn=a, retain="30d", prune_batch_size=batch_size)
    reports: list[pruning.PruneReport] = []
    seconds, lat = with_writer(a, lambda: reports.append(pruning.prune(settings, now=NOW)))
    total = reports[0].total
    out["batched"] = (seconds, total.events, before - rows_of(a), lat, total.batches)

    before = rows_of(b)
    deleted: list[int] = []
    seconds, lat = with_writer(b, lambda: deleted.append(one_delete(b)))
    out["one DELETE"] = (seconds, deleted[0], before - rows_of(b), lat, 1)

    # The partitioned copy is made from a third fill (b's old events are gone by now).
    c_dsn = make_db(cluster, f"prune_parts_{i}", events)
    parts = partitioned_copy(c_dsn)
    keys = [f'["{k}"]' for k in random.Random(i).sample(range(5000), 5000)]
    out["lookup events"] = lookups(c_dsn, "events", keys)  # both hold the whole year
    out["lookup partitioned"] = lookups(c_dsn, "events_by_month", keys)
    dropped: list[int] = []
    seconds, lat = with_writer(c_dsn, lambda: dropped.append(drop_partitions(c_dsn, parts)))
    out["partition drop"] = (seconds, dropped[0], dropped[0], lat, len(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    cluster = c.start_cluster()
    try:
        results = []
        for i in range(args.repeat):
            c.say(f"repetition {i + 1}: filling {args.events:,} events (x3)...")
            r = repetition(cluster, i, args.events, args.batch_size)
            results.append(r)
            c.say(f"  writer while idle: {latencies(r['idle'])}")
            for name in ("batched", "one DELETE", "partition drop"):
                seconds, events, rows, lat, steps = r[name]
                c.say(
                    f"  {name:>14}: {events:,} events ({rows:,} rows) in {seconds:.2f} s ="
                    f" {events / seconds:,.0f} events/s, {rows / seconds:,.0f} rows/s"
                    f" [{steps} transactions/partitions]; writer: {latencies(lat)}"
                )
            c.say(
                f"  latest-version lookup: {r['lookup events'] * 1e6:.0f} us (one table),"
                f" {r['lookup partitioned'] * 1e6:.0f} us (14 monthly partitions)"
            )
        if len(results) > 1:
            for name in ("batched", "one DELETE", "partition drop"):
                rate = statistics.median(r[name][1] / r[name][0] for r in results)
                c.say(f"median {name}: {rate:,.0f} events/s")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
