"""The digest job: sends each digest sink the digest of every period (hour, day) or
snapshot run that is over, once, and records it.

How a change reaches a digest, and why nothing is lost or sent twice:

1. The router makes a delivery for the digest sink as for any sink. The delivery engine
   never gets digest sinks (the composition root hands them to this job instead), so the
   delivery stays open (``pending``) in the store: the sink holds nothing in memory.
2. A change belongs to the period of its time (commit time, else capture time) in the
   sink's time zone; a change that arrives after its period's digest went out (capture
   was down, a dead delivery was retried by hand) belongs to the period after the last one
   handled (the checkpoint's ``until``). For ``run`` digests, a snapshot run's changes
   belong to that run; changes of watches that have no runs (logical, trigger, listen
   capture) go out hourly.
3. A period is due when it ended ``delay`` seconds ago and the router has looked at every
   event from before its end; a run, when it ended ``delay`` seconds ago and its events
   were all routed. The oldest due digest of a sink goes first (a later period waits for
   an earlier one that is waiting for a retry, so digests arrive in order).
4. In one transaction, under a per-sink advisory lock (one job per sink, across
   processes): lock the digest's open deliveries (``FOR UPDATE``), send the mail, record
   every delivery's outcome (delivered; failed with backoff; dead after the sink's
   ``max_attempts`` or a permanent error) and the checkpoint, commit.

A crash before the commit (even between the mail server's "accepted" and the commit)
rolls it all back: the deliveries are open again and the same digest is sent again, with
the same ``Message-ID``, so that mail programs can drop the copy. A crash after the commit
sends nothing again. That is the same at-least-once with an idempotency key as every
other sink, and the only honest promise over SMTP.

A period or run without changes gets a digest only with ``send_empty``: for hours and
days only the latest period that ended (no flood of empty digests after downtime), and
never one for a period before the sink existed; for runs, every snapshot run of a
subscribed watch that started after the subscription. Empty digests are recorded by the
checkpoint alone, in the transaction after the mail was accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta, tzinfo
from time import monotonic as time_now
from typing import Any, Final, Literal

import psycopg

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry
from pgherald.delivery.engine import RetryPolicy
from pgherald.delivery.router import CHECKPOINT as ROUTER_CHECKPOINT
from pgherald.errors import ConnectionFailed, PermanentSinkError, RetryableSinkError, SinkError
from pgherald.sinks.base import Outcome
from pgherald.sinks.digest import Digest, DigestPolicy, DigestSink, Period, RunInfo
from pgherald.store import deliveries
from pgherald.store import digests as store
from pgherald.store.changelog import ChangeLog
from pgherald.store.deliveries import Status, StoredSink
from pgherald.store.digests import DigestState

log = logging.getLogger("pgherald.digests")

_STATUS: Final[dict[str, Status]] = {"sent": "delivered", "dead": "dead", "retry": "failed"}
MAX_PER_PASS = 100
"""Digests one sink sends in one pass at most (the next pass goes on)."""


def window_of(
    moment: datetime, period: Literal["hour", "day"], zone: tzinfo
) -> tuple[datetime, datetime]:
    """The hour or day (in ``zone``) that holds ``moment``, as UTC ``[start, end)``."""
    local = moment.astimezone(zone)
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        return start, start + timedelta(hours=1)
    day = local.date()
    start = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    return start, end


def window_key(period: Literal["hour", "day"], start: datetime, zone: tzinfo) -> str:
    local = start.astimezone(zone)
    if period == "day":
        return f"day:{local.date().isoformat()}"
    return f"hour:{local:%Y-%m-%dT%H:%M%z}"


@dataclass(frozen=True)
class DigestResult:
    """What became of one digest."""

    sink: str
    key: str
    changes: int
    outcome: Literal["sent", "retry", "dead"]
    error: str | None = None


@dataclass
class _Plan:
    """A digest about to be sent, with what to record once it was (or was not)."""

    digest: Digest
    locked: list[tuple[int, int]]
    """``(delivery id, attempts)`` of its changes, locked in the open transaction."""
    done: DigestState
    """The checkpoint once the digest is finished (sent, or given up)."""
    empty_key: tuple[str, str] | None = None


@dataclass
class _EmptyTries:
    tries: int = 0
    not_before: datetime | None = None


@dataclass
class _SinkState:
    sink: DigestSink
    stored: StoredSink
    policy: DigestPolicy
    empty_tries: dict[str, _EmptyTries] = field(default_factory=dict)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _state(name: str, sink: DigestSink, stored: StoredSink) -> _SinkState:
    if sink.digest is None:
        raise ValueError(f"sink {name!r} does not send digests")
    return _SinkState(sink, stored, sink.digest)


async def _close(sink: DigestSink) -> None:
    try:
        await sink.close()
    except Exception as e:  # closing is best effort
        log.warning("closing sink %s: %s", sink.name, _one_line(e))


class DigestJob:
    """Sends the due digests of the given sinks, once per ``run_once`` or every ``poll``
    seconds until stopped."""

    def __init__(
        self,
        settings: Settings,
        sinks: Mapping[str, tuple[DigestSink, StoredSink]],
        *,
        policy: RetryPolicy | None = None,
        poll: float = 15.0,
    ) -> None:
        self.settings = settings
        self.policy = policy or RetryPolicy()
        self.poll = poll
        self.connected = threading.Event()
        self._sinks: dict[str, _SinkState] = {}
        for name, (sink, stored) in sinks.items():
            self._sinks[name] = _state(name, sink, stored)
        self._lock = threading.Lock()
        self._replacement: dict[str, tuple[DigestSink, StoredSink]] | None = None
        self._woken = threading.Event()

    @property
    def sinks(self) -> list[str]:
        """The names of the sinks it serves (as of its last pass)."""
        return sorted(self._sinks)

    def replace_sinks(self, sinks: Mapping[str, tuple[DigestSink, StoredSink]]) -> None:
        """Serves these sinks from the next pass on, which comes at once (from any thread:
        the delivery engine hands over the digest sinks of the store as they change). A
        sink whose object is the same keeps its state; one that goes is closed."""
        for name, (sink, stored) in sinks.items():
            _state(name, sink, stored)  # refuses a sink that does not send digests
        with self._lock:
            self._replacement = dict(sinks)
        self._woken.set()

    async def _take_replacement(self) -> None:
        with self._lock:
            replacement, self._replacement = self._replacement, None
        if replacement is None:
            return
        kept: dict[str, _SinkState] = {}
        for name, (sink, stored) in replacement.items():
            old = self._sinks.get(name)
            if old is not None and old.sink is sink:
                old.stored = stored
                kept[name] = old
            else:
                kept[name] = _state(name, sink, stored)
        gone = [
            st.sink
            for name, st in self._sinks.items()
            if name not in kept or kept[name].sink is not st.sink
        ]
        self._sinks = kept
        for sink in gone:
            await _close(sink)

    # -- running ---------------------------------------------------------------------------

    def run_blocking(self, stop: threading.Event) -> None:
        asyncio.run(self.run(stop))

    async def run(self, stop: threading.Event) -> None:
        """Every ``poll`` seconds (at once when its sinks were replaced), sends what is due;
        a lost store is retried. Without sinks it connects to nothing."""
        self.connected.set()
        delay = 1.0
        try:
            while not stop.is_set():
                self._woken.clear()
                await self._take_replacement()
                try:
                    if self._sinks:
                        await self.run_once()
                    delay = 1.0
                    wait = self.poll
                except (psycopg.OperationalError, ConnectionFailed) as e:
                    log.warning(
                        "digests lost the store (%s); retrying in %.0fs", _one_line(e), delay
                    )
                    wait, delay = delay, min(delay * 2, 60.0)
                deadline = time_now() + wait
                while not stop.is_set() and not self._woken.is_set() and time_now() < deadline:  # noqa: ASYNC110 (threading.Events)
                    await asyncio.sleep(min(0.2, max(0.0, deadline - time_now())))
        finally:
            for state in self._sinks.values():
                await _close(state.sink)

    async def run_once(self, now: datetime | None = None) -> list[DigestResult]:
        """One pass over every sink: sends what is due at ``now`` (the database's clock by
        default; tests move it on)."""
        conn = await asyncio.to_thread(connect, self.settings, application_name="pgherald-digests")
        results: list[DigestResult] = []
        try:
            loader = await asyncio.to_thread(TypeRegistry.load, conn)
            await asyncio.to_thread(conn.commit)
            for state in self._sinks.values():
                results += await self._serve(conn, state, loader, now)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.rollback)
            await asyncio.to_thread(conn.close)
        return results

    async def _serve(
        self,
        conn: psycopg.Connection[Any],
        state: _SinkState,
        loader: TypeRegistry,
        now: datetime | None,
    ) -> list[DigestResult]:
        results: list[DigestResult] = []
        for _ in range(MAX_PER_PASS):
            plan = await asyncio.to_thread(self._plan, conn, state, loader, now)
            if plan is None:
                break
            outcome = await self._send(state.sink, plan.digest)
            result = await asyncio.to_thread(self._finish, conn, state, plan, outcome, now)
            results.append(result)
            if result.outcome != "sent":
                break  # the server is in trouble: the next pass tries again
        return results

    async def _send(self, sink: DigestSink, digest: Digest) -> Outcome:
        try:
            return await sink.send_digest(digest)
        except SinkError as e:
            return e
        except Exception as e:  # a sink's bug or an unexpected library error: retry
            return RetryableSinkError(f"{type(e).__name__}: {_one_line(e)}")

    # -- deciding what is due (in a transaction that stays open while the mail goes) -------

    def _plan(
        self,
        conn: psycopg.Connection[Any],
        state: _SinkState,
        loader: TypeRegistry,
        now: datetime | None,
    ) -> _Plan | None:
        schema, name = self.settings.schema, state.sink.name
        if not store.try_lock(conn, schema, name):
            conn.rollback()
            return None
        clock = now or store.clock(conn)
        saved = store.load_state(conn, schema, name)
        try:
            plan = self._plan_window(conn, state, saved, loader, clock)
            if plan is None and state.policy.period == "run":
                plan = self._plan_run(conn, state, saved, loader, clock)
        except psycopg.errors.LockNotAvailable:
            log.info("sink %s: its changes are locked elsewhere; next pass", name)
            plan = None
        if plan is None:
            conn.rollback()
        return plan

    def _plan_window(
        self,
        conn: psycopg.Connection[Any],
        state: _SinkState,
        saved: DigestState,
        loader: TypeRegistry,
        now: datetime,
    ) -> _Plan | None:
        """The oldest due hour or day (for a run sink: hour, of changes without a run)."""
        schema, name, policy = self.settings.schema, state.sink.name, state.policy
        by_run = policy.period == "run"
        period: Literal["hour", "day"] = "day" if policy.period == "day" else "hour"
        zone = policy.timezone or UTC
        delay = timedelta(seconds=policy.delay)
        head = store.window_head(conn, schema, name, saved.until, by_run)
        if head is not None:
            start, end = window_of(head, period, zone)
            if end + delay > now:
                return None
            if store.unrouted_before(conn, schema, name, end, by_run, ROUTER_CHECKPOINT):
                return None
            count, next_at = store.window_state(conn, schema, name, saved.until, end, by_run)
            if count and next_at is not None and next_at > now:
                return None  # waiting for its retry; later periods wait behind it
            locked = store.lock_window(conn, schema, name, saved.until, end, by_run)
            if locked:
                digest = self._digest(
                    conn, state, loader, period, window_key(period, start, zone), locked,
                    start=start, end=end,
                )  # fmt: skip
                return _Plan(digest, locked, replace(saved, until=end))
        if not policy.send_empty or by_run:
            return None
        # The latest period that is over, if nothing was sent for it and the sink existed.
        current, _ = window_of(now - delay, period, zone)
        start, end = window_of(current - timedelta(microseconds=1), period, zone)
        lower = max(d for d in (saved.until, state.stored.created_at) if d is not None) if (
            saved.until or state.stored.created_at
        ) else None  # fmt: skip
        if lower is not None and end <= lower:
            return None
        if head is not None and head < end:
            return None
        if store.unrouted_before(conn, schema, name, end, by_run, ROUTER_CHECKPOINT):
            return None
        key = window_key(period, start, zone)
        if not self._empty_may_go(state, key, now):
            return None
        watches = tuple(store.subscribed_watches(conn, schema, name))
        digest = self._empty(state, period, key, start=start, end=end, watches=watches)
        return _Plan(digest, [], replace(saved, until=end), empty_key=("window", key))

    def _plan_run(
        self,
        conn: psycopg.Connection[Any],
        state: _SinkState,
        saved: DigestState,
        loader: TypeRegistry,
        now: datetime,
    ) -> _Plan | None:
        """The oldest due snapshot run with changes for the sink, else (with send_empty) the
        oldest run without any."""
        schema, name, policy = self.settings.schema, state.sink.name, state.policy
        delay = timedelta(seconds=policy.delay)
        for run in store.open_runs(conn, schema, name):
            if run.status == "running":
                continue
            over = run.ended_at or run.started_at
            if over is not None and over + delay > now:
                continue
            if run.next_attempt_at > now:
                continue
            if store.unrouted_run(conn, schema, run.watch, run.position, ROUTER_CHECKPOINT):
                continue
            locked = store.lock_run(conn, schema, name, run.watch, run.position)
            if not locked:
                continue
            info = RunInfo(
                run.run_id if run.run_id is not None else -1,
                run.watch,
                run.status or "unknown",
                run.started_at,
                run.ended_at,
                run.error,
            )
            digest = self._digest(
                conn, state, loader, "run", f"run:{run.run_id or run.position}", locked,
                run=info, serial=run.first_delivery,
            )  # fmt: skip
            return _Plan(digest, locked, saved)
        if not policy.send_empty:
            return None
        marks = dict(saved.runs)
        moved = False
        blocked: set[str] = set()
        for ended in store.finished_runs(conn, schema, name, saved.runs):
            if ended.watch in blocked:
                continue
            over = ended.ended_at or ended.started_at
            if ended.status == "running" or over + delay > now:
                blocked.add(ended.watch)
                continue
            position = str(ended.id)
            if ended.changes and store.unrouted_run(
                conn, schema, ended.watch, position, ROUTER_CHECKPOINT
            ):
                blocked.add(ended.watch)
                continue
            if ended.changes and store.run_deliveries(conn, schema, name, ended.watch, position)[1]:
                marks[ended.watch] = ended.id  # it has changes for the sink: not empty
                moved = True
                continue
            key = f"run:{ended.id}"
            if not self._empty_may_go(state, key, now):
                blocked.add(ended.watch)
                continue
            info = RunInfo(
                ended.id, ended.watch, ended.status, ended.started_at, ended.ended_at, ended.error
            )
            digest = self._empty(state, "run", key, run=info, watches=(ended.watch,))
            finished = replace(saved, runs={**marks, ended.watch: ended.id})
            return _Plan(digest, [], finished, empty_key=("run", key))
        if moved:
            store.save_state(conn, schema, name, replace(saved, runs=marks))
            conn.commit()
        return None

    def _empty_may_go(self, state: _SinkState, key: str, now: datetime) -> bool:
        tries = state.empty_tries.get(key)
        return tries is None or tries.not_before is None or tries.not_before <= now

    def _digest(
        self,
        conn: psycopg.Connection[Any],
        state: _SinkState,
        loader: TypeRegistry,
        period: Period,
        key: str,
        locked: list[tuple[int, int]],
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        run: RunInfo | None = None,
        serial: int = 0,
    ) -> Digest:
        schema = self.settings.schema
        ids = [i for i, _ in locked]
        counts = store.counts(conn, schema, ids)
        rows = store.event_rows(conn, schema, ids[: state.policy.max_items])
        events = ChangeLog(conn, schema).stored_events(rows, loader)
        return Digest(
            sink=state.sink.name,
            period=period,
            key=key,
            start=start,
            end=end,
            total=len(ids),
            counts=counts,
            events=[(e.id, e.event) for e in events],
            timezone=state.policy.timezone,
            run=run,
            watches=tuple(sorted({w for w, _ in counts})),
            serial=serial,
        )

    def _empty(
        self,
        state: _SinkState,
        period: Period,
        key: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        run: RunInfo | None = None,
        watches: tuple[str, ...] = (),
    ) -> Digest:
        return Digest(
            sink=state.sink.name,
            period=period,
            key=key,
            start=start,
            end=end,
            total=0,
            counts={},
            events=[],
            timezone=state.policy.timezone,
            run=run,
            watches=watches,
        )

    # -- recording -------------------------------------------------------------------------

    def _finish(
        self,
        conn: psycopg.Connection[Any],
        state: _SinkState,
        plan: _Plan,
        outcome: Outcome,
        now: datetime | None,
    ) -> DigestResult:
        schema, name = self.settings.schema, state.sink.name
        digest = plan.digest
        tried = max((a for _, a in plan.locked), default=0) + 1
        if plan.empty_key is not None:
            tries = state.empty_tries.setdefault(plan.empty_key[1], _EmptyTries())
            tried = tries.tries + 1
        max_attempts = state.stored.max_attempts
        error = None if outcome is None else _one_line(outcome)
        verdict: Literal["sent", "retry", "dead"]
        if outcome is None:
            verdict = "sent"
        elif isinstance(outcome, PermanentSinkError) or tried >= max_attempts:
            verdict = "dead"
        else:
            verdict = "retry"
        delay = 0.0
        if verdict == "retry":
            retry_after = getattr(outcome, "retry_after", None)
            delay = self.policy.delay(tried, float(retry_after) if retry_after else None)
        if plan.locked:
            status: Status = _STATUS[verdict]
            deliveries.record(conn, schema, [(i, status, delay, error) for i, _ in plan.locked])
        elif plan.empty_key is not None:
            key = plan.empty_key[1]
            if verdict == "retry":
                tries = state.empty_tries[key]
                tries.tries = tried
                tries.not_before = (now or datetime.now(UTC)) + timedelta(seconds=delay)
            else:
                state.empty_tries.pop(key, None)
        if verdict != "retry":
            store.save_state(conn, schema, name, plan.done)
        conn.commit()
        if verdict == "sent":
            log.info("sink %s: sent digest %s (%d changes)", name, digest.key, digest.total)
        elif verdict == "dead":
            log.error("sink %s: gave up digest %s: %s", name, digest.key, error)
        else:
            log.warning(
                "sink %s: digest %s not sent (%s); retrying in %.1fs",
                name,
                digest.key,
                error,
                delay,
            )
        return DigestResult(name, digest.key, digest.total, verdict, error)
