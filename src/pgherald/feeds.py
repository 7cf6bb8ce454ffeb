"""Feeds: a feed sink's delivered changes as Atom or RSS, for the web app
(``feed_for_token``), for static files (``export_feeds``), and the feed tokens.

A feed is read at request time: the sink's delivered deliveries joined to their events,
newest first (``store.history.feed_events``), one entry per change or, in a digest mode,
one per run, hour or day (``render.digest``). Nothing is stored but the deliveries.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry
from pgherald.errors import ConfigError
from pgherald.events import ChangeEvent
from pgherald.events.model import TypedLoader
from pgherald.presentation import Presentation, renderer
from pgherald.render import WebLinks
from pgherald.render.digest import event_time, group
from pgherald.render.feed import FEED_KINDS, FeedEntry, FeedInfo, FeedKind, document, feed_uuid
from pgherald.sinks.feed import FeedOptions, new_token
from pgherald.store import deliveries, history, migrations
from pgherald.store.changelog import ChangeLog
from pgherald.store.deliveries import StoredSink

log = logging.getLogger("pgherald.feeds")

PAGE: Final = 500
MAX_SCAN: Final = 100_000
"""Events read at most to make one digest feed (a digest beyond counts what it read)."""


@dataclass(frozen=True)
class Feed:
    sink: StoredSink
    options: FeedOptions


def _feed(sink: StoredSink) -> Feed:
    return Feed(sink, FeedOptions.parse(sink.name, sink.options))


def feed_sinks(conn: psycopg.Connection[Any], schema: str) -> list[Feed]:
    """Every feed sink; one whose stored options are malformed (edited by hand) is logged
    and left out, so it cannot take the other feeds down with it."""
    out = []
    for sink in deliveries.list_sinks(conn, schema):
        if sink.kind != "feed":
            continue
        try:
            out.append(_feed(sink))
        except ConfigError as e:
            log.warning("%s; the feed is not served", e)
    return out


def find_by_token(conn: psycopg.Connection[Any], schema: str, token: str) -> Feed | None:
    """The enabled feed whose token this is; every feed's token is compared in constant
    time, so the answer's timing tells nothing about how close a guess was."""
    found: Feed | None = None
    given = token.encode("utf-8")
    for feed in feed_sinks(conn, schema):
        stored = (feed.options.token or "").encode("utf-8")
        if stored and hmac.compare_digest(stored, given) and feed.sink.enabled:
            found = feed
    return found


def _pages(
    changelog: ChangeLog, sink: str, loader: TypedLoader | None
) -> Iterator[tuple[int, ChangeEvent]]:
    before = history.NEWEST
    scanned = 0
    while scanned < MAX_SCAN:
        page = history.feed_events(changelog, sink, before, PAGE, loader)
        for stored in page:
            yield stored.id, stored.event
        if len(page) < PAGE:
            return
        scanned += len(page)
        before = page[-1].id


def build_feed(
    conn: psycopg.Connection[Any],
    schema: str,
    feed: Feed,
    kind: FeedKind,
    presentation: Presentation,
    loader: TypedLoader | None = None,
) -> bytes:
    """The feed document of one feed sink."""
    if kind not in FEED_KINDS:
        raise ConfigError(f"unknown feed kind {kind!r}; use atom or rss")
    if not presentation.public_url:
        raise ConfigError(
            "feeds need the public URL of the web app for their links: set public_url"
            " (or pass --base-url)"
        )
    token = feed.options.token
    if not token:
        raise ConfigError(f"feed {feed.sink.name!r} has no token yet: run `pgherald sink token`")
    links = WebLinks(presentation.public_url)
    r = renderer(conn, schema, presentation, links)
    changelog = ChangeLog(conn, schema)
    loader = loader if loader is not None else TypeRegistry.load(conn)
    opts = feed.options
    groups = group(
        _pages(changelog, feed.sink.name, loader),
        opts.mode,
        r.formatter.zone,
        limit=opts.entries,
    )
    entries: list[FeedEntry] = []
    for g in groups:
        assert g.first is not None and g.last is not None
        if opts.mode == "change":
            log_id, event = g.events[0]
            view = r.view(event, log_id)
            entries.append(
                FeedEntry(
                    key=g.key,
                    title=view.headline,
                    html=str(r.change_html(view)),
                    updated=event_time(event),
                    published=event_time(event),
                    link=view.row_url or view.watch_url,
                )
            )
            continue
        digest = r.digest(g)
        link = links.index()
        if g.key.startswith("run:"):
            link = links.run(int(g.key.rsplit(":", 1)[1]))
        elif len(g.watches) == 1:
            link = links.watch(g.watches[0])
        entries.append(
            FeedEntry(
                key=g.key,
                title=digest.title,
                html=str(digest.html),
                updated=g.last,
                published=g.first,
                link=link,
            )
        )
    sink = feed.sink
    created = sink.created_at or datetime(1970, 1, 1, tzinfo=UTC)
    watched = [
        r.display(s.watch).title
        for s in deliveries.list_subscriptions(conn, schema)
        if s.sink == sink.name
    ]
    info = FeedInfo(
        id=feed_uuid(schema, sink.name, created.isoformat()),
        title=opts.title or f"pgherald: {sink.name}",
        subtitle=(
            f"Changes in {', '.join(watched)}" if watched else "Changes captured by pgherald"
        ),
        self_url=links.feed(token, kind),
        link=links.index(),
        updated=max((e.updated for e in entries), default=created),
    )
    return document(kind, info, entries)


