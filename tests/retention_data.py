"""A year of synthetic change log, written straight in SQL (``generate_series``), for the
retention tests and ``bench/bench_prune.py``.

``fill_year`` writes ``n`` events spread evenly over the 365 days before ``now``, in log
order, for three watches (the caller registers the watches it wants registered):

- ``orders``: 70% of the events, rows ``0..keys-1``; after half a year only the first
  half of the keys change, so the other half's newest version is about six months old.
  Inserts first, then updates, and every 101st event a delete;
- ``audit``: 20%, only in the first half year (all of it older than 90 days);
- ``gone``: the rest (10%, 30% in the second half year), a watch that is not registered
  any more.

Updates have two field rows. About every 7th event has a delivered delivery (one
attempt), every 503rd a dead one (three attempts), every 1009th a pending and every
1013th a failed one (two attempts). ``nightly`` is a snapshot watch with one run a day and
three events per run. ``orders`` has an error a day; the runs and errors of no watch, one
a week.
"""

from __future__ import annotations

import multiprocessing
import time
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgherald.events.model import ChangeEvent, ColumnSpec, RowImage, RowShape
from pgherald.store.changelog import ChangeLog, shape_columns, shape_digest

SHAPE = RowShape((ColumnSpec("id", 23, "integer"), ColumnSpec("v", 25, "text")))
SINK = "hook"

_EVENTS = """
INSERT INTO {s}.events (
    event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
    old_values, new_values, changed, xid, position, commit_time, captured_at, method,
    old_values_source
)
SELECT 'syn/' || g, x.watch, x.op, 'public', x.watch, '["' || x.k || '"]', '{{id}}', %(shape)s,
       CASE WHEN x.op IN ('update', 'delete') THEN ARRAY[x.k::text, 'v' || (g - 1)] END,
       CASE WHEN x.op <> 'delete' THEN ARRAY[x.k::text, 'v' || g] END,
       CASE WHEN x.op = 'update' THEN '{{v,w}}'::text[] END,
       g, '0/' || to_hex(g), x.at, x.at,
       CASE WHEN x.watch = 'audit' THEN 'trigger' ELSE 'logical' END,
       CASE WHEN x.op = 'insert' THEN 'none' ELSE 'replica_identity' END
FROM generate_series(1, %(n)s) AS g
CROSS JOIN LATERAL (
    SELECT w.watch, w.k, w.at,
           CASE WHEN g %% 101 = 0 THEN 'delete'
                WHEN g <= %(keys)s * 2 THEN 'insert'
                ELSE 'update' END AS op
    FROM (
        SELECT CASE WHEN g %% 10 < 7 THEN 'orders'
                    WHEN g %% 10 < 9 AND g <= %(n)s / 2 THEN 'audit'
                    ELSE 'gone' END AS watch,
               CASE WHEN g <= %(n)s / 2 THEN g %% %(keys)s
                    ELSE g %% (%(keys)s / 2) END AS k,
               %(now)s::timestamptz - interval '365 days'
                   + (g - 1) * (interval '365 days' / %(n)s) AS at
    ) AS w
) AS x
ORDER BY g
"""

_RUNS = """
INSERT INTO {s}.runs (watch, source, started_at, ended_at, status, inserts)
SELECT 'nightly', 'snapshot', %(now)s::timestamptz - d * interval '1 day',
       %(now)s::timestamptz - d * interval '1 day' + interval '1 minute', 'ok', 3
FROM generate_series(365, 1, -1) AS d
ORDER BY d DESC
"""

_RUN_EVENTS = """
INSERT INTO {s}.events (
    event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
    new_values, position, commit_time, captured_at, method
)
SELECT 'run/' || r.id || '/' || i, 'nightly', 'insert', 'public', 'nightly',
       '["' || (r.id * 10 + i) || '"]', '{{id}}', %(shape)s,
       ARRAY[(r.id * 10 + i)::text, 'x'], r.id::text, r.started_at, r.started_at, 'snapshot'
FROM {s}.runs r
CROSS JOIN generate_series(1, 3) AS i
WHERE r.watch = 'nightly'
ORDER BY r.id, i
"""

_FIELDS = """
INSERT INTO {s}.event_fields (event_id, column_name, old_value, new_value)
SELECT e.id, c.name, e.old_values[2], e.new_values[2]
FROM {s}.events e
CROSS JOIN (VALUES ('v'), ('w')) AS c(name)
WHERE e.op = 'update'
"""

_DELIVERIES = """
INSERT INTO {s}.deliveries (event_id, sink, status, attempts, delivered_at, created_at)
SELECT e.id, %(sink)s, s.status,
       CASE s.status WHEN 'delivered' THEN 1 WHEN 'dead' THEN 3 WHEN 'failed' THEN 2 ELSE 0 END,
       CASE WHEN s.status = 'delivered' THEN e.captured_at END, e.captured_at
FROM {s}.events e
CROSS JOIN LATERAL (
    SELECT CASE WHEN e.id %% 1009 = 0 THEN 'pending'
                WHEN e.id %% 1013 = 0 THEN 'failed'
                WHEN e.id %% 503 = 0 THEN 'dead'
                WHEN e.id %% 7 = 0 THEN 'delivered' END AS status
) AS s
WHERE s.status IS NOT NULL
"""

