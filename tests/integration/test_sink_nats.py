"""The NATS sink against the machine's nats-server (127.0.0.1:4222, JetStream enabled).

Every test uses its own stream and subject prefix (unique names, the stream deleted at the
end) and reads what the stream holds. An outage is made with the test's own TCP proxy
between the sink and the server, never by stopping the shared server; the one test that
needs a server without JetStream starts a private nats-server of its own.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import nats
import nats.js
import nats.js.api
import nats.js.errors
import pytest
from nats.aio.client import Client

import pgherald.sinks.nats
from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import Operation
from pgherald.events.formats import FORMATS, Format, to_format
from pgherald.sinks.base import IDEMPOTENCY_HEADER, SinkConfig
from pgherald.sinks.nats import NatsSink, from_config, subject_token
from tests.integration.sink_events import change, message, messages, run, unique
from tests.tcp_proxy import TcpProxy

SERVER = "nats://127.0.0.1:4222"


@dataclass
class Place:
    """A test's own stream and subject prefix, and a connection to look into the stream."""

    stream: str
    prefix: str
    nc: Client
    js: nats.js.JetStreamContext

    async def stored(self) -> list[nats.js.api.RawStreamMsg]:
        info = await self.js.stream_info(self.stream)
        assert info.state.first_seq in (1, 0)
        return [
            await self.js.get_msg(self.stream, seq) for seq in range(1, info.state.last_seq + 1)
        ]

    async def count(self) -> int:
        info = await self.js.stream_info(self.stream)
        return info.state.messages

    def sink(self, **options: Any) -> NatsSink:
        return from_config(
            SinkConfig(
                "nats-test",
                "nats",
                options={
                    "servers": SERVER,
                    "stream": self.stream,
                    "subject_prefix": self.prefix,
                    **options,
                },
            )
        )


@asynccontextmanager
async def place() -> AsyncIterator[Place]:
    nc = Client()
    try:
        await nc.connect(SERVER, allow_reconnect=False, connect_timeout=5)
    except Exception as exc:
        pytest.fail(
            f"nats-server is not reachable at 127.0.0.1:4222 ({exc!r}): run .ci/services",
            pytrace=False,
        )
    here = Place(unique("stream"), unique("subjects"), nc, nc.jetstream(timeout=5))
    try:
        yield here
    finally:
        try:
            await here.js.delete_stream(here.stream)
        except nats.js.errors.NotFoundError:
            pass
        finally:
            await nc.close()


@asynccontextmanager
async def started(sink: NatsSink) -> AsyncIterator[NatsSink]:
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def test_a_batch_is_stored_in_order_with_body_headers_and_subject() -> None:
    ops: tuple[Operation, ...] = ("insert", "update", "delete")
    tables = [("public", "orders"), ("public", "items"), ("shop", "orders")]
    events = [
        change(
            seq, row=seq % 7, op=ops[seq % 3], schema=tables[seq % 3][0], table=tables[seq % 3][1]
        )
        for seq in range(1, 301)
    ]
    batch = messages(events)

    async def main() -> None:
        async with place() as here, started(here.sink()) as sink:
            assert await sink.send(batch) == [None] * len(batch)
            # A plain JetStream consumer of one table sees that table's events, in order.
            sub = await here.js.pull_subscribe(f"{here.prefix}.shop.*", stream=here.stream)
            fetched = await sub.fetch(len(batch), timeout=5)
            stored = await here.stored()
        assert [m.data for m in fetched] == [m.body for m in batch if m.event.schema == "shop"]
        assert len(stored) == len(batch)
        for sent, got in zip(batch, stored, strict=True):
            e = sent.event
            assert got.data == sent.body
            assert got.subject == f"{here.prefix}.{e.schema}.{e.table}"
            assert got.headers is not None
            assert got.headers["Nats-Msg-Id"] == e.event_id
            assert got.headers[IDEMPOTENCY_HEADER] == e.event_id
            assert got.headers["Content-Type"] == "application/json"
            assert got.headers["pgherald-operation"] == e.op
            assert got.headers["pgherald-table"] == f"{e.schema}.{e.table}"
            assert got.headers["pgherald-watch"] == e.watch

    run(main())


