"""The webhook sink against a real HTTP server run by the test (stdlib ``http.server`` in a
thread): bodies, headers, signature, classification of answers, timeouts, order and outages."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import pytest

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events.formats import FORMATS, Format
from pgherald.sinks.base import Message, Outcome, SinkConfig
from pgherald.sinks.webhook import WebhookSink, from_config, parse_retry_after
from tests.integration.sink_events import change, message, messages
from tests.tcp_proxy import TcpProxy


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    started: float
    ended: float = 0.0


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0


class Receiver:
    """An HTTP server that records every request and answers as ``reply`` says."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.reply: Callable[[Request], Reply] = lambda request: Reply()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = Request(
                    self.path, dict(self.headers.items()), self.rfile.read(length), time.monotonic()
                )
                with receiver._lock:
                    receiver.requests.append(request)
                    receiver.in_flight += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                reply = receiver.reply(request)
                time.sleep(reply.delay)
                with receiver._lock:
                    receiver.in_flight -= 1
                request.ended = time.monotonic()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def sink(url: str, **options: Any) -> WebhookSink:
    strictly = options.pop("strictly_ordered", False)
    return from_config(
        SinkConfig("hook", "webhook", options={"url": url, **options}, strictly_ordered=strictly)
    )


def deliver(webhook: WebhookSink, *batches: Sequence[Message]) -> list[list[Outcome]]:
    async def main() -> list[list[Outcome]]:
        await webhook.start()
        try:
            return [await webhook.send(batch) for batch in batches]
        finally:
            await webhook.close()

    return asyncio.run(main())


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """The receiver's check, exactly as docs/reference/sinks.md shows it."""
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


def test_posts_each_event_with_its_body_headers_and_signature(receiver: Receiver) -> None:
    batch = messages([change(1, row=1), change(2, row=2, op="update"), change(3, row=1)])
    webhook = sink(receiver.url, secret="s3cret", headers={"Authorization": "Bearer t"})

    [outcomes] = deliver(webhook, batch)

    assert outcomes == [None, None, None]
    assert len(receiver.requests) == 3
    by_key = {r.headers["Idempotency-Key"]: r for r in receiver.requests}
    assert set(by_key) == {m.idempotency_key for m in batch}
    for m in batch:
        got = by_key[m.idempotency_key]
        assert got.path == "/hook"
        assert got.body == m.body
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["pgherald-watch"] == "orders"
        assert got.headers["pgherald-operation"] == m.event.op
        assert got.headers["pgherald-table"] == "public.orders"
        assert got.headers["Authorization"] == "Bearer t"
        assert verify(b"s3cret", got.body, got.headers["X-Pgherald-Signature"])
        assert not verify(b"other", got.body, got.headers["X-Pgherald-Signature"])
        assert not verify(b"s3cret", got.body + b" ", got.headers["X-Pgherald-Signature"])
    # Row 1's two events arrived in log order.
    row1 = [r.headers["Idempotency-Key"] for r in receiver.requests if b'"id":1,' in r.body]
    assert row1 == [batch[0].idempotency_key, batch[2].idempotency_key]


def test_unsigned_without_secret_and_names_percent_encoded(receiver: Receiver) -> None:
    event = change(1, schema="sales", table="Zoë/ü%", watch="zoé")
    deliver(sink(receiver.url), [message(event)])

    [got] = receiver.requests
    assert "X-Pgherald-Signature" not in got.headers
    assert unquote(got.headers["pgherald-table"]) == "sales.Zoë/ü%"
    assert unquote(got.headers["pgherald-watch"]) == "zoé"
    assert got.headers["pgherald-table"].isascii()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format(receiver: Receiver, fmt: Format) -> None:
    m = message(change(1, op="update"), fmt)
    assert deliver(sink(receiver.url), [m]) == [[None]]
    [got] = receiver.requests
    assert got.body == m.body
    assert json.loads(got.body) == json.loads(m.body)
    expected = "application/cloudevents+json" if fmt == "cloudevents" else "application/json"
    assert got.headers["Content-Type"] == expected
    assert got.headers["Idempotency-Key"] == m.idempotency_key


