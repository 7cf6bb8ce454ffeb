"""The Redis Streams sink against the real Redis on this machine's loopback (6379), with
stream names unique to the test run, and a proxy of the test's own for outages."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import pytest
import redis.asyncio as aioredis

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events.formats import FORMATS, Format
from pgherald.sinks.base import SinkConfig
from pgherald.sinks.redis import RedisStreamSink, from_config
from tests.integration.sink_events import change, message, messages
from tests.tcp_proxy import TcpProxy

REDIS = "redis://127.0.0.1:6379/0"
T = TypeVar("T")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A prefix unique to this test; its keys are removed afterwards. Fails loudly when
    Redis is not running."""
    name = f"pgherald-test-{uuid.uuid4().hex[:12]}"

    async def ping() -> None:
        async with aioredis.Redis.from_url(REDIS) as r:
            await r.ping()

    try:
        asyncio.run(ping())
    except Exception as exc:
        pytest.fail(f"Redis is not running on 127.0.0.1:6379 ({exc}); start it (./dev test does)")
    yield name

    async def clean() -> None:
        async with aioredis.Redis.from_url(REDIS) as r:
            keys = [k async for k in r.scan_iter(match=f"{name}*")]
            if keys:
                await r.delete(*keys)

    asyncio.run(clean())


def sink(stream: str, **options: Any) -> RedisStreamSink:
    return from_config(SinkConfig("streams", "redis", options={"stream": stream, **options}))


def run(body: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        async with aioredis.Redis.from_url(REDIS) as r:
            return await body(r)

    return asyncio.run(main())


async def entries(r: aioredis.Redis, stream: str) -> list[dict[str, bytes]]:
    """The stream's entries, field names decoded."""
    got = cast(list[tuple[bytes, dict[bytes, bytes]]], await r.xrange(stream))
    return [{k.decode(): v for k, v in fields.items()} for _id, fields in got]


def test_a_batch_lands_in_order_with_its_fields(prefix: str) -> None:
    events = [change(seq, row=seq % 3, op="insert" if seq < 3 else "update") for seq in range(8)]
    batch = messages(events)

    async def body(r: aioredis.Redis) -> None:
        s = sink(prefix)
        await s.start()
        try:
            assert await s.send(batch) == [None] * 8
        finally:
            await s.close()
        got = await entries(r, prefix)
        assert [e["id"].decode() for e in got] == [m.idempotency_key for m in batch]
        for entry, m in zip(got, batch, strict=True):
            assert set(entry) == {"event", "id", "op", "table"}
            assert entry["event"] == m.body
            assert entry["op"].decode() == m.event.op
            assert entry["table"].decode() == "public.orders"

    run(body)


def test_a_stream_per_table(prefix: str) -> None:
    batch = messages(
        [
            change(1, table="orders"),
            change(2, table="Zoë's items", schema="shop", watch="items"),
            change(3, table="orders"),
        ]
    )

    async def body(r: aioredis.Redis) -> None:
        s = sink(prefix + ".{schema}.{table}.{watch}")
        await s.start()
        assert await s.send(batch) == [None] * 3
        await s.close()
        orders = await entries(r, f"{prefix}.public.orders.orders")
        items = await entries(r, f"{prefix}.shop.Zoë's items.items")
        assert [e["id"].decode() for e in orders] == [
            batch[0].idempotency_key,
            batch[2].idempotency_key,
        ]
        assert [e["table"].decode() for e in items] == ["shop.Zoë's items"]

    run(body)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format(prefix: str, fmt: Format) -> None:
    m = message(change(1, op="delete"), fmt)

    async def body(r: aioredis.Redis) -> None:
        s = sink(prefix)
        assert await s.send([m]) == [None]  # send without start: it starts itself
        await s.close()
        [entry] = await entries(r, prefix)
        assert entry["event"] == m.body
        assert json.loads(entry["event"]) == json.loads(m.body)
        assert entry["id"].decode() == m.idempotency_key

    run(body)


def test_maxlen_trims_approximately_and_zero_keeps_everything(prefix: str) -> None:
    batch = messages([change(seq, row=seq) for seq in range(600)])

    async def body(r: aioredis.Redis) -> tuple[int, int]:
        trimmed, unbounded = sink(prefix + ".a", maxlen=10), sink(prefix + ".b", maxlen=0)
        for s in (trimmed, unbounded):
            for start in range(0, 600, 100):
                assert await s.send(batch[start : start + 100]) == [None] * 100
            await s.close()
        return await r.xlen(prefix + ".a"), await r.xlen(prefix + ".b")

    trimmed_len, unbounded_len = run(body)
    assert 10 <= trimmed_len <= 250
    assert unbounded_len == 600


def test_a_refused_append_is_permanent_for_that_message_only(prefix: str) -> None:
    batch = messages([change(1, table="good"), change(2, table="bad"), change(3, table="good")])

    async def body(r: aioredis.Redis) -> list[Any]:
        await r.set(f"{prefix}.bad", "a string, not a stream")
        s = sink(prefix + ".{table}")
        outcomes = await s.send(batch)
        await s.close()
        assert len(await entries(r, f"{prefix}.good")) == 2
        return outcomes

    outcomes = run(body)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentSinkError)
    assert "WRONGTYPE" in str(outcomes[1])


