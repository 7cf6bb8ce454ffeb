"""The AMQP sink's own frames against the real broker: bodies larger than a frame, and a
batch of many messages written as one buffer, arrive whole and in order."""

from __future__ import annotations

from tests.integration.sink_events import change, message, messages, run
from tests.integration.test_sink_amqp import exchange, sink_for, started


def test_a_body_larger_than_a_frame_arrives_whole() -> None:
    big = message(change(1, name="x" * 300_000))  # RabbitMQ's frames are 128 KiB
    small = message(change(2))

    async def main() -> None:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            assert await sink.send([big, small, big]) == [None] * 3
            got = await consumer.take(3)
            assert [m.body for m in got] == [big.body, small.body, big.body]

    run(main())


def test_many_batches_arrive_in_order_with_their_confirms() -> None:
    batch = messages([change(seq, row=seq % 11) for seq in range(1, 2001)])

    async def main() -> None:
        async with exchange() as (name, consumer), started(sink_for(name)) as sink:
            for start in range(0, len(batch), 500):
                assert await sink.send(batch[start : start + 500]) == [None] * 500
            got = await consumer.take(len(batch), seconds=30)
            assert [m.message_id for m in got] == [m.idempotency_key for m in batch]
            assert [m.body for m in got] == [m.body for m in batch]

    run(main())
