"""The readable pages of ``pgherald.pages`` served live in the console: a watch's changes
(``/watches/<name>``), a snapshot run (``/runs/<id>``) and a row's history
(``/watches/<name>/rows/<key>``). These are the addresses that feed entries and e-mails
link to (``render.WebLinks``), and the same pages that ``pgherald export --html`` writes,
shown in the console's layout with its locale and time zone.

Signed in only, like every page; a viewer reaches only the watches on their allow-list
(and only the runs of those), and anything else is answered as what does not exist.
"""

from __future__ import annotations

from starlette.responses import Response

from pgherald import pages
from pgherald.render import WebLinks
from pgherald.render.pages import Page
from pgherald.store import history
from pgherald.web.console import Ctx, not_found, page

LINKS = WebLinks("")


def _before(ctx: Ctx) -> int | None:
    raw = ctx.param("before")
    return int(raw) if raw is not None and raw.isdigit() and len(raw) <= 18 else None


def _show(ctx: Ctx, found: Page | None, what: str) -> Response:
    if found is None:
        return not_found(ctx, what)
    return ctx.render("published.html", page=found, active="changes")


@page()
def watch_page(ctx: Ctx) -> Response:
    name = ctx.request.path_params["name"]
    if not ctx.viewer.may_read(name):
        return not_found(ctx, "There is no such watch.")
    found = pages.watch(
        ctx.conn, ctx.schema, ctx.console.presentation, LINKS, name, before=_before(ctx)
    )
    return _show(ctx, found, "There is no such watch.")


@page()
def row_page(ctx: Ctx) -> Response:
    name, key = ctx.request.path_params["name"], ctx.request.path_params["key"]
    if not ctx.viewer.may_read(name):
        return not_found(ctx, "There is no such row.")
    found = pages.row(
        ctx.conn, ctx.schema, ctx.console.presentation, LINKS, name, key, before=_before(ctx)
    )
    return _show(ctx, found, "There is no such row.")


@page()
def run_page(ctx: Ctx) -> Response:
    run_id = int(ctx.request.path_params["run_id"])
    run = history.get_run(ctx.conn, ctx.schema, run_id) if run_id < 2**63 else None
    if run is None or not (
        ctx.viewer.can_edit or (run.watch is not None and ctx.viewer.may_read(run.watch))
    ):
        return not_found(ctx, "There is no such run.")
    found = pages.run(ctx.conn, ctx.schema, ctx.console.presentation, LINKS, run_id)
    return _show(ctx, found, "There is no such run.")


__all__ = ["row_page", "run_page", "watch_page"]
