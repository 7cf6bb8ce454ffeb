"""SIGKILL the delivery worker at random moments: everything is delivered, exactly once
after dropping duplicates by idempotency key, each row in log order, nothing stuck.

A paced stream of changes (inserts, hot rows updated again and again, a few deletes) is
captured in-process by trigger capture, and delivered by ``pgherald deliver`` (a
subprocess, routing and delivery only) to a Redis stream of the test's own on the
machine's Redis (the redis sink, ``maxlen = 0`` so nothing is trimmed). The worker is
SIGKILLed 10 times, mostly while it holds a claim (a batch being sent or its outcome
being recorded: the delivery connection is inside its transaction), sometimes while it
starts, and started again each time.

A claim is a row lock held by the worker's transaction, so a killed worker's batch is
free again as soon as its backend sees the client gone, and the outcome commits with the
claim, so a batch sent but not recorded is sent again: duplicates, never losses. At the
end, what the stream holds, duplicates and all, must hold every event of the change log,
each duplicate an exact copy with the same idempotency key, each row's events in log order
(``delivery_harness`` gives the verdict and shows it can fail); every delivery is
``delivered`` and none is open.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import cast

import psycopg
import pytest
import redis

from pgherald import routing_admin
from tests import capture_harness as h
from tests.conftest import Database
from tests.faults import delivery_harness as d

pytestmark = pytest.mark.slow

EVENTS = 10_000
STREAM_SECONDS = 25.0
KILLS = 10
REDIS = "redis://127.0.0.1:6379/0"
SINK = "stream"


def read_stream(client: redis.Redis, key: str) -> list[d.Arrival]:
    """Every entry of the stream, in the stream's order, as (id field, event field)."""
    out: list[d.Arrival] = []
    start = "-"
    while True:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]], client.xrange(key, start, "+", count=5000)
        )
        if start != "-":
            entries = entries[1:]  # the range is inclusive of the last one read
        if not entries:
            return out
        out.extend((fields[b"id"].decode(), fields[b"event"]) for _, fields in entries)
        start = entries[-1][0].decode()


def test_sigkill_of_the_delivery_worker_at_random_moments(db_primary: Database) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    dsn = db_primary.dsn
    client = redis.Redis.from_url(REDIS)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS} ({exc!r}): run .ci/services")
    stream = f"pgherald-test-kill-{uuid.uuid4().hex[:10]}"
    db_primary.execute(d.STREAM_SETUP)
    settings = h.install(
        dsn, [d.STREAM_TABLE], settings=h.settings_for(dsn, method="trigger"), slot=False
    )
    routing_admin.add_sink(
        settings, SINK, "redis", options={"url": REDIS, "stream": stream, "maxlen": 0}
    )
    routing_admin.subscribe(settings, SINK, [d.STREAM_WATCH])
    # Held short of its end until the last kill, so every kill is mid-stream on a slow machine.
    writer = d.StreamWriter(dsn, EVENTS, STREAM_SECONDS, seed=seed, hold_at=EVENTS * 9 // 10)
    proc = d.DeliverProcess(settings, "--sink", SINK)
    kills = in_start = holding_claim = 0
    try:
        with h.capturing(settings) as capture, psycopg.connect(dsn, autocommit=True) as watcher:

            def problem() -> str | None:
                if writer.error is not None:
                    return f"the stream failed: {writer.error!r}"
                return h.capture_problem(capture)

            writer.start()
            while kills < KILLS:
                since = d.server_now(dsn)
                proc.start()
                if rng.random() < 0.2:
                    time.sleep(rng.uniform(0.0, 1.0))  # somewhere in its start-up
                    in_start += 1
                else:
                    proc.wait_delivering(SINK, since)
                    time.sleep(rng.uniform(0.1, 1.5))
                    deadline = time.monotonic() + 1.0
                    while time.monotonic() < deadline and not d.claim_open(watcher, SINK):
                        time.sleep(0.002)
                    holding_claim += d.claim_open(watcher, SINK)
                proc.kill()
                kills += 1
                assert not problem(), problem()
                assert writer.is_alive(), "the stream ended before the last kill"
            killed_at = time.monotonic()
            writer.release.set()
            proc.start()
            writer.finish(60)
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            d.wait_for(
                lambda: (
                    d.open_deliveries(settings) == 0
                    and d.delivery_statuses(settings, SINK)["delivered"] >= EVENTS
                ),
                60,
                lambda: f"deliveries: {d.delivery_statuses(settings, SINK)}",
                lambda: None if proc.alive() else f"pgherald deliver died:\n{proc.log()[-3000:]}",
            )
            delivered_at = time.monotonic()
            assert proc.stop() == 0, proc.log()[-3000:]
        statuses = d.delivery_statuses(settings, SINK)
        arrivals = read_stream(client, stream)
    finally:
        writer.stop.set()
        proc.close()
        client.delete(stream)
        client.close()

    truth = d.log_truth(settings, d.STREAM_WATCH)
    assert len(truth) == EVENTS == writer.made
    assert statuses == {"delivered": EVENTS}, statuses
    assert d.open_deliveries(settings) == 0
    verdict = d.verdict(arrivals, truth)
    d.assert_verdict_can_fail(arrivals, truth, rng)
    assert holding_claim > 0, "no kill landed while a batch was claimed"
    print(
        f"\ndelivery sigkill (seed {seed}): {verdict.events} events ({dict(writer.ops)}) on"
        f" {verdict.rows} rows; {kills} kills ({in_start} in start-up, {holding_claim} holding"
        f" a claim), {proc.starts} starts; {verdict.arrivals} entries, {verdict.duplicates}"
        f" duplicates; kills done {killed_at - started:.1f}s in, all delivered"
        f" {delivered_at - killed_at:.1f}s later; {time.monotonic() - started:.1f}s in all"
    )