def test_a_batch_larger_than_the_pending_limit_goes_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pgherald.sinks.nats, "_MAX_PENDING", 7)
    batch = messages([change(seq) for seq in range(1, 31)])

    async def main() -> None:
        async with place() as here, started(here.sink(timeout=5)) as sink:
            assert await sink.send(batch) == [None] * len(batch)
            assert [m.data for m in await here.stored()] == [m.body for m in batch]

    run(main())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_stored_as_encoded(fmt: Format) -> None:
    sent = message(change(5, op="update"), fmt)

    async def main() -> nats.js.api.RawStreamMsg:
        async with place() as here, started(here.sink()) as sink:
            assert await sink.send([sent]) == [None]
            (stored,) = await here.stored()
            return stored

    stored = run(main())
    assert stored.data == sent.body
    assert stored.data is not None
    assert json.loads(stored.data) == to_format(sent.event, fmt, source_uri="pgherald://test")
    assert stored.headers is not None
    assert stored.headers["Content-Type"] == sent.content_type


def test_the_server_drops_a_resent_event() -> None:
    """A retry of events the stream already holds stores nothing new: the server
    recognises them by Nats-Msg-Id, and a consumer sees each once."""
    old = messages([change(1), change(2)])
    new = messages([change(3)])

    async def main() -> None:
        async with place() as here, started(here.sink()) as sink:
            assert await sink.send(old) == [None, None]
            assert await here.count() == 2
            # The same events again, around a new one: acked (delivered), not stored.
            assert await sink.send([old[0], *new, old[1]]) == [None, None, None]
            stored = await here.stored()
            assert [m.data for m in stored] == [old[0].body, old[1].body, new[0].body]
            # The server does the dropping: a raw publish with the same id says so.
            ack = await here.js.publish(
                f"{here.prefix}.public.orders",
                b"not stored",
                headers={"Nats-Msg-Id": old[0].idempotency_key},
            )
            assert ack.duplicate is True
            assert await here.count() == 3

    run(main())


def test_the_stream_is_created_on_start_and_an_existing_one_is_kept() -> None:
    async def main() -> None:
        async with place() as here:
            async with started(here.sink(duplicate_window=30)):
                info = await here.js.stream_info(here.stream)
            assert info.config.subjects == [f"{here.prefix}.>"]
            assert info.config.duplicate_window == 30
            assert info.config.storage == nats.js.api.StorageType.FILE
            # Started again: the stream is there and is left as it is.
            await here.js.update_stream(info.config, max_msgs=1000)
            async with started(here.sink()) as sink:
                assert await sink.send([message(change(1))]) == [None]
            info = await here.js.stream_info(here.stream)
            assert info.config.max_msgs == 1000
            assert info.config.duplicate_window == 30

    run(main())


def test_names_become_valid_subject_tokens() -> None:
    odd = change(1, schema="my schema", table="odd.name v2*>\t")
    plain_unicode = change(2, table="Zoë")
    no_schema = change(3, schema="", table="channel.x")

    async def main() -> None:
        async with place() as here, started(here.sink()) as sink:
            assert await sink.send(messages([odd, plain_unicode, no_schema])) == [None] * 3
            stored = await here.stored()
            assert [m.subject for m in stored] == [
                f"{here.prefix}.my_schema.odd_name_v2___",
                f"{here.prefix}.public.Zoë",
                f"{here.prefix}.channel_x",
            ]
            assert stored[0].headers is not None
            assert unquote(stored[0].headers["pgherald-table"]) == "my schema.odd.name v2*>\t"
            assert stored[1].headers is not None
            assert stored[1].headers["pgherald-table"] == "public.Zo%C3%AB"
            assert unquote(stored[1].headers["pgherald-watch"]) == "Zoë"

    run(main())
    assert subject_token("") == "_"
    assert subject_token("a.b") == "a_b"


