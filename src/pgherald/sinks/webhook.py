"""The webhook sink: each event (or each batch) as an HTTP POST to a URL.

Built this way because:

- **One POST per event by default**, so a receiver can answer for each event and a bad one
  is dead-lettered alone; ``batch = true`` sends the batch as one JSON array instead, for
  receivers that prefer fewer, larger requests (then one answer counts for all of it).
- **Concurrent, but never out of order for a row.** Posting a batch one request at a time
  would make throughput a function of the receiver's latency, so the posts of a batch go
  out concurrently (``concurrency`` at most, over a keep-alive connection pool) in
  *lanes*: one lane per row (watch and key), posted in order, the next only after the
  previous one was answered. When a post of a lane fails, the row's later events are not
  sent (they would overtake it on the retry). Events without a key (truncate) and
  updates that move a row to another key act as barriers: everything before them is
  answered first. A strictly ordered sink has a single lane.
- **Retries are the engine's job; telling which failures deserve one is ours.** 2xx is
  delivered; timeouts, connection errors, 408, 425, 429 and 5xx are retryable; anything
  else (other 4xx, redirects, which are not followed) is permanent. ``Retry-After``
  (seconds or an HTTP date) goes into ``RetryableSinkError.retry_after``. When the
  receiver as a whole is unavailable (it cannot be reached, times out, or answers 429 or
  503), the posts of the batch not yet started are not sent and share that error, so a
  down receiver costs one timeout per lane, not per event.
- **Receivers can check who sent it and drop duplicates.** ``secret`` signs the exact
  body bytes with HMAC-SHA256 (``X-Pgherald-Signature: sha256=<hex>``); every post
  carries the event's id as ``Idempotency-Key`` (in batch mode, a digest of the batch's
  event ids) and the ``pgherald-*`` headers say what it is without parsing the body.
  Header values are percent-encoded UTF-8, since table names need not be ASCII.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Hashable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import quote

import httpx

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import ChangeEvent
from pgherald.sinks.base import IDEMPOTENCY_HEADER, Message, Options, Outcome, SinkConfig

SIGNATURE_HEADER: Final = "X-Pgherald-Signature"
EVENT_COUNT_HEADER: Final = "pgherald-event-count"
USER_AGENT: Final = "pgherald-webhook"
BATCH_CONTENT_TYPES: Final = {
    "application/json": "application/json",
    "application/cloudevents+json": "application/cloudevents-batch+json",
}
_RESERVED: Final = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        IDEMPOTENCY_HEADER.lower(),
        SIGNATURE_HEADER.lower(),
    }
)
_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_SAFE: Final = "!#$&'()*+,/:;=?@[]~ -._"
_SERVER_WIDE: Final = frozenset({429, 503})
_RETRYABLE: Final = frozenset({408, 425, 429})
_DETAIL_CHARS: Final = 200


class WebhookSink:
    """POSTs events to one URL; see the module docstring for the why."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        batch: bool = False,
        secret: str | None = None,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        concurrency: int = 8,
        strictly_ordered: bool = False,
    ) -> None:
        self.name = name
        self.url = url
        self.batch = batch
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.strictly_ordered = strictly_ordered
        self.extra_headers = dict(headers or {})
        self._secret = secret.encode() if secret is not None else None
        self._target = redacted(url)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Makes the connection pool; connects lazily, so a receiver that is down now is
        reported by ``send``, not here."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                limits=httpx.Limits(
                    max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                ),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT, **self.extra_headers},
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        if not batch:
            return []
        await self.start()
        if self.batch:
            outcome = await self._post(batch_body(batch), self._batch_headers(batch))
            return [outcome] * len(batch)
        return await self._send_each(batch)

    async def _send_each(self, batch: Sequence[Message]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(batch)
        gate = asyncio.Semaphore(self.concurrency)
        failed_lanes: dict[Hashable, Outcome] = {}
        halted: Outcome = None
        """Set when the receiver as a whole is unavailable, or a barrier failed: nothing
        more is started."""

        async def run_lane(lane: Hashable, indexes: list[int]) -> None:
            nonlocal halted
            for position, i in enumerate(indexes):
                earlier = failed_lanes.get(lane)
                if halted is not None or earlier is not None:
                    outcomes[i] = _not_sent(halted or earlier)
                    continue
                async with gate:
                    if halted is not None:
                        outcomes[i] = _not_sent(halted)
                        continue
                    outcome = await self._post(batch[i].body, self._headers(batch[i]))
                outcomes[i] = outcome
                if outcome is not None:
                    failed_lanes[lane] = outcome
                    if lane is None or _server_wide(outcome):
                        halted = outcome
                    for j in indexes[position + 1 :]:
                        outcomes[j] = _not_sent(outcome)
                    return

        for segment in self._segments(batch):
            if halted is not None:
                for lane_indexes in segment.values():
                    for i in lane_indexes:
                        outcomes[i] = _not_sent(halted)
                continue
            await asyncio.gather(*(run_lane(lane, ix) for lane, ix in segment.items()))
        return outcomes

    def _segments(self, batch: Sequence[Message]) -> list[dict[Hashable, list[int]]]:
        """The batch cut at barriers into groups of lanes that may run side by side. A
        barrier is a segment of its own, in the lane of everything (``None``), so a failed
        barrier holds back the rest of the batch."""
        if self.strictly_ordered:
            return [{None: list(range(len(batch)))}]
        segments: list[dict[Hashable, list[int]]] = [{}]
        for i, message in enumerate(batch):
            lane = row_lane(message.event)
            if lane is None:
                segments.append({None: [i]})
                segments.append({})
            else:
                segments[-1].setdefault(lane, []).append(i)
        return [s for s in segments if s]

    def _headers(self, message: Message) -> dict[str, str]:
        headers = {name: header_value(value) for name, value in message.headers.items()}
        headers["Content-Type"] = message.content_type
        return self._signed(headers, message.body)

    def _batch_headers(self, batch: Sequence[Message]) -> dict[str, str]:
        ids = "\n".join(m.idempotency_key for m in batch).encode()
        content_type = batch[0].content_type
        headers = {
            "Content-Type": BATCH_CONTENT_TYPES.get(content_type, content_type),
            IDEMPOTENCY_HEADER: "batch-" + hashlib.sha256(ids).hexdigest()[:32],
            EVENT_COUNT_HEADER: str(len(batch)),
        }
        return self._signed(headers, batch_body(batch))

    def _signed(self, headers: dict[str, str], body: bytes) -> dict[str, str]:
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
        return headers

    async def _post(self, body: bytes, headers: dict[str, str]) -> Outcome:
        client = self._client
        assert client is not None, "start() first"
        try:
            response = await client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return _ServerWide(f"webhook {self._target}: no answer within {self.timeout:g}s")
        except httpx.TransportError as exc:
            return _ServerWide(f"webhook {self._target}: {type(exc).__name__}: {_one_line(exc)}")
        return classify(response, self._target)


class _ServerWide(RetryableSinkError):
    """The receiver as a whole could not be reached (not one event's problem)."""


def _server_wide(error: Outcome) -> bool:
    return isinstance(error, _ServerWide)


def _not_sent(cause: Outcome) -> RetryableSinkError:
    """The error of a post held back behind a failed one: retryable, with the cause's
    wait, since it was never tried."""
    retry_after = cause.retry_after if isinstance(cause, RetryableSinkError) else None
    return RetryableSinkError(f"not sent: {cause}", retry_after=retry_after)


def classify(response: httpx.Response, target: str) -> Outcome:
    """The outcome of one answer: 2xx delivered, 408/425/429/5xx retryable, else permanent."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    what = f"webhook {target} answered {status} {response.reason_phrase}".rstrip()
    detail = _one_line(response.text) if response.content else ""
    if detail:
        what += f": {detail}"
    if status in _RETRYABLE or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        error_class = _ServerWide if status in _SERVER_WIDE else RetryableSinkError
        return error_class(what, retry_after=retry_after)
    if 300 <= status < 400:
        return PermanentSinkError(f"{what} (redirects are not followed: configure the final URL)")
    return PermanentSinkError(what)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Pgherald-Signature`` value of a body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def batch_body(batch: Sequence[Message]) -> bytes:
    """The batch as a JSON array of the events' bodies, bytes as encoded (no re-encoding)."""
    return b"[" + b",".join(m.body for m in batch) + b"]"


def header_value(value: str) -> str:
    """Percent-encoded UTF-8 (RFC 3986): ASCII names other than ``%`` arrive unchanged."""
    return quote(value, safe=_HEADER_SAFE)


def row_lane(event: ChangeEvent) -> Hashable | None:
    """The lane of an event's row, or None for a barrier (no key, or a key that moved)."""
    if not event.key:
        return None
    if event.old is not None and event.new is not None:
        for name in event.key:
            if (
                name in event.old.shape
                and name in event.new.shape
                and event.old.text(name) != event.new.text(name)
            ):
                return None
    values = tuple(sorted((name, repr(value)) for name, value in event.key.items()))
    return (event.watch, event.schema, event.table, values)


def redacted(url: str) -> str:
    """The URL without credentials or query (which may hold a token), for messages."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def from_config(config: SinkConfig) -> WebhookSink:
    options = Options(config.name, config.kind, config.options)
    url = options.text("url", required=True)
    assert url is not None
    batch = options.boolean("batch", False)
    secret = options.text("secret")
    timeout = options.number("timeout", 10.0, minimum=0.001)
    headers = options.mapping("headers")
    concurrency = options.integer("concurrency", 8, minimum=1)
    options.check_unknown()

    def fail(message: str) -> ConfigError:
        return ConfigError(f"sink {config.name!r} (webhook): {message}")

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise fail("option 'url' is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise fail(f"option 'url' must be an http:// or https:// URL, not {redacted(url)!r}")
    if secret == "":
        raise fail("option 'secret' must not be empty (leave it out to send unsigned)")
    for name, value in headers.items():
        if not _TOKEN.match(name):
            raise fail(f"header name {name!r} is not a valid HTTP header name")
        lowered = name.lower()
        if lowered in _RESERVED or lowered.startswith("pgherald-"):
            raise fail(f"header {name!r} is set by pgherald and cannot be configured")
        if any(c in value for c in "\r\n\0") or not value.isascii():
            raise fail(f"header {name!r} must be one line of ASCII")
    return WebhookSink(
        config.name,
        url,
        batch=batch,
        secret=secret,
        timeout=timeout,
        headers=headers,
        concurrency=concurrency,
        strictly_ordered=config.strictly_ordered,
    )
