"""Readiness: is this process connected, capturing, and not stuck? (``/readyz``)

Ready means:

- the change log's database answers (a short query, under a short timeout);
- every part this process runs (registered in ``ops.status``) says all is well: its
  threads are alive, the sources it leads are connected, and capture is not stuck.

**Stuck** is judged by progress, not by lag alone, because a capture that catches up after
downtime has a large lag and is working. Logical capture makes progress with every batch
the change log takes, and, when idle, with every heartbeat the slot moves past (every
10 s by default); no progress for ``stall`` seconds while it is connected means it is
stuck. Trigger capture is idle for as long as nobody writes, so it is stuck only when the
oldest change in its queue is older than ``stall`` and nothing was stored for as long.

A part that another instance leads (high availability) is standing by: it is not judged.
Logical capture that slot safety paused (policy ``pause-and-alert``) is not ready, and
says so with the slot's retained WAL against the policy threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from pgherald.config import Settings
from pgherald.errors import PgHeraldError
from pgherald.ops import measure, status
from pgherald.ops.status import Probe
from pgherald.sources.listen_capture import checkpoint_name as listen_checkpoint
from pgherald.sources.logical import checkpoint_name as logical_checkpoint
from pgherald.sources.slot_safety import format_size
from pgherald.sources.trigger import checkpoint_name as trigger_checkpoint

STALL_SECONDS: Final = 60.0
"""No progress for this long while there is work is "stuck" (six heartbeat intervals)."""
CHECK_TIMEOUT: Final = 3.0


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _thread_problems(threads: list[Any]) -> list[str]:
    out = []
    for t in threads:
        if t.error is not None:
            out.append(f"{t.name} stopped: {one_line(t.error)}")
        elif t.ident is not None and not t.is_alive():
            out.append(f"{t.name} is not running")
    return out


def _leads(capture: Any, role: str) -> bool:
    """Whether this process leads ``role`` (always, without leadership)."""
    leadership = getattr(capture, "leadership", None)
    roles = getattr(leadership, "roles", None)
    if not isinstance(roles, dict) or role not in roles:
        return True
    return bool(roles[role].leading.is_set())


class CaptureProbe:
    """The readiness of an ``app.Capture`` (duck-typed: its threads and sources)."""

    def __init__(
        self,
        capture: Any,
        stall: float = STALL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capture = capture
        self.stall = stall
        self.clock = clock
        settings: Settings = capture.settings
        self.logical_name = logical_checkpoint(settings.slot)
        self.trigger_name = trigger_checkpoint(settings.schema)
        self._lsn: int | None = getattr(capture.source, "stored_lsn", None)
        self._moved = clock()
        """When the logical source's acknowledged position last changed, as seen here."""

    def _logical_progress(self, now: float) -> float:
        source = self.capture.source
        lsn = getattr(source, "stored_lsn", None)
        if lsn != self._lsn:
            self._lsn = lsn
            self._moved = now
        stored = status.last_progress(self.logical_name)
        return max(self._moved, stored or 0.0)

    def __call__(self, conn: psycopg.Connection[Any] | None) -> list[str]:
        c = self.capture
        now = self.clock()
        problems = _thread_problems(list(c.threads))
        parts = (
            ("logical capture", c.source, self.logical_name),
            ("trigger capture", c.trigger, self.trigger_name),
            ("listen capture", c.listen, listen_checkpoint(c.settings.schema)),
        )
        for title, source, role in parts:
            if source is None:
                continue
            if role is not None and not _leads(c, role):
                if role == self.logical_name:
                    self._moved = now  # standing by: the clock starts when it leads
                continue
            paused = getattr(source, "paused", None) if role == self.logical_name else None
            if paused:
                problems.append(self._paused(source))
                self._moved = now
                continue
            connected = getattr(source, "connected", None)
            if connected is not None and not connected.is_set():
                problems.append(f"{title} is not connected")
                if role == self.logical_name:
                    self._moved = now
                continue
            if role == self.logical_name:
                problems += self._logical_stuck(source, now)
            elif role == self.trigger_name and conn is not None:
                problems += self._trigger_stuck(conn, now)
        return problems

    def _paused(self, source: Any) -> str:
        """Slot safety's pause (policy ``pause-and-alert``), in numbers: what the slot holds
        back against the policy threshold."""
        health = getattr(source, "slot_health", None)
        thresholds = getattr(getattr(source, "settings", None), "thresholds", None)
        retained = getattr(health, "retained_bytes", None)
        limit = getattr(thresholds, "policy_bytes", None)
        amounts = (
            f": retained WAL {format_size(retained)} >= {format_size(limit)}"
            if retained is not None and limit is not None
            else ""
        )
        return (
            f"capture paused by slot safety policy{amounts} (slot {self.capture.settings.slot};"
            " pgherald's log says how to go on)"
        )

    def _logical_stuck(self, source: Any, now: float) -> list[str]:
        settings = getattr(source, "settings", None)
        if not getattr(settings, "heartbeat_interval", 0):
            return []  # without heartbeats an idle source makes no progress: cannot tell
        idle = now - self._logical_progress(now)
        if idle <= self.stall:
            return []
        return [
            f"logical capture made no progress for {idle:.0f} s"
            f" (slot {self.capture.settings.slot}; stuck above {self.stall:.0f} s)"
        ]

    def _trigger_stuck(self, conn: psycopg.Connection[Any], now: float) -> list[str]:
        schema = self.capture.settings.schema
        row = conn.execute(measure.query("trigger_queue", schema)).fetchone()
        oldest = row[1] if row is not None else None
        if oldest is None or oldest <= self.stall:
            return []
        stored = status.last_progress(self.trigger_name)
        idle = now - stored if stored is not None else None
        if idle is not None and idle <= self.stall:
            return []
        return [
            f"trigger capture is stuck: the oldest queued change is {oldest:.0f} s old and"
            f" nothing was stored for {self.stall:.0f} s"
        ]