def test_a_stream_deleted_under_the_sink_is_made_again() -> None:
    async def main() -> None:
        async with place() as here, started(here.sink()) as sink:
            assert await sink.send([message(change(1))]) == [None]
            await here.js.delete_stream(here.stream)
            (outcome,) = await sink.send([message(change(2))])
            assert isinstance(outcome, RetryableSinkError)
            assert await sink.send([message(change(2))]) == [None]
            assert [m.headers["Nats-Msg-Id"] for m in await here.stored() if m.headers] == [
                change(2).event_id
            ]

    run(main())


def test_a_stream_that_does_not_take_the_subjects_is_a_clear_retryable_error() -> None:
    async def main() -> None:
        async with place() as here:
            await here.js.add_stream(name=here.stream, subjects=[f"{here.prefix}-other.>"])
            async with started(here.sink()) as sink:
                (outcome,) = await sink.send([message(change(1))])
            assert isinstance(outcome, RetryableSinkError)
            assert "no JetStream stream answered" in str(outcome)
            assert await here.count() == 0

    run(main())


def test_an_event_larger_than_max_payload_fails_alone_and_for_good() -> None:
    big = message(change(2, name="x" * 1_100_000))

    async def main() -> None:
        async with place() as here, started(here.sink()) as sink:
            outcomes = await sink.send([message(change(1)), big, message(change(3))])
            assert outcomes[0] is None and outcomes[2] is None
            assert isinstance(outcomes[1], PermanentSinkError)
            assert "max_payload" in str(outcomes[1])
            assert await here.count() == 2

    run(main())


def test_a_server_outage_fails_sends_as_retryable_then_they_succeed() -> None:
    first, during, after = message(change(1)), message(change(2)), message(change(3))

    async def main() -> None:
        async with place() as here, TcpProxy("127.0.0.1", 4222) as proxy:
            server = f"nats://127.0.0.1:{proxy.port}"
            async with started(here.sink(servers=server, timeout=2)) as sink:
                assert await sink.send([first]) == [None]
                await proxy.cut()
                began = time.monotonic()
                outcomes = await sink.send([during, during])
                assert time.monotonic() - began < 1.5, "a cut connection must fail fast"
                assert all(isinstance(o, RetryableSinkError) for o in outcomes), outcomes
                again = await sink.send([during])
                assert isinstance(again[0], RetryableSinkError)
                assert "cannot connect" in str(again[0])
                await proxy.restore()
                assert await sink.send([during, after]) == [None, None]
            stored = await here.stored()
            assert [m.data for m in stored] == [first.body, during.body, after.body]

    run(main())


def test_a_hanging_server_times_out_and_the_resend_is_not_stored_twice() -> None:
    sent = message(change(1))

    async def main() -> None:
        async with place() as here, TcpProxy("127.0.0.1", 4222) as proxy:
            server = f"nats://127.0.0.1:{proxy.port}"
            async with started(here.sink(servers=server, timeout=0.5)) as sink:
                await proxy.stall()
                began = time.monotonic()
                (outcome,) = await sink.send([sent])
                assert time.monotonic() - began < 3
                assert isinstance(outcome, RetryableSinkError)
                # The stalled publish is still in the proxy; it may reach the server now.
                await proxy.restore()
                assert await sink.send([sent]) == [None]
            await asyncio.sleep(0.2)
            assert [m.data for m in await here.stored()] == [sent.body]

    run(main())


def test_a_server_down_at_start_is_retryable_and_picked_up_later() -> None:
    sent = message(change(1))

    async def main() -> None:
        async with place() as here, TcpProxy("127.0.0.1", 4222) as proxy:
            await proxy.cut()
            sink = here.sink(servers=f"nats://u:s3cret-pw@127.0.0.1:{proxy.port}", timeout=2)
            with pytest.raises(RetryableSinkError, match="cannot connect") as caught:
                await sink.start()
            assert "s3cret-pw" not in str(caught.value)
            await proxy.restore()
            # The server has no users configured, so it takes these credentials.
            try:
                assert await sink.send([sent]) == [None]
            finally:
                await sink.close()
            assert [m.data for m in await here.stored()] == [sent.body]

    run(main())


