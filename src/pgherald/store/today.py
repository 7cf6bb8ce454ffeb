"""How many changes each watch captured today: counted once a day, then only what is new.

The dashboard shows it for every watch and refreshes every 15 seconds in every open tab.
Counted from scratch, it reads every index entry of the day's events each time: 426 ms of
the server per refresh at 1.2 million events today (``bench/bench_soak.py``), ten times
that on a busier store. Log ids become visible in order (the append lock), so the events
counted up to log id N never change: the count is taken once from the ``captured_at``
index (the day's first refresh in this process), then each refresh adds the events with
ids above N, read from the primary key. The answer is the count from scratch: events
captured since the start of today in the server's time zone, by watch (events pruned
since they were counted still count, which only a retention shorter than a day makes).

Counts are kept per store (server, database and schema) in the process, so every user
and tab of a console shares them; a database made again under the same name is another
store, and a log whose newest id went back (restored from an older backup) is counted
afresh.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg

from pgherald.db.sqlfiles import named_query
from pgherald.store.session import in_schema

_FILE: Final = "web.sql"


def _q(name: str) -> LiteralString:
    return named_query(_FILE, name)


@dataclass
class _Counted:
    day: datetime
    upto: int
    """Every event with a log id up to this one is in ``counts``."""
    counts: dict[str, int] = field(default_factory=dict)


_counted: dict[tuple[Any, ...], _Counted] = {}
_lock = threading.Lock()


def changes_today(
    conn: psycopg.Connection[Any], schema: str, watches: Sequence[str] | None = None
) -> dict[str, int]:
    """Events captured today, by watch (only ``watches`` when given; absent means none)."""
    with in_schema(conn, schema):
        row = conn.execute(_q("today_position")).fetchone()
        assert row is not None
        day, last, database = row[0], int(row[1]), int(row[2])
        store = (conn.info.host, conn.info.port, database, schema)
        with _lock:
            known = _counted.get(store)
            if known is None or known.day != day or known.upto > last:
                known = None
        if known is None:
            rows = conn.execute(_q("today_from_scratch"), {"day": day, "upto": last})
            fresh = _Counted(day, last, {str(w): int(n) for w, n in rows.fetchall()})
        else:
            fresh = _Counted(day, max(last, known.upto), dict(known.counts))
            if last > known.upto:
                rows = conn.execute(
                    _q("today_since"), {"day": day, "after": known.upto, "upto": last}
                )
                for w, n in rows.fetchall():
                    fresh.counts[str(w)] = fresh.counts.get(str(w), 0) + int(n)
    with _lock:
        current = _counted.get(store)
        if current is None or current.day != fresh.day or current.upto <= fresh.upto:
            _counted[store] = fresh
    wanted = fresh.counts if watches is None else {w: fresh.counts.get(w, 0) for w in watches}
    return {w: n for w, n in wanted.items() if n}