class DeliveryProbe:
    """The readiness of an ``app.Delivery``: its threads run, router and engine started."""

    def __init__(self, delivery: Any) -> None:
        self.delivery = delivery

    def __call__(self, conn: psycopg.Connection[Any] | None) -> list[str]:
        d = self.delivery
        problems = _thread_problems(list(d.threads))
        for title, part in (("routing", d.router), ("delivery", d.engine)):
            connected = getattr(part, "connected", None)
            if connected is not None and not connected.is_set():
                problems.append(f"{title} has not started")
        return problems


def capture_probe(capture: Any) -> Probe:
    return CaptureProbe(capture)


def delivery_probe(delivery: Any) -> Probe:
    return DeliveryProbe(delivery)


@dataclass
class Readiness:
    ready: bool
    problems: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    """The names of the parts that were asked (empty: only the database)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not ready",
            "problems": self.problems,
            "parts": self.parts,
        }


def check(
    settings: Settings, timeout: float = CHECK_TIMEOUT, expect: Sequence[str] = ()
) -> Readiness:
    """Asks the database and every registered part (blocking: run it in a thread).

    ``expect`` names the parts this process is meant to run (``capture``, ``delivery``):
    one that has not registered yet (still starting, or restarting after a reload) is a
    problem too.
    """
    problems: list[str] = []
    conn: psycopg.Connection[Any] | None = None
    try:
        conn = measure.open_session(settings, timeout, "pgherald-readyz")
        conn.execute("SELECT 1")
    except (psycopg.Error, PgHeraldError) as e:
        problems.append(f"the change log's database does not answer: {one_line(e)}")
        if conn is not None:
            conn.close()
        conn = None
    found = status.probes()
    running = {name for name, _ in found}
    problems += [f"{name} has not started" for name in expect if name not in running]
    try:
        for name, probe in found:
            try:
                problems += probe(conn)
            except (psycopg.Error, PgHeraldError) as e:
                problems.append(f"{name}: cannot tell ({one_line(e)})")
    finally:
        if conn is not None:
            conn.close()
    return Readiness(not problems, problems, [name for name, _ in found])


__all__ = [
    "STALL_SECONDS",
    "CaptureProbe",
    "DeliveryProbe",
    "Readiness",
    "capture_probe",
    "check",
    "delivery_probe",
]
