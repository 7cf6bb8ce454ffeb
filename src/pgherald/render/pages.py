"""HTML pages of the change log: the index, a watch, a run, a row's history.

Each function returns a ``Page``: its title, its body (HTML to put inside any layout; the
web console uses its own) and its breadcrumbs; ``Renderer``-independent ``standalone``
wraps one in pgherald's plain layout, as the static export writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from markupsafe import Markup

from pgherald.events.model import ChangeEvent
from pgherald.render.links import WebLinks
from pgherald.render.renderer import Renderer
from pgherald.render.values import visible


class WatchLike(Protocol):
    """What a page shows of a watch (``store.watches.Watch`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def changes_seen(self) -> int: ...
    @property
    def last_run_at(self) -> datetime | None: ...
    @property
    def last_error(self) -> str | None: ...


class RunLike(Protocol):
    """What a page shows of a run (``store.runs.Run`` is one)."""

    @property
    def id(self) -> int: ...
    @property
    def watch(self) -> str | None: ...
    @property
    def source(self) -> str: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def ended_at(self) -> datetime | None: ...
    @property
    def status(self) -> str: ...
    @property
    def inserts(self) -> int: ...
    @property
    def updates(self) -> int: ...
    @property
    def deletes(self) -> int: ...
    @property
    def rows_compared(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...


@dataclass(frozen=True)
class Crumb:
    title: str
    url: str


@dataclass(frozen=True)
class Page:
    title: str
    body: Markup
    crumbs: tuple[Crumb, ...] = field(default=())


def _line(text: str | None, limit: int = 300) -> str:
    if text is None:
        return ""
    shown = visible(text, newlines=False)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _when(r: Renderer, value: datetime | None) -> str:
    return r.when(value) if value is not None else "never"


def _watch_row(r: Renderer, w: WatchLike) -> dict[str, Any]:
    return {
        "title": _line(r.display(w.name).title),
        "url": r.links.watch(w.name) if r.links else "",
        "target": _line(w.target),
        "method": w.method,
        "status": w.status,
        "changes": r.formatter.text(w.changes_seen),
        "last_run": _when(r, w.last_run_at),
        "last_error": _line(w.last_error),
    }


def _run_row(r: Renderer, run: RunLike) -> dict[str, Any]:
    fmt = r.formatter.text
    return {
        "id": run.id,
        "url": r.links.run(run.id) if r.links else "",
        "watch_title": _line(r.display(run.watch).title) if run.watch else "(all watches)",
        "watch_url": r.links.watch(run.watch) if r.links and run.watch else None,
        "source": run.source,
        "started": _when(r, run.started_at),
        "ended": _when(r, run.ended_at) if run.ended_at else "still running",
        "status": run.status,
        "error": _line(run.error),
        "inserts": fmt(run.inserts),
        "updates": fmt(run.updates),
        "deletes": fmt(run.deletes),
        "rows_compared": fmt(run.rows_compared) if run.rows_compared is not None else "—",
    }


def _body(renderer: Renderer, name: str, /, **context: Any) -> Markup:
    return renderer.templates.html(name, None, **context)


def index_page(r: Renderer, watches: Sequence[WatchLike], runs: Sequence[RunLike]) -> Page:
    body = _body(
        r,
        "index.html",
        watches=[_watch_row(r, w) for w in watches],
        runs=[_run_row(r, x) for x in runs],
    )
    return Page("Watches", body)


def watch_page(
    r: Renderer,
    watch: WatchLike,
    events: Sequence[tuple[int, ChangeEvent]],
    runs: Sequence[RunLike] = (),
    older_url: str | None = None,
) -> Page:
    """A watch: what it watches and how it goes, its latest runs and changes (newest first)."""
    body = _body(
        r,
        "watch.html",
        w=_watch_row(r, watch),
        runs=[_run_row(r, x) for x in runs],
        changes=r.changes_html(events),
        older_url=older_url,
    )
    return Page(_line(r.display(watch.name).title), body)


def run_page(
    r: Renderer, run: RunLike, events: Sequence[tuple[int, ChangeEvent]], more: int = 0
) -> Page:
    """A run: when, how it ended, its counts, and the changes it found (in log order)."""
    row = _run_row(r, run)
    body = _body(r, "run.html", r=row, changes=r.changes_html(events), more=more)
    crumbs: tuple[Crumb, ...] = ()
    if run.watch and r.links:
        crumbs = (Crumb(row["watch_title"], r.links.watch(run.watch)),)
    return Page(f"Run {run.id}", body, crumbs)


def row_page(
    r: Renderer,
    watch: str,
    row_key: str,
    events: Sequence[tuple[int, ChangeEvent]],
    older_url: str | None = None,
) -> Page:
    """A row's history, newest first: what changed, when, how captured, old → new."""
    title = _line(r.display(watch).title)
    label = "row"
    if events:
        label = r.view(events[0][1]).label or label
    body = _body(
        r,
        "row.html",
        watch_title=title,
        watch_url=r.links.watch(watch) if r.links else "",
        changes=r.changes_html(events),
        older_url=older_url,
        row_key=row_key,
    )
    crumbs = (Crumb(title, r.links.watch(watch)),) if r.links else ()
    return Page(f"{title}: {label}", body, crumbs)


def standalone(r: Renderer, page: Page, generated: datetime | None = None) -> str:
    """The page in pgherald's own plain layout (the static export's files)."""
    return r.templates.render(
        "layout.html",
        None,
        lang=r.formatter.babel_locale.language,
        title=page.title,
        body=page.body,
        crumbs=page.crumbs,
        links=r.links or WebLinks(),
        timezone=r.formatter.timezone,
        generated=r.when(generated) if generated else None,
    )
