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

import bisect
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

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


class BatchHistogram(Collector):
    """A histogram fed a batch of values at a time, for hot paths.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets per value
    (several microseconds each, about as much as the rest of delivering a message costs);
    here a batch is sorted into buckets with ``bisect`` and added under one lock. The
    exposition is the same: ``_bucket`` (cumulative, ``le`` inclusive), ``_count``, ``_sum``.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        registry.register(self)

    def observe_many(self, labels: Sequence[str], values: Iterable[float]) -> None:
        bounds = self.bounds
        counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf only)
        total = 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
            total += value
        if not any(counts):
            return
        with self._lock:
            series = self._series.setdefault(tuple(labels), ([0] * len(counts), [0.0]))
            for i, n in enumerate(counts):
                series[0][i] += n
            series[1][0] += total

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            found = [(k, list(c), t[0]) for k, (c, t) in sorted(self._series.items())]
        for labels, counts, total in found:
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(
                    ("+Inf" if bound == float("inf") else repr(bound), float(cumulative))
                )
            family.add_metric(list(labels), buckets, sum_value=total)
        yield family


def _le(bound: float) -> str:
    """A bucket's ``le`` label as Prometheus' own clients write it (``0.5``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(bound)


DELIVERY_LATENCY: Final = BatchHistogram(
    "pgherald_delivery_latency_seconds",
    "From the change's commit in the watched database to its successful send, per sink.",
    ["sink"],
    LATENCY_BUCKETS,
    REGISTRY,
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
    DELIVERY_LATENCY.observe_many((sink,), (max(seconds, 0.0) for seconds in latencies))


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
    "BatchHistogram",
    "captured",
    "delivery_outcomes",
    "snapshot_run",
]
