"""What every sink is: one destination, sending batches of messages, saying per message
whether it arrived, and whether a failure is worth retrying.

The delivery engine (``pgherald.delivery``) claims deliveries, builds ``Message``s (the
event encoded in the sink's format, with its idempotency key), calls ``send`` with a
batch in log order, and records each outcome: ``None`` is delivered; a
``RetryableSinkError`` is tried again later with backoff; a ``PermanentSinkError`` is
dead-lettered at once. ``send`` should not raise for one message's failure: it returns
that message's error, so the others of the batch still count. If it raises, the whole
batch counts as failed with that error (a ``SinkError`` says which kind; anything else is
taken as retryable).

Order: messages of one batch are given in log order, and a sink must not let a later
message of the batch overtake an earlier one *to the same destination key* (the engine
puts events of one row in log order; "strictly ordered" sinks get everything in order).
A sink that sends a batch concurrently (pipelined publishes, awaited confirms) keeps that
order by publishing in order on one channel or connection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from pgherald.errors import ConfigError, SinkError
from pgherald.events import ChangeEvent
from pgherald.events.formats import FORMATS, Format, encode

Outcome = SinkError | None
"""``None``: delivered. A ``SinkError``: not delivered, and whether to retry."""

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"


@dataclass(frozen=True)
class Message:
    """One event as a sink sends it."""

    event: ChangeEvent
    log_id: int
    """The event's position in the change log (its order)."""
    body: bytes
    """The event encoded in the sink's format (compact UTF-8 JSON)."""
    content_type: str = "application/json"

    @property
    def idempotency_key(self) -> str:
        """The event's stable id: a consumer that saw it once can drop it the second time."""
        return self.event.event_id

    @property
    def routing_key(self) -> str:
        """``schema.table.operation`` (for a query watch: the watch's name as the table)."""
        e = self.event
        return f"{e.schema}.{e.table}.{e.op}" if e.schema else f"{e.table}.{e.op}"

    @property
    def headers(self) -> dict[str, str]:
        """What every sink that has headers sends along."""
        e = self.event
        return {
            IDEMPOTENCY_HEADER: e.event_id,
            "pgherald-watch": e.watch,
            "pgherald-operation": e.op,
            "pgherald-table": f"{e.schema}.{e.table}" if e.schema else e.table,
        }


def make_message(event: ChangeEvent, log_id: int, fmt: Format, source_uri: str) -> Message:
    """The event encoded for a sink (``FormatError`` when it has no such form)."""
    content_type = "application/cloudevents+json" if fmt == "cloudevents" else "application/json"
    return Message(event, log_id, encode(event, fmt, source_uri=source_uri), content_type)


class Sink(Protocol):
    """One destination. ``start`` connects (and declares what it needs), ``send`` delivers a
    batch, ``close`` lets go. The engine calls them from one asyncio task at a time."""

    name: str
    strictly_ordered: bool
    """Everything in log order (one lane); otherwise only each row's events are."""

    async def start(self) -> None: ...

    async def send(self, batch: Sequence[Message]) -> list[Outcome]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SinkConfig:
    """A sink as configured (TOML ``[[sink]]`` or ``pgherald sink add``): validated by the
    sink's own ``from_config``, which reads ``options`` and refuses unknown keys."""

    name: str
    kind: str
    format: Format = "pgherald"
    options: Mapping[str, Any] = field(default_factory=dict)
    strictly_ordered: bool = False


Kind = Literal[
    "webhook", "amqp", "nats", "redis", "mqtt", "replica", "python", "stdout", "feed", "email"
]


def check_format(value: str) -> Format:
    for known in FORMATS:
        if value == known:
            return known
    raise ConfigError(f"unknown format {value!r}; use one of {', '.join(FORMATS)}")


class Options:
    """Reads a sink's options with one clear error per mistake, and notices unknown keys."""

    def __init__(self, sink: str, kind: str, options: Mapping[str, Any]) -> None:
        self.sink = sink
        self.kind = kind
        self._options = dict(options)
        self._used: set[str] = set()

    def _fail(self, message: str) -> ConfigError:
        return ConfigError(f"sink {self.sink!r} ({self.kind}): {message}")

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        self._used.add(key)
        value = self._options.get(key, default)
        if value is None:
            if required:
                raise self._fail(f"option {key!r} is required")
            return None
        if not isinstance(value, str) or (required and not value):
            raise self._fail(f"option {key!r} must be a non-empty string")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        self._used.add(key)
        value = self._options.get(key, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self._fail(f"option {key!r} must be a number, not {value!r}") from None
        if number < minimum:
            raise self._fail(f"option {key!r} must be at least {minimum:g}")
        return number

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        number = self.number(key, default, minimum=minimum)
        if number != int(number):
            raise self._fail(f"option {key!r} must be a whole number")
        return int(number)

    def boolean(self, key: str, default: bool) -> bool:
        self._used.add(key)
        value = self._options.get(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise self._fail(f"option {key!r} must be true or false, not {value!r}")

    def mapping(self, key: str) -> dict[str, str]:
        self._used.add(key)
        value = self._options.get(key) or {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self._fail(f"option {key!r} must be a table of strings")
        return dict(value)

    def check_unknown(self) -> None:
        unknown = sorted(set(self._options) - self._used)
        if unknown:
            raise self._fail(
                f"unknown option(s) {', '.join(map(repr, unknown))}; known:"
                f" {', '.join(sorted(self._used))}"
            )
