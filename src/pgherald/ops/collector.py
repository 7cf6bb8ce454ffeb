"""Gauges read from the database at scrape time: lag, retained WAL, queue depths.

They describe the pipeline, not this process, so they are measured when Prometheus asks
(``ops.measure``, one short session under a short timeout) and every process that serves
``/metrics`` reports the same values. When the database does not answer in time, the
scrape still succeeds, with ``pgherald_database_up 0`` and without these gauges, so that
an alert on "database down" can fire instead of a scrape error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Final

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pgherald.config import Settings
from pgherald.errors import PgHeraldError
from pgherald.ops import metrics
from pgherald.ops.measure import OPEN_STATUSES, Measurements, measure, open_session

log = logging.getLogger("pgherald.metrics")

SCRAPE_TIMEOUT: Final = 2.0
"""Seconds for connecting and for each statement; Prometheus' own default is 10 s."""


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class DatabaseCollector(Collector):
    """Collects the database-derived gauges of one change log."""

    def __init__(self, settings: Settings, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.settings = settings
        self.timeout = timeout

    def describe(self) -> list[Metric]:
        return []  # unknown until collected: no early scrape at registration

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        up = _gauge("pgherald_database_up", "1 when the change log's database answered.")
        found: Measurements | None = None
        try:
            with open_session(self.settings, self.timeout, "pgherald-metrics") as conn:
                found = measure(conn, self.settings)
        except (psycopg.Error, PgHeraldError) as e:
            log.warning("metrics: the change log's database did not answer: %s", e)
        up.add_metric([], 1.0 if found is not None else 0.0)
        yield up
        if found is not None:
            yield from _families(found)
        took = _gauge(
            "pgherald_database_scrape_seconds", "How long reading the database's figures took."
        )
        took.add_metric([], time.monotonic() - started)
        yield took


def _families(m: Measurements) -> Iterator[Metric]:
    slot = m.slot
    if slot is not None:
        labels = [m.slot_name]
        families: list[tuple[str, str, float | int | None]] = [
            (
                "pgherald_slot_active",
                "1 while a process streams from pgherald's slot.",
                1.0 * slot.active,
            ),
            (
                "pgherald_capture_lag_bytes",
                "WAL written since the position pgherald last confirmed.",
                slot.lag_bytes,
            ),
            (
                "pgherald_capture_lag_seconds",
                "How far behind logical capture is, in seconds (an estimate: see"
                " docs/how-to/monitoring.md).",
                slot.lag_seconds,
            ),
            (
                "pgherald_slot_retained_wal_bytes",
                "WAL the server keeps for pgherald's slot.",
                slot.retained_bytes,
            ),
            (
                "pgherald_slot_safe_wal_size_bytes",
                "WAL that may still be written before max_slot_wal_keep_size invalidates the slot.",
                slot.safe_wal_size,
            ),
            (
                "pgherald_slot_lost",
                "1 when the slot was invalidated (wal_status = lost).",
                1.0 * slot.lost,
            ),
        ]
        for name, doc, value in families:
            if value is None:
                continue
            family = _gauge(name, doc, ["slot"])
            family.add_metric(labels, float(value))
            yield family
    rows = _gauge("pgherald_trigger_queue_rows", "Changes waiting in the trigger queue.")
    rows.add_metric([], float(m.trigger_rows))
    yield rows
    oldest = _gauge(
        "pgherald_trigger_queue_oldest_seconds",
        "Age of the oldest change waiting in the trigger queue (0 when empty).",
    )
    oldest.add_metric([], m.trigger_oldest_seconds or 0.0)
    yield oldest
    open_ = _gauge(
        "pgherald_deliveries_open",
        "Deliveries not done yet, per sink and status (pending, delivering, failed).",
        ["sink", "status"],
    )
    dead = _gauge("pgherald_deliveries_dead", "Dead letters per sink.", ["sink"])
    for sink, counts in sorted(m.deliveries.items()):
        for status in OPEN_STATUSES:
            open_.add_metric([sink, status], float(counts.get(status, 0)))
        dead.add_metric([sink], float(counts.get("dead", 0)))
    yield open_
    yield dead
    errors = _gauge("pgherald_errors_last_hour", "Errors recorded in the store in the last hour.")
    errors.add_metric([], float(m.errors_recent))
    yield errors
    age = _gauge(
        "pgherald_snapshot_last_success_age_seconds",
        "Seconds since each snapshot watch last ran successfully (since it was made, if never).",
        ["watch"],
    )
    for s in m.snapshots:
        age.add_metric([s.watch], s.age)
    yield age


def exposition(settings: Settings) -> bytes:
    """The text of a scrape: this process' metrics, then the database's gauges."""
    database = CollectorRegistry(auto_describe=False)
    database.register(DatabaseCollector(settings))
    return generate_latest(metrics.REGISTRY) + generate_latest(database)


__all__ = ["DatabaseCollector", "exposition"]
