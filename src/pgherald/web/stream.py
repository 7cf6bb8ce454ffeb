"""``/changes/stream``: the change browser's new rows as server-sent events.

Each event is one table row of HTML (``event: change``, ``id:`` its log id), which the
page's htmx SSE extension puts at the top of the table. A reconnecting browser sends the
last id it got (``Last-Event-ID``) and continues from there. The stream checks the
session again at every wake-up, so a user who is removed, demoted or signs out elsewhere
stops receiving changes, and a viewer only ever receives the watches on their list.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pgherald.db.types import TypeRegistry
from pgherald.store import browse
from pgherald.store.changelog import ChangeLog
from pgherald.web import pages
from pgherald.web.console import Console, Ctx, login_redirect
from pgherald.web.security import Viewer
from pgherald.web.views import LIST_WIDTH, view

KEEPALIVE_SECONDS: Final = 15.0
BATCH: Final = 200
BACKLOG: Final = 1000
"""A stream resumed from far behind starts at most this many events back."""


def _sse(event: str, data: str, id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if id is not None:
        lines.append(f"id: {id}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


def _authorize(console: Console, request: Request) -> tuple[Viewer, browse.Filters] | Response:
    with console.pool.connection() as conn:
        viewer = console.viewer(request, conn)
        if viewer is None:
            return login_redirect(request)
        ctx = Ctx(request, console, conn, viewer, None)
        try:
            filters = pages._filters(ctx, pages._query(ctx))
        except pages.BadFilter as e:
            return Response(str(e), status_code=400)
        if filters is None:
            return Response("There is no such watch.", status_code=404)
        return viewer, filters


def _still_allowed(console: Console, request: Request, was: Viewer) -> bool:
    with console.pool.connection() as conn:
        now = console.viewer(request, conn)
    return (
        now is not None
        and now.role == was.role
        and (now.watches is None or set(was.watches or ()) <= set(now.watches))
    )


def _read(
    console: Console, filters: browse.Filters, after: int
) -> tuple[list[tuple[int, str]], int]:
    """Rendered rows of what matched since ``after``, and how far the log was read."""
    template = console.templates.get_template("_change_row.html")
    with console.pool.connection() as conn:
        log = ChangeLog(conn, console.settings.schema)
        upto = log.last_id()
        after = max(after, upto - BACKLOG)
        found = browse.newer(log, filters, after, upto, BATCH, TypeRegistry.load(conn))
        r = console.renderer(conn, LIST_WIDTH) if found else None
    if len(found) == BATCH:
        upto = found[-1].id
    rows = [(e.id, template.render(e=view(e, r), fresh=True)) for e in found if r is not None]
    return rows, upto


async def stream(request: Request) -> Response:
    console: Console = request.app.state.console
    checked = await run_in_threadpool(_authorize, console, request)
    if isinstance(checked, Response):
        return checked
    viewer, filters = checked
    after = 0
    for raw in (request.headers.get("Last-Event-ID"), request.query_params.get("after")):
        if raw and raw.isdigit() and len(raw) < 19:
            after = max(after, int(raw))

    async def events() -> AsyncIterator[str]:
        nonlocal after
        notifier = console.notifier
        yield "retry: 3000\n\n"
        while not notifier.closed:
            ticket = notifier.ticket()
            if not await run_in_threadpool(_still_allowed, console, request, viewer):
                yield _sse("signed-out", "")
                return
            while True:
                rows, upto = await run_in_threadpool(_read, console, filters, after)
                for log_id, html in rows:
                    yield _sse("change", html, log_id)
                after = max(after, upto)
                if len(rows) < BATCH:
                    break
            if not await notifier.wait(ticket, KEEPALIVE_SECONDS):
                yield ": keepalive\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
