"""The MQTT sink against the real Mosquitto on this machine's loopback (1883), with topics
unique to the test run, a real subscriber, and a proxy of the test's own for outages."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt
import psutil
import pytest

from pgherald.errors import ConfigError, RetryableSinkError
from pgherald.events.formats import FORMATS, Format
from pgherald.sinks.base import Message, Outcome, SinkConfig
from pgherald.sinks.mqtt import MqttSink, from_config
from tests.integration.sink_events import change, message, messages
from tests.tcp_proxy import TcpProxy

BROKER = ("127.0.0.1", 1883)


def unique_prefix() -> str:
    return f"pgherald-test/{uuid.uuid4().hex[:12]}"


def sink(prefix: str, **options: Any) -> MqttSink:
    return from_config(
        SinkConfig("broker", "mqtt", options={"topic_prefix": prefix, "timeout": 3, **options})
    )


class Subscriber:
    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.got: list[aiomqtt.Message] = []

    async def take(self, count: int, within: float = 5.0) -> list[aiomqtt.Message]:
        """The first ``count`` messages (in arrival order); fails if they do not come."""

        async def collect() -> None:
            async for received in self.client.messages:
                self.got.append(received)
                if len(self.got) >= count:
                    return

        if len(self.got) < count:
            await asyncio.wait_for(collect(), within)
        taken, self.got = self.got[:count], self.got[count:]
        return taken

    async def nothing_more(self, wait: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            await self.take(1, wait)


@asynccontextmanager
async def subscriber(prefix: str) -> AsyncIterator[Subscriber]:
    """A v5 subscriber of everything under ``prefix``; fails loudly without a broker."""
    client = aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5, timeout=5)
    try:
        await client.__aenter__()
    except aiomqtt.MqttError as exc:
        pytest.fail(f"Mosquitto is not running on 127.0.0.1:1883 ({exc}); ./dev test starts it")
    try:
        await client.subscribe(f"{prefix}/#", qos=1)
        yield Subscriber(client)
    finally:
        await client.__aexit__(None, None, None)


def user_properties(received: aiomqtt.Message) -> dict[str, str]:
    props = received.properties
    return dict(getattr(props, "UserProperty", []) or [])


async def send(s: MqttSink, batch: Sequence[Message]) -> list[Outcome]:
    await s.start()
    return await s.send(batch)


def test_a_batch_arrives_in_order_with_topic_body_and_headers() -> None:
    prefix = unique_prefix()
    events = [change(seq, row=seq % 3, op="insert" if seq < 3 else "update") for seq in range(30)]
    events.append(change(30, schema="sales", table="line+items/#1", watch="li"))
    batch = messages(events)

    async def main() -> None:
        async with subscriber(prefix) as sub:
            s = sink(prefix)
            assert await send(s, batch) == [None] * 31
            got = await sub.take(31)
            await s.close()
            await sub.nothing_more()
        assert [r.payload for r in got] == [m.body for m in batch]
        for received, m in zip(got[:30], batch, strict=False):
            assert received.topic.value == f"{prefix}/public/orders"
            assert received.qos == 1 and received.retain is False
            assert user_properties(received) == m.headers
            assert received.properties is not None
            assert getattr(received.properties, "ContentType", None) == "application/json"
        assert got[30].topic.value == f"{prefix}/sales/line_items__1"
        assert user_properties(got[30])["Idempotency-Key"] == batch[30].idempotency_key

    asyncio.run(main())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format(fmt: Format) -> None:
    prefix = unique_prefix()
    m = message(change(1, op="update"), fmt)

    async def main() -> None:
        async with subscriber(prefix) as sub:
            s = sink(prefix)
            assert await send(s, [m]) == [None]
            [received] = await sub.take(1)
            await s.close()
        assert received.payload == m.body
        assert isinstance(received.payload, bytes)
        assert json.loads(received.payload) == json.loads(m.body)
        assert received.properties is not None
        assert getattr(received.properties, "ContentType", None) == m.content_type
        assert user_properties(received)["Idempotency-Key"] == m.idempotency_key

    asyncio.run(main())


def test_mqtt_3_1_1_has_no_headers_but_delivers() -> None:
    prefix = unique_prefix()
    batch = messages([change(1), change(2, row=2)])

    async def main() -> None:
        async with subscriber(prefix) as sub:
            s = sink(prefix, protocol="3.1.1", username="someone", password="pw")
            assert await send(s, batch) == [None, None]
            got = await sub.take(2)
            await s.close()
        assert [r.payload for r in got] == [m.body for m in batch]
        assert all(user_properties(r) == {} for r in got)

    asyncio.run(main())


def test_outage_through_a_proxy_then_recovery() -> None:
    prefix = unique_prefix()

    async def main() -> None:
        async with subscriber(prefix) as sub, TcpProxy(*BROKER) as proxy:
            s = sink(prefix, port=proxy.port)
            assert await send(s, messages([change(1), change(2)])) == [None, None]
            assert len(await sub.take(2)) == 2

            await proxy.cut()
            loop = asyncio.get_running_loop()
            started = loop.time()
            during = await s.send(messages([change(3), change(4)]))
            assert all(isinstance(o, RetryableSinkError) for o in during)
            assert "127.0.0.1" in str(during[0])
            assert loop.time() - started < 2  # noticed at once, not by timeout
            assert await s.send(messages([change(3)])) != [None]  # still down

            await proxy.restore()
            after = messages([change(3), change(4)])
            assert await s.send(after) == [None, None]
            assert [r.payload for r in await sub.take(2)] == [m.body for m in after]

            # A connection dropped while idle is replaced on the next send.
            await proxy.cut()
            await proxy.restore()
            assert await s.send(messages([change(5)])) == [None]
            assert len(await sub.take(1)) == 1
            await s.close()

    asyncio.run(main())


def test_a_batch_larger_than_the_window_arrives_whole_and_in_order() -> None:
    prefix = unique_prefix()
    batch = messages([change(seq, row=seq) for seq in range(250)])

    async def main() -> None:
        async with subscriber(prefix) as sub:
            s = sink(prefix)
            assert await send(s, batch) == [None] * 250
            got = await sub.take(250)
            await s.close()
        assert [r.payload for r in got] == [m.body for m in batch]

    asyncio.run(main())


def test_a_cut_in_the_middle_of_a_batch() -> None:
    """What is reported delivered did arrive; the rest is retryable, and arrives on retry."""
    prefix = unique_prefix()
    # Fewer than Mosquitto's default max_queued_messages (1000), past which the broker
    # drops QoS 1 messages for a subscriber that lags behind.
    batch = messages([change(seq, row=seq) for seq in range(800)])

    async def main() -> None:
        async with subscriber(prefix) as sub, TcpProxy(*BROKER) as proxy:
            s = sink(prefix, port=proxy.port)
            assert await send(s, batch[:1]) == [None]
            sending = asyncio.ensure_future(s.send(batch))
            received = [r.payload for r in await sub.take(6)]  # the first, and 5 of the batch
            await proxy.cut()
            outcomes = await sending
            delivered = [m for m, o in zip(batch, outcomes, strict=True) if o is None]
            failed = [m for m, o in zip(batch, outcomes, strict=True) if o is not None]
            assert delivered and failed
            assert all(isinstance(o, RetryableSinkError) for o in outcomes if o is not None)
            # Acknowledged ones are a prefix of the batch: order is kept.
            assert delivered == batch[: len(delivered)]
            await proxy.restore()
            assert await s.send(failed) == [None] * len(failed)
            await s.close()
            async with asyncio.timeout(10):
                while not {m.body for m in batch} <= set(received):
                    received += [r.payload for r in await sub.take(1)]

    asyncio.run(main())


def test_a_hung_broker_times_out_and_the_next_batch_reconnects() -> None:
    prefix = unique_prefix()

    async def main() -> None:
        async with subscriber(prefix) as sub, TcpProxy(*BROKER) as proxy:
            s = sink(prefix, port=proxy.port, timeout=0.5)
            assert await send(s, messages([change(1)])) == [None]
            await proxy.stall()
            loop = asyncio.get_running_loop()
            started = loop.time()
            [error] = await s.send(messages([change(2)]))
            assert isinstance(error, RetryableSinkError)
            assert "no PUBACK within 0.5s" in str(error)
            assert loop.time() - started < 3
            # Connecting to a hung broker times out too.
            [error] = await s.send(messages([change(2)]))
            assert isinstance(error, RetryableSinkError)
            await proxy.cut()
            await proxy.restore()
            assert await s.send(messages([change(3)])) == [None]
            await s.close()
            # The stalled message may or may not have reached the broker; change(3) did.
            seen: list[str] = []
            wanted = message(change(3)).idempotency_key
            while wanted not in seen:
                [received] = await sub.take(1)
                seen.append(user_properties(received)["Idempotency-Key"])
            assert seen[0] == message(change(1)).idempotency_key

    asyncio.run(main())


def test_failed_connects_leave_no_sockets_behind() -> None:
    prefix = unique_prefix()

    def client_sockets(port: int) -> int:
        """Our sockets connected to the proxy (the sink's side of its connections)."""
        return sum(
            1
            for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port
        )

    async def main() -> None:
        async with TcpProxy(*BROKER) as proxy:
            s = sink(prefix, port=proxy.port, timeout=0.2)
            assert await send(s, messages([change(1)])) == [None]
            await proxy.stall()
            for _ in range(5):
                [error] = await s.send(messages([change(1)]))
                assert isinstance(error, RetryableSinkError)
            await asyncio.sleep(0.05)
            assert client_sockets(proxy.port) == 0
            await s.close()

    asyncio.run(main())


def test_nothing_listening_is_retryable() -> None:
    async def main() -> None:
        s = sink("x", port=9, username="u", password="hunter2")
        [error] = await s.send(messages([change(1)]))
        await s.close()
        assert isinstance(error, RetryableSinkError)
        assert "cannot connect" in str(error) and "hunter2" not in str(error)

    asyncio.run(main())


def test_topics() -> None:
    s = sink("acme/cdc")
    assert s.topic_of(change(1)) == "acme/cdc/public/orders"
    assert s.topic_of(change(1, schema="a/b", table="c+d#e")) == "acme/cdc/a_b/c_d_e"
    assert s.topic_of(change(1, schema="", table="my_query")) == "acme/cdc/my_query"


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"topic_prefix": ""}, "'topic_prefix' must be a non-empty topic"),
        ({"topic_prefix": "a/+/b"}, "without +, # or NUL"),
        ({"topic_prefix": "a/#"}, "without +, # or NUL"),
        ({"topic_prefix": "$SYS/x"}, "must not start with $"),
        ({"topic_prefix": "a/"}, "must not have empty levels"),
        ({"topic_prefix": "a//b"}, "must not have empty levels"),
        ({"port": 0}, "'port' must be at least 1"),
        ({"port": 70000}, "'port' must be at most 65535"),
        ({"port": "x"}, "'port' must be a number"),
        ({"host": ""}, "'host' must be a non-empty string"),
        ({"password": "pw"}, "'password' needs option 'username'"),
        ({"protocol": "4"}, '\'protocol\' must be "5" or "3.1.1"'),
        ({"protocol": 3}, '\'protocol\' must be "5" or "3.1.1"'),
        ({"timeout": 0}, "'timeout' must be at least"),
        ({"qos": 2}, "unknown option(s) 'qos'"),
    ],
)
def test_config_errors(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_config(SinkConfig("broker", "mqtt", options=options))
    assert complaint in str(caught.value)
    assert str(caught.value).startswith("sink 'broker' (mqtt): ")
    assert "pw" not in str(caught.value).replace("'password'", "")


def test_config_defaults() -> None:
    s = from_config(SinkConfig("broker", "mqtt", options={"protocol": 5}))
    assert (s.host, s.port, s.topic_prefix, s.protocol) == ("127.0.0.1", 1883, "pgherald", "5")
    assert (s.username, s.client_id, s.timeout, s.keepalive) == (None, None, 10.0, 60)