@pytest.mark.parametrize("fmt", ["pgherald", "cloudevents"])
def test_batch_mode_posts_one_json_array(receiver: Receiver, fmt: Format) -> None:
    batch = messages([change(i, row=i % 2) for i in range(1, 6)], fmt)
    webhook = sink(receiver.url, batch=True, secret="k")

    [outcomes] = deliver(webhook, batch)
    deliver(webhook, batch)  # the same batch again (a retry)

    assert outcomes == [None] * 5
    first, again = receiver.requests
    assert first.body == b"[" + b",".join(m.body for m in batch) + b"]"
    assert json.loads(first.body) == [json.loads(m.body) for m in batch]
    assert verify(b"k", first.body, first.headers["X-Pgherald-Signature"])
    assert first.headers["pgherald-event-count"] == "5"
    expected = "application/cloudevents-batch+json" if fmt == "cloudevents" else "application/json"
    assert first.headers["Content-Type"] == expected
    assert first.headers["Idempotency-Key"].startswith("batch-")
    assert again.headers["Idempotency-Key"] == first.headers["Idempotency-Key"]


def test_batch_mode_failure_counts_for_every_event(receiver: Receiver) -> None:
    receiver.reply = lambda request: Reply(422, body=b"no thanks")
    [outcomes] = deliver(sink(receiver.url, batch=True), messages([change(1), change(2)]))
    assert all(isinstance(o, PermanentSinkError) for o in outcomes)
    assert "422" in str(outcomes[0]) and "no thanks" in str(outcomes[0])


def test_503_with_retry_after_then_200(receiver: Receiver) -> None:
    answers = iter([Reply(503, {"Retry-After": "7"}, b"busy"), Reply(200)])
    receiver.reply = lambda request: next(answers)
    m = message(change(1))
    webhook = sink(receiver.url)

    first, second = deliver(webhook, [m], [m])

    [error] = first
    assert isinstance(error, RetryableSinkError)
    assert error.retry_after == 7.0
    assert "503" in str(error) and "busy" in str(error)
    assert second == [None]
    assert [r.headers["Idempotency-Key"] for r in receiver.requests] == [m.idempotency_key] * 2


def test_429_with_an_http_date_retry_after(receiver: Receiver) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    receiver.reply = lambda request: Reply(429, {"Retry-After": when})
    [[error]] = deliver(sink(receiver.url), [message(change(1))])
    assert isinstance(error, RetryableSinkError)
    assert error.retry_after is not None and 25 <= error.retry_after <= 31


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, PermanentSinkError),
        (401, PermanentSinkError),
        (404, PermanentSinkError),
        (410, PermanentSinkError),
        (301, PermanentSinkError),
        (408, RetryableSinkError),
        (500, RetryableSinkError),
        (502, RetryableSinkError),
        (204, type(None)),
        (202, type(None)),
    ],
)
def test_classification(receiver: Receiver, status: int, kind: type) -> None:
    receiver.reply = lambda request: Reply(status, {"Location": "http://elsewhere/"})
    [[outcome]] = deliver(sink(receiver.url), [message(change(1))])
    assert isinstance(outcome, kind)
    if outcome is not None:
        assert str(status) in str(outcome)
        assert "\n" not in str(outcome)
    if isinstance(outcome, RetryableSinkError):
        assert outcome.retry_after is None


def test_timeout_is_retryable(receiver: Receiver) -> None:
    receiver.reply = lambda request: Reply(delay=3.0)
    started = time.monotonic()
    [[error]] = deliver(sink(receiver.url, timeout=0.3), [message(change(1))])
    assert isinstance(error, RetryableSinkError)
    assert "no answer within 0.3s" in str(error)
    assert time.monotonic() - started < 2.0


