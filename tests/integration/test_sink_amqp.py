"""The AMQP sink against the machine's RabbitMQ (127.0.0.1:5672, guest/guest).

Every test declares its own exchange (a unique name, deleted at the end) and reads what
arrived with a plain consumer: an exclusive queue of its own bound to that exchange. An
outage is made with the test's own TCP proxy between the sink and the broker, never by
stopping the shared broker.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aio_pika.abc
import pytest

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import Operation
from pgherald.events.formats import FORMATS, Format, to_format
from pgherald.sinks.amqp import AmqpSink, from_config, routing_key_of
from pgherald.sinks.base import IDEMPOTENCY_HEADER, Message, SinkConfig
from tests.integration.sink_events import change, message, messages, run, unique
from tests.tcp_proxy import TcpProxy

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def broker() -> aio_pika.abc.AbstractConnection:
    try:
        return await aio_pika.connect(URL, timeout=5)
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ is not reachable at 127.0.0.1:5672 ({exc!r}): run .ci/services",
            pytrace=False,
        )


class Consumer:
    """A plain consumer: its own exclusive queue bound to the exchange, messages kept."""

    def __init__(self, queue: aio_pika.abc.AbstractQueue) -> None:
        self.queue = queue
        self.received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(self, incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
        await self.received.put(incoming)

    async def take(self, n: int, seconds: float = 10) -> list[aio_pika.abc.AbstractIncomingMessage]:
        async with asyncio.timeout(seconds):
            return [await self.received.get() for _ in range(n)]

    async def nothing_more(self, seconds: float = 0.3) -> None:
        await asyncio.sleep(seconds)
        assert self.received.empty(), "an unexpected message arrived"


@asynccontextmanager
async def exchange(
    exchange_type: str = "fanout",
    *,
    bindings: tuple[str, ...] = ("#",),
    consume: bool = True,
    **queue_args: Any,
) -> AsyncIterator[tuple[str, Consumer]]:
    """A fresh exchange name with a consumer bound to it (the exchange is declared here
    the way the sink declares it, so the queue can be bound before the sink starts)."""
    name = unique("x")
    connection = await broker()
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(
            name, aio_pika.ExchangeType(exchange_type), durable=True
        )
        queue = await channel.declare_queue(exclusive=True, arguments=queue_args or None)
        for binding in bindings:
            await queue.bind(ex, binding)
        consumer = Consumer(queue)
        if consume:
            await queue.consume(consumer.on_message, no_ack=True)
        yield name, consumer
    finally:
        try:
            cleanup = await connection.channel()
            await cleanup.exchange_delete(name)
        finally:
            await connection.close()


@asynccontextmanager
async def started(sink: AmqpSink) -> AsyncIterator[AmqpSink]:
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def sink_for(name: str, **options: Any) -> AmqpSink:
    return from_config(
        SinkConfig("amqp-test", "amqp", options={"url": URL, "exchange": name, **options})
    )


def test_a_batch_arrives_in_order_with_body_headers_and_routing_key() -> None:
    ops: tuple[Operation, ...] = ("insert", "update", "delete")
    events = [change(seq, row=seq % 7, op=ops[seq % 3]) for seq in range(1, 301)]
    batch = messages(events)

    async def main() -> None:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            assert await sink.send(batch) == [None] * len(batch)
            got = await consumer.take(len(batch))
            await consumer.nothing_more()
        for sent, incoming in zip(batch, got, strict=True):
            assert incoming.body == sent.body
            assert incoming.message_id == sent.idempotency_key
            assert incoming.headers == sent.headers
            assert incoming.headers[IDEMPOTENCY_HEADER] == sent.event.event_id
            assert incoming.content_type == "application/json"
            assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert incoming.routing_key == f"public.orders.{sent.event.op}"
            assert incoming.exchange == name
            assert incoming.app_id == "pgherald"
            assert incoming.type == sent.event.op

    run(main())


def test_a_plain_consumer_reads_the_simple_format_unchanged() -> None:
    events = [change(1, op="insert"), change(2, op="update"), change(3, op="delete")]

    async def main() -> list[dict[str, Any]]:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            assert await sink.send(messages(events, "simple")) == [None] * 3
            return [json.loads(m.body) for m in await consumer.take(3)]

    received = run(main())
    assert received == [to_format(e, "simple") for e in events]
    assert received[0] == {
        "table": "orders",
        "schema": "public",
        "operation": "INSERT",
        "new_record": {"id": 1, "name": "Zoë 1", "amount": "1.50"},
        "old_record": None,
    }
    assert received[1]["operation"] == "UPDATE"
    assert received[1]["old_record"] == {"id": 1, "name": "Zoë 1", "amount": "0.00"}
    assert received[2]["operation"] == "DELETE"
    assert received[2]["new_record"] is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_published_as_encoded(fmt: Format) -> None:
    sent = message(change(5, op="update"), fmt)

    async def main() -> aio_pika.abc.AbstractIncomingMessage:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            assert await sink.send([sent]) == [None]
            return (await consumer.take(1))[0]

    incoming = run(main())
    assert incoming.body == sent.body
    assert json.loads(incoming.body) == to_format(sent.event, fmt, source_uri="pgherald://test")
    assert incoming.content_type == sent.content_type
    assert incoming.content_type == (
        "application/cloudevents+json" if fmt == "cloudevents" else "application/json"
    )


def test_a_topic_exchange_routes_by_schema_table_and_operation() -> None:
    dotted = change(3, table="odd.name v2", op="insert")
    events = [
        change(1, table="orders", op="insert"),
        change(2, table="orders", op="delete"),
        change(4, table="items", op="delete", schema="shop"),
    ]

    bindings = ("public.orders.*", "*.*.delete", "public.odd_name v2.#")

    async def main() -> None:
        async with exchange("topic", bindings=bindings) as (name, orders):
            async with started(sink_for(name, exchange_type="topic")) as sink:
                outcomes = await sink.send(messages([*events, dotted]))
            assert outcomes == [None] * 4
            got = await orders.take(4)
        assert [m.routing_key for m in got] == [
            "public.orders.insert",
            "public.orders.delete",
            "shop.items.delete",
            "public.odd_name v2.insert",
        ]
        # A delete of public.orders matches two bindings of one queue: delivered once.
        await orders.nothing_more()

    run(main())
    assert routing_key_of(dotted) == "public.odd_name v2.insert"


def test_a_message_no_queue_takes_fails_alone_and_others_arrive() -> None:
    events = [
        change(1, table="orders"),
        change(2, table="nobody_listens"),
        change(3, table="orders"),
    ]

    async def main() -> None:
        async with exchange("topic", bindings=("public.orders.*",)) as (name, consumer):
            async with started(sink_for(name, exchange_type="topic")) as sink:
                outcomes = await sink.send(messages(events))
            assert outcomes[0] is None
            assert outcomes[2] is None
            assert isinstance(outcomes[1], RetryableSinkError)
            assert "no queue is bound" in str(outcomes[1])
            assert "public.nobody_listens.insert" in str(outcomes[1])
            got = await consumer.take(2)
            assert [m.message_id for m in got] == [events[0].event_id, events[2].event_id]
            # Not mandatory: the broker drops what nobody takes, and that counts as sent.
            async with started(sink_for(name, exchange_type="topic", mandatory=False)) as sink:
                assert await sink.send(messages(events)) == [None] * 3
            assert len(await consumer.take(2)) == 2

    run(main())


def test_a_nack_fails_that_message_alone() -> None:
    """A queue that is full (nobody consumes) and rejects publishes makes the broker nack."""
    events = [change(seq) for seq in range(1, 4)]
    full: dict[str, Any] = {"x-max-length": 1, "x-overflow": "reject-publish"}

    async def main() -> None:
        async with exchange(consume=False, **full) as (name, _), started(sink_for(name)) as sink:
            outcomes = await sink.send(messages(events))
            assert outcomes[0] is None
            for outcome in outcomes[1:]:
                assert isinstance(outcome, RetryableSinkError)
                assert "nack" in str(outcome)
            # The sink stays usable after a nack.
            assert sink.connected

    run(main())


def test_the_idempotency_key_is_the_same_on_a_resend() -> None:
    sent = message(change(9))

    async def main() -> list[aio_pika.abc.AbstractIncomingMessage]:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            assert await sink.send([sent]) == [None]
            assert await sink.send([sent]) == [None]
            return await consumer.take(2)

    first, second = run(main())
    assert first.message_id == second.message_id == sent.event.event_id
    assert first.headers[IDEMPOTENCY_HEADER] == second.headers[IDEMPOTENCY_HEADER]


def test_a_broker_outage_fails_sends_as_retryable_then_they_succeed() -> None:
    first, during, after = message(change(1)), message(change(2)), message(change(3))

    async def main() -> None:
        async with exchange() as (name, consumer), TcpProxy("127.0.0.1", 5672) as proxy:
            url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
            async with started(sink_for(name, url=url, timeout=2)) as sink:
                assert await sink.send([first]) == [None]
                await proxy.cut()
                began = time.monotonic()
                outcomes = await sink.send([during, during])
                assert time.monotonic() - began < 1.5, "a cut connection must fail fast"
                assert all(isinstance(o, RetryableSinkError) for o in outcomes), outcomes
                assert "guest:guest" not in str(outcomes[0])
                # Still down: connecting again is refused, still retryable.
                again = await sink.send([during])
                assert isinstance(again[0], RetryableSinkError)
                assert "cannot connect" in str(again[0])
                await proxy.restore()
                assert await sink.send([during, after]) == [None, None]
            got = await consumer.take(3)
            assert [m.message_id for m in got] == [
                first.idempotency_key,
                during.idempotency_key,
                after.idempotency_key,
            ]

    run(main())


def test_a_hanging_broker_times_out_as_retryable_then_recovers() -> None:
    sent = message(change(1))

    async def main() -> None:
        async with exchange() as (name, consumer), TcpProxy("127.0.0.1", 5672) as proxy:
            url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
            async with started(sink_for(name, url=url, timeout=0.5)) as sink:
                await proxy.stall()
                began = time.monotonic()
                outcome = (await sink.send([sent]))[0]
                assert time.monotonic() - began < 3
                assert isinstance(outcome, RetryableSinkError)
                await proxy.restore()
                assert await sink.send([sent]) == [None]
            # The stalled publish may or may not have reached the broker: a duplicate,
            # which the message id lets a consumer drop.
            got = await consumer.take(1)
            assert got[0].message_id == sent.idempotency_key

    run(main())


def test_a_connection_lost_while_confirms_are_awaited_fails_at_once() -> None:
    batch = messages([change(seq) for seq in range(1, 51)])

    async def main() -> None:
        async with exchange() as (name, consumer), TcpProxy("127.0.0.1", 5672) as proxy:
            url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
            async with started(sink_for(name, url=url, timeout=10)) as sink:
                await proxy.stall()
                sending = asyncio.create_task(sink.send(batch))
                await asyncio.sleep(0.3)
                assert not sending.done()
                began = time.monotonic()
                await proxy.cut()
                outcomes = await sending
                assert time.monotonic() - began < 2, "must not wait for the timeout"
                assert all(isinstance(o, RetryableSinkError) for o in outcomes), outcomes
                await proxy.restore()
                assert await sink.send(batch) == [None] * len(batch)
            got = await consumer.take(len(batch))
            assert [m.message_id for m in got] == [m.idempotency_key for m in batch]

    run(main())


def test_an_exchange_deleted_under_the_sink_is_declared_again() -> None:
    async def main() -> None:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            assert await sink.send([message(change(1))]) == [None]
            await consumer.take(1)
            cleanup = await consumer.queue.channel.get_underlay_channel()
            await cleanup.exchange_delete(name)
            (outcome,) = await sink.send([message(change(2))])
            assert isinstance(outcome, RetryableSinkError)
            # Declared again on the next send; the consumer binds its queue again.
            (outcome,) = await sink.send([message(change(2))])
            assert isinstance(outcome, RetryableSinkError)
            assert "no queue is bound" in str(outcome)
            await consumer.queue.bind(name, "#")
            assert await sink.send([message(change(2))]) == [None]
            assert (await consumer.take(1))[0].message_id == change(2).event_id

    run(main())


def test_a_broker_down_at_start_is_retryable_and_picked_up_later() -> None:
    sent = message(change(1))

    async def main() -> None:
        async with exchange() as (name, consumer), TcpProxy("127.0.0.1", 5672) as proxy:
            await proxy.cut()
            sink = sink_for(name, url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", timeout=2)
            with pytest.raises(RetryableSinkError, match="cannot connect"):
                await sink.start()
            await proxy.restore()
            try:
                assert await sink.send([sent]) == [None]
            finally:
                await sink.close()
            assert (await consumer.take(1))[0].body == sent.body

    run(main())


def test_wrong_credentials_are_retryable_and_not_shown() -> None:
    async def main() -> None:
        sink = sink_for(unique("x"), url="amqp://guest:s3cret-pw@127.0.0.1:5672/", timeout=5)
        with pytest.raises(RetryableSinkError) as caught:
            await sink.start()
        assert "s3cret-pw" not in str(caught.value)
        outcomes = await sink.send([message(change(1))])
        assert isinstance(outcomes[0], RetryableSinkError)
        assert "s3cret-pw" not in str(outcomes[0])
        await sink.close()

    run(main())


def test_an_exchange_of_another_type_is_refused_clearly() -> None:
    async def main() -> None:
        async with exchange("topic") as (name, _):
            sink = sink_for(name)  # fanout
            with pytest.raises(PermanentSinkError, match="fanout exchange"):
                await sink.start()
            # In send, a sink-wide refusal leaves the messages retryable (they are fine).
            outcomes = await sink.send([message(change(1))])
            assert isinstance(outcomes[0], RetryableSinkError)
            await sink.close()

    run(main())


def test_an_over_long_routing_key_fails_that_message_permanently() -> None:
    long_name = change(2, table="t" * 300, schema="s")
    events: list[Message] = [message(change(1)), message(long_name), message(change(3))]

    async def main() -> None:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            outcomes = await sink.send(events)
            assert outcomes[0] is None and outcomes[2] is None
            assert isinstance(outcomes[1], PermanentSinkError)
            assert len(await consumer.take(2)) == 2

    run(main())


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "option 'exchange' is required"),
        ({"exchange": ""}, "option 'exchange' must be a non-empty string"),
        ({"exchange": "x", "exchange_type": "direct"}, "must be one of fanout, topic"),
        ({"exchange": "x", "url": "http://host/"}, "must be an amqp:// or amqps:// URL"),
        ({"exchange": "x", "url": "amqp://host:99999/"}, "option 'url' is not a valid URL"),
        ({"exchange": "amq.topic"}, "the broker's own"),
        ({"exchange": "x" * 256}, "longer than 255 bytes"),
        ({"exchange": "x", "timeout": 0}, "option 'timeout' must be at least"),
        ({"exchange": "x", "mandatory": "perhaps"}, "option 'mandatory' must be true or false"),
        ({"exchange": "x", "queue": "q"}, "unknown option(s) 'queue'"),
    ],
)
def test_bad_options_get_one_clear_error(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_config(SinkConfig("broken", "amqp", options=options))
    assert error in str(caught.value)
    assert str(caught.value).startswith("sink 'broken' (amqp): ")


def test_defaults() -> None:
    sink = from_config(SinkConfig("s", "amqp", options={"exchange": "events"}))
    assert sink.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert sink.exchange_type == "fanout"
    assert sink.mandatory is True
    assert sink.strictly_ordered is False
    with_password = from_config(
        SinkConfig("s", "amqp", options={"exchange": "e", "url": "amqps://u:pw@h:5671/v?x=1"})
    )
    assert with_password._target == "amqps://h:5671/v"
