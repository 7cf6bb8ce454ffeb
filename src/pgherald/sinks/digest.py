"""What a digest is, and what a sink that sends digests promises, apart from any one sink.

A digest summarises a sink's deliveries of one period: an hour, a day (both in the sink's
time zone), or one snapshot run. The digest job (``pgherald.delivery.digests``) decides
which deliveries belong to which digest and when a digest is due; the sink only turns a
``Digest`` into its destination's form and says whether it arrived. Both sides know this
module and nothing of each other, so delivery never imports a concrete sink.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Final, Literal, Protocol

from pgherald.events import ChangeEvent
from pgherald.sinks.base import Outcome

Period = Literal["hour", "day", "run"]
PERIODS: Final[tuple[Period, ...]] = ("hour", "day", "run")


@dataclass(frozen=True)
class DigestPolicy:
    """How a sink wants its deliveries grouped."""

    period: Period
    send_empty: bool = False
    """Send a digest that says "nothing changed" for a period without deliveries."""
    delay: float = 60.0
    """Seconds a period stays open after it ended, for changes still on their way."""
    max_items: int = 200
    """Changes listed one by one; the rest are only counted (a digest stays readable and
    its size bounded however much changed)."""
    timezone: tzinfo | None = None
    """Where hours and days begin (UTC when None)."""


@dataclass(frozen=True)
class RunInfo:
    """The snapshot run a ``run`` digest is about."""

    id: int
    watch: str
    status: str
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None = None


@dataclass(frozen=True)
class Digest:
    """One digest, ready to send: counts of everything, and the first changes themselves."""

    sink: str
    period: Period
    """The period it covers: ``hour``/``day`` windows, or ``run`` (``run`` is set)."""
    key: str
    """Stable name of what it covers (``day:2024-05-01``, ``run:42``): the same digest,
    sent again after a crash, has the same key and so the same message id."""
    start: datetime | None
    end: datetime | None
    total: int
    counts: Mapping[tuple[str, str], int]
    """``(watch, operation)`` → number of changes."""
    events: Sequence[tuple[int, ChangeEvent]]
    """``(log id, event)`` of the first ``max_items`` changes, in log order."""
    timezone: tzinfo | None = None
    run: RunInfo | None = None
    watches: tuple[str, ...] = field(default_factory=tuple)
    """The watches it speaks for (for an empty digest: the subscribed ones)."""
    serial: int = 0
    """Tells apart two digests of one key (a run's changes that came after its digest
    went out get a digest of their own): the first delivery's id, or 0."""

    @property
    def empty(self) -> bool:
        return self.total == 0

    @property
    def omitted(self) -> int:
        """Changes counted but not listed."""
        return self.total - len(self.events)

    @property
    def digest_id(self) -> str:
        """A stable id of this digest (sink and key), for message ids and idempotency keys."""
        text = f"{self.sink}\x00{self.key}\x00{self.serial}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class DigestSink(Protocol):
    """A sink whose deliveries go out as digests, sent by the digest job, not one by one."""

    name: str
    digest: DigestPolicy | None

    async def start(self) -> None: ...

    async def send_digest(self, digest: Digest) -> Outcome:
        """``None``: sent. A ``SinkError``: not sent, and whether trying again can help."""
        ...

    async def close(self) -> None: ...


def digest_policy(sink: object) -> DigestPolicy | None:
    """The sink's digest policy, or None when it delivers each change itself (the engine's
    job). The composition root uses it to hand a sink to the engine or the digest job."""
    policy = getattr(sink, "digest", None)
    return policy if isinstance(policy, DigestPolicy) else None
