"""The NATS sink: each event as a message in a JetStream stream, one subject per table.

Built this way because:

- **JetStream, not core NATS.** Core NATS forgets a message nobody is subscribed to at
  that moment; a stream keeps it, and its publish ack says the server has stored it. An
  event counts as delivered only once it is acked. The stream is created on start when
  missing (file storage, subjects ``<prefix>.>``); one that exists is used as it is, and
  every publish names it (``Nats-Expected-Stream``), so an event cannot land in another
  stream by accident.
- **A subject per table.** ``<prefix>.<schema>.<table>`` lets a consumer filter what it
  wants with NATS's own wildcards (``pgherald.public.*``). A subject token cannot hold a
  dot, whitespace or a wildcard, so those characters in a name become ``_``: any table
  name gives a valid subject, and the exact name is in the headers.
- **The server drops duplicates.** ``Nats-Msg-Id`` is the event's id (its idempotency
  key): when a retry publishes an event the stream already holds (within the stream's
  duplicate window), the server acks it as a duplicate and stores nothing, so a lost ack
  never makes a consumer see an event twice.
- **Pipelined.** A batch is published in order on one connection and the acks are
  awaited together: one round trip per batch, and the server keeps a connection's order.
- **Our own reconnection.** nats-py's background reconnection would buffer publishes
  while the server is away and leave us waiting for acks until a timeout; with it off, a
  lost connection fails the events not yet acked at once (retryable), and the next
  ``send`` connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from asyncio import FIRST_COMPLETED
from collections.abc import Sequence
from typing import Final
from urllib.parse import quote, urlsplit

import nats
import nats.errors
import nats.js
import nats.js.api
import nats.js.errors
from nats.aio.client import Client

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError, SinkError
from pgherald.events import ChangeEvent
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig

DEFAULT_SERVERS: Final = "nats://127.0.0.1:4222"
DEFAULT_PREFIX: Final = "pgherald"
MSG_ID_HEADER: Final = "Nats-Msg-Id"
SCHEMES: Final = ("nats", "tls", "ws", "wss")
_UNSAFE_TOKEN: Final = re.compile(r"[.*>\s\x00-\x1f\x7f]")
_BAD_STREAM_NAME: Final = re.compile(r"[.*>/\\\s\x00-\x1f\x7f]")
_HEADER_SAFE: Final = "!#$&'()*+,/:;=?@[]~-._"
_MESSAGE_TOO_BIG: Final = frozenset({10054})
"""JetStream error codes that are the message's fault: retrying cannot help."""
_DETAIL_CHARS: Final = 200
_CLOSE_WAIT: Final = 2.0
"""Seconds to wait for a polite close: after a failure the server may never answer."""
_MAX_PENDING: Final = 10_000
"""Publishes awaiting their ack at most; a larger batch goes out in chunks of this size."""


