"""The delivery engine: claims due deliveries in batches, sends them, records every outcome.

Per sink, one loop:

1. **Claim** a batch (``FOR UPDATE SKIP LOCKED``, joined to the events): the locks are
   the claim, so several workers (threads, processes, machines) share a sink's load
   without sending anything twice, and a worker that dies lets go of its batch at once.
   A delivery is claimed only when no earlier delivery of its row is still open, so one
   row's events reach the sink in log order, also across retries and workers.
2. **Send** the batch to the sink (one call; the sink pipelines it), each message carrying
   the event id as its idempotency key.
3. **Record** each outcome in the same transaction that holds the claim: delivered;
   retryable (back off exponentially with jitter, or as long as the sink was told to
   wait, until the sink's ``max_attempts``, then dead); permanent (dead at once). Every
   attempt is a row of ``delivery_attempts``.

A crash between 2 and 3 sends that batch again: delivery is at least once, and the
idempotency key lets consumers drop the duplicates. Strictly ordered sinks get all their
deliveries in log order from a single worker (an advisory lock per sink).

**Two lanes.** A sink that is not strictly ordered is served on two connections that take
turns: while one batch is sent, the other connection records the batch before it and
claims the next, so the sink does not wait for the database and the database does not
wait for the sink. Order still holds: a claim never takes a delivery whose row has an
earlier delivery open, and the batch in flight is open (claimed, not yet recorded) until
its outcomes commit. A strictly ordered sink keeps one lane: its next batch must not go
before the outcome of the last one is known.

**Round trips.** A claim is one round trip (its statements in a pipeline; the events'
row shapes are known after the first batches) plus the pipeline's end, the record one.
The transaction does not wait for the WAL flush at COMMIT: a crash of the *server* may
forget the last outcomes recorded, and those deliveries are then sent again, which at
least once allows; nothing else was built on them, since whatever was committed after
them is lost with them (the WAL keeps the order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import psycopg

from pgherald import logs
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry
from pgherald.errors import (
    ConfigError,
    ConnectionFailed,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
)
from pgherald.events.formats import FormatError
from pgherald.ops import metrics
from pgherald.sinks.base import Message, Outcome, Sink, check_format, make_message
from pgherald.sources.listen import Listener
from pgherald.store import deliveries
from pgherald.store.changelog import ChangeLog, StoredEvent
from pgherald.store.deliveries import Status, StoredSink, deliveries_channel

log = logging.getLogger("pgherald.delivery")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base * 2**(n-1)`` seconds, capped, times a random
    factor in ``[1 - jitter, 1 + jitter]``; a sink's ``retry_after`` wins when longer."""

    base: float = 0.5
    maximum: float = 300.0
    jitter: float = 0.5

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        raw = min(self.base * 2.0 ** max(attempts - 1, 0), self.maximum)
        delay = raw * (1 - self.jitter + 2 * self.jitter * random.random())
        return max(delay, retry_after or 0.0)


@dataclass
class SinkStats:
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    batches: int = 0


@dataclass(frozen=True)
class _Batch:
    ids: list[int]
    attempts: list[int]
    events: list[StoredEvent]


@dataclass(frozen=True)
class _Lane:
    """A connection that claims and records in turn, with the change log reader that
    remembers the row shapes it has read on it."""

    conn: psycopg.Connection[Any]
    changelog: ChangeLog


_ASYNC_COMMIT: Final = "SET LOCAL synchronous_commit TO off"
"""The claim's transaction does not wait for the WAL flush at COMMIT (module docstring)."""


async def _pause(stop: threading.Event, seconds: float) -> None:
    """Sleeps ``seconds``, or less when ``stop`` is set meanwhile (so stopping never waits
    out a retry delay)."""
    deadline = time.monotonic() + seconds
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:  # noqa: ASYNC110 (a threading.Event)
        await asyncio.sleep(min(left, 0.1))


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _latencies(batch: _Batch, outcomes: Sequence[Outcome], sent: datetime) -> list[float]:
    """Seconds from each delivered event's commit (its capture, where the source knows no
    commit time) to ``sent``, for the latency histogram."""
    return [
        (sent - (stored.event.commit_time or stored.event.captured_at)).total_seconds()
        for stored, outcome in zip(batch.events, outcomes, strict=True)
        if outcome is None
    ]


