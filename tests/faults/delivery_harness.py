"""Shared parts of the delivery proofs (outages, kills, the replica): a paced stream of
changes, the truth the change log holds about it, and the verdict on what a destination
received.

The verdict is the delivery contract, checked on the raw arrivals of a destination (in
the order it saw them, duplicates included), against the change log:

- every event of the stream arrived, and nothing that is not in the log did;
- a message that arrived twice carries the same idempotency key *and* the same body, so a
  consumer that drops a second copy by its key loses nothing;
- each row's messages arrived in log order: their log ids never go down (a duplicate may
  repeat the last one, never come back after a later event of the row), so after
  dropping duplicates each row's events are exactly in log order.

``assert_verdict_can_fail`` shows that the check rejects a lost, a reordered and a
forged message, so that a pass means something.
"""

from __future__ import annotations

import json
import random
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgherald.config import Settings
from tests import capture_harness as h

STREAM_TABLE = "stream_rows"
STREAM_WATCH = "stream_rows"
STREAM_SETUP = "CREATE TABLE stream_rows (id bigint PRIMARY KEY, seq int NOT NULL, note text)"

Arrival = tuple[str, bytes]
"""(idempotency key, body) of one message as the destination received it."""


# -- the stream ----------------------------------------------------------------------------


@dataclass
class Pace:
    """``total`` changes over ``seconds``: a writer may be at most this far."""

    total: int
    seconds: float
    started: float = field(default_factory=time.monotonic)

    def allowed(self) -> float:
        return self.total * (time.monotonic() - self.started) / self.seconds


class StreamWriter(threading.Thread):
    """Writes exactly ``total`` changes to ``stream_rows`` at ``pace``: small transactions
    that insert new rows, update a few *hot* rows again and again (``seq`` counts their
    updates) and now and then delete a cold row. ``made`` counts committed changes."""

    def __init__(
        self,
        dsn: str,
        total: int,
        seconds: float,
        *,
        hot_rows: int = 20,
        seed: int = 0,
        hold_at: int | None = None,
    ) -> None:
        """``hold_at``: stop at about that many changes until ``release`` is set, so a fault
        the test makes meanwhile is in the middle of the stream however slow the machine."""
        super().__init__(name="stream-writer", daemon=True)
        self.hold_at = hold_at
        self.release = threading.Event()
        self.dsn = dsn
        self.total = total
        self.pace = Pace(total, seconds)
        self.hot_rows = hot_rows
        self.rng = random.Random(seed)
        self.made = 0
        self.ops: Counter[str] = Counter()
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self._run(conn)
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self, conn: psycopg.Connection[Any]) -> None:
        hot = list(range(1, self.hot_rows + 1))
        with conn.transaction():
            conn.execute(
                "INSERT INTO stream_rows SELECT g, 0, 'hot' FROM generate_series(1, %s) g",
                (self.hot_rows,),
            )
        self._count("insert", self.hot_rows)
        next_id = 1_000_000
        cold: list[int] = []
        while self.made < self.total and not self.stop.is_set():
            while self.made > self.pace.allowed() and not self.stop.is_set():
                time.sleep(0.005)
            while (
                self.hold_at is not None
                and self.made >= self.hold_at
                and not self.release.is_set()
                and not self.stop.is_set()
            ):
                time.sleep(0.005)
            left = self.total - self.made
            with conn.transaction():
                n = min(left, self.rng.randint(1, 12))
                rows = conn.execute(
                    "INSERT INTO stream_rows SELECT g, 0, md5(g::text)"
                    " FROM generate_series(%s::bigint, %s::bigint) g RETURNING id",
                    (next_id, next_id + n - 1),
                ).fetchall()
                next_id += n
                cold.extend(int(r[0]) for r in rows)
                made = {"insert": len(rows)}
                left -= len(rows)
                if left > 0 and self.rng.random() < 0.6:
                    chosen = self.rng.sample(hot, min(left, self.rng.randint(1, 3)))
                    for key in chosen:  # one statement each: a row's updates in a known order
                        conn.execute(
                            "UPDATE stream_rows SET seq = seq + 1, note = %s WHERE id = %s",
                            (f"u{self.rng.randrange(10**6)}", key),
                        )
                    made["update"] = len(chosen)
                    left -= len(chosen)
                if left > 0 and len(cold) > 100 and self.rng.random() < 0.2:
                    victim = cold.pop(self.rng.randrange(len(cold) - 50))
                    conn.execute("DELETE FROM stream_rows WHERE id = %s", (victim,))
                    made["delete"] = 1
            for op, count in made.items():
                self._count(op, count)

    def _count(self, op: str, n: int) -> None:
        self.ops[op] += n
        self.made += n

    def finish(self, timeout: float) -> None:
        """Waits for the whole stream; raises what stopped the writer."""
        self.join(timeout)
        assert not self.is_alive(), f"the stream did not finish in {timeout:.0f}s"
        if self.error is not None:
            raise self.error
        assert self.made == self.total, (self.made, self.total)


