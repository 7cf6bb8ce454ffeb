"""HTML pages of the change log, read from the store: the index, a watch, a snapshot run, a
row's history. The web app serves them (each function returns a ``render.pages.Page`` to
put in its layout, or ``None`` for a watch, run or row that does not exist);
``export_html`` writes them as a static site with relative links.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry
from pgherald.events.model import TypedLoader
from pgherald.presentation import Presentation, renderer
from pgherald.render import Links, Renderer, StaticLinks, WebLinks
from pgherald.render import pages as render_pages
from pgherald.render.pages import Page
from pgherald.store import history, migrations, runs
from pgherald.store import watches as registry
from pgherald.store.changelog import ChangeLog

PAGE_SIZE: Final = 50
RUN_PAGE_SIZE: Final = 500


def _older(links: Links, url: str, events: list[Any], limit: int) -> str | None:
    """The next page's URL (web pages only: a static site shows the newest page)."""
    if not isinstance(links, WebLinks) or len(events) < limit:
        return None
    return f"{url}?before={events[-1].id}"


def index(
    conn: psycopg.Connection[Any],
    schema: str,
    presentation: Presentation,
    links: Links,
    runs_shown: int = 20,
) -> Page:
    r = renderer(conn, schema, presentation, links)
    return render_pages.index_page(
        r, registry.list_watches(conn, schema), runs.list_runs(conn, schema, limit=runs_shown)
    )


def watch(
    conn: psycopg.Connection[Any],
    schema: str,
    presentation: Presentation,
    links: Links,
    name: str,
    before: int | None = None,
    limit: int = PAGE_SIZE,
    loader: TypedLoader | None = None,
) -> Page | None:
    found = registry.get_watch(conn, schema, name)
    if found is None:
        return None
    r = renderer(conn, schema, presentation, links)
    loader = loader if loader is not None else TypeRegistry.load(conn)
    stored = history.watch_events(
        ChangeLog(conn, schema), name, before or history.NEWEST, limit, loader
    )
    return render_pages.watch_page(
        r,
        found,
        [(s.id, s.event) for s in stored],
        runs.list_runs(conn, schema, watch=name, limit=20),
        older_url=_older(links, links.watch(name), stored, limit),
    )


def run(
    conn: psycopg.Connection[Any],
    schema: str,
    presentation: Presentation,
    links: Links,
    run_id: int,
    limit: int = RUN_PAGE_SIZE,
    loader: TypedLoader | None = None,
) -> Page | None:
    r = renderer(conn, schema, presentation, links)
    return _run(conn, schema, r, run_id, limit, loader)


def _run(
    conn: psycopg.Connection[Any],
    schema: str,
    r: Renderer,
    run_id: int,
    limit: int,
    loader: TypedLoader | None,
) -> Page | None:
    found = history.get_run(conn, schema, run_id)
    if found is None:
        return None
    loader = loader if loader is not None else TypeRegistry.load(conn)
    stored = history.run_events(ChangeLog(conn, schema), found, 0, limit, loader)
    more = history.run_event_count(conn, schema, found) - len(stored) if len(stored) == limit else 0
    return render_pages.run_page(r, found, [(s.id, s.event) for s in stored], more)


def row(
    conn: psycopg.Connection[Any],
    schema: str,
    presentation: Presentation,
    links: Links,
    watch_name: str,
    row_key: str,
    before: int | None = None,
    limit: int = PAGE_SIZE,
    loader: TypedLoader | None = None,
) -> Page | None:
    r = renderer(conn, schema, presentation, links)
    return _row(conn, schema, r, watch_name, row_key, before, limit, loader)


def _row(
    conn: psycopg.Connection[Any],
    schema: str,
    r: Renderer,
    watch_name: str,
    row_key: str,
    before: int | None,
    limit: int,
    loader: TypedLoader | None,
) -> Page | None:
    loader = loader if loader is not None else TypeRegistry.load(conn)
    stored = history.row_events(
        ChangeLog(conn, schema), watch_name, row_key, before or history.NEWEST, limit, loader
    )
    if not stored and before is None:
        return None
    links = r.links
    return render_pages.row_page(
        r,
        watch_name,
        row_key,
        [(s.id, s.event) for s in stored],
        older_url=(_older(links, links.row(watch_name, row_key), stored, limit) if links else None),
    )


@dataclass(frozen=True)
class ExportedSite:
    folder: Path
    watches: int
    runs: int
    rows: int

    @property
    def pages(self) -> int:
        return 1 + self.watches + self.runs + self.rows


def export_html(
    settings: Settings,
    folder: Path,
    presentation: Presentation | None = None,
    *,
    changes_per_watch: int = 200,
    runs_per_watch: int = 50,
) -> ExportedSite:
    """Writes a static site: ``index.html``, a page per watch (its newest changes), per run
    (its latest runs) and per row (the rows among those changes), all links relative.

    Each file is written whole and renamed into place, so a web server serving the folder
    while it is exported never serves half a page. Pages of watches, runs or rows no longer
    exported are left where they are.
    """
    shown = presentation or Presentation.of(settings)
    schema = settings.schema
    now = datetime.now(UTC)
    for sub in ("watches", "runs", "rows"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    counts = {"watches": 0, "runs": 0, "rows": 0}
    with connect(settings, application_name="pgherald-export") as conn:
        migrations.require_current(conn, schema)
        conn.commit()
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one consistent view
        loader = TypeRegistry.load(conn)
        top, below = StaticLinks(""), StaticLinks("../")
        r_top = renderer(conn, schema, shown, top)
        r_below = r_top.with_links(below)

        def write(relative: str, r: Renderer, page: Page | None) -> None:
            if page is None:
                return
            _write(folder / relative, render_pages.standalone(r, page, now))

        write(
            "index.html",
            r_top,
            render_pages.index_page(
                r_top, registry.list_watches(conn, schema), runs.list_runs(conn, schema, limit=20)
            ),
        )
        changelog = ChangeLog(conn, schema)
        for w in registry.list_watches(conn, schema):
            stored = history.watch_events(
                changelog, w.name, history.NEWEST, changes_per_watch, loader
            )
            watch_runs = runs.list_runs(conn, schema, watch=w.name, limit=runs_per_watch)
            page = render_pages.watch_page(
                r_below, w, [(s.id, s.event) for s in stored], watch_runs
            )
            write(StaticLinks.watch_file(w.name), r_below, page)
            counts["watches"] += 1
            for x in watch_runs:
                write(
                    StaticLinks.run_file(x.id),
                    r_below,
                    _run(conn, schema, r_below, x.id, RUN_PAGE_SIZE, loader),
                )
                counts["runs"] += 1
            for key in history.watch_rows(conn, schema, w.name, changes_per_watch):
                write(
                    StaticLinks.row_file(w.name, key),
                    r_below,
                    _row(conn, schema, r_below, w.name, key, None, changes_per_watch, loader),
                )
                counts["rows"] += 1
        conn.rollback()
    return ExportedSite(folder, counts["watches"], counts["runs"], counts["rows"])


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
