"""A broker outage in the middle of a stream loses nothing and breaks no row's order.

A 20,000-event stream (inserts, hot rows updated again and again, a few deletes) is
captured by trigger capture and delivered by the delivery engine (in-process, with a
short backoff so that recovery after the outage is quick) to the machine's RabbitMQ
through the test's own TCP proxy: the amqp sink publishes to a fanout exchange, and a
plain consumer reads its own exclusive queue bound to it. Half-way through, the proxy is
cut for 30 seconds (connections dropped, new ones refused) while the stream goes on, and
then restored. At the end, what the consumer received, duplicates and all, must hold
every event of the change log, duplicates only as exact copies with the same
idempotency key (``message_id``), and each row's events in log order (``delivery_harness``
gives the verdict, and shows that it can fail).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from types import TracebackType

import aio_pika
import aio_pika.abc
import psycopg
import pytest

from pgherald import app, routing_admin
from pgherald.delivery.engine import RetryPolicy
from tests import capture_harness as h
from tests.conftest import Database
from tests.faults import delivery_harness as d
from tests.tcp_proxy import ThreadedTcpProxy

pytestmark = pytest.mark.slow

EVENTS = 20_000
STREAM_SECONDS = 45.0
CUT_SECONDS = 30.0
CUT_AFTER = 0.2
"""The proxy is cut once the consumer got this share of the stream."""
FAST = RetryPolicy(base=0.1, maximum=1.0, jitter=0.3)
URL = "amqp://guest:guest@127.0.0.1:5672/"
SINK = "broker"


class Consumer:
    """A plain consumer in a thread of its own: an exclusive queue bound to the fanout
    exchange (declared here as the sink declares it), every message kept in arrival order."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.arrivals: list[d.Arrival] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._connection: aio_pika.abc.AbstractConnection | None = None

    def __enter__(self) -> Consumer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    async def _start(self) -> None:
        try:
            self._connection = await aio_pika.connect(URL, timeout=5)
        except Exception as exc:
            pytest.fail(f"RabbitMQ is not reachable at {URL} ({exc!r}): run .ci/services")
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert message.message_id is not None
        assert message.headers.get("Idempotency-Key") == message.message_id
        self.arrivals.append((message.message_id, message.body))

    async def _stop(self) -> None:
        if self._connection is not None:
            channel = await self._connection.channel()
            await channel.exchange_delete(self.exchange)
            await self._connection.close()

    @property
    def count(self) -> int:
        return len(self.arrivals)


def test_broker_cut_for_30s_mid_stream_loses_nothing_and_keeps_each_rows_order(
    db_primary: Database,
) -> None:
    started = time.monotonic()
    seed = random.randrange(10**6)
    dsn = db_primary.dsn
    db_primary.execute(d.STREAM_SETUP)
    settings = h.install(
        dsn, [d.STREAM_TABLE], settings=h.settings_for(dsn, method="trigger"), slot=False
    )
    exchange = f"pgherald-test-outage-{uuid.uuid4().hex[:10]}"
    # Held short of its end until the broker is back, so the cut is mid-stream on a slow machine.
    writer = d.StreamWriter(dsn, EVENTS, STREAM_SECONDS, seed=seed, hold_at=EVENTS * 9 // 10)
    with ThreadedTcpProxy("127.0.0.1", 5672) as proxy, Consumer(exchange) as consumer:
        routing_admin.add_sink(
            settings,
            SINK,
            "amqp",
            options={
                "url": f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                "exchange": exchange,
                "timeout": 5,
            },
            max_attempts=1000,  # the outage must not dead-letter anything
        )
        routing_admin.subscribe(settings, SINK, [d.STREAM_WATCH])
        with h.capturing(settings) as capture:
            delivery = app.Delivery(settings, policy=FAST).start()

            def problem() -> str | None:
                if writer.error is not None:
                    return f"the stream failed: {writer.error!r}"
                if delivery.errors:
                    return f"delivery stopped: {delivery.errors[0]!r}"
                return h.capture_problem(capture)

            try:
                delivery.wait_ready()
                writer.start()
                d.wait_for(
                    lambda: consumer.count >= EVENTS * CUT_AFTER,
                    60,
                    lambda: f"only {consumer.count} messages arrived before the cut",
                    problem,
                )
                proxy.cut()
                cut_at = time.monotonic()
                arrived_at_cut = consumer.count
                time.sleep(1.0)  # what was already on its way lands
                arrived_early_in_cut = consumer.count
                while time.monotonic() - cut_at < CUT_SECONDS:
                    assert not problem(), problem()
                    time.sleep(0.2)
                arrived_in_cut = consumer.count - arrived_early_in_cut
                written_at_restore = writer.made
                proxy.restore()
                writer.release.set()
                restored_at = time.monotonic()
                writer.finish(60)
                h.catch_up(settings, alive=lambda: h.capture_problem(capture))
                d.wait_for(
                    lambda: d.delivery_statuses(settings, SINK)["delivered"] >= EVENTS,
                    60,
                    lambda: f"deliveries after the outage: {d.delivery_statuses(settings, SINK)}",
                    problem,
                )
                delivered_at = time.monotonic()
                d.wait_for(lambda: consumer.count >= EVENTS, 30, lambda: "consumer lags")
                time.sleep(0.5)  # duplicates still on their way
            finally:
                delivery.close()
        statuses = d.delivery_statuses(settings, SINK)
        arrivals = list(consumer.arrivals)

    truth = d.log_truth(settings, d.STREAM_WATCH)
    assert len(truth) == EVENTS == writer.made
    assert statuses == {"delivered": EVENTS}, statuses
    assert arrived_in_cut == 0, f"{arrived_in_cut} messages arrived through a cut proxy"
    assert arrived_at_cut < EVENTS * 0.9 and written_at_restore < EVENTS, (
        "the outage was not in the middle of the stream"
    )
    verdict = d.verdict(arrivals, truth)
    d.assert_verdict_can_fail(arrivals, truth, random.Random(seed))
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE outcome = 'retry'), count(DISTINCT delivery_id)"
            " FILTER (WHERE outcome = 'retry') FROM pgherald.delivery_attempts"
        ).fetchone()
    assert row is not None
    retries, retried = int(row[0]), int(row[1])
    assert retried > 0, "no delivery was retried: the outage was not felt"
    print(
        f"\namqp outage (seed {seed}): {verdict.events} events ({dict(writer.ops)}) on"
        f" {verdict.rows} rows; cut after {arrived_at_cut} arrived, {written_at_restore}"
        f" written at restore; {retries} failed attempts of {retried} deliveries;"
        f" {verdict.duplicates} duplicates; all delivered"
        f" {delivered_at - restored_at:.1f}s after the restore; {time.monotonic() - started:.1f}s"
        " in all"
    )