def feed_for_token(
    settings: Settings,
    token: str,
    kind: FeedKind,
    *,
    presentation: Presentation | None = None,
    conn: psycopg.Connection[Any] | None = None,
    loader: TypedLoader | None = None,
) -> bytes | None:
    """The feed document for a token, or ``None`` when no enabled feed has that token (the
    web app answers 404 then, the same for every wrong token)."""
    shown = presentation or Presentation.of(settings)
    if conn is None:
        with connect(settings, autocommit=True, application_name="pgherald-feeds") as own:
            return feed_for_token(
                settings, token, kind, presentation=shown, conn=own, loader=loader
            )
    feed = find_by_token(conn, settings.schema, token)
    if feed is None:
        return None
    return build_feed(conn, settings.schema, feed, kind, shown, loader)


def ensure_tokens(conn: psycopg.Connection[Any], schema: str) -> dict[str, str]:
    """Gives every feed sink without a token one; returns each feed's token by sink name."""
    for feed in feed_sinks(conn, schema):
        if not feed.options.token:
            history.set_feed_token(conn, schema, feed.sink.name, new_token(), replace=False)
    return {f.sink.name: f.options.token for f in feed_sinks(conn, schema) if f.options.token}


def feed_token(settings: Settings, name: str) -> str:
    """A feed sink's token (made now if it has none)."""
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        _require_feed(conn, settings.schema, name)
        tokens = ensure_tokens(conn, settings.schema)
        conn.commit()
    return tokens[name]


def rotate_token(settings: Settings, name: str) -> str:
    """Replaces a feed sink's token: the old URL stops working at once."""
    token = new_token()
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        _require_feed(conn, settings.schema, name)
        history.set_feed_token(conn, settings.schema, name, token, replace=True)
        conn.commit()
    return token


def _require_feed(conn: psycopg.Connection[Any], schema: str, name: str) -> None:
    for s in deliveries.list_sinks(conn, schema):
        if s.name == name:
            if s.kind != "feed":
                raise ConfigError(f"sink {name!r} is a {s.kind} sink, not a feed")
            return
    raise ConfigError(f"no sink named {name!r} (see `pgherald sink list`)")


@dataclass(frozen=True)
class ExportedFeed:
    sink: str
    files: tuple[Path, ...]


def export_feeds(
    settings: Settings,
    folder: Path,
    presentation: Presentation | None = None,
) -> list[ExportedFeed]:
    """Writes every enabled feed as ``<token>.atom`` and ``<token>.rss`` in ``folder`` (the
    web app's ``/feeds/`` URLs, so a static server of the folder at ``<public URL>/feeds/``
    serves the same links). Files are written whole, then renamed into place."""
    shown = presentation or Presentation.of(settings)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[ExportedFeed] = []
    with connect(settings, application_name="pgherald-export") as conn:
        migrations.require_current(conn, settings.schema)
        ensure_tokens(conn, settings.schema)
        conn.commit()
        loader = TypeRegistry.load(conn)
        for feed in feed_sinks(conn, settings.schema):
            if not feed.sink.enabled or not feed.options.token:
                continue
            files = []
            for kind in FEED_KINDS:
                data = build_feed(conn, settings.schema, feed, kind, shown, loader)
                path = folder / f"{feed.options.token}.{kind}"
                _write(path, data)
                files.append(path)
            out.append(ExportedFeed(feed.sink.name, tuple(files)))
        conn.commit()
    return out


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
