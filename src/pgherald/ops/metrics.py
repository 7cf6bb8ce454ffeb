"""The metrics pgherald counts as it works, for Prometheus (``/metrics``).

Counters and histograms live here, in one registry of pgherald's own (with the process
and Python collectors), and the layers that do the work report to them through the small
functions below: capture (``app.ChangeLogSink``, once the change log committed), the
delivery engine (once outcomes are recorded), snapshot runs (once a run ended). They are
counts of *this process*: a process that does not capture counts no captured events, and
a restart starts them at zero, which Prometheus' ``rate()`` and ``increase()`` expect.

What is better read from the database (lag, retained WAL, queue depths) is measured at
scrape time by ``ops.collector``, so every process that serves ``/metrics`` says the same.
This module imports nothing of pgherald, so that any layer may import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REGISTRY: Final = CollectorRegistry(auto_describe=True)
"""pgherald's metrics and the process' (memory, CPU, open files), not the library's
global registry, so that nothing else a program registers there leaks into ours."""

ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 3600.0,
)  # fmt: skip
"""Seconds: a healthy pipeline delivers in milliseconds; retries take minutes to hours."""

RUN_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)

EVENTS_CAPTURED: Final = Counter(
    "pgherald_events_captured",
    "Events committed to the change log by this process, per watch and capture method.",
    ["watch", "method"],
    registry=REGISTRY,
)
DELIVERIES: Final = Counter(
    "pgherald_deliveries",
    "Delivery outcomes recorded by this process, per sink: delivered, failed (to be"
    " retried) or dead (dead-lettered).",
    ["sink", "outcome"],
    registry=REGISTRY,
)
DELIVERY_LATENCY: Final = Histogram(
    "pgherald_delivery_latency_seconds",
    "From the change's commit in the watched database to its successful send, per sink.",
    ["sink"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
SNAPSHOT_RUNS: Final = Counter(
    "pgherald_snapshot_runs",
    "Snapshot runs that ended in this process, per watch and status (ok, error).",
    ["watch", "status"],
    registry=REGISTRY,
)
SNAPSHOT_RUN_SECONDS: Final = Histogram(
    "pgherald_snapshot_run_duration_seconds",
    "How long snapshot runs took, per watch and status.",
    ["watch", "status"],
    buckets=RUN_BUCKETS,
    registry=REGISTRY,
)


def captured(counts: Mapping[tuple[str, str], int]) -> None:
    """Counts events the change log committed, by ``(watch, method)``."""
    for (watch, method), n in counts.items():
        if n:
            EVENTS_CAPTURED.labels(watch, method).inc(n)


def delivery_outcomes(
    sink: str, delivered: int, failed: int, dead: int, latencies: Iterable[float] = ()
) -> None:
    """Counts a recorded batch's outcomes, and the latency of each delivered message."""
    for outcome, n in (("delivered", delivered), ("failed", failed), ("dead", dead)):
        if n:
            DELIVERIES.labels(sink, outcome).inc(n)
    histogram = DELIVERY_LATENCY.labels(sink)
    for seconds in latencies:
        histogram.observe(max(seconds, 0.0))


def snapshot_run(watch: str, status: str, seconds: float) -> None:
    """Counts a snapshot run that ended, and how long it took."""
    SNAPSHOT_RUNS.labels(watch, status).inc()
    SNAPSHOT_RUN_SECONDS.labels(watch, status).observe(max(seconds, 0.0))


__all__ = [
    "DELIVERIES",
    "DELIVERY_LATENCY",
    "EVENTS_CAPTURED",
    "REGISTRY",
    "SNAPSHOT_RUNS",
    "SNAPSHOT_RUN_SECONDS",
    "captured",
    "delivery_outcomes",
    "snapshot_run",
]