# -- the truth ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Logged:
    """An event as the change log holds it: its log id and its row."""

    log_id: int
    row: str


def log_truth(settings: Settings, watch: str) -> dict[str, Logged]:
    """The watch's events by event id (the idempotency key)."""
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, event_id, coalesce(row_key, '') FROM {} WHERE watch = %s").format(
                sql.Identifier(settings.schema, "events")
            ),
            (watch,),
        ).fetchall()
    return {str(r[1]): Logged(int(r[0]), str(r[2])) for r in rows}


def delivery_statuses(settings: Settings, sink: str) -> Counter[str]:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT status, count(*) FROM {} WHERE sink = %s GROUP BY status").format(
                sql.Identifier(settings.schema, "deliveries")
            ),
            (sink,),
        ).fetchall()
    return Counter({str(r[0]): int(r[1]) for r in rows})


def open_deliveries(settings: Settings) -> int:
    """Deliveries not yet finished (pending, failed or delivering), of every sink."""
    return sum(
        n
        for status, n in delivery_statuses_all(settings).items()
        if status in ("pending", "failed", "delivering")
    )


def delivery_statuses_all(settings: Settings) -> Counter[str]:
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT status, count(*) FROM {} GROUP BY status").format(
                sql.Identifier(settings.schema, "deliveries")
            )
        ).fetchall()
    return Counter({str(r[0]): int(r[1]) for r in rows})


