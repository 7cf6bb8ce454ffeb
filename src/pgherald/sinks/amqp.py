"""The AMQP sink: each event as a persistent message on a RabbitMQ exchange.

Built this way because:

- **An exchange, not a queue.** pgherald publishes to one durable exchange that it
  declares on start (``fanout`` by default, or ``topic``); who listens, and with which
  queues, is the consumers' business. Every message carries the routing key
  ``schema.table.operation`` (dots inside a name become ``_``, so a topic binding such
  as ``public.*.insert`` always sees three words); a fanout exchange ignores it.
- **Confirmed, or not delivered.** The channel runs in publisher-confirm mode and
  messages are ``mandatory`` and persistent: a message counts as delivered only when the
  broker acked it, which for a durable queue means it is on disk. A nack, or a message
  the broker returned because no queue is bound to take it, fails that message alone
  (retryable: a consumer may bind a queue, the broker may have room again later).
- **Pipelined.** A batch is published whole on one channel, in order, and the confirms
  are awaited together: one round trip per batch, not per message, and the broker keeps
  a channel's order, so no message overtakes an earlier one. The batch's frames are
  encoded here (``amqp_frames``) and handed to the connection's writer as one buffer,
  under the channel's publish lock, with a confirmation registered per message as
  aiormq's own ``basic_publish`` does: one write to the socket per batch. Published one
  by one through aio-pika, each message cost a task, a drain and a ``send()`` of its
  own, about 120 µs of CPU; now it is about 30 µs.
- **Consumers can drop duplicates.** A retry after a lost confirm may publish a message
  twice; ``message_id`` is the event's id (its idempotency key), and the headers carry
  ``Idempotency-Key`` and the ``pgherald-*`` headers, so a consumer can tell without
  parsing the body. The body is the sink's format, unchanged; ``content_type`` says
  which JSON it is.
- **Our own reconnection.** A plain connection, not aio-pika's robust one: when the
  broker goes away, the messages not yet confirmed fail at once (retryable), and the
  next ``send`` connects and declares again, so a broker that comes back (or an
  exchange that was deleted) is picked up without a background task of our own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aio_pika
import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
from aiormq.abc import ChannelFrame

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError, SinkError
from pgherald.events import ChangeEvent
from pgherald.sinks import amqp_frames
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig

ExchangeType = Literal["fanout", "topic"]
EXCHANGE_TYPES: Final[tuple[ExchangeType, ...]] = ("fanout", "topic")
DEFAULT_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
APP_ID: Final = "pgherald"
_MAX_SHORTSTR: Final = 255
_DETAIL_CHARS: Final = 200
_CLOSE_WAIT: Final = 2.0
"""Seconds to wait for a polite close: after a failure the server may never answer."""


class AmqpSink:
    """Publishes events to one exchange; see the module docstring for the why."""

    def __init__(
        self,
        name: str,
        exchange: str,
        *,
        url: str = DEFAULT_URL,
        exchange_type: ExchangeType = "fanout",
        mandatory: bool = True,
        timeout: float = 10.0,
        strictly_ordered: bool = False,
    ) -> None:
        self.name = name
        self.url = url
        self.exchange_name = exchange
        self.exchange_type = exchange_type
        self.mandatory = mandatory
        self.timeout = timeout
        self.strictly_ordered = strictly_ordered
        self._target = redacted(url)
        self._secrets = credentials(url)
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._raw: aiormq.Channel | None = None
        """aiormq's channel under aio-pika's, on which batches are published."""

    @property
    def connected(self) -> bool:
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def start(self) -> None:
        """Connects and declares the exchange. Raises ``RetryableSinkError`` when the
        broker cannot be reached, ``PermanentSinkError`` when it refuses the declaration
        (an exchange of that name with another type, no permission)."""
        await self._ensure()

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = self._raw = None
        if connection is not None and not connection.is_closed:
            # Going away anyway: a broker that does not answer cleans up after itself.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), min(self.timeout, _CLOSE_WAIT))

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        if not batch:
            return []
        try:
            await self._ensure()
        except SinkError as exc:
            # The broker as a whole is unavailable or refuses us: nothing is wrong with
            # the messages, so every one of them may be tried again.
            return [RetryableSinkError(str(exc))] * len(batch)
        channel = self._raw
        assert channel is not None
        outcomes: list[Outcome] = [None] * len(batch)
        frames: list[bytes] = []
        published: list[int] = []
        for i, message in enumerate(batch):
            try:
                frames.append(self._frames(channel, message))
            except ValueError as exc:  # a field that AMQP cannot carry
                outcomes[i] = PermanentSinkError(
                    f"amqp: message cannot be published: {self._detail(exc)}"
                )
                continue
            published.append(i)
        if not published:
            return outcomes
        keys = [batch[i].idempotency_key for i in published]
        try:
            first, confirmations = await self._publish(channel, b"".join(frames), keys)
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,  # closed since _ensure
            ConnectionError,
            TimeoutError,  # the writer did not take the frames in time
        ) as exc:
            lost = _ConnectionLost(f"amqp {self._target}: {self._error(exc)}")
            for i in published:
                outcomes[i] = lost
            await self._drop()
            return outcomes
        try:
            done, _ = await asyncio.wait(confirmations, timeout=self.timeout)
        finally:
            self._forget(channel, first, keys, confirmations)
        for i, confirmation in zip(published, confirmations, strict=True):
            outcomes[i] = self._outcome(confirmation, batch[i], confirmation in done)
        if any(isinstance(o, _ConnectionLost) for o in outcomes):
            await self._drop()
        return outcomes

    def _frames(self, channel: aiormq.Channel, message: Message) -> bytes:
        event = message.event
        return amqp_frames.publish(
            channel.number,
            self.exchange_name,
            routing_key_of(event),
            message.body,
            mandatory=self.mandatory,
            max_body=channel.max_content_size,
            content_type=message.content_type,
            content_encoding="utf-8",
            headers=message.headers,
            persistent=True,
            message_id=message.idempotency_key,
            timestamp=event.commit_time or event.captured_at,
            type=event.op,
            app_id=APP_ID,
        )

    async def _publish(
        self, channel: aiormq.Channel, frames: bytes, keys: list[str]
    ) -> tuple[int, list[asyncio.Future[Any]]]:
        """Queues the batch's frames on the connection and registers a confirmation per
        message, as ``basic_publish`` does for one: under the channel's lock, so that no
        other publish comes between, delivery tags counted as the broker counts them, and
        message ids known so that a returned message fails its own confirmation. Returns
        the first delivery tag and the confirmations."""
        async with channel.lock, asyncio.timeout(self.timeout):
            await channel.write_queue.put(ChannelFrame(payload=frames, should_close=False))
            # Nothing was awaited since the frames were queued: the writer has not run,
            # so no confirm can come before its confirmation is registered.
            first = channel.delivery_tag + 1
            channel.delivery_tag += len(keys)
            confirmations: list[asyncio.Future[Any]] = []
            for tag, key in enumerate(keys, start=first):
                confirmation = channel.create_future()
                channel.confirmations[tag] = confirmation
                channel.message_id_delivery_tag[key] = tag
                confirmations.append(confirmation)
            return first, confirmations

    @staticmethod
    def _forget(
        channel: aiormq.Channel,
        first: int,
        keys: list[str],
        confirmations: list[asyncio.Future[Any]],
    ) -> None:
        """Drops the message ids of a finished batch (aiormq would keep them forever)."""
        for tag, key in enumerate(keys, start=first):
            if channel.message_id_delivery_tag.get(key) == tag:
                del channel.message_id_delivery_tag[key]
        for confirmation in confirmations:
            if not confirmation.done():
                confirmation.cancel()  # the connection is dropped; nobody waits any more

    def _outcome(
        self, confirmation: asyncio.Future[Any], message: Message, confirmed: bool
    ) -> Outcome:
        if not confirmed:
            return _ConnectionLost(
                f"amqp {self._target}: no confirm within {self.timeout:g}s; will reconnect"
            )
        if confirmation.cancelled():
            # aiormq cancels the confirms still pending when the channel goes away.
            return _ConnectionLost(f"amqp {self._target}: connection lost before the confirm")
        exc = confirmation.exception()
        if exc is None:
            return None
        if isinstance(exc, aiormq.exceptions.PublishError):
            return RetryableSinkError(
                f"amqp {self._target}: exchange {self.exchange_name!r} returned the message"
                f" with routing key {routing_key_of(message.event)!r}: no queue is bound to"
                " take it"
            )
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return RetryableSinkError(
                f"amqp {self._target}: the broker refused the message (nack): {self._detail(exc)}"
            )
        if isinstance(exc, asyncio.CancelledError):
            return _ConnectionLost(f"amqp {self._target}: connection lost before the confirm")
        return _ConnectionLost(f"amqp {self._target}: {self._error(exc)}")

    async def _ensure(self) -> aio_pika.abc.AbstractExchange:
        if self._exchange is not None and self.connected:
            return self._exchange
        await self._drop()
        try:
            connection = await aio_pika.connect(
                self.url,
                timeout=self.timeout,
                client_properties={"connection_name": f"pgherald sink {self.name}"},
            )
        except Exception as exc:
            raise RetryableSinkError(
                f"amqp {self._target}: cannot connect: {self._error(exc)}"
            ) from None
        self._connection = connection
        try:
            self._channel = channel = await asyncio.wait_for(
                connection.channel(publisher_confirms=True, on_return_raises=True), self.timeout
            )
            self._exchange = await channel.declare_exchange(
                self.exchange_name,
                aio_pika.ExchangeType(self.exchange_type),
                durable=True,
                timeout=self.timeout,
            )
            raw = await channel.get_underlay_channel()
            assert isinstance(raw, aiormq.Channel)
            self._raw = raw
        except aiormq.exceptions.ChannelClosed as exc:
            await self._drop()
            raise PermanentSinkError(
                f"amqp {self._target}: cannot declare the durable {self.exchange_type} exchange"
                f" {self.exchange_name!r}: {self._detail(exc)} (an exchange of that name with"
                " another type or durability, or no permission?)"
            ) from None
        except Exception as exc:
            await self._drop()
            raise RetryableSinkError(
                f"amqp {self._target}: cannot open a channel: {self._error(exc)}"
            ) from None
        return self._exchange

    async def _drop(self) -> None:
        """Forgets the connection (closing it if it is still open), so that the next
        send connects afresh."""
        await self.close()

    def _detail(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."

    def _error(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.timeout:g}s"
        detail = self._detail(exc)
        return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class _ConnectionLost(RetryableSinkError):
    """The connection or channel failed: the sink reconnects on the next send."""


def routing_key_of(event: ChangeEvent) -> str:
    """``schema.table.operation`` with dots in names as ``_`` (``table.operation`` when
    the event has no schema, as listen watches)."""
    parts = [event.schema, event.table] if event.schema else [event.table]
    return ".".join([*(p.replace(".", "_") for p in parts), event.op])


def redacted(url: str) -> str:
    """The URL without credentials or query, for messages."""
    try:
        parsed = urlsplit(url)
        host, port = parsed.hostname or "", parsed.port
    except ValueError:
        return "<invalid url>"
    host = f"[{host}]" if ":" in host else host
    return f"{parsed.scheme}://{host}{'' if port is None else f':{port}'}{parsed.path}"


def credentials(url: str) -> list[str]:
    """The password of a URL (or a lone user, which may be a token), to keep out of
    messages."""
    try:
        parsed = urlsplit(url)
    except ValueError:
        return []
    secret = parsed.password or parsed.username
    return [secret] if secret else []


def from_config(config: SinkConfig) -> AmqpSink:
    options = Options(config.name, config.kind, config.options)
    url = options.text("url", DEFAULT_URL)
    exchange = options.text("exchange", required=True)
    exchange_type = options.text("exchange_type", "fanout")
    mandatory = options.boolean("mandatory", True)
    timeout = options.number("timeout", 10.0, minimum=0.001)
    options.check_unknown()
    assert url is not None and exchange is not None and exchange_type is not None

    def fail(message: str) -> ConfigError:
        return ConfigError(f"sink {config.name!r} ({config.kind}): {message}")

    try:
        parsed = urlsplit(url)
        host, _ = parsed.hostname, parsed.port
    except ValueError:
        raise fail("option 'url' is not a valid URL") from None
    if parsed.scheme not in ("amqp", "amqps") or not host:
        raise fail(f"option 'url' must be an amqp:// or amqps:// URL, not {redacted(url)!r}")
    if len(exchange.encode()) > _MAX_SHORTSTR:
        raise fail(f"option 'exchange' is longer than {_MAX_SHORTSTR} bytes")
    if exchange.startswith("amq."):
        raise fail(
            f"exchange {exchange!r}: names starting with 'amq.' are the broker's own;"
            " choose another name"
        )
    if exchange_type not in EXCHANGE_TYPES:
        raise fail(
            f"option 'exchange_type' must be one of {', '.join(EXCHANGE_TYPES)},"
            f" not {exchange_type!r}"
        )
    return AmqpSink(
        config.name,
        exchange,
        url=url,
        exchange_type="topic" if exchange_type == "topic" else "fanout",
        mandatory=mandatory,
        timeout=timeout,
        strictly_ordered=config.strictly_ordered,
    )
