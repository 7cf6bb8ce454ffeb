"""Readiness probes, with stand-ins for capture's threads and sources and a fake clock.

The real thing (a daemon whose database goes away and comes back) is proved in
``tests/faults/test_readyz.py``; here, the judgement of states that are slow or awkward to
bring about for real: a stuck source, a dead thread, a standby.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pgherald.config import Settings
from pgherald.ops import status
from pgherald.ops.readiness import CaptureProbe, DeliveryProbe
from pgherald.sources.logical import LogicalSettings, LogicalSource
from pgherald.sources.slot_safety import Reading, SlotHealth, SlotThresholds


@dataclass
class FakeThread:
    name: str
    error: BaseException | None = None
    alive: bool = True
    ident: int | None = 1

    def is_alive(self) -> bool:
        return self.alive


@dataclass
class FakeLogicalSettings:
    heartbeat_interval: float = 10.0


@dataclass
class FakeSource:
    connected: threading.Event = field(default_factory=threading.Event)
    stored_lsn: int = 0
    settings: FakeLogicalSettings = field(default_factory=FakeLogicalSettings)


@dataclass
class FakeRole:
    leading: threading.Event = field(default_factory=threading.Event)


@dataclass
class FakeLeadership:
    roles: dict[str, FakeRole]


class FakeCapture:
    def __init__(self, slot: str) -> None:
        self.settings = Settings(dsn="", slot=slot)
        self.threads = [FakeThread("pgherald-logical")]
        self.source: Any = FakeSource()
        self.source.connected.set()
        self.trigger = None
        self.listen = None
        self.scheduler = None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_connected_source_that_moves_is_ready(request: Any) -> None:
    clock = Clock()
    capture = FakeCapture(f"s_{request.node.name}"[:60])
    probe = CaptureProbe(capture, stall=60, clock=clock)
    assert probe(None) == []
    for _ in range(10):  # heartbeats move the position every 10 s
        clock.now += 10
        capture.source.stored_lsn += 100
        assert probe(None) == []


def test_no_progress_for_longer_than_the_bound_is_stuck(request: Any) -> None:
    clock = Clock()
    capture = FakeCapture(f"s_{request.node.name}"[:60])
    probe = CaptureProbe(capture, stall=60, clock=clock)
    clock.now += 59
    assert probe(None) == []
    clock.now += 2
    [problem] = probe(None)
    assert "made no progress for 61 s" in problem
    # Batches stored (a long transaction in pieces) count as progress too.
    status.note_progress(probe.logical_name, clock.now)
    assert probe(None) == []


def test_without_heartbeats_an_idle_source_is_not_called_stuck(request: Any) -> None:
    clock = Clock()
    capture = FakeCapture(f"s_{request.node.name}"[:60])
    capture.source.settings.heartbeat_interval = 0
    probe = CaptureProbe(capture, stall=60, clock=clock)
    clock.now += 3600
    assert probe(None) == []


def test_a_disconnected_source_and_a_dead_thread_are_not_ready(request: Any) -> None:
    capture = FakeCapture(f"s_{request.node.name}"[:60])
    capture.source.connected.clear()
    capture.threads.append(FakeThread("pgherald-snapshots", error=RuntimeError("boom\nmore")))
    capture.threads.append(FakeThread("pgherald-listen", alive=False))
    capture.threads.append(FakeThread("pgherald-trigger", alive=False, ident=None))  # not started
    problems = CaptureProbe(capture, clock=Clock())(None)
    assert problems == [
        "pgherald-snapshots stopped: boom more",
        "pgherald-listen is not running",
        "logical capture is not connected",
    ]


def test_a_standby_is_not_judged_until_it_leads(request: Any) -> None:
    clock = Clock()
    capture = FakeCapture(f"s_{request.node.name}"[:60])
    capture.source.connected.clear()  # another instance streams
    probe = CaptureProbe(capture, stall=60, clock=clock)
    role = FakeRole()
    capture.leadership = FakeLeadership({probe.logical_name: role})  # type: ignore[attr-defined]
    clock.now += 3600
    assert probe(None) == []
    role.leading.set()  # it takes over: not connected yet, then connected and moving
    assert probe(None) == ["logical capture is not connected"]
    capture.source.connected.set()
    clock.now += 30
    assert probe(None) == []


def test_a_listen_standby_is_not_judged_until_it_leads(request: Any) -> None:
    capture = FakeCapture(f"s_{request.node.name}"[:60])
    capture.listen = FakeSource()  # type: ignore[assignment]  # another instance listens
    role = FakeRole()
    capture.leadership = FakeLeadership({"listen:pgherald": role})  # type: ignore[attr-defined]
    probe = CaptureProbe(capture, stall=60, clock=Clock())
    assert probe(None) == []
    role.leading.set()
    assert probe(None) == ["listen capture is not connected"]


def test_delivery_probe() -> None:
    @dataclass
    class Part:
        connected: threading.Event = field(default_factory=threading.Event)

    @dataclass
    class FakeDelivery:
        router: Part = field(default_factory=Part)
        engine: Part = field(default_factory=Part)
        threads: list[FakeThread] = field(default_factory=list)

    d = FakeDelivery(threads=[FakeThread("pgherald-router"), FakeThread("pgherald-delivery")])
    assert DeliveryProbe(d)(None) == ["routing has not started", "delivery has not started"]
    d.router.connected.set()
    d.engine.connected.set()
    assert DeliveryProbe(d)(None) == []
    d.threads[1].error = OSError("store gone")
    assert DeliveryProbe(d)(None) == ["pgherald-delivery stopped: store gone"]


def test_a_capture_paused_by_slot_safety_says_so_with_its_numbers(request: Any) -> None:
    """The real logical source paused by policy pause-and-alert (its monitor's reading over
    the policy threshold): not ready, and the problem says why in numbers, not only that
    capture is not connected."""
    slot = f"s_{request.node.name}"[:60]
    thresholds = SlotThresholds(warn_bytes=16 << 10, critical_bytes=32 << 10,
                                policy_bytes=64 << 10, policy="pause-and-alert")  # fmt: skip
    source = LogicalSource(LogicalSettings(dsn="", slot=slot, thresholds=thresholds), [])
    source.connected.set()
    capture = FakeCapture(slot)
    capture.source = source
    probe = CaptureProbe(capture, stall=60, clock=Clock())
    health = SlotHealth(
        slot, "pgoutput", "db", True, None, "0/1", "0/1", "reserved", None, None, None,
        retained_bytes=80 << 10, lag_bytes=80 << 10, current_lsn=None,
    )  # fmt: skip
    source._on_reading(Reading(health, "policy", "over", time.monotonic()))
    assert source._action is not None and source._action.kind == "pause"
    stop = threading.Event()
    pausing = threading.Thread(target=source._pause, args=("over", stop))
    pausing.start()
    try:
        deadline = time.monotonic() + 10
        while source.paused is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert probe(None) == [
            "capture paused by slot safety policy: retained WAL 80 kB >= 64 kB"
            f" (slot {slot}; pgherald's log says how to go on)"
        ]
    finally:
        stop.set()
        pausing.join(10)
    assert source.paused is None
    assert probe(None) == ["logical capture is not connected"]  # no longer paused