def test_rows_go_concurrently_and_each_row_in_order(receiver: Receiver) -> None:
    receiver.reply = lambda request: Reply(delay=0.15)
    events = [change(seq, row=seq % 4) for seq in range(12)]  # 4 rows, 3 events each
    batch = messages(events)

    started = time.monotonic()
    [outcomes] = deliver(sink(receiver.url, concurrency=8), batch)
    elapsed = time.monotonic() - started

    assert outcomes == [None] * 12
    assert receiver.max_in_flight >= 3
    assert elapsed < 12 * 0.15 * 0.6  # far from one at a time
    for row in range(4):
        ids = [m.idempotency_key for m in batch if m.event.key["id"] == row]
        got = [r for r in receiver.requests if r.headers["Idempotency-Key"] in ids]
        assert [r.headers["Idempotency-Key"] for r in got] == ids
        for before, after in itertools.pairwise(got):
            assert after.started >= before.ended  # the next only after the answer


def test_strictly_ordered_posts_one_at_a_time(receiver: Receiver) -> None:
    receiver.reply = lambda request: Reply(delay=0.02)
    batch = messages([change(seq, row=seq) for seq in range(6)])
    deliver(sink(receiver.url, strictly_ordered=True), batch)
    assert receiver.max_in_flight == 1
    assert [r.headers["Idempotency-Key"] for r in receiver.requests] == [
        m.idempotency_key for m in batch
    ]


def test_a_failed_event_holds_back_its_row_only(receiver: Receiver) -> None:
    batch = messages([change(1, row=1), change(2, row=2), change(3, row=1), change(4, row=2)])
    bad = batch[0].idempotency_key
    receiver.reply = lambda r: Reply(500 if r.headers["Idempotency-Key"] == bad else 200)

    [outcomes] = deliver(sink(receiver.url), batch)

    assert isinstance(outcomes[0], RetryableSinkError) and "500" in str(outcomes[0])
    assert isinstance(outcomes[2], RetryableSinkError)
    assert str(outcomes[2]).startswith("not sent:")
    assert outcomes[1] is None and outcomes[3] is None
    sent = {r.headers["Idempotency-Key"] for r in receiver.requests}
    assert batch[2].idempotency_key not in sent  # would have overtaken the failed one


def test_a_permanent_failure_holds_back_the_row_as_retryable(receiver: Receiver) -> None:
    batch = messages([change(1, row=1), change(2, row=1)])
    bad = batch[0].idempotency_key
    receiver.reply = lambda r: Reply(400 if r.headers["Idempotency-Key"] == bad else 200)
    [outcomes] = deliver(sink(receiver.url), batch)
    assert isinstance(outcomes[0], PermanentSinkError)
    assert isinstance(outcomes[1], RetryableSinkError)


def test_an_unavailable_receiver_stops_the_rest_of_the_batch(receiver: Receiver) -> None:
    receiver.reply = lambda request: Reply(503, {"Retry-After": "5"})
    batch = messages([change(seq, row=seq) for seq in range(10)])
    [outcomes] = deliver(sink(receiver.url, concurrency=1), batch)
    assert len(receiver.requests) == 1
    for outcome in outcomes:
        assert isinstance(outcome, RetryableSinkError)
        assert outcome.retry_after == 5.0


def test_truncate_and_key_moves_are_barriers(receiver: Receiver) -> None:
    receiver.reply = lambda request: Reply(delay=0.05)
    batch = messages(
        [
            change(1, row=1),
            change(2, row=2),
            change(3, op="truncate"),
            change(4, row=3),
            change(5, row=4, op="update", old_row=3),
            change(6, row=5),
        ]
    )
    deliver(sink(receiver.url), batch)
    at = {r.headers["Idempotency-Key"]: r for r in receiver.requests}
    ids = [m.idempotency_key for m in batch]
    assert at[ids[2]].started >= max(at[ids[0]].ended, at[ids[1]].ended)
    assert at[ids[3]].started >= at[ids[2]].ended
    assert at[ids[4]].started >= at[ids[3]].ended
    assert at[ids[5]].started >= at[ids[4]].ended


