"""What logical capture costs the application: pgbench insert TPS with and without it.

Each repetition uses a fresh database with a watched table and runs pgbench (one-row
INSERT transactions, ``synchronous_commit = on``, several clients, as fast as it can)
three times, in an order that rotates between repetitions:

- ``no slot``: nobody decodes anything (the baseline);
- ``pgherald``: pgherald captures into the change log, in the same cluster, while
  pgbench runs; after pgbench stops we also note how long pgherald needs to catch up
  (a capture that keeps the TPS up by falling behind would not be a fair figure);
- ``pg_recvlogical``: the server decodes for a bare reader writing to /dev/null, which is
  what any logical decoding costs, whoever reads (the reference).

Printed: median TPS of each, and the median over repetitions of pgherald / no slot
(target >= 0.85) and of pg_recvlogical / no slot, each taken within one repetition.

Run: ``.venv/bin/python bench/bench_writer_overhead.py [--seconds 15] [--clients 8]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import _common as c

TARGET_RATIO = 0.85


def drop_slots(db: c.BenchDB) -> None:
    """Drops the database's slots once their readers are gone (a walsender lingers a bit)."""
    with db.connect() as conn:
        for _ in range(200):
            active = conn.execute(
                "SELECT count(*) FROM pg_replication_slots"
                " WHERE database = current_database() AND active"
            ).fetchone()
            if active is None or active[0] == 0:
                break
            time.sleep(0.05)
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = current_database()"
        )


def baseline(db: c.BenchDB, clients: int, seconds: int) -> float:
    drop_slots(db)
    return c.pgbench(db, c.INSERT_ONE, clients=clients, seconds=seconds).tps


def with_pgherald(db: c.BenchDB, clients: int, seconds: int) -> tuple[float, float]:
    """(TPS, seconds pgherald needed after pgbench ended to store every row)."""
    before = c.table_rows(db)
    with c.capturing(db) as capture:  # creates the slot: the log has no checkpoint yet
        deadline = time.monotonic() + 30
        while not capture.source.connected.wait(0.05):
            capture.stored()
            if time.monotonic() > deadline:
                raise TimeoutError("capture did not start")
        already = capture.stored()
        tps = c.pgbench(db, c.INSERT_ONE, clients=clients, seconds=seconds).tps
        ended = time.perf_counter()
        inserted = c.table_rows(db) - before
        caught_up = capture.wait_stored(already + inserted, timeout=600)
    drop_slots(db)
    with psycopg.connect(db.dsn, autocommit=True) as conn:  # the next capture starts afresh
        conn.execute("DELETE FROM pgherald.checkpoints")
    return tps, caught_up - ended


def with_pg_recvlogical(db: c.BenchDB, clients: int, seconds: int) -> float:
    drop_slots(db)
    db.create_reference_slot()
    with c.pg_recvlogical_attached(db):
        tps = c.pgbench(db, c.INSERT_ONE, clients=clients, seconds=seconds).tps
    drop_slots(db)
    return tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cluster = c.start_cluster()
    runs: dict[str, list[float]] = {"no slot": [], "pgherald": [], "pg_recvlogical": []}
    lags: list[float] = []
    order = ["no slot", "pgherald", "pg_recvlogical"]
    try:
        c.say(
            f"PostgreSQL {cluster.version}, pgbench one-row inserts, {args.clients} clients,"
            f" {args.seconds}s per run"
        )
        for rep in range(args.repeat):
            db = c.bench_db(cluster, f"overhead_{rep}")
            try:
                for name in order:
                    if name == "no slot":
                        runs[name].append(baseline(db, args.clients, args.seconds))
                    elif name == "pgherald":
                        tps, lag = with_pgherald(db, args.clients, args.seconds)
                        runs[name].append(tps)
                        lags.append(lag)
                    else:
                        runs[name].append(with_pg_recvlogical(db, args.clients, args.seconds))
            finally:
                db.drop()
            c.say(
                f"  #{rep + 1}: no slot {runs['no slot'][-1]:7,.0f} tps | pgherald"
                f" {runs['pgherald'][-1]:7,.0f} tps (caught up {lags[-1]:.2f}s after) |"
                f" pg_recvlogical {runs['pg_recvlogical'][-1]:7,.0f} tps"
            )
            order = order[1:] + order[:1]
    finally:
        cluster.stop()
    base = c.median(runs["no slot"])
    ours = c.median(runs["pgherald"])
    ref = c.median(runs["pg_recvlogical"])
    # The ratio is taken within each repetition (its runs are minutes apart at most) and
    # then the median of those: other load on the machine drifts between repetitions.
    ratio = c.median([o / b for o, b in zip(runs["pgherald"], runs["no slot"], strict=True)])
    ref_ratio = c.median(
        [r / b for r, b in zip(runs["pg_recvlogical"], runs["no slot"], strict=True)]
    )
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    c.say(
        f"median of {args.repeat}: no slot {base:,.0f} tps, pgherald {ours:,.0f} tps,"
        f" pg_recvlogical {ref:,.0f} tps; median ratio to no slot: pgherald {ratio:.2f}"
        f" (caught up {c.median(lags):.2f}s after pgbench), pg_recvlogical {ref_ratio:.2f}"
        f"  [target pgherald/no slot >= {TARGET_RATIO}: {verdict}]"
    )


if __name__ == "__main__":
    main()
