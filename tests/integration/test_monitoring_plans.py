"""The statements a metrics scrape and ``pgherald check`` run stay cheap on a big store.

A scrape runs every few seconds for as long as pgherald runs, and the deliveries table
holds every delivery ever made until retention prunes it. A statement that scans it
costs more with every delivery: at 240,000 deliveries, counting open deliveries by
status scanned the whole table once per sink and status, 320 ms of the server a scrape.
These tests fill a store with many delivered deliveries and a few open and dead ones,
and check that each statement of ``ops.measure`` that reads deliveries never scans the
table, whatever the statistics say (fresh, or none since the fill), and still counts
right.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from pgherald.ops.measure import measure, query
from tests import capture_harness as h
from tests.conftest import Database

DELIVERED = 100_000


def _fill(db: Database) -> None:
    db.execute("INSERT INTO pgherald.sinks (name, kind) VALUES ('a', 'stdout'), ('b', 'stdout')")
    db.execute(
        """
        INSERT INTO pgherald.events (event_id, watch, op, schema_name, table_name, row_key,
                                     position, captured_at, method)
        SELECT 'e' || g, 'w', 'insert', 'public', 't', '["' || g || '"]', 'x', now(), 'logical'
        FROM generate_series(1, %s) g
        """,
        (DELIVERED,),
    )
    db.execute(
        """
        INSERT INTO pgherald.deliveries (event_id, sink, status, order_key)
        SELECT id, CASE WHEN rest > 30 OR id %% 2 = 0 THEN 'a' ELSE 'b' END,
               CASE WHEN rest > 30 THEN 'delivered'
                    WHEN rest > 20 THEN 'pending'
                    WHEN rest > 10 THEN 'failed'
                    ELSE 'dead' END,
               id::text
        FROM (SELECT id, %s - id + 1 AS rest FROM pgherald.events) e
        """,
        (DELIVERED,),
    )


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed", "no-statistics"])
def test_the_scrape_never_scans_the_deliveries(db: Database, analyzed: bool) -> None:
    settings = h.install(db.dsn, slot=False)
    _fill(db)
    if analyzed:
        db.execute("ANALYZE")
    with db.connect() as conn:
        for name, params in (
            ("deliveries_by_sink", {}),
            ("dead_since", {"window": timedelta(hours=24)}),
        ):
            text = query(name, settings.schema).as_string(conn)
            plan = [str(r[0]) for r in conn.execute("EXPLAIN " + text, params).fetchall()]
            assert not any("Seq Scan on deliveries" in line for line in plan), (name, plan)
            # Each scan of deliveries expects the few rows it counts, not a share of the
            # table (a status the planner cannot see was guessed at 7,500-120,000 rows:
            # bitmap or whole-table scans, and a plan costly enough to be JIT-compiled).
            expected = [
                int(m.group(1))
                for line in plan
                if re.search(r" on deliveries(_\w+)? ", line)
                for m in [re.search(r"rows=(\d+)", line)]
                if m
            ]
            assert expected and max(expected) < 1_000, (name, plan)

        found = measure(conn, settings)
    assert found.deliveries == {
        "a": {"pending": 5, "delivering": 0, "failed": 5, "dead": 5},
        "b": {"pending": 5, "delivering": 0, "failed": 5, "dead": 5},
    }  # sink a also has all the delivered ones, which are not counted
    assert found.dead_recent == {"a": 5, "b": 5}