class DeliveryEngine:
    """Delivers to the given sinks until stopped."""

    def __init__(
        self,
        settings: Settings,
        sinks: Mapping[str, tuple[Sink, StoredSink]],
        *,
        batch_size: int = 500,
        policy: RetryPolicy | None = None,
        poll: float = 0.5,
        source_uri: str = "pgherald",
    ) -> None:
        self.settings = settings
        self.sinks = dict(sinks)
        self.batch_size = batch_size
        self.policy = policy or RetryPolicy()
        self.poll = poll
        self.source_uri = source_uri
        self.stats = {name: SinkStats() for name in self.sinks}
        self.connected = threading.Event()
        self._wakes: dict[str, asyncio.Event] = {}
        """Set by the router's NOTIFY; each sink's loop clears its own before it claims, so
        a NOTIFY that comes while it claims is not lost."""

    # -- running ---------------------------------------------------------------------------

    def run_blocking(self, stop: threading.Event) -> None:
        """Runs the engine in this thread's own event loop until ``stop`` is set."""
        asyncio.run(self.run(stop))

    async def run(self, stop: threading.Event) -> None:
        self._wakes = {name: asyncio.Event() for name in self.sinks}
        tasks = [
            asyncio.create_task(self._serve(name, sink, cfg, stop), name=f"deliver-{name}")
            for name, (sink, cfg) in self.sinks.items()
        ]
        tasks.append(asyncio.create_task(self._listen(stop), name="deliveries-wake"))
        self.connected.set()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.1)
                failed = [t for t in tasks if t.done() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
            # Stopping: each sink's loop ends after the batch it is sending is recorded
            # (claims it made ahead are rolled back with their connection). A send that
            # outlasts the shutdown bound is cancelled: its claim is released, unrecorded.
            await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sink, _ in self.sinks.values():
                try:
                    await sink.close()
                except Exception as e:  # closing is best effort
                    log.warning("closing sink %s: %s", sink.name, _one_line(e))

    async def _listen(self, stop: threading.Event) -> None:
        wakes = list(self._wakes.values())

        def woken(_: object = None) -> None:
            for wake in wakes:
                wake.set()

        async with Listener(
            self.settings.dsn, [deliveries_channel(self.settings.schema)], on_reconnect=woken
        ) as listener:
            listener.add_callback(woken)
            while not stop.is_set():  # noqa: ASYNC110 (stop is a threading.Event)
                await asyncio.sleep(0.2)

    async def _idle(self, name: str) -> None:
        """Waits for the router's NOTIFY (at once if one came since the last claim began),
        or ``poll`` seconds for retries that fall due."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakes[name].wait(), self.poll)

    async def _serve(self, name: str, sink: Sink, cfg: StoredSink, stop: threading.Event) -> None:
        logs.bind(sink=name)  # this task's log records say which sink they are about
        delay = 0.5
        while not stop.is_set():
            try:
                await sink.start()
                break
            except Exception as e:  # a broker that is down: keep trying
                log.warning(
                    "sink %s cannot start (%s); retrying in %.1fs", name, _one_line(e), delay
                )
                await _pause(stop, delay)
                delay = min(delay * 2, 30.0)
        delay = 0.5
        while not stop.is_set():
            try:
                await self._deliver_loop(name, sink, cfg, stop)
                return
            except (psycopg.OperationalError, ConnectionFailed) as e:
                log.warning("delivery to %s lost the store (%s); retrying", name, _one_line(e))
                await _pause(stop, delay)
                delay = min(delay * 2, 30.0)

    async def _deliver_loop(
        self, name: str, sink: Sink, cfg: StoredSink, stop: threading.Event
    ) -> None:
        # A sink that is strictly ordered by nature (the replica) is, whatever its
        # configuration says: per-row claims would let a key move or a truncate
        # overtake the rows around it, and the copy would diverge.
        strict = cfg.strictly_ordered or sink.strictly_ordered
        lanes: list[_Lane] = []
        try:
            for _ in range(1 if strict else 2):
                conn = await asyncio.to_thread(
                    connect, self.settings, application_name=f"pgherald-deliver-{name}"[:63]
                )
                lanes.append(_Lane(conn, ChangeLog(conn, self.settings.schema)))
            first = lanes[0].conn
            loader = await asyncio.to_thread(TypeRegistry.load, first)
            await asyncio.to_thread(first.commit)
            if strict:
                # Another worker delivers to this strictly ordered sink: stand by.
                while not stop.is_set() and not await asyncio.to_thread(self._lead, first, name):  # noqa: ASYNC110
                    await asyncio.sleep(1.0)
            await self._lanes(name, sink, cfg, strict, loader, lanes, stop)
        finally:
            for lane in lanes:
                await asyncio.to_thread(lane.conn.close)

    async def _lanes(
        self,
        name: str,
        sink: Sink,
        cfg: StoredSink,
        strict: bool,
        loader: TypeRegistry,
        lanes: list[_Lane],
        stop: threading.Event,
    ) -> None:
        """Claims, sends and records until ``stop``; with two lanes, a lane records its
        last batch and claims its next one while the other lane's batch is sent."""
        wake = self._wakes[name]

        async def claim(lane: _Lane, after: asyncio.Task[None] | None = None) -> _Batch:
            if after is not None:
                await after  # the lane's last batch is recorded: its connection is free
            wake.clear()
            return await asyncio.to_thread(self._claim, lane, name, strict, loader)

        async def record(lane: _Lane, batch: _Batch, outcomes: list[Outcome]) -> None:
            sent = datetime.now(UTC)
            counts = await asyncio.to_thread(self._record, lane.conn, cfg, batch, outcomes)
            self._count(name, counts)
            metrics.delivery_outcomes(name, *counts, _latencies(batch, outcomes, sent))

        current = 0
        recording: asyncio.Task[None] | None = None  # the other lane's last batch
        claiming: asyncio.Task[_Batch] | None = asyncio.create_task(claim(lanes[current]))
        try:
            while not stop.is_set():
                assert claiming is not None
                batch = await claiming
                claiming = None
                if not batch.ids:
                    await self._idle(name)
                    claiming = asyncio.create_task(claim(lanes[current], recording))
                    recording = None
                    continue
                sending = asyncio.create_task(self._send(sink, cfg, batch))
                other = (current + 1) % len(lanes)
                # Two lanes: the next batch is claimed meanwhile, when there is more to
                # claim by the look of it (a full batch, or the router said it routed more
                # since this claim began); else that claim would mostly find nothing, and
                # at a steady trickle every batch would cost two claims.
                ahead = other != current and (len(batch.ids) >= self.batch_size or wake.is_set())
                if ahead:
                    claiming = asyncio.create_task(claim(lanes[other], recording))
                    recording = None
                outcomes = await sending
                recorded = asyncio.create_task(record(lanes[current], batch, outcomes))
                if not ahead:  # in turn: record, then claim on the same lane
                    await recorded
                    if recording is not None:
                        await recording
                        recording = None
                    claiming = asyncio.create_task(claim(lanes[current]))
                else:
                    recording = recorded
                    current = other
        finally:
            # Let what runs on the connections end before they are closed; a claim that is
            # not sent is rolled back with its connection.
            pending = [t for t in (claiming, recording) if t is not None]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def _count(self, name: str, counts: tuple[int, int, int]) -> None:
        stats = self.stats[name]
        stats.delivered += counts[0]
        stats.retried += counts[1]
        stats.dead += counts[2]
        stats.batches += 1

    def _lead(self, conn: psycopg.Connection[Any], name: str) -> bool:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(hashtext('pgherald.sink:' || %s || ':' || %s))",
            (self.settings.schema, name),
        ).fetchone()
        conn.commit()
        return bool(row and row[0])

    def _claim(self, lane: _Lane, name: str, strict: bool, loader: TypeRegistry) -> _Batch:
        """Claims a batch in a new transaction (one round trip and the pipeline's end)."""
        conn = lane.conn
        with conn.pipeline():
            conn.execute(_ASYNC_COMMIT)
            claimed = deliveries.claim(conn, self.settings.schema, name, self.batch_size, strict)
            if not claimed:
                conn.rollback()
                return _Batch([], [], [])
        # Outside the pipeline: reading shapes not seen yet needs a round trip of its own.
        events = lane.changelog.stored_events([c.event_row for c in claimed], loader)
        return _Batch([c.id for c in claimed], [c.attempts for c in claimed], events)

    async def _send(self, sink: Sink, cfg: StoredSink, batch: _Batch) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(batch.ids)
        messages: list[Message] = []
        where: list[int] = []
        for i, stored in enumerate(batch.events):
            try:
                fmt = check_format(cfg.format)
                messages.append(make_message(stored.event, stored.id, fmt, self.source_uri))
                where.append(i)
            except (FormatError, ConfigError) as e:
                outcomes[i] = PermanentSinkError(str(e))
        if messages:
            try:
                sent = await sink.send(messages)
                if len(sent) != len(messages):
                    raise RetryableSinkError(
                        f"sink returned {len(sent)} outcomes for {len(messages)} messages"
                    )
            except SinkError as e:
                sent = [e] * len(messages)
            except Exception as e:  # a sink's bug or an unexpected library error: retry
                sent = [RetryableSinkError(_one_line(e))] * len(messages)
            for i, outcome in zip(where, sent, strict=True):
                outcomes[i] = outcome
        return outcomes

    def _record(
        self,
        conn: psycopg.Connection[Any],
        cfg: StoredSink,
        batch: _Batch,
        outcomes: Sequence[Outcome],
    ) -> tuple[int, int, int]:
        """Records the outcomes and commits (one round trip); returns how many were
        delivered, will be retried, and are dead."""
        rows: list[tuple[int, Status, float, str | None]] = []
        delivered = retried = dead = 0
        for delivery_id, attempts, outcome in zip(batch.ids, batch.attempts, outcomes, strict=True):
            tried = attempts + 1
            if outcome is None:
                rows.append((delivery_id, "delivered", 0.0, None))
                delivered += 1
            elif isinstance(outcome, PermanentSinkError) or tried >= cfg.max_attempts:
                rows.append((delivery_id, "dead", 0.0, _one_line(outcome)))
                dead += 1
            else:
                retry_after = getattr(outcome, "retry_after", None)
                delay = self.policy.delay(tried, float(retry_after) if retry_after else None)
                rows.append((delivery_id, "failed", delay, _one_line(outcome)))
                retried += 1
        with conn.pipeline():
            deliveries.record(conn, self.settings.schema, rows)
            conn.commit()
        return delivered, retried, dead
