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

**Sinks that change while it runs.** The engine serves the sinks as the store has them
now: the store functions that add, change, disable or remove a sink (``pgherald sink``,
a configuration reload, the console's self-service) NOTIFY ``sinks_channel`` in their
transaction, and the engine then reads the sinks again, has them built (``catalog``: the
composition root knows the kinds) and starts, restarts or stops the sinks that changed.
It also reads them every ``refresh`` seconds, so a NOTIFY that was missed (the engine's
connection was down) only delays a change. A sink that is stopped or restarted finishes
the batch it is sending and records it first; claims it made ahead are rolled back with
their connection, so those deliveries are simply open again.

**Idle sinks cost no connection.** One connection per engine (the *control* connection,
in a thread of its own) LISTENs for the router's wake-ups, which name the sinks that got
deliveries, and for sink changes. A sink's lanes are opened when it has work (a wake-up,
a retry that fell due, or a look every ``sweep`` seconds at which idle sinks a claim
would find work for, which catches what no NOTIFY announced) and closed again after
``idle_close`` seconds without a batch. A busy sink keeps its lanes, as above.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

import psycopg
from psycopg import sql

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
from pgherald.store import deliveries
from pgherald.store.changelog import ChangeLog, StoredEvent
from pgherald.store.deliveries import (
    Status,
    StoredSink,
    deliveries_channel,
    sinks_channel,
    woken_sinks,
)

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


SinkSet: TypeAlias = Mapping[str, tuple[Sink, StoredSink]]
"""Sinks by name: the built sink and its row in the store."""

Catalog: TypeAlias = Callable[[Sequence[StoredSink]], SinkSet]
"""Turns the store's sinks (all of them, as read) into those this engine serves, built. It
should hand back the same ``Sink`` object for a sink whose row did not change: the engine
restarts a sink whose object or row changed. It runs in the engine's control thread."""