def test_a_connection_lost_while_acks_are_awaited_fails_at_once() -> None:
    batch = messages([change(seq) for seq in range(1, 51)])

    async def main() -> None:
        async with place() as here, TcpProxy("127.0.0.1", 4222) as proxy:
            server = f"nats://127.0.0.1:{proxy.port}"
            async with started(here.sink(servers=server, timeout=10)) as sink:
                await proxy.stall()
                sending = asyncio.create_task(sink.send(batch))
                await asyncio.sleep(0.3)
                assert not sending.done()
                began = time.monotonic()
                await proxy.cut()
                outcomes = await sending
                assert time.monotonic() - began < 2, "must not wait for the timeout"
                assert all(isinstance(o, RetryableSinkError) for o in outcomes), outcomes
                assert "connection lost" in str(outcomes[0])
                await proxy.restore()
                assert await sink.send(batch) == [None] * len(batch)
            assert [m.data for m in await here.stored()] == [m.body for m in batch]

    run(main())


@pytest.fixture
def server_without_jetstream(tmp_path: Any) -> Iterator[str]:
    program = shutil.which("nats-server") or "/usr/sbin/nats-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [program, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("a private nats-server did not start", pytrace=False)
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_server_without_jetstream_is_refused_clearly(server_without_jetstream: str) -> None:
    async def main() -> None:
        sink = from_config(
            SinkConfig(
                "s", "nats", options={"servers": server_without_jetstream, "stream": "events"}
            )
        )
        with pytest.raises(PermanentSinkError, match="JetStream is not enabled"):
            await sink.start()
        (outcome,) = await sink.send([message(change(1))])
        assert isinstance(outcome, RetryableSinkError)
        await sink.close()

    run(main())


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "option 'stream' is required"),
        ({"stream": "a.b"}, "cannot hold dots"),
        ({"stream": "a b"}, "cannot hold dots"),
        ({"stream": "s", "servers": "http://h:4222"}, "must be a nats://"),
        ({"stream": "s", "servers": " , "}, "at least one server"),
        ({"stream": "s", "servers": "nats://h:99999"}, "is not a valid URL"),
        ({"stream": "s", "subject_prefix": "a..b"}, "non-empty tokens"),
        ({"stream": "s", "subject_prefix": "a.*"}, "without wildcards"),
        ({"stream": "s", "subject_prefix": "a b"}, "without wildcards"),
        ({"stream": "s", "subject_prefix": "$JS"}, "are the server's"),
        ({"stream": "s", "timeout": -1}, "option 'timeout' must be at least"),
        ({"stream": "s", "duplicate_window": "long"}, "must be a number"),
        ({"stream": "s", "subject": "x"}, "unknown option(s) 'subject'"),
    ],
)
def test_bad_options_get_one_clear_error(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_config(SinkConfig("broken", "nats", options=options))
    assert error in str(caught.value)
    assert str(caught.value).startswith("sink 'broken' (nats): ")


def test_defaults_and_several_servers() -> None:
    sink = from_config(SinkConfig("s", "nats", options={"stream": "events"}))
    assert sink.servers == ["nats://127.0.0.1:4222"]
    assert sink.subject_prefix == "pgherald"
    assert sink.duplicate_window == 120
    assert sink.subject(change(1)) == "pgherald.public.orders"
    several = from_config(
        SinkConfig(
            "s",
            "nats",
            options={
                "stream": "events",
                "servers": "nats://a:4222, tls://u:pw@b:4222",
                "subject_prefix": "acme.cdc",
            },
        )
    )
    assert several.servers == ["nats://a:4222", "tls://u:pw@b:4222"]
    assert several.subject(change(1)) == "acme.cdc.public.orders"
    assert "pw" not in several._target
    token = from_config(
        SinkConfig("s", "nats", options={"stream": "e", "servers": "nats://s3cret-token@h:4222"})
    )
    assert token._target == "nats://h:4222"
    assert token._secrets == ["s3cret-token"]
