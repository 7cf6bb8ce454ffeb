"""The batch histogram exports what prometheus_client's own Histogram would, for the same
values (it only sorts them into buckets a batch at a time)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgherald.ops.metrics import LATENCY_BUCKETS, BatchHistogram


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_batch_histogram_equals_the_library_histogram() -> None:
    rng = random.Random(7)
    values = [*LATENCY_BUCKETS, 0.0, 1e6, *(rng.expovariate(2.0) for _ in range(2000))]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("lat_seconds", "x", ["sink"], LATENCY_BUCKETS, ours)
    plain = Histogram("lat_seconds", "x", ["sink"], buckets=LATENCY_BUCKETS, registry=theirs)
    for sink in ("a", "b"):
        chunk = values if sink == "a" else values[:10]
        for i in range(0, len(chunk), 300):
            batch.observe_many((sink,), chunk[i : i + 300])
        for v in chunk:
            plain.labels(sink).observe(v)
    batch.observe_many(("c",), [])  # an empty batch adds no series
    mine, library = samples(ours), samples(theirs)
    assert mine.keys() == library.keys()
    for key, value in library.items():
        assert abs(mine[key] - value) <= 1e-9 * max(1.0, abs(value)), key