@dataclass(eq=False)
class _Slot:
    """One sink as the engine serves it."""

    name: str
    sink: Sink
    cfg: StoredSink
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when the engine stops, or this sink was changed, disabled or removed."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a wake-up for the sink (and with ``stop``); a claim clears it before it
    claims, so a wake-up that comes while it claims is not lost."""
    active: bool = False
    """Whether it holds connections (its lanes) now; read by the control thread."""
    due: float | None = None
    """While idle: when (``time.monotonic``) its next retry falls due, if it knows one."""
    task: asyncio.Task[None] | None = None

    @property
    def strict(self) -> bool:
        # A sink that is strictly ordered by nature (the replica) is, whatever its
        # configuration says: per-row claims would let a key move or a truncate
        # overtake the rows around it, and the copy would diverge.
        return self.cfg.strictly_ordered or self.sink.strictly_ordered


class _Budget:
    """The connections that the lanes of all sinks may hold together (``max_connections``):
    a burst of work for many sinks at once (a change that goes to every user's feed) must
    not take all of the server's connections. A sink waits for one lane's worth; a second
    lane is taken only when one is free; and while sinks wait, a sink whose claim comes
    back empty gives its connections back at once instead of after ``idle_close``."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def wanted(self) -> bool:
        """Whether some sink waits for a connection."""
        return any(not f.done() for f in self._waiters)

    def try_take(self) -> bool:
        if self.free > 0 and not self.wanted:
            self.free -= 1
            return True
        return False

    async def take(self, stop: threading.Event) -> bool:
        """Waits for a connection's worth; False (nothing taken) when ``stop`` is set first."""
        if self.try_take():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        got = False
        try:
            while not stop.is_set():
                await asyncio.wait([waiter], timeout=0.2)
                if waiter.done():
                    got = True
                    return True
            return False
        finally:
            if not got:
                if waiter.done() and not waiter.cancelled():
                    self.give()  # handed over as we gave up: pass it on
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class _Halted(Exception):
    """The engine ended while the control thread waited for its loop."""


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
    """Delivers to the given sinks until stopped; with a ``catalog``, to the sinks of the
    store as they change (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        sinks: SinkSet,
        *,
        batch_size: int = 500,
        policy: RetryPolicy | None = None,
        poll: float = 0.5,
        source_uri: str = "pgherald",
        catalog: Catalog | None = None,
        refresh: float = 30.0,
        sweep: float = 5.0,
        idle_close: float = 10.0,
        max_connections: int = 20,
    ) -> None:
        self.settings = settings
        self.sinks: dict[str, tuple[Sink, StoredSink]] = dict(sinks)
        """The sinks served now: a new dict at each change, so any thread may read it."""
        self.batch_size = batch_size
        self.policy = policy or RetryPolicy()
        self.poll = poll
        self.source_uri = source_uri
        self.catalog = catalog
        self.refresh = refresh
        """Seconds between readings of the sinks that no NOTIFY asked for (a safety net)."""
        self.sweep = sweep
        """Seconds between looks at which idle sinks have work that no NOTIFY announced."""
        self.idle_close = idle_close
        """Seconds without a batch after which a sink closes its connections."""
        self.max_connections = max_connections
        """Connections the sinks' lanes hold together at most (besides the control one)."""
        self.stats: defaultdict[str, SinkStats] = defaultdict(SinkStats)
        self.connected = threading.Event()
        """Set once the control connection listens and the sinks were read."""
        self.sink_changes = 0
        """Sinks started, restarted or stopped since the engine started (changes applied)."""
        self._slots: dict[str, _Slot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._halt = threading.Event()
        self._types: TypeRegistry | None = None
        self._last_read: list[StoredSink] | None = None
        self._budget = _Budget(max(max_connections, 1))
        # Sinks whose send outlasted the shutdown bound and was cancelled: the thread ends
        # on time, but the stop was not clean, and the daemon must say so (exit 1).
        self.cut_short: list[str] = []

    # -- running ---------------------------------------------------------------------------

    def run_blocking(self, stop: threading.Event) -> None:
        """Runs the engine in this thread's own event loop until ``stop`` is set."""
        asyncio.run(self.run(stop))

    async def run(self, stop: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._halt.clear()
        self.cut_short = []
        self._budget = _Budget(max(self.max_connections, 1))
        for name, (sink, cfg) in self.sinks.items():
            self._start_slot(name, sink, cfg)
        control = threading.Thread(
            target=self._control, args=(stop,), name="pgherald-delivery-control", daemon=True
        )
        control.start()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.1)
                if self._failure is not None:
                    raise self._failure
            # Stopping: each sink's loop ends after the batch it is sending is recorded
            # (claims it made ahead are rolled back with their connection). A send that
            # outlasts the shutdown bound is cancelled: its claim is released, unrecorded.
            self._stop_slots()
            if self._tasks:
                _, late = await asyncio.wait(
                    list(self._tasks), timeout=self.settings.shutdown_timeout
                )
                self.cut_short = sorted(t.get_name().removeprefix("deliver-") for t in late)
        finally:
            self._halt.set()
            self._stop_slots()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(control.join, 5.0)

    def _stop_slots(self) -> None:
        for slot in self._slots.values():
            slot.stop.set()
            slot.wake.set()

    def _start_slot(
        self, name: str, sink: Sink, cfg: StoredSink, after: asyncio.Task[None] | None = None
    ) -> None:
        slot = _Slot(name, sink, cfg)
        self._slots[name] = slot
        slot.task = asyncio.create_task(self._serve(slot, after), name=f"deliver-{name}")
        self._tasks.add(slot.task)
        slot.task.add_done_callback(self._slot_ended)

    def _slot_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _wake(self, names: frozenset[str] | None) -> None:
        """Wakes the named sinks (None: all); in the loop."""
        for slot in self._slots.values() if names is None else ():
            slot.wake.set()
        for name in names or ():
            found = self._slots.get(name)
            if found is not None:
                found.wake.set()

    async def _apply(self, wanted: SinkSet) -> None:
        """Makes the slots serve ``wanted``: a sink whose object or row changed is stopped
        (it finishes what it sends) and started again once it has; one that is gone is
        stopped; a new one is started (and looks for work at once)."""
        retired: dict[str, asyncio.Task[None]] = {}
        for name, slot in list(self._slots.items()):
            new = wanted.get(name)
            if new is not None and new[0] is slot.sink and new[1] == slot.cfg:
                continue
            slot.stop.set()
            slot.wake.set()
            del self._slots[name]
            if slot.task is not None:
                retired[name] = slot.task
            self.sink_changes += 1
            if new is None:
                log.info(
                    "sink %r was disabled or removed: delivery to it stops (the batch it is"
                    " sending is finished first)",
                    name,
                    extra={"sink": name},
                )
        for name, (sink, cfg) in wanted.items():
            if name in self._slots:
                continue
            if name in retired:
                log.info("sink %r changed: delivering with its new definition", name)
            else:
                self.sink_changes += 1
                log.info("delivering to sink %r (%s) from now on", name, cfg.kind)
            self._start_slot(name, sink, cfg, after=retired.get(name))
            self._slots[name].wake.set()
        self.sinks = {n: (s.sink, s.cfg) for n, s in self._slots.items()}

    # -- the control connection (a thread of its own) --------------------------------------

    def _control(self, stop: threading.Event) -> None:
        """Listens for wake-ups and sink changes, reads the sinks, looks at idle sinks'
        work; reconnects when the connection is lost. What else ends it ends the engine."""
        delay = 0.5
        while not (stop.is_set() or self._halt.is_set()):
            try:
                self._control_session(stop)
                return
            except _Halted:
                return
            except (psycopg.OperationalError, ConnectionFailed) as e:
                log.warning(
                    "delivery lost its control connection (%s); retrying in %.1fs",
                    _one_line(e),
                    delay,
                )
                if self._halt.wait(delay):
                    return
                delay = min(delay * 2, 30.0)
            except BaseException as e:  # a bug: the engine ends with it
                self._failure = e
                return

    def _control_session(self, stop: threading.Event) -> None:
        schema = self.settings.schema
        deliveries_ch, sinks_ch = deliveries_channel(schema), sinks_channel(schema)
        with connect(self.settings, autocommit=True, application_name="pgherald-delivery") as conn:
            for channel in (deliveries_ch, sinks_ch):
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            # Listening now: a change committed from here on is heard, and one committed
            # before is in what is read next (so is work routed before).
            self._last_read = None
            self._reread(conn)
            self._look(conn)
            self.connected.set()
            now = time.monotonic()
            next_read, next_look = now + self.refresh, now + self.sweep
            while not (stop.is_set() or self._halt.is_set()):
                changed = False
                wait = max(0.0, min(0.2, next_read - now, next_look - now))
                for n in conn.notifies(timeout=wait):
                    if n.channel == sinks_ch:
                        changed = True
                        break  # read them now; what else came is kept for the next look
                    self._call_soon(self._wake, woken_sinks(n.payload))
                now = time.monotonic()
                if changed or now >= next_read:
                    self._reread(conn)
                    next_read = now + self.refresh
                if now >= next_look:
                    self._look(conn)
                    next_look = time.monotonic() + self.sweep
                now = time.monotonic()

    def _call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(callback, *args)

    def _reread(self, conn: psycopg.Connection[Any]) -> None:
        """Reads the sinks; when they changed, has them built and serves them."""
        if self.catalog is None:
            return
        stored = deliveries.list_sinks(conn, self.settings.schema)
        if stored == self._last_read:
            return
        wanted = self.catalog(stored)
        self._in_loop(self._apply(dict(wanted)))
        self._last_read = stored

    def _in_loop(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs a coroutine in the engine's loop and waits for it (unless the engine ends)."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._halt.is_set():
            work.close()
            raise _Halted
        try:
            future = asyncio.run_coroutine_threadsafe(work, loop)
        except RuntimeError:  # the loop closed meanwhile
            work.close()
            raise _Halted from None
        while True:
            try:
                future.result(timeout=0.2)
                return
            except concurrent.futures.TimeoutError:
                if self._halt.is_set():
                    future.cancel()
                    raise _Halted from None

    def _look(self, conn: psycopg.Connection[Any]) -> None:
        """Wakes the idle sinks that a claim would find work for (the safety net of the
        router's NOTIFY, and how work that nobody announced is found: claims released by
        a worker that died, deliveries put back by hand)."""
        slots = list(self._slots.values())
        idle = {s.name: s.strict for s in slots if not s.active and not s.wake.is_set()}
        due = deliveries.due_sinks(conn, self.settings.schema, idle)
        if due:
            self._call_soon(self._wake, frozenset(due))

    # -- one sink --------------------------------------------------------------------------

    async def _serve(self, slot: _Slot, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.wait([after])  # its previous definition finishes its batch first
        name, sink = slot.name, slot.sink
        logs.bind(sink=name)  # this task's log records say which sink they are about
        try:
            delay = 0.5
            while not slot.stop.is_set():
                try:
                    await sink.start()
                    break
                except Exception as e:  # a broker that is down: keep trying
                    log.warning(
                        "sink %s cannot start (%s); retrying in %.1fs", name, _one_line(e), delay
                    )
                    await _pause(slot.stop, delay)
                    delay = min(delay * 2, 30.0)
            delay = 0.5
            while not slot.stop.is_set():
                await self._until_work(slot)
                if slot.stop.is_set():
                    break
                try:
                    await self._deliver_loop(slot)
                    delay = 0.5
                except (psycopg.OperationalError, ConnectionFailed) as e:
                    log.warning("delivery to %s lost the store (%s); retrying", name, _one_line(e))
                    await _pause(slot.stop, delay)
                    delay = min(delay * 2, 30.0)
                    slot.wake.set()  # it was at work: look again
        finally:
            try:
                await sink.close()
            except Exception as e:  # closing is best effort
                log.warning("closing sink %s: %s", name, _one_line(e))

    async def _until_work(self, slot: _Slot) -> None:
        """Idle, without a connection: returns when the sink is woken (a wake-up, a look
        that found work, ``stop``) or its next retry falls due."""
        while not slot.wake.is_set():
            left = None if slot.due is None else slot.due - time.monotonic()
            if left is not None and left <= 0:
                slot.due = None
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.wake.wait(), left)

    async def _idle(self, slot: _Slot) -> None:
        """Waits for a wake-up (at once if one came since the last claim began), or
        ``poll`` seconds for retries that fall due."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slot.wake.wait(), self.poll)

    async def _deliver_loop(self, slot: _Slot) -> None:
        """The sink at work: opens its lanes, delivers until it was idle for ``idle_close``
        seconds (or is stopped), notes when its next retry is due, closes them."""
        name, strict = slot.name, slot.strict
        slot.active = True
        lanes: list[_Lane] = []
        taken = 0
        try:
            if not await self._budget.take(slot.stop):
                return
            taken = 1
            if not strict and self._budget.try_take():
                taken = 2
            for _ in range(taken):
                conn = await asyncio.to_thread(
                    connect, self.settings, application_name=f"pgherald-deliver-{name}"[:63]
                )
                lanes.append(_Lane(conn, ChangeLog(conn, self.settings.schema)))
            first = lanes[0].conn
            loader = self._types
            if loader is None:
                loader = self._types = await asyncio.to_thread(TypeRegistry.load, first)
                await asyncio.to_thread(first.commit)
            if strict and not await self._leads(first, slot):
                return  # another worker delivers to this strictly ordered sink: stand by
            await self._lanes(slot, strict, loader, lanes)
            if not slot.stop.is_set():
                due = await asyncio.to_thread(self._next_due, first, name)
                slot.due = None if due is None else time.monotonic() + due
        finally:
            slot.active = False
            for lane in lanes:
                await asyncio.to_thread(lane.conn.close)
            for _ in range(taken):
                self._budget.give()

    async def _leads(self, conn: psycopg.Connection[Any], slot: _Slot) -> bool:
        """Whether this worker leads the strictly ordered sink (tried every second for up
        to ``idle_close`` seconds)."""
        deadline = time.monotonic() + self.idle_close
        while not slot.stop.is_set():
            if await asyncio.to_thread(self._lead, conn, slot.name):
                return True
            if time.monotonic() >= deadline:
                return False
            await _pause(slot.stop, 1.0)
        return False

    def _next_due(self, conn: psycopg.Connection[Any], name: str) -> float | None:
        due = deliveries.next_due(conn, self.settings.schema, name)
        conn.rollback()
        return due

    async def _lanes(
        self,
        slot: _Slot,
        strict: bool,
        loader: TypeRegistry,
        lanes: list[_Lane],
    ) -> None:
        """Claims, sends and records until the sink is stopped or was idle ``idle_close``
        seconds; with two lanes, a lane records its last batch and claims its next one
        while the other lane's batch is sent."""
        name, sink, cfg, stop, wake = slot.name, slot.sink, slot.cfg, slot.stop, slot.wake

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
        idle_since: float | None = None
        recording: asyncio.Task[None] | None = None  # the other lane's last batch
        claiming: asyncio.Task[_Batch] | None = asyncio.create_task(claim(lanes[current]))
        try:
            while not stop.is_set():
                assert claiming is not None
                batch = await claiming
                claiming = None
                if not batch.ids:
                    now = time.monotonic()
                    if idle_since is None:
                        idle_since = now
                    if not wake.is_set() and (
                        now - idle_since >= self.idle_close or self._budget.wanted
                    ):
                        break  # idle: the connections go, until there is work again
                    await self._idle(slot)
                    claiming = asyncio.create_task(claim(lanes[current], recording))
                    recording = None
                    continue
                idle_since = None
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
