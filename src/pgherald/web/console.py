"""What every request of the console shares: settings, the cookie signer, templates, a few
pooled store connections and the live notifier; and the wrapper that authenticates a
request, checks its role and its CSRF token, and runs the page's code in a worker thread
(the store's code is synchronous psycopg).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jinja2
import psycopg
from psycopg import pq
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from pgherald import __version__
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.errors import ConnectionFailed, PgHeraldError, SchemaError
from pgherald.presentation import Presentation, displays
from pgherald.render import Formatter, Renderer, WebLinks
from pgherald.store import migrations
from pgherald.store import users as user_store
from pgherald.web.live import Notifier
from pgherald.web.security import SESSION_COOKIE, Signer, Viewer, same_token

log = logging.getLogger("pgherald.web")
Need = Literal["viewer", "editor", "admin"]
_POOL_SIZE: Final = 8


class Pool:
    """A few idle autocommit connections, reused between requests (a console is small)."""

    def __init__(self, settings: Settings, size: int = _POOL_SIZE) -> None:
        self.settings = settings
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue(size)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn: psycopg.Connection[Any] | None = None
        while conn is None:
            try:
                candidate = self._idle.get_nowait()
            except queue.Empty:
                conn = connect(self.settings, autocommit=True, application_name="pgherald-web")
                break
            if not candidate.closed and not candidate.broken:
                conn = candidate
        try:
            yield conn
        finally:
            if (
                conn.closed
                or conn.broken
                or conn.info.transaction_status != pq.TransactionStatus.IDLE
            ):
                conn.close()
            else:
                try:
                    self._idle.put_nowait(conn)
                except queue.Full:
                    conn.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


@dataclass
class Console:
    settings: Settings
    signer: Signer
    templates: jinja2.Environment
    notifier: Notifier
    pool: Pool
    secure_cookies: bool | None = None
    """Mark cookies Secure: None decides per request (https or not)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def presentation(self) -> Presentation:
        """The settings' locale, time zone and templates: the console shows values and
        times as the feeds, pages and mails do."""
        return Presentation.of(self.settings)

    def formatter(self) -> Formatter:
        p = self.presentation
        return Formatter(p.locale, p.timezone)

    def renderer(self, conn: psycopg.Connection[Any], shorten: int) -> Renderer:
        """The shared renderer (``pgherald.render``) with every watch's display options and
        links to the console's own pages; values cut at ``shorten`` characters."""
        p = self.presentation
        return Renderer(
            locale=p.locale,
            timezone=p.timezone,
            templates_dir=p.templates_dir,
            displays=displays(conn, self.settings.schema),
            links=WebLinks(""),
            shorten=shorten,
        )

    def viewer(self, request: Request, conn: psycopg.Connection[Any]) -> Viewer | None:
        session = self.signer.read_session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        user = user_store.get_user(conn, self.settings.schema, session.user)
        if user is None or user.generation != session.generation:
            return None
        return Viewer(user, session)

    def secure(self, request: Request) -> bool:
        if self.secure_cookies is not None:
            return self.secure_cookies
        return request.url.scheme == "https"

    def render(
        self,
        request: Request,
        template: str,
        viewer: Viewer | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        page = self.templates.get_template(template)
        html = page.render(
            request=request,
            viewer=viewer,
            csrf=viewer.csrf if viewer else "",
            path=request.url.path,
            version=__version__,
            **context,
        )
        return HTMLResponse(html, status_code=status)


@dataclass
class Ctx:
    """One authenticated request: who, with which connection, and its form (for POST)."""

    request: Request
    console: Console
    conn: psycopg.Connection[Any]
    viewer: Viewer
    form: FormData | None

    @property
    def settings(self) -> Settings:
        return self.console.settings

    @property
    def schema(self) -> str:
        return self.console.settings.schema

    def param(self, name: str) -> str | None:
        """A query parameter, or a form field for POST; blank counts as absent."""
        source = self.form if self.form is not None else self.request.query_params
        value = source.get(name)
        if not isinstance(value, str):
            return None
        value = value.strip()
        return value or None

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return self.console.render(self.request, template, self.viewer, status, **context)

    def is_htmx(self) -> bool:
        return self.request.headers.get("HX-Request") == "true"


def _allowed(viewer: Viewer, need: Need) -> bool:
    if need == "admin":
        return viewer.is_admin
    if need == "editor":
        return viewer.can_edit
    return True


def login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = "/login?" + urllib.parse.urlencode({"next": target})
    if request.headers.get("HX-Request") == "true":
        return Response(status_code=401, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


def unavailable(console: Console, request: Request, error: Exception) -> HTMLResponse:
    """The store cannot be reached or is not installed: say so, calmly, with a 503."""
    return console.render(
        request, "error.html", None, status=503, title="Store unavailable", message=str(error)
    )


def page(need: Need = "viewer") -> Callable[[Callable[[Ctx], Response]], Callable[..., Any]]:
    """Makes a page handler (``Ctx -> Response``, synchronous) an endpoint that requires
    a session with at least role ``need`` and, for POST, the session's CSRF token."""

    def wrap(handler: Callable[[Ctx], Response]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            console: Console = request.app.state.console
            form: FormData | None = None
            if request.method == "POST":
                form = await request.form(max_files=0, max_fields=500)
            return await run_in_threadpool(_run, console, request, form, need, handler)

        return endpoint

    return wrap


def _run(
    console: Console,
    request: Request,
    form: FormData | None,
    need: Need,
    handler: Callable[[Ctx], Response],
) -> Response:
    try:
        with console.pool.connection() as conn:
            viewer = console.viewer(request, conn)
            if viewer is None:
                return login_redirect(request)
            if form is not None:
                given = form.get("csrf")
                token = given if isinstance(given, str) else request.headers.get("X-CSRF-Token")
                if not same_token(viewer.csrf, token):
                    return console.render(
                        request,
                        "error.html",
                        viewer,
                        status=403,
                        title="Form expired",
                        message="This form is out of date or did not come from this console."
                        " Go back, reload the page and try again.",
                    )
            if not _allowed(viewer, need):
                return console.render(
                    request,
                    "error.html",
                    viewer,
                    status=403,
                    title="Not allowed",
                    message=f"Your role ({viewer.role}) cannot do this.",
                )
            return handler(Ctx(request, console, conn, viewer, form))
    except (ConnectionFailed, SchemaError, psycopg.OperationalError) as e:
        log.warning("store unavailable: %s", e)
        return unavailable(console, request, e)


def not_found(ctx: Ctx, what: str = "This page does not exist.") -> HTMLResponse:
    """The same answer for what does not exist and what this user may not read."""
    return ctx.render("error.html", status=404, title="Not found", message=what)


def check_store(settings: Settings) -> None:
    """Refuses to start on a store that is missing or of another version."""
    with connect(settings, autocommit=True) as conn:
        migrations.require_current(conn, settings.schema)


__all__ = [
    "Console",
    "Ctx",
    "Need",
    "PgHeraldError",
    "Pool",
    "check_store",
    "login_redirect",
    "not_found",
    "page",
    "unavailable",
]