class NatsSink:
    """Publishes events to a JetStream stream; see the module docstring for the why."""

    def __init__(
        self,
        name: str,
        stream: str,
        *,
        servers: Sequence[str] = (DEFAULT_SERVERS,),
        subject_prefix: str = DEFAULT_PREFIX,
        duplicate_window: float = 120.0,
        timeout: float = 10.0,
        strictly_ordered: bool = False,
    ) -> None:
        self.name = name
        self.stream = stream
        self.servers = list(servers)
        self.subject_prefix = subject_prefix
        self.duplicate_window = duplicate_window
        self.timeout = timeout
        self.strictly_ordered = strictly_ordered
        self._target = ",".join(redacted(s) for s in self.servers)
        self._secrets = [secret for s in self.servers for secret in credentials(s)]
        self._nc: Client | None = None
        self._js: nats.js.JetStreamContext | None = None
        self._lost: asyncio.Event | None = None
        self._stream_ready = False

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def subject(self, event: ChangeEvent) -> str:
        """``<prefix>.<schema>.<table>`` (``<prefix>.<table>`` without a schema)."""
        parts = [event.schema, event.table] if event.schema else [event.table]
        return ".".join([self.subject_prefix, *(subject_token(p) for p in parts)])

    async def start(self) -> None:
        """Connects and makes sure the stream exists. Raises ``RetryableSinkError`` when
        no server can be reached, ``PermanentSinkError`` when the server refuses to
        create the stream (JetStream off, no permission, subjects taken by another
        stream)."""
        await self._ensure()

    async def close(self) -> None:
        nc, self._nc, self._js, self._lost = self._nc, None, None, None
        if nc is not None and not nc.is_closed:
            # Going away anyway: a server that does not answer cleans up after itself.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), min(self.timeout, _CLOSE_WAIT))

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        if not batch:
            return []
        try:
            js, lost = await self._ensure()
        except SinkError as exc:
            # The server as a whole is unavailable or refuses us: the events are fine.
            return [RetryableSinkError(str(exc))] * len(batch)
        outcomes: list[Outcome] = [None] * len(batch)
        for start in range(0, len(batch), _MAX_PENDING):
            chunk = range(start, min(start + _MAX_PENDING, len(batch)))
            if not await self._send_chunk(js, lost, batch, chunk, outcomes):
                for i in range(chunk.stop, len(batch)):
                    outcomes[i] = _ConnectionLost(f"nats {self._target}: not sent, connection lost")
                break
        if any(isinstance(o, _ConnectionLost) for o in outcomes):
            await self.close()
        return outcomes

    async def _send_chunk(
        self,
        js: nats.js.JetStreamContext,
        lost: asyncio.Event,
        batch: Sequence[Message],
        chunk: range,
        outcomes: list[Outcome],
    ) -> bool:
        """Publishes ``batch[chunk]`` and awaits its acks; False when the connection
        failed."""
        pending: dict[int, asyncio.Future[nats.js.api.PubAck]] = {}
        broken = False
        for i in chunk:
            message = batch[i]
            if broken:
                outcomes[i] = _ConnectionLost(f"nats {self._target}: not sent, connection lost")
                continue
            try:
                # No wait_stall: the chunk fits under the context's limit of pending
                # publishes, so this only appends to the connection's buffer, without
                # yielding to the loop; the whole chunk goes out in a few writes.
                pending[i] = await js.publish_async(
                    self.subject(message.event),
                    message.body,
                    stream=self.stream,
                    headers=self._headers(message),
                )
            except nats.errors.MaxPayloadError:
                outcomes[i] = PermanentSinkError(
                    f"nats: event of {len(message.body)} bytes is larger than the server's"
                    " max_payload"
                )
            except Exception as exc:
                outcomes[i] = _ConnectionLost(f"nats {self._target}: {self._error(exc)}")
                broken = True
        if pending:
            await self._await_acks(pending, outcomes, lost)
        return not broken and not any(isinstance(outcomes[i], _ConnectionLost) for i in chunk)

    async def _await_acks(
        self,
        pending: dict[int, asyncio.Future[nats.js.api.PubAck]],
        outcomes: list[Outcome],
        lost: asyncio.Event,
    ) -> None:
        """Waits for every ack, but not past ``timeout``, nor once the connection is
        gone (the rest will never come)."""

        async def all_acks() -> None:
            await asyncio.gather(*pending.values(), return_exceptions=True)

        async def connection_lost() -> None:
            await lost.wait()

        acks = asyncio.create_task(all_acks())
        gone = asyncio.create_task(connection_lost())
        try:
            await asyncio.wait({acks, gone}, timeout=self.timeout, return_when=FIRST_COMPLETED)
        except BaseException:
            acks.cancel()
            raise
        finally:
            gone.cancel()
        for i, future in pending.items():
            outcomes[i] = self._outcome(future, lost)
        if not acks.done():
            acks.cancel()  # cancels the futures still waiting: nats-py forgets them

    def _outcome(self, future: asyncio.Future[nats.js.api.PubAck], lost: asyncio.Event) -> Outcome:
        if not future.done():
            if lost.is_set():
                return _ConnectionLost(f"nats {self._target}: connection lost before the ack")
            return _ConnectionLost(
                f"nats {self._target}: no ack within {self.timeout:g}s; will reconnect"
            )
        exc = future.exception()
        if exc is None:
            return None  # stored, or a duplicate the stream already holds
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            self._stream_ready = False  # deleted? the next send makes it again if missing
            return RetryableSinkError(
                f"nats {self._target}: no JetStream stream answered (is stream"
                f" {self.stream!r} there, with subjects covering {self.subject_prefix}.>?)"
            )
        if isinstance(exc, nats.js.errors.APIError):
            what = (
                f"nats {self._target}: stream {self.stream!r} refused the event: {exc.description}"
            )
            if exc.err_code in _MESSAGE_TOO_BIG:
                return PermanentSinkError(what)
            return RetryableSinkError(what)
        return RetryableSinkError(f"nats {self._target}: {self._error(exc)}")

    def _headers(self, message: Message) -> dict[str, str]:
        headers = {name: header_value(value) for name, value in message.headers.items()}
        headers[MSG_ID_HEADER] = message.idempotency_key
        headers["Content-Type"] = message.content_type
        return headers

    async def _ensure(self) -> tuple[nats.js.JetStreamContext, asyncio.Event]:
        """The connection (made again if it was lost) and the stream (made again if it
        went missing)."""
        js, lost = self._js, self._lost
        if js is None or lost is None or lost.is_set() or not self.connected:
            js, lost = await self._connect()
        if not self._stream_ready:
            try:
                await self._make_stream(js)
            except BaseException:
                await self.close()
                raise
            self._stream_ready = True
        return js, lost

    async def _connect(self) -> tuple[nats.js.JetStreamContext, asyncio.Event]:
        await self.close()
        lost = asyncio.Event()

        async def on_lost() -> None:
            lost.set()

        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            # Kept for the message of a failed connect; nats-py would log each one.
            errors.append(exc)

        nc = Client()
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=self.servers,
                    name=f"pgherald sink {self.name}",
                    # Each server tried (twice, nats-py's least) without waiting between,
                    # then the error; no reconnecting in the background.
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=max(1, math.ceil(self.timeout)),
                    disconnected_cb=on_lost,
                    closed_cb=on_lost,
                    error_cb=on_error,
                ),
                self.timeout,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if isinstance(exc, nats.errors.NoServersError) and errors:
                exc = errors[-1]  # why the last server could not be had
            raise RetryableSinkError(
                f"nats {self._target}: cannot connect: {self._error(exc)}"
            ) from None
        js = nc.jetstream(timeout=self.timeout, publish_async_max_pending=_MAX_PENDING)
        self._nc, self._js, self._lost = nc, js, lost
        return js, lost

    async def _make_stream(self, js: nats.js.JetStreamContext) -> None:
        """Creates the stream unless it exists (an existing one is left as it is)."""
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        except nats.js.errors.ServiceUnavailableError:  # nobody answers the JetStream API
            raise PermanentSinkError(
                f"nats {self._target}: JetStream is not enabled on the server (start it with -js)"
            ) from None
        except nats.js.errors.APIError as exc:
            raise PermanentSinkError(
                f"nats {self._target}: cannot look up stream {self.stream!r}: {exc.description}"
            ) from None
        except Exception as exc:
            raise RetryableSinkError(
                f"nats {self._target}: cannot look up stream {self.stream!r}: {self._error(exc)}"
            ) from None
        try:
            await js.add_stream(
                name=self.stream,
                subjects=[f"{self.subject_prefix}.>"],
                storage=nats.js.api.StorageType.FILE,
                duplicate_window=self.duplicate_window,
            )
        except nats.js.errors.APIError as exc:
            raise PermanentSinkError(
                f"nats {self._target}: cannot create stream {self.stream!r} with subjects"
                f" {self.subject_prefix}.>: {exc.description}"
            ) from None
        except Exception as exc:
            raise RetryableSinkError(
                f"nats {self._target}: cannot create stream {self.stream!r}: {self._error(exc)}"
            ) from None

    def _error(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.timeout:g}s"
        text = " ".join(str(exc).split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if len(text) > _DETAIL_CHARS:
            text = text[: _DETAIL_CHARS - 3] + "..."
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _ConnectionLost(RetryableSinkError):
    """The connection failed: the sink reconnects on the next send."""


def subject_token(name: str) -> str:
    """A name as one subject token: dots, whitespace, wildcards and control characters
    become ``_`` (an empty name too)."""
    return _UNSAFE_TOKEN.sub("_", name) or "_"


def header_value(value: str) -> str:
    """Percent-encoded UTF-8 (RFC 3986): ASCII names without ``%`` or spaces arrive
    unchanged (NATS header values are one trimmed line)."""
    return quote(value, safe=_HEADER_SAFE)


def redacted(server: str) -> str:
    """A server URL without credentials, for messages."""
    try:
        parsed = urlsplit(server)
        host, port = parsed.hostname or "", parsed.port
    except ValueError:
        return "<invalid url>"
    host = f"[{host}]" if ":" in host else host
    return f"{parsed.scheme}://{host}{'' if port is None else f':{port}'}"


def credentials(server: str) -> list[str]:
    """The password of a server URL (or a lone user: a token), to keep out of messages."""
    try:
        parsed = urlsplit(server)
    except ValueError:
        return []
    secret = parsed.password or parsed.username
    return [secret] if secret else []


def from_config(config: SinkConfig) -> NatsSink:
    options = Options(config.name, config.kind, config.options)
    servers_text = options.text("servers", DEFAULT_SERVERS)
    stream = options.text("stream", required=True)
    prefix = options.text("subject_prefix", DEFAULT_PREFIX)
    duplicate_window = options.number("duplicate_window", 120.0, minimum=0.001)
    timeout = options.number("timeout", 10.0, minimum=0.001)
    options.check_unknown()
    assert servers_text is not None and stream is not None and prefix is not None

    def fail(message: str) -> ConfigError:
        return ConfigError(f"sink {config.name!r} ({config.kind}): {message}")

    servers = [s.strip() for s in servers_text.split(",") if s.strip()]
    if not servers:
        raise fail("option 'servers' must name at least one server")
    for server in servers:
        try:
            parsed = urlsplit(server)
            host, _ = parsed.hostname, parsed.port
        except ValueError:
            raise fail(f"server {redacted(server)!r} is not a valid URL") from None
        if parsed.scheme not in SCHEMES or not host:
            raise fail(
                f"server {redacted(server)!r} must be a nats://, tls://, ws:// or wss:// URL"
                " with a host"
            )
    if _BAD_STREAM_NAME.search(stream):
        raise fail(
            f"stream name {stream!r} cannot hold dots, wildcards (* >), slashes or whitespace"
        )
    tokens = prefix.split(".")
    if any(not t or _UNSAFE_TOKEN.search(t) for t in tokens):
        raise fail(
            f"option 'subject_prefix' {prefix!r} must be dot-separated non-empty tokens"
            " without wildcards (* >) or whitespace"
        )
    if prefix.startswith("$"):
        raise fail(f"option 'subject_prefix' {prefix!r}: subjects starting with $ are the server's")
    return NatsSink(
        config.name,
        stream,
        servers=servers,
        subject_prefix=prefix,
        duplicate_window=duplicate_window,
        timeout=timeout,
        strictly_ordered=config.strictly_ordered,
    )
