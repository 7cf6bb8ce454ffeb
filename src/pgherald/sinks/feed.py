"""The feed sink: a pull sink. Delivering to it is only recording that the event belongs
to the feed; readers fetch the feed (Atom or RSS) at its token's URL, made at read time
from the sink's delivered deliveries (``pgherald.feeds``).

Options: ``token`` (the secret part of the feed's URL; made by ``pgherald sink add`` when
absent, replaced by ``pgherald sink rotate-token``), ``title``, ``entries`` (how many
entries the feed shows, default 100) and ``mode``: ``change`` (an entry per change),
``run`` (per capture run or transaction), ``day`` or ``hour`` (a digest per period).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pgherald.errors import ConfigError
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig

FeedMode = Literal["change", "run", "day", "hour"]
FEED_MODES: Final[tuple[FeedMode, ...]] = ("change", "run", "day", "hour")
DEFAULT_ENTRIES: Final = 100
MAX_ENTRIES: Final = 1000
TOKEN_BYTES: Final = 32
_TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]{22,128}$")


def new_token() -> str:
    """An unguessable token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def check_token(token: str, where: str = "token") -> str:
    if not _TOKEN.match(token):
        raise ConfigError(
            f"{where} must be 22 to 128 characters of A-Z, a-z, 0-9, '-' and '_'"
            " (leave it out and one is made)"
        )
    return token


@dataclass(frozen=True)
class FeedOptions:
    token: str | None
    title: str | None
    entries: int
    mode: FeedMode

    @classmethod
    def parse(cls, sink: str, options: Mapping[str, Any]) -> FeedOptions:
        """The options of feed sink ``sink``; one ConfigError per mistake."""
        opts = Options(sink, "feed", options)
        token = opts.text("token")
        if token is not None:
            check_token(token, f"sink {sink!r} (feed): option 'token'")
        title = opts.text("title")
        entries = opts.integer("entries", DEFAULT_ENTRIES, minimum=1)
        if entries > MAX_ENTRIES:
            raise ConfigError(f"sink {sink!r} (feed): option 'entries' is at most {MAX_ENTRIES}")
        mode = opts.text("mode", "change")
        if mode not in FEED_MODES:
            raise ConfigError(
                f"sink {sink!r} (feed): option 'mode' must be one of {', '.join(FEED_MODES)},"
                f" not {mode!r}"
            )
        opts.check_unknown()
        return cls(token, title, entries, mode)


def with_token(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with a token made if they have none (what ``sink add`` stores)."""
    out = dict(options)
    if not out.get("token"):
        out["token"] = new_token()
    return out


class FeedSink:
    """Accepts every message at once: the feed is read from the deliveries it records."""

    def __init__(self, name: str, options: FeedOptions, strictly_ordered: bool = False) -> None:
        self.name = name
        self.options = options
        self.strictly_ordered = strictly_ordered

    async def start(self) -> None:
        return None

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        return [None] * len(batch)

    async def close(self) -> None:
        return None


def from_config(config: SinkConfig) -> FeedSink:
    return FeedSink(
        config.name,
        FeedOptions.parse(config.name, config.options),
        strictly_ordered=config.strictly_ordered,
    )
