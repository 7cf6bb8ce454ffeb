"""What the digest job reads from and writes to the store: a digest sink's open deliveries
per period or per snapshot run, the runs it has seen, and its own checkpoint.

The job's state is one checkpoint row per sink (``digest:<sink>`` in ``checkpoints``),
saved in the transaction that records a digest's outcome: ``until``, the end of the last
period handled, and ``runs``, the last snapshot run looked at per watch. The deliveries'
own status says which changes were sent; the checkpoint only says which periods and runs
are done, so that an empty digest goes out once and a late change joins the next period.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, LiteralString

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from pgherald.db.sqlfiles import named_query
from pgherald.store import checkpoints
from pgherald.store.session import in_schema


def _q(name: str) -> LiteralString:
    return named_query("digests.sql", name)


def checkpoint_name(sink: str) -> str:
    return f"digest:{sink}"


@dataclass
class DigestState:
    until: datetime | None = None
    """The end of the last period handled (sent, dead, or empty)."""
    runs: dict[str, int] = field(default_factory=dict)
    """Per watch, the last snapshot run looked at for an empty digest."""

    def dump(self) -> str:
        return json.dumps(
            {"until": self.until.isoformat() if self.until else None, "runs": self.runs},
            sort_keys=True,
        )

    @classmethod
    def load(cls, text: str | None) -> DigestState:
        if not text:
            return cls()
        data = json.loads(text)
        until = data.get("until")
        return cls(
            until=datetime.fromisoformat(until) if until else None,
            runs={str(k): int(v) for k, v in (data.get("runs") or {}).items()},
        )


def load_state(conn: psycopg.Connection[Any], schema: str, sink: str) -> DigestState:
    return DigestState.load(checkpoints.load_checkpoint(conn, schema, checkpoint_name(sink)))


def save_state(conn: psycopg.Connection[Any], schema: str, sink: str, state: DigestState) -> None:
    """In the caller's transaction (it commits, with the outcome it goes with)."""
    checkpoints.save_checkpoint(conn, schema, checkpoint_name(sink), state.dump())


def _one(conn: psycopg.Connection[Any], schema: str, name: str, params: dict[str, Any]) -> Any:
    with in_schema(conn, schema):
        row = conn.cursor(row_factory=tuple_row).execute(_q(name), params).fetchone()
    assert row is not None
    return row


def _all(
    conn: psycopg.Connection[Any], schema: str, name: str, params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    with in_schema(conn, schema):
        return conn.cursor(row_factory=tuple_row).execute(_q(name), params).fetchall()


def try_lock(conn: psycopg.Connection[Any], schema: str, sink: str) -> bool:
    """This transaction is the sink's digest job (False: another one is)."""
    return bool(_one(conn, schema, "try_lock", {"schema": schema, "sink": sink})[0])


def clock(conn: psycopg.Connection[Any]) -> datetime:
    row = conn.cursor(row_factory=tuple_row).execute(_q("clock")).fetchone()
    assert row is not None
    value: datetime = row[0]
    return value


# -- periods ----------------------------------------------------------------------------------


def window_head(
    conn: psycopg.Connection[Any], schema: str, sink: str, until: datetime | None, by_run: bool
) -> datetime | None:
    params = {"sink": sink, "until": until, "by_run": by_run}
    value: datetime | None = _one(conn, schema, "window_head", params)[0]
    return value


def window_state(
    conn: psycopg.Connection[Any],
    schema: str,
    sink: str,
    until: datetime | None,
    end: datetime,
    by_run: bool,
) -> tuple[int, datetime | None]:
    """How many open changes the period holds, and when the last of them may be tried."""
    params = {"sink": sink, "until": until, "end": end, "by_run": by_run}
    n, next_at = _one(conn, schema, "window_state", params)
    return int(n), next_at


def unrouted_before(
    conn: psycopg.Connection[Any], schema: str, sink: str, end: datetime, by_run: bool, router: str
) -> bool:
    params = {"sink": sink, "end": end, "by_run": by_run, "router": router}
    return bool(_one(conn, schema, "unrouted_before", params)[0])


def lock_window(
    conn: psycopg.Connection[Any],
    schema: str,
    sink: str,
    until: datetime | None,
    end: datetime,
    by_run: bool,
) -> list[tuple[int, int]]:
    """``(delivery id, attempts)`` of the period's open changes, locked in this transaction."""
    params = {"sink": sink, "until": until, "end": end, "by_run": by_run}
    return [(int(r[0]), int(r[1])) for r in _all(conn, schema, "lock_window", params)]


# -- runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenRun:
    watch: str
    position: str
    changes: int
    next_attempt_at: datetime
    first_delivery: int
    run_id: int | None
    status: str | None
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None


def open_runs(conn: psycopg.Connection[Any], schema: str, sink: str) -> list[OpenRun]:
    rows = _all(conn, schema, "open_runs", {"sink": sink})
    return [
        OpenRun(r[0], r[1], int(r[2]), r[3], int(r[4]), r[5], r[6], r[7], r[8], r[9]) for r in rows
    ]


def unrouted_run(
    conn: psycopg.Connection[Any], schema: str, watch: str, position: str, router: str
) -> bool:
    params = {"watch": watch, "position": position, "router": router}
    return bool(_one(conn, schema, "unrouted_run", params)[0])


def lock_run(
    conn: psycopg.Connection[Any], schema: str, sink: str, watch: str, position: str
) -> list[tuple[int, int]]:
    params = {"sink": sink, "watch": watch, "position": position}
    return [(int(r[0]), int(r[1])) for r in _all(conn, schema, "lock_run", params)]


@dataclass(frozen=True)
class FinishedRun:
    id: int
    watch: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    error: str | None
    changes: int


def finished_runs(
    conn: psycopg.Connection[Any], schema: str, sink: str, marks: dict[str, int]
) -> list[FinishedRun]:
    """Snapshot runs of the sink's watches after ``marks`` (ended or not), oldest first."""
    rows = _all(conn, schema, "finished_runs", {"sink": sink, "marks": Jsonb(marks)})
    return [FinishedRun(int(r[0]), r[1], r[2], r[3], r[4], r[5], int(r[6])) for r in rows]


def run_deliveries(
    conn: psycopg.Connection[Any], schema: str, sink: str, watch: str, position: str
) -> tuple[int, int]:
    """The sink's deliveries of one run: ``(open, all)``."""
    params = {"sink": sink, "watch": watch, "position": position}
    open_count, total = _one(conn, schema, "run_deliveries", params)
    return int(open_count), int(total)


# -- contents ---------------------------------------------------------------------------------


def counts(
    conn: psycopg.Connection[Any], schema: str, ids: Sequence[int]
) -> dict[tuple[str, str], int]:
    rows = _all(conn, schema, "digest_counts", {"ids": list(ids)})
    return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}


def event_rows(
    conn: psycopg.Connection[Any], schema: str, ids: Sequence[int]
) -> list[tuple[Any, ...]]:
    """The events of these deliveries, as ``ChangeLog.stored_events`` reads them."""
    return _all(conn, schema, "digest_events", {"ids": list(ids)})


def subscribed_watches(conn: psycopg.Connection[Any], schema: str, sink: str) -> list[str]:
    return [str(r[0]) for r in _all(conn, schema, "subscribed_watches", {"sink": sink})]
