"""How fast logical capture drains a replication slot's backlog into the change log.

For each case a fresh database gets pgherald's slot and a second, reference slot on the
same publication, then a workload is committed while nobody reads either: both slots
hold the identical backlog. Then

- ``pg_recvlogical`` drains the reference slot to /dev/null (``--endpos`` = the WAL
  position after the workload), which is how fast the server decodes and sends: the
  ceiling for any client;
- pgherald (``LogicalSource`` + ``ChangeLogSink``, as ``pgherald run`` wires them)
  drains its slot until every row's event is committed in the change log.

Rows/s = workload rows / seconds. The order of the two alternates between repetitions.
Cases: ``single`` (one-row transactions, the common OLTP shape) and ``large`` (all rows
in one transaction). Targets: at least 50,000 rows/s stored, ratio to pg_recvlogical at
least 0.3.

Run: ``.venv/bin/python bench/bench_logical_throughput.py [--rows N] [--repeat R]
[--case single|large|both]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import _common as c
from pgherald.db.embedded import EmbeddedCluster

TARGET_RATE = 50_000
TARGET_RATIO = 0.3


def one_case(cluster: EmbeddedCluster, case: str, rows: int, repeat: int) -> None:
    statement = c.SINGLE_ROW_TRANSACTIONS if case == "single" else c.ONE_TRANSACTION
    ours: list[float] = []
    theirs: list[float] = []
    server_us: list[float] = []
    client_us: list[float] = []
    meter = c.CpuMeter(cluster, client=time.process_time)
    for rep in range(repeat):
        db = c.bench_db(cluster, f"throughput_{case}_{rep}")
        try:
            db.create_reference_slot()
            made = c.run_workload(db, statement, rows)
            end = db.wal_lsn()
            if rep % 2 == 0:
                t_ref = c.drain_pg_recvlogical(db, end)
            with meter.measuring() as cpu:
                t_ours = c.drain_pgherald(db, rows)
            if rep % 2 == 1:
                t_ref = c.drain_pg_recvlogical(db, end)
        finally:
            db.drop()
        ours.append(rows / t_ours)
        theirs.append(rows / t_ref)
        server_us.append(cpu["server"] / rows * 1e6)
        client_us.append(cpu["client"] / rows * 1e6)
        c.say(
            f"  {case} #{rep + 1}: workload {made:5.1f}s | pg_recvlogical {rows / t_ref:9,.0f}"
            f" rows/s | pgherald stored {rows / t_ours:9,.0f} rows/s"
            f" | ratio {t_ref / t_ours:.2f} | CPU per row: server {server_us[-1]:.1f} us"
            f" (walsender and store), pgherald {client_us[-1]:.1f} us"
        )
    rate, ref = c.median(ours), c.median(theirs)
    # Within each repetition, then the median: other load drifts between repetitions.
    ratio = c.median([o / t for o, t in zip(ours, theirs, strict=True)])
    verdict = "ok" if rate >= TARGET_RATE and ratio >= TARGET_RATIO else "BELOW TARGET"
    c.say(
        f"{case:6} ({rows:,} rows, median of {repeat}): pgherald {rate:,.0f} rows/s stored,"
        f" pg_recvlogical {ref:,.0f} rows/s, median ratio {ratio:.2f}"
        f"  [target >= {TARGET_RATE:,} rows/s and >= {TARGET_RATIO}: {verdict}];"
        f" CPU per row: server {c.median(server_us):.1f} us, pgherald"
        f" {c.median(client_us):.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case", choices=("single", "large", "both"), default="both")
    args = parser.parse_args()
    cluster = c.start_cluster()
    try:
        c.say(f"PostgreSQL {cluster.version}, {args.rows:,} rows per case")
        for case in ("single", "large") if args.case == "both" else (args.case,):
            one_case(cluster, case, args.rows, args.repeat)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
