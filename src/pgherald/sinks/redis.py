"""The Redis sink: each event appended to a Redis Stream with XADD.

Built this way because:

- **Streams, not pub/sub.** A stream keeps what it was given until it is trimmed, so a
  consumer that was away reads what it missed (consumer groups, ``XREADGROUP``); PUBLISH
  would drop everything sent while nobody listened, against "never lose an event".
- **One pipeline per batch.** The batch's XADDs are written in one go on one connection
  (``pipeline(transaction=False)``: no MULTI, which would only add all-or-nothing, which
  we do not need) and their replies read back in order, one outcome per message: one
  round trip per batch instead of one per event. Redis runs a connection's commands in
  the order sent, so the log order of the batch is the order in each stream.
- **A stream per table if asked.** ``stream`` may name ``{schema}``, ``{table}`` and
  ``{watch}``, so consumers of one table need not read everyone's changes.
- **Bounded by default.** ``MAXLEN ~ 100000`` (approximate: Redis trims whole macro
  nodes, which is cheap) keeps an unread stream from eating the server's memory; ``0``
  turns trimming off.
- **Retrying is the engine's job.** redis-py retries a batch once, at once, on a new
  connection, but only after a connection error (a pooled connection that died while idle
  must not fail a send), never after a timeout (the server may still be working on it).
  Other connection errors and timeouts are reported as retryable, and the next ``send``
  connects anew. Either kind of retry may append part of a batch twice, which is what the
  ``id`` field is for. An append that Redis refuses for good (the key holds another type,
  an ACL forbids it) is permanent; one that may succeed later (out of memory, a
  read-only replica, loading) is retryable.
- Entry fields: ``event`` (the body in the sink's format), ``id`` (the idempotency key,
  for consumers to drop a duplicate after a retried batch), ``op`` and ``table``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.typing import EncodableT, FieldT

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import ChangeEvent
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
DEFAULT_MAXLEN: Final = 100_000
PLACEHOLDERS: Final = ("schema", "table", "watch")
_TRANSIENT: Final = (
    "OOM",
    "READONLY",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "MISCONF",
)
"""Error codes of replies that may succeed later; any other refusal is permanent."""
_DETAIL_CHARS: Final = 200


class RedisStreamSink:
    """Appends events to Redis Streams; see the module docstring for the why."""

    def __init__(
        self,
        name: str,
        stream: str,
        *,
        url: str = DEFAULT_URL,
        maxlen: int = DEFAULT_MAXLEN,
        timeout: float = 10.0,
        strictly_ordered: bool = False,
    ) -> None:
        self.name = name
        self.stream = stream
        self.url = url
        self.maxlen = maxlen
        self.timeout = timeout
        self.strictly_ordered = strictly_ordered
        self._templated = any(f"{{{p}}}" in stream for p in PLACEHOLDERS)
        self._streams: dict[tuple[str, str, str], str] = {}
        self._client: aioredis.Redis | None = None

    async def start(self) -> None:
        """Makes the client; it connects on first use, so a server that is down now is
        reported by ``send``, not here."""
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                decode_responses=False,
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def stream_of(self, event: ChangeEvent) -> str:
        """The stream an event goes to."""
        if not self._templated:
            return self.stream
        names = (event.schema, event.table, event.watch)
        stream = self._streams.get(names)
        if stream is None:
            stream = self.stream.format(schema=event.schema, table=event.table, watch=event.watch)
            self._streams[names] = stream
        return stream

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        if not batch:
            return []
        await self.start()
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        maxlen = self.maxlen or None
        for message in batch:
            fields: dict[FieldT, EncodableT] = {
                "event": message.body,
                "id": message.idempotency_key,
                "op": message.event.op,
                "table": message.headers["pgherald-table"],
            }
            pipe.xadd(self.stream_of(message.event), fields, maxlen=maxlen, approximate=True)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except AuthenticationError as exc:
            # Retryable, not permanent: fixing the password must not have dead-lettered
            # every event meanwhile.
            error = RetryableSinkError(f"redis {self._where}: authentication failed: {exc}")
            return [error] * len(batch)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            error = RetryableSinkError(f"redis {self._where}: {_describe(exc)}")
            return [error] * len(batch)
        except RedisError as exc:
            error = RetryableSinkError(f"redis {self._where}: {_describe(exc)}")
            return [error] * len(batch)
        return [self._outcome(reply) for reply in replies]

    @property
    def _where(self) -> str:
        return redacted(self.url)

    def _outcome(self, reply: object) -> Outcome:
        if not isinstance(reply, BaseException):
            return None
        text = _one_line(reply)
        if isinstance(reply, ResponseError):
            if text.split(" ", 1)[0].upper() in _TRANSIENT:
                return RetryableSinkError(f"redis {self._where} refused XADD: {text}")
            return PermanentSinkError(f"redis {self._where} refused XADD: {text}")
        return RetryableSinkError(f"redis {self._where}: {_describe(reply)}")


def _describe(exc: BaseException) -> str:
    text = _one_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<invalid url>"
    _userinfo, at, host = rest.rpartition("@")
    return f"{scheme}://{host}" if at else url


def check_stream_template(template: str) -> str | None:
    """None when ``template`` is a usable stream name, else what is wrong with it."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"is not a valid template ({exc}; write a literal brace as {{{{ or }}}})"
    for _literal, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            shown = (
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            return (
                f"has an unknown placeholder {shown}; use {{schema}}, {{table}} or {{watch}}"
                " (a literal brace is written {{ or }})"
            )
    return None


def from_config(config: SinkConfig) -> RedisStreamSink:
    options = Options(config.name, config.kind, config.options)
    url = options.text("url", DEFAULT_URL)
    stream = options.text("stream", required=True)
    maxlen = options.integer("maxlen", DEFAULT_MAXLEN, minimum=0)
    timeout = options.number("timeout", 10.0, minimum=0.001)
    options.check_unknown()
    assert url is not None and stream is not None

    def fail(message: str) -> ConfigError:
        return ConfigError(f"sink {config.name!r} (redis): {message}")

    try:
        parse_url(url)
    except ValueError:
        raise fail(
            f"option 'url' must be a redis://, rediss:// or unix:// URL, not {redacted(url)!r}"
        ) from None
    problem = check_stream_template(stream)
    if problem is not None:
        raise fail(f"option 'stream' {problem}")
    return RedisStreamSink(
        config.name,
        stream,
        url=url,
        maxlen=maxlen,
        timeout=timeout,
        strictly_ordered=config.strictly_ordered,
    )