def test_outage_through_a_proxy_then_recovery(prefix: str) -> None:
    async def main() -> None:
        async with TcpProxy("127.0.0.1", 6379) as proxy:
            s = sink(prefix, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=2)
            await s.start()
            assert await s.send(messages([change(1), change(2)])) == [None, None]

            await proxy.cut()
            during = await s.send(messages([change(3), change(4)]))
            assert all(isinstance(o, RetryableSinkError) for o in during)
            assert "127.0.0.1" in str(during[0])

            await proxy.restore()
            assert await s.send(messages([change(3), change(4)])) == [None, None]

            # A connection dropped while idle is noticed and replaced on the next send.
            await proxy.cut()
            await proxy.restore()
            assert await s.send(messages([change(5)])) == [None]
            await s.close()

        async with aioredis.Redis.from_url(REDIS) as r:
            got = [e["id"].decode() for e in await entries(r, prefix)]
        assert got == [m.idempotency_key for m in messages([change(i) for i in range(1, 6)])]

    asyncio.run(main())


def test_a_hung_server_times_out(prefix: str) -> None:
    async def main() -> None:
        async with TcpProxy("127.0.0.1", 6379) as proxy:
            s = sink(prefix, url=f"redis://127.0.0.1:{proxy.port}/0", timeout=0.3)
            assert await s.send(messages([change(1)])) == [None]
            await proxy.stall()
            loop = asyncio.get_running_loop()
            started = loop.time()
            [error] = await s.send(messages([change(2)]))
            assert isinstance(error, RetryableSinkError)
            assert "Timeout" in str(error)
            assert loop.time() - started < 2
            await proxy.cut()
            await proxy.restore()
            assert await s.send(messages([change(3)])) == [None]
            await s.close()

    asyncio.run(main())


def test_nothing_listening_is_retryable() -> None:
    async def main() -> None:
        s = sink("x", url="redis://:hunter2@127.0.0.1:9/0", timeout=2)
        [error] = await s.send(messages([change(1)]))
        await s.close()
        assert isinstance(error, RetryableSinkError)
        assert "hunter2" not in str(error)
        assert "\n" not in str(error)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({}, "option 'stream' is required"),
        ({"stream": ""}, "option 'stream' must be a non-empty string"),
        ({"stream": "s.{tabel}"}, "unknown placeholder {tabel}"),
        ({"stream": "s.{table!r}"}, "unknown placeholder {table!r}"),
        ({"stream": "s.{table:>5}"}, "unknown placeholder {table:>5}"),
        ({"stream": "s.{0}"}, "unknown placeholder {0}"),
        ({"stream": "s.{table"}, "not a valid template"),
        ({"stream": "s", "url": "http://u:pw@x/"}, "must be a redis://"),
        ({"stream": "s", "maxlen": -1}, "'maxlen' must be at least 0"),
        ({"stream": "s", "maxlen": 1.5}, "'maxlen' must be a whole number"),
        ({"stream": "s", "timeout": 0}, "'timeout' must be at least"),
        ({"stream": "s", "channel": "x"}, "unknown option(s) 'channel'"),
    ],
)
def test_config_errors(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_config(SinkConfig("streams", "redis", options=options))
    assert complaint in str(caught.value)
    assert str(caught.value).startswith("sink 'streams' (redis): ")
    assert "pw" not in str(caught.value)


def test_config_defaults_and_literal_braces() -> None:
    s = from_config(SinkConfig("streams", "redis", options={"stream": "{{x}}.{table}"}))
    assert (s.url, s.maxlen, s.timeout) == ("redis://127.0.0.1:6379/0", 100_000, 10.0)
    assert s.stream_of(change(1)) == "{x}.orders"
