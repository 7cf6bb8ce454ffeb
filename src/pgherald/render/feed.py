"""Atom 1.0 and RSS 2.0 documents (feedgen) from rendered entries.

Ids are ``urn:uuid:`` URNs, made with UUIDv5 from the feed's own id and the entry's key
(an event's stable id, or a digest's run or period), so an entry keeps its id however often
the feed is made, and two feeds never share one. ``updated`` is the newest change an
entry shows (a digest of the current hour is updated as changes arrive); ``published``
its first. The rules of the W3C feed validator that matter here are kept: an Atom feed and
each entry have id, title and updated, the feed has an author and a ``self`` link; an RSS
channel has title, link and description, each item a guid and an RFC 822 ``pubDate``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from feedgen.feed import FeedGenerator

from pgherald.events.formats import pgherald_version
from pgherald.render.values import visible

FeedKind = Literal["atom", "rss"]
FEED_KINDS: Final[tuple[FeedKind, ...]] = ("atom", "rss")
CONTENT_TYPES: Final[dict[str, str]] = {
    "atom": "application/atom+xml; charset=utf-8",
    "rss": "application/rss+xml; charset=utf-8",
}
_NAMESPACE: Final = uuid.UUID("5b0c6f3e-6c1e-4a51-9d43-3b8a1f0e7d21")


def feed_uuid(*parts: str) -> uuid.UUID:
    """A feed's id from what names it for good (store, sink name, when it was made)."""
    return uuid.uuid5(_NAMESPACE, "\x1f".join(parts))


def entry_id(feed: uuid.UUID, key: str) -> str:
    return uuid.uuid5(feed, key).urn


@dataclass(frozen=True)
class FeedEntry:
    key: str
    """What the entry is (``event:<event id>``, ``run:...``, ``day:2024-03-01``)."""
    title: str
    html: str
    updated: datetime
    published: datetime
    link: str | None = None


@dataclass(frozen=True)
class FeedInfo:
    id: uuid.UUID
    title: str
    subtitle: str
    self_url: str
    """This document's URL (the Atom or the RSS one)."""
    link: str
    """A web page for people (the HTML page of the feed's changes, or the site)."""
    updated: datetime
    """When the feed changed: its newest entry, or when it was made if it has none."""
    author: str = "pgherald"


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _text(value: str) -> str:
    """Feed text must be XML: characters XML cannot carry are shown as escapes."""
    return visible(value)


def document(kind: FeedKind, info: FeedInfo, entries: Sequence[FeedEntry]) -> bytes:
    """The feed as UTF-8 XML, entries in the order given (newest first)."""
    fg = FeedGenerator()
    fg.id(info.id.urn)
    fg.title(_text(info.title))
    fg.subtitle(_text(info.subtitle))
    fg.description(_text(info.subtitle))
    fg.author({"name": _text(info.author)})
    # feedgen makes the last link the RSS channel's <link>: the page for people.
    fg.link(href=info.self_url, rel="self")
    fg.link(href=info.link, rel="alternate")
    fg.generator("pgherald", version=pgherald_version(), uri="https://pypi.org/project/pgherald/")
    fg.language("en")
    fg.updated(_aware(info.updated))
    if kind == "rss":
        fg.lastBuildDate(_aware(info.updated))
    for e in entries:
        fe = fg.add_entry(order="append")
        fe.id(entry_id(info.id, e.key))
        fe.guid(entry_id(info.id, e.key), permalink=False)
        fe.title(_text(e.title))
        fe.updated(_aware(e.updated))
        fe.published(_aware(e.published))
        fe.content(_text(e.html), type="html")
        if e.link:
            fe.link(href=e.link, rel="alternate")
    data: bytes = fg.atom_str(pretty=True) if kind == "atom" else fg.rss_str(pretty=True)
    return data