def test_a_failed_barrier_holds_back_the_rest(receiver: Receiver) -> None:
    batch = messages([change(1, row=1), change(2, op="truncate"), change(3, row=1)])
    receiver.reply = lambda r: Reply(500 if r.headers["pgherald-operation"] == "truncate" else 200)
    [outcomes] = deliver(sink(receiver.url), batch)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], RetryableSinkError)
    assert isinstance(outcomes[2], RetryableSinkError)
    assert len(receiver.requests) == 2


def test_outage_then_recovery_through_a_proxy(receiver: Receiver) -> None:
    async def main() -> tuple[list[Outcome], list[Outcome], list[Outcome]]:
        async with TcpProxy("127.0.0.1", receiver.port) as proxy:
            webhook = sink(f"http://127.0.0.1:{proxy.port}/hook", timeout=2)
            await webhook.start()
            try:
                before = await webhook.send(messages([change(1), change(2, row=2)]))
                await proxy.cut()
                during = await webhook.send(messages([change(3), change(4, row=2)]))
                await proxy.restore()
                after = await webhook.send(messages([change(3), change(4, row=2)]))
            finally:
                await webhook.close()
            return before, during, after

    before, during, after = asyncio.run(main())
    assert before == [None, None]
    assert all(isinstance(o, RetryableSinkError) for o in during)
    assert "ConnectError" in str(during[0]) or "not sent" in str(during[0])
    assert after == [None, None]
    assert len(receiver.requests) == 4


def test_a_receiver_that_is_not_there() -> None:
    [[error]] = deliver(sink("http://127.0.0.1:9/hook", timeout=2), [message(change(1))])
    assert isinstance(error, RetryableSinkError)


def test_messages_never_show_credentials(receiver: Receiver) -> None:
    receiver.reply = lambda request: Reply(400)
    url = f"http://user:hunter2@127.0.0.1:{receiver.port}/hook?token=abc"
    [[error]] = deliver(sink(url), [message(change(1))])
    assert "hunter2" not in str(error) and "abc" not in str(error)
    assert receiver.requests[0].path == "/hook?token=abc"


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({}, "option 'url' is required"),
        ({"url": ""}, "option 'url' must be a non-empty string"),
        ({"url": "ftp://x/"}, "http:// or https://"),
        ({"url": "http://u:pw@/x"}, "http:// or https://"),
        ({"url": "http://x/", "batch": "sometimes"}, "'batch' must be true or false"),
        ({"url": "http://x/", "timeout": 0}, "'timeout' must be at least"),
        ({"url": "http://x/", "timeout": "soon"}, "'timeout' must be a number"),
        ({"url": "http://x/", "concurrency": 0}, "'concurrency' must be at least 1"),
        ({"url": "http://x/", "secret": ""}, "'secret' must not be empty"),
        ({"url": "http://x/", "headers": "X-A: b"}, "'headers' must be a table of strings"),
        ({"url": "http://x/", "headers": {"Bad Name": "v"}}, "not a valid HTTP header name"),
        ({"url": "http://x/", "headers": {"X-A": "a\r\nb"}}, "one line of ASCII"),
        ({"url": "http://x/", "headers": {"idempotency-key": "v"}}, "set by pgherald"),
        ({"url": "http://x/", "headers": {"pgherald-watch": "v"}}, "set by pgherald"),
        ({"url": "http://x/", "retries": 3}, "unknown option(s) 'retries'"),
    ],
)
def test_config_errors(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        from_config(SinkConfig("hook", "webhook", options=options))
    assert complaint in str(caught.value)
    assert str(caught.value).startswith("sink 'hook' (webhook): ")
    assert "pw" not in str(caught.value)


def test_config_defaults() -> None:
    webhook = from_config(SinkConfig("hook", "webhook", options={"url": "https://x.example/h"}))
    assert (webhook.batch, webhook.timeout, webhook.concurrency) == (False, 10.0, 8)
    assert webhook.strictly_ordered is False and webhook.name == "hook"


def test_parse_retry_after() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) is None
