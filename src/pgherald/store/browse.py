"""Reading the change log the way people browse it: newest first, filtered, page by page.

Pages are keyset pages: "the events below log id N", never ``OFFSET``, so the thousandth
page costs what the first does. Each access path has an index: the whole log its primary
key, one or more watches ``(watch, id)``, one row ``(watch, row_key, id)``. Filters that
no index serves (operation, time, text) are applied within a bounded window of the log
(``window`` events per watch), so a rare match costs at most one window per request; a
page that ends short says where the search stopped (``Page.older``), and the next request
goes on from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg

from pgherald.db.sqlfiles import named_query
from pgherald.events.model import TypedLoader
from pgherald.store.changelog import ChangeLog, StoredEvent
from pgherald.store.deliveries import DeliveryRow
from pgherald.store.session import in_schema
from pgherald.store.today import changes_today

NEWEST: Final = 2**63 - 1
"""A ``before`` above every log id: the first page."""
WINDOW: Final = 20_000
"""How many events of a watch (or of the log) one request looks through for matches."""


def _q(name: str) -> LiteralString:
    return named_query("web.sql", name)


@dataclass(frozen=True)
class Filters:
    """What the change browser narrows the log to; ``None`` means "any"."""

    watches: tuple[str, ...] | None = None
    """The watches to show (a viewer's allow-list, or the one chosen); None: every watch."""
    op: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    row_key: str | None = None
    """A row (``row_key`` as the log stores it); needs exactly one watch."""
    text: str | None = None
    """Case-insensitive text looked for in the key and the old and new values."""

    @property
    def residual(self) -> bool:
        """Whether a filter applies that no index serves (so pages are windowed)."""
        return any(v is not None for v in (self.op, self.since, self.until, self.text))

    def params(self) -> dict[str, Any]:
        return {"op": self.op, "since": self.since, "until": self.until, "q": self.text}


@dataclass(frozen=True)
class Page:
    events: list[StoredEvent]
    older: int | None
    """``before`` for the next page, or None when nothing older is left."""
    searched_to: int | None = None
    """Set when the page ended short because the window was used up: the log id the
    search reached, from where the next page goes on."""


def page(
    log: ChangeLog,
    filters: Filters,
    before: int = NEWEST,
    limit: int = 50,
    window: int = WINDOW,
    loader: TypedLoader | None = None,
) -> Page:
    """The newest ``limit`` events below log id ``before`` that match ``filters``; with a
    ``loader`` (``db.types``), their values are typed (numbers, dates...)."""
    conn, schema = log.conn, log.schema
    if filters.watches is not None and not filters.watches:
        return Page([], None)
    params: dict[str, Any] = {"before": before, "limit": limit + 1, **filters.params()}
    with in_schema(conn, schema):
        if filters.row_key is not None:
            assert filters.watches is not None and len(filters.watches) == 1
            name = "page_row"
            params.update(watch=filters.watches[0], row_key=filters.row_key)
            floor = 0
        else:
            floor = 0
            if filters.residual:
                floor = _floor(conn, filters.watches, before, window)
            params["floor"] = floor
            if filters.watches is None:
                name = "page_all"
            else:
                name = "page_watches"
                params["watches"] = list(filters.watches)
        rows = conn.execute(_q(name), params).fetchall()
    events = log.stored_events(rows[:limit], loader)
    if len(rows) > limit:
        return Page(events, events[-1].id)
    if floor > 1:
        return Page(events, floor, searched_to=floor)
    return Page(events, None)


def _floor(
    conn: psycopg.Connection[Any], watches: Sequence[str] | None, before: int, window: int
) -> int:
    if watches is None:
        row = conn.execute(_q("floor_all"), {"before": before, "window": window}).fetchone()
        assert row is not None
        return int(row[1]) if int(row[0]) == window else 0
    row = conn.execute(
        _q("floor_watches"), {"watches": list(watches), "before": before, "window": window}
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def newer(
    log: ChangeLog,
    filters: Filters,
    after: int,
    upto: int,
    limit: int = 200,
    loader: TypedLoader | None = None,
) -> list[StoredEvent]:
    """Matching events with ``after < id <= upto``, oldest first (live updates)."""
    if filters.watches is not None and not filters.watches:
        return []
    params: dict[str, Any] = {"after": after, "upto": upto, "limit": limit, **filters.params()}
    name = "newer_all"
    if filters.watches is not None:
        name = "newer_watches"
        params["watches"] = list(filters.watches)
    with in_schema(log.conn, log.schema):
        rows = log.conn.execute(_q(name), params).fetchall()
    if filters.row_key is not None:
        rows = [r for r in rows if r[6] == filters.row_key]
    return log.stored_events(rows, loader)


def event(log: ChangeLog, log_id: int, loader: TypedLoader | None = None) -> StoredEvent | None:
    with in_schema(log.conn, log.schema):
        rows = log.conn.execute(_q("get_event"), {"id": log_id}).fetchall()
    found = log.stored_events(rows, loader)
    return found[0] if found else None


@dataclass(frozen=True)
class Activity:
    """How a watch is doing, for the dashboard."""

    watch: str
    changes_today: int
    errors_today: int
    last_change_at: datetime | None
    queued: int
    oldest_queued: datetime | None


def activity(
    conn: psycopg.Connection[Any], schema: str, watches: Sequence[str] | None
) -> dict[str, Activity]:
    params = {"watches": list(watches) if watches is not None else None}
    with in_schema(conn, schema):
        rows = conn.execute(_q("watch_activity"), params).fetchall()
    today = changes_today(conn, schema, watches)
    return {
        r[0]: Activity(r[0], today.get(r[0], 0), int(r[1]), r[2], int(r[3]), r[4]) for r in rows
    }


def deliveries(
    conn: psycopg.Connection[Any],
    schema: str,
    before: int = NEWEST,
    sink: str | None = None,
    status: str | None = None,
    limit: int = 50,
) -> tuple[list[DeliveryRow], int | None]:
    """A page of deliveries, newest first, and ``before`` for the next page."""
    params = {"before": before, "sink": sink, "status": status, "limit": limit + 1}
    with in_schema(conn, schema):
        rows = conn.execute(_q("page_deliveries"), params).fetchall()
    found = [DeliveryRow(*r) for r in rows[:limit]]
    return found, (found[-1].id if len(rows) > limit else None)


__all__ = ["NEWEST", "WINDOW", "Activity", "Filters", "Page", "activity", "event", "newer", "page"]