def wait_for(
    what: Callable[[], bool],
    seconds: float,
    message: Callable[[], str] = lambda: "timed out",
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Polls ``what`` until true; ``alive`` returns a text when waiting is pointless."""
    deadline = time.monotonic() + seconds
    while not what():
        if alive is not None:
            problem = alive()
            if problem:
                raise AssertionError(problem)
        if time.monotonic() > deadline:
            raise AssertionError(message())
        time.sleep(0.1)


# -- the verdict --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    events: int
    arrivals: int
    duplicates: int
    rows: int


def body_key(body: bytes) -> str:
    """The event id written in a body of pgherald's format."""
    return str(json.loads(body)["event_id"])


def verdict(arrivals: Sequence[Arrival], truth: Mapping[str, Logged]) -> Verdict:
    """Checks the delivery contract (module docstring) on raw arrivals; raises
    AssertionError with the first breach."""
    first: dict[str, bytes] = {}
    per_row: dict[str, list[int]] = defaultdict(list)
    duplicates = 0
    for key, body in arrivals:
        logged = truth.get(key)
        assert logged is not None, f"a message with key {key!r} arrived that the log lacks"
        assert body_key(body) == key, f"message {key!r} carries the body of {body_key(body)!r}"
        seen = first.get(key)
        if seen is None:
            first[key] = body
        else:
            duplicates += 1
            assert seen == body, f"two messages with key {key!r} differ"
        ids = per_row[logged.row]
        assert not ids or ids[-1] <= logged.log_id, (
            f"row {logged.row}: log id {logged.log_id} arrived after {ids[-1]}"
        )
        ids.append(logged.log_id)
    missing = sorted(truth.keys() - first.keys(), key=lambda k: truth[k].log_id)
    assert not missing, (
        f"{len(missing)} of {len(truth)} events never arrived, first log ids:"
        f" {[truth[k].log_id for k in missing[:5]]}"
    )
    return Verdict(len(truth), len(arrivals), duplicates, len(per_row))


def assert_verdict_can_fail(
    arrivals: Sequence[Arrival], truth: Mapping[str, Logged], rng: random.Random
) -> None:
    """The verdict rejects the same arrivals with one message lost, two of one row swapped,
    or a duplicate whose body differs."""
    arrivals = list(arrivals)
    # Every arrival of one event goes: deleting one copy of a duplicated event loses nothing.
    gone = arrivals[rng.randrange(len(arrivals))][0]
    lost = [arrival for arrival in arrivals if arrival[0] != gone]
    by_row: dict[str, list[int]] = defaultdict(list)
    for i, (key, _) in enumerate(arrivals):
        by_row[truth[key].row].append(i)
    # Two arrivals of one row that are different events: swapping two copies of one event
    # changes nothing.
    pairs = [
        (ix[0], j) for ix in by_row.values() for j in ix[1:] if arrivals[j][0] != arrivals[ix[0]][0]
    ][:1000]
    assert pairs, "no row with two events: the order check would prove nothing"
    a, b = rng.choice(pairs)
    swapped = list(arrivals)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    key, body = arrivals[rng.randrange(len(arrivals))]
    forged = [*arrivals, (key, body.replace(b'"', b' "', 1))]
    for broken in (lost, swapped, forged):
        with pytest.raises(AssertionError):
            verdict(broken, truth)


# -- `pgherald deliver` as a subprocess ---------------------------------------------------------


def server_now(dsn: str) -> datetime:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


class DeliverProcess(h.CaptureProcess):
    """``pgherald deliver [--sink ...]`` as a subprocess: routing and delivery without
    capture, killable at any moment (see ``CaptureProcess``)."""

    def command(self) -> list[str]:
        s = self.settings
        return [str(h.PGHERALD), "--dsn", s.dsn, "--schema", s.schema, "deliver", *self.args]

    def wait_delivering(self, sink: str, since: datetime, timeout: float = 30.0) -> None:
        """Returns once a delivery connection for ``sink`` opened after ``since`` exists."""
        name = f"pgherald-deliver-{sink}"[:63]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.settings.dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise AssertionError(f"pgherald deliver exited early:\n{self.log()[-3000:]}")
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                    " AND backend_start >= %s",
                    (name, since),
                ).fetchone()
                if row and row[0]:
                    return
                time.sleep(0.02)
        raise AssertionError(f"pgherald deliver did not connect in time:\n{self.log()[-3000:]}")


def claim_open(conn: psycopg.Connection[Any], sink: str) -> bool:
    """Whether a delivery connection of ``sink`` is inside a transaction (it holds a claim:
    it is sending a batch or recording its outcome)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND xact_start IS NOT NULL AND datname = current_database()",
        (f"pgherald-deliver-{sink}"[:63],),
    ).fetchone()
    return bool(row and row[0])


def run_cli(*args: str, settings: Settings) -> str:
    """``pgherald --dsn ... ARGS``; its stdout (fails with its stderr when it failed)."""
    done = subprocess.run(
        [str(h.PGHERALD), "--dsn", settings.dsn, "--schema", settings.schema, *args],
        capture_output=True,
        text=True,
        env=h.cli_env(),
        cwd=tempfile.gettempdir(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"pgherald {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout
