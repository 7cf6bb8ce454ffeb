"""The MQTT sink: each event published to a topic of its table, QoS 1, through aiomqtt.

Built this way because:

- **A topic per table** (``<topic_prefix>/<schema>/<table>``) is what MQTT subscribers
  filter on (``pgherald/public/+``, ``pgherald/#``); ``+``, ``#`` and ``/`` in names
  would change the topic's meaning, so they become ``_``.
- **QoS 1, not retained.** QoS 1 makes the broker acknowledge each message (PUBACK) once
  it has taken responsibility for it: that acknowledgement is what "delivered" means
  here. QoS 2 would add a second round trip only to avoid duplicates, which the
  idempotency key already lets consumers drop. A retained message would make a new
  subscriber see one stale change per topic as if it were new.
- **A batch is pipelined.** All of its messages are handed to the client at once, in log
  order, on one connection (so the broker receives them in that order), and then their
  PUBACKs are awaited together: one round trip per batch (paho keeps up to 20 in flight,
  MQTT's usual receive maximum, and sends the rest as acknowledgements come back), not
  one per message.
- **Headers where MQTT has them.** With MQTT 5 (the default) each message carries the
  ``Idempotency-Key`` and ``pgherald-*`` headers as user properties and the body's
  content type. MQTT 3.1.1 has no headers: the body (the configured format) is all a
  subscriber gets, so use a format that carries the event's id (``pgherald``,
  ``cloudevents``) to drop duplicates.
- **Failures are retryable, and the next batch reconnects.** A lost connection, a broker
  that cannot be reached, or PUBACKs that stop coming (``timeout`` seconds without any
  progress) make every message not yet acknowledged retryable, and the connection is
  dropped; the next ``send`` opens a new one (a clean session: the engine, not the
  session, resends what was not acknowledged). aiomqtt does not expose the reason code of
  an MQTT 5 PUBACK, so a broker that acknowledges a message it refused (an ACL) is taken
  at its word, as MQTT 3.1.1 always must.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final, Literal

import aiomqtt
from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import ChangeEvent
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig

DEFAULT_PREFIX: Final = "pgherald"
Protocol = Literal["5", "3.1.1"]
PROTOCOLS: Final[dict[str, aiomqtt.ProtocolVersion]] = {
    "5": aiomqtt.ProtocolVersion.V5,
    "3.1.1": aiomqtt.ProtocolVersion.V311,
}
_TOPIC_UNSAFE: Final = str.maketrans({"+": "_", "#": "_", "/": "_", "\0": "_"})
_DETAIL_CHARS: Final = 200
WINDOW: Final = 40
"""Publishes handed to the client and not yet acknowledged, at most: aiomqtt and paho do
work proportional to that number for each publish and each PUBACK, so handing them a
whole large batch at once would cost time quadratic in its size. Twice paho's 20 in
flight keeps the connection busy."""


class MqttSink:
    """Publishes events to an MQTT broker; see the module docstring for the why."""

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        topic_prefix: str = DEFAULT_PREFIX,
        protocol: Protocol = "5",
        client_id: str | None = None,
        timeout: float = 10.0,
        keepalive: int = 60,
        strictly_ordered: bool = False,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.topic_prefix = topic_prefix
        self.protocol: Protocol = protocol
        self.client_id = client_id
        self.timeout = timeout
        self.keepalive = keepalive
        self.strictly_ordered = strictly_ordered
        self._topics: dict[tuple[str, str], str] = {}
        self._client: aiomqtt.Client | None = None

    @property
    def _where(self) -> str:
        return f"mqtt {self.host}:{self.port}"

    async def start(self) -> None:
        """Nothing to prepare: the connection is opened by the first ``send``, so a broker
        that is down now is reported there, per message, as retryable."""

    async def close(self) -> None:
        await self._drop()

    def topic_of(self, event: ChangeEvent) -> str:
        """``<prefix>/<schema>/<table>`` (``<prefix>/<table>`` when there is no schema)."""
        names = (event.schema, event.table)
        topic = self._topics.get(names)
        if topic is None:
            levels = [n.translate(_TOPIC_UNSAFE) for n in names if n]
            topic = "/".join([self.topic_prefix, *levels])
            self._topics[names] = topic
        return topic

    def _properties(self, message: Message) -> Properties | None:
        if self.protocol != "5":
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = list(message.headers.items())
        properties.ContentType = message.content_type
        properties.PayloadFormatIndicator = 1  # UTF-8 text
        return properties

    async def _connect(self) -> aiomqtt.Client:
        if self._client is not None:
            if not _disconnected(self._client).done():
                return self._client
            await self._drop()  # lost while idle: connect anew
        v5 = self.protocol == "5"
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self._password,
            identifier=self.client_id,
            protocol=PROTOCOLS[self.protocol],
            clean_session=None if v5 else True,
            clean_start=True if v5 else mqtt_client.MQTT_CLEAN_START_FIRST_ONLY,
            timeout=self.timeout,
            keepalive=self.keepalive,
        )
        # A batch has many PUBACKs pending at once, on purpose: not worth a warning.
        client.pending_calls_threshold = 1 << 30
        try:
            await client.__aenter__()
        except aiomqtt.MqttError:
            _abandon(client)
            raise
        self._client = client
        return client

    async def _drop(self) -> None:
        """Lets go of the connection (after a failure, or at close)."""
        client, self._client = self._client, None
        if client is None:
            return
        _forget(client)
        try:
            await asyncio.wait_for(client.__aexit__(None, None, None), self.timeout)
        except (aiomqtt.MqttError, TimeoutError, OSError):
            _abandon(client)

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        if not batch:
            return []
        try:
            client = await self._connect()
        except aiomqtt.MqttError as exc:
            error = RetryableSinkError(f"{self._where}: cannot connect: {_one_line(exc)}")
            return [error] * len(batch)

        # Started in log order (asyncio runs new tasks in the order they were created), so
        # paho is handed the messages in that order; at most WINDOW unacknowledged at once.
        lost = _disconnected(client)
        tasks: list[asyncio.Future[None]] = []
        outstanding: set[asyncio.Future[None]] = set()
        progress = asyncio.Event()

        def acknowledged(task: asyncio.Future[None]) -> None:
            outstanding.discard(task)
            progress.set()

        problem = ""
        for m in batch:
            while len(outstanding) >= WINDOW and not problem:
                problem = await self._progress(progress, lost)
            if problem:
                break
            task = asyncio.ensure_future(
                client.publish(
                    self.topic_of(m.event),
                    m.body,
                    qos=1,
                    retain=False,
                    properties=self._properties(m),
                    timeout=float("inf"),
                )
            )
            task.add_done_callback(acknowledged)
            tasks.append(task)
            outstanding.add(task)
        while outstanding and not problem:
            problem = await self._progress(progress, lost)
        left = list(outstanding)
        for leftover in left:
            leftover.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        outcomes = [self._outcome(task, problem) for task in tasks]
        not_sent = RetryableSinkError(f"{self._where}: not sent: {problem}")
        outcomes += [not_sent] * (len(batch) - len(tasks))
        if problem or any(o is not None for o in outcomes):
            await self._drop()
        return outcomes

    async def _progress(self, progress: asyncio.Event, lost: asyncio.Future[None]) -> str:
        """Waits until some publish is done; what went wrong if instead the connection was
        lost or nothing came for ``timeout`` seconds."""
        if not progress.is_set():
            waiter = asyncio.ensure_future(progress.wait())
            either: set[asyncio.Future[Any]] = {waiter, lost}
            try:
                await asyncio.wait(
                    either, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
        if lost.done():
            return f"connection lost: {_one_line(lost.exception() or 'closed')}"
        if not progress.is_set():
            return f"no PUBACK within {self.timeout:g}s"
        progress.clear()
        return ""

    def _outcome(self, task: asyncio.Future[None], problem: str) -> Outcome:
        if task.cancelled():
            return RetryableSinkError(f"{self._where}: not acknowledged: {problem}")
        exc = task.exception()
        if exc is None:
            return None
        if isinstance(exc, ValueError):  # paho refuses the message itself (size, topic)
            return PermanentSinkError(f"{self._where}: cannot publish: {_one_line(exc)}")
        return RetryableSinkError(f"{self._where}: not acknowledged: {_one_line(exc)}")


def _disconnected(client: aiomqtt.Client) -> asyncio.Future[None]:
    """The future aiomqtt completes when the connection is lost. aiomqtt only fails a
    pending publish by its timeout, so without this a broken connection would cost a
    whole ``timeout`` per batch instead of failing at once."""
    lost: asyncio.Future[None] = client._disconnected
    return lost


def _abandon(client: aiomqtt.Client) -> None:
    """Closes a connection that could not be opened or closed properly, so that its socket
    does not linger (aiomqtt keeps it when CONNACK or the DISCONNECT never came)."""
    # aiomqtt offers no public way to do this: reach for its paho client and state.
    # Not paho's disconnect(): it would queue a DISCONNECT whose write is scheduled on the
    # loop after the socket is closed. Closing the socket is enough for the broker.
    paho = client._client
    sock = paho.socket()
    if sock is not None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_reader(sock.fileno())
            loop.remove_writer(sock.fileno())
        with contextlib.suppress(Exception):
            sock.close()
    task = client._misc_task
    if task is not None:
        task.cancel()
    _forget(client)


def _forget(client: aiomqtt.Client) -> None:
    """Marks the error of a lost connection as seen, so asyncio does not log it as
    unretrieved when the client is dropped: ``send`` has reported it already."""
    lost = _disconnected(client)
    if lost.done() and not lost.cancelled():
        lost.exception()


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def from_config(config: SinkConfig) -> MqttSink:
    raw = dict(config.options)
    # ``protocol = 5`` in TOML is a number; "3.1.1" can only be a string.
    if isinstance(raw.get("protocol"), int) and not isinstance(raw["protocol"], bool):
        raw["protocol"] = str(raw["protocol"])
    options = Options(config.name, config.kind, raw)
    host = options.text("host", "127.0.0.1")
    port = options.integer("port", 1883, minimum=1)
    username = options.text("username")
    password = options.text("password")
    topic_prefix = options.text("topic_prefix", DEFAULT_PREFIX)
    protocol = options.text("protocol", "5")
    client_id = options.text("client_id")
    timeout = options.number("timeout", 10.0, minimum=0.001)
    keepalive = options.integer("keepalive", 60, minimum=1)
    options.check_unknown()
    assert host is not None and topic_prefix is not None and protocol is not None

    def fail(message: str) -> ConfigError:
        return ConfigError(f"sink {config.name!r} (mqtt): {message}")

    if not host:
        raise fail("option 'host' must be a non-empty string")
    if port > 65535:
        raise fail("option 'port' must be at most 65535")
    if password is not None and username is None:
        raise fail("option 'password' needs option 'username' too")
    if protocol == "5.0":
        protocol = "5"
    if protocol == "5":
        checked: Protocol = "5"
    elif protocol == "3.1.1":
        checked = "3.1.1"
    else:
        raise fail(f'option \'protocol\' must be "5" or "3.1.1", not {protocol!r}')
    if not topic_prefix or any(c in topic_prefix for c in "+#\0"):
        raise fail(
            f"option 'topic_prefix' must be a non-empty topic without +, # or NUL,"
            f" not {topic_prefix!r}"
        )
    if topic_prefix.startswith("$"):
        raise fail("option 'topic_prefix' must not start with $ (topics the broker reserves)")
    if topic_prefix.startswith("/") or topic_prefix.endswith("/") or "//" in topic_prefix:
        raise fail(f"option 'topic_prefix' must not have empty levels, not {topic_prefix!r}")
    return MqttSink(
        config.name,
        host=host,
        port=port,
        username=username,
        password=password,
        topic_prefix=topic_prefix,
        protocol=checked,
        client_id=client_id,
        timeout=timeout,
        keepalive=keepalive,
        strictly_ordered=config.strictly_ordered,
    )