_ATTEMPTS = """
INSERT INTO {s}.delivery_attempts (delivery_id, attempted_at, outcome)
SELECT d.id, d.created_at,
       CASE WHEN d.status = 'delivered' THEN 'delivered'
            WHEN d.status = 'dead' AND i = d.attempts THEN 'dead' ELSE 'retry' END
FROM {s}.deliveries d
CROSS JOIN LATERAL generate_series(1, d.attempts) AS i
"""

_ERRORS = """
INSERT INTO {s}.errors (occurred_at, watch, source, message)
SELECT %(now)s::timestamptz - d * interval '1 day', 'orders', 'logical', 'synthetic'
FROM generate_series(365, 1, -1) AS d;
INSERT INTO {s}.errors (occurred_at, watch, source, message)
SELECT %(now)s::timestamptz - d * interval '7 days', NULL, 'logical', 'synthetic'
FROM generate_series(52, 1, -1) AS d;
INSERT INTO {s}.runs (watch, source, started_at, ended_at, status)
SELECT NULL, 'logical', %(now)s::timestamptz - d * interval '7 days',
       %(now)s::timestamptz - d * interval '7 days' + interval '1 hour', 'ok'
FROM generate_series(52, 1, -1) AS d
"""


def fill_year(
    conn: psycopg.Connection[Any], now: datetime, n: int, keys: int = 5000, schema: str = "pgherald"
) -> None:
    """Writes the synthetic year (see the module docstring) in the caller's connection."""
    columns = shape_columns(SHAPE)
    row = conn.execute(
        f"INSERT INTO {schema}.shapes (digest, columns, names) VALUES (%s, %s, %s)"
        " ON CONFLICT (digest) DO UPDATE SET digest = EXCLUDED.digest RETURNING id",
        (shape_digest(columns), Jsonb(columns), [c[0] for c in columns]),
    ).fetchone()
    assert row is not None
    shape = int(row[0])
    conn.execute(
        f"INSERT INTO {schema}.sinks (name, kind) VALUES (%s, 'webhook') ON CONFLICT DO NOTHING",
        (SINK,),
    )
    params = {"n": n, "keys": keys, "now": now, "shape": shape, "sink": SINK}
    for statement in (_EVENTS, _RUNS, _RUN_EVENTS, _FIELDS, _DELIVERIES, _ATTEMPTS, _ERRORS):
        text = statement.format(s=schema)
        for part in text.split(";\n"):
            conn.execute(part.encode(), params)  # the tests' own literal SQL
    conn.execute(f"ANALYZE {schema}.events".encode())


def _write(dsn: str, now: datetime, schema: str, stop: Any, appended: Any, out: Any) -> None:
    """The writer process: appends until ``stop``, then sends its latencies and ids."""
    latencies: list[float] = []
    event_ids: list[str] = []
    error: str | None = None
    try:
        with psycopg.connect(dsn, autocommit=False) as conn:
            log = ChangeLog(conn, schema)
            i = 0
            while not stop.is_set():
                i += 1
                key = f"w{i}"
                event = ChangeEvent(
                    event_id=f"writer/{i}",
                    watch="orders",
                    op="insert",
                    schema="public",
                    table="orders",
                    key={"id": key},
                    old=None,
                    new=RowImage(SHAPE, (key, "live")),
                    changed=(),
                    xid=i,
                    position=f"1/{i:X}",
                    commit_time=now,
                    captured_at=now,
                    method="logical",
                )
                started = time.monotonic()
                log.append([event], commit=True)
                latencies.append(time.monotonic() - started)
                event_ids.append(event.event_id)
                with appended.get_lock():
                    appended.value += 1
                time.sleep(0.002)
    except BaseException as e:  # reported to the parent
        error = f"{type(e).__name__}: {e}"
    out.send((latencies, event_ids, error))


class Writer:
    """Appends one event per transaction to ``orders`` (new rows ``w1``, ``w2``...), as
    capture does, about every 2 ms, and times every append, until ``finish``.

    It is a process of its own, like capture in ``pgherald run``: in a thread, its
    latencies would include waiting for the interpreter lock that the pruner holds.
    """

    def __init__(self, dsn: str, now: datetime, schema: str = "pgherald") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._appended = ctx.Value("i", 0)
        self._receive, send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_write,
            args=(dsn, now, schema, self._stop, self._appended, send),
            daemon=True,
        )
        self.latencies: list[float] = []
        self.event_ids: list[str] = []
        self.error: str | None = None

    @property
    def appended(self) -> int:
        return int(self._appended.value)

    def start(self, warm_up: int = 20, timeout: float = 60.0) -> None:
        """Starts it and returns once it has appended ``warm_up`` events."""
        self._process.start()
        deadline = time.monotonic() + timeout
        while self.appended < warm_up:
            if not self._process.is_alive() or time.monotonic() > deadline:
                self.finish()
                raise RuntimeError(f"the writer did not start: {self.error}")
            time.sleep(0.01)

    def finish(self) -> None:
        """Stops it and collects what it measured (``error``: what stopped it early)."""
        self._stop.set()
        if self._receive.poll(60):
            self.latencies, self.event_ids, self.error = self._receive.recv()
        self._process.join(30)
