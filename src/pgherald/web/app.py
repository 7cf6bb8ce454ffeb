"""The console as an ASGI application: routes, security headers, and what it shares.

``create_app(settings)`` builds it; ``pgherald.web.server.serve`` runs it. Pages are
HTML from Jinja2 templates (autoescaped), enhanced by htmx and its SSE extension, which
the console serves itself from ``static/``: nothing is loaded from another site, and the
Content-Security-Policy says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.errors import ConfigError
from pgherald.ops.http import routes as ops_routes
from pgherald.store import migrations
from pgherald.store import users as user_store
from pgherald.web import login, mine, pages, published, stream
from pgherald.web.console import Console, Pool
from pgherald.web.feeds import feed_routes
from pgherald.web.live import Notifier
from pgherald.web.security import MIN_SECRET, SECRET_NAME, Signer, new_secret

HERE: Final = Path(__file__).parent
SESSION_HOURS: Final = 12

HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none';"
        " object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class SecurityHeaders:
    """Adds ``HEADERS`` to every response, and ``no-store`` to all but static files (pages
    hold data a shared cache must not keep). Plain ASGI, so streams pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                if not static:
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pgherald.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def resolve_secret(settings: Settings, configured: str | None) -> str:
    """The configured secret, or the one the store keeps (made at the first start)."""
    if configured is not None:
        if len(configured) < MIN_SECRET:
            raise ConfigError(
                f"the web console's secret must have at least {MIN_SECRET} characters"
            )
        return configured
    with connect(settings, autocommit=True) as conn:
        migrations.require_current(conn, settings.schema)
        return user_store.secret(conn, settings.schema, SECRET_NAME, new_secret())


def routes() -> list[BaseRoute]:
    return [
        Route("/", pages.dashboard),
        Route("/login", login.login, methods=["GET", "POST"]),
        Route("/logout", login.logout, methods=["POST"]),
        Route("/changes", pages.changes),
        Route("/changes/stream", stream.stream),
        Route("/events/{log_id:int}", pages.event_detail),
        Route("/history", pages.history),
        Route("/watch", pages.watch_detail),
        Route("/watches/new", pages.watch_form),
        Route("/watches", pages.watch_add, methods=["POST"]),
        Route("/subscriptions", pages.subscriptions),
        Route("/subscriptions/add", pages.subscribe, methods=["POST"]),
        Route("/subscriptions/remove", pages.unsubscribe, methods=["POST"]),
        Route("/deliveries", pages.deliveries_page),
        Route("/users", pages.users_page),
        Route("/users/add", pages.user_add, methods=["POST"]),
        Route("/users/update", pages.user_update, methods=["POST"]),
        Route("/my", mine.mine),
        Route("/my/subscribe", mine.my_subscribe, methods=["POST"]),
        Route("/my/unsubscribe", mine.my_unsubscribe, methods=["POST"]),
        Route("/my/email", mine.my_email, methods=["POST"]),
        Route("/my/feed/rotate", mine.my_feed_rotate, methods=["POST"]),
        Route("/my/deliveries", mine.my_deliveries),
        Route("/watches/{name}", published.watch_page),
        Route("/watches/{name}/rows/{key:path}", published.row_page),
        Route("/runs/{run_id:int}", published.run_page),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]


def create_app(
    settings: Settings,
    *,
    secret: str | None = None,
    session_hours: float = SESSION_HOURS,
    secure_cookies: bool | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The console for the store of ``settings``.

    ``secret`` signs the cookies (at least 32 characters); without one, the console uses
    the secret stored in the store, made at its first start, which every console of the
    store shares. ``secure_cookies`` forces the Secure flag (None: when served over
    https). ``extra_routes`` are mounted before the console's own (feeds, for instance).
    """
    console = Console(
        settings=settings,
        signer=Signer(resolve_secret(settings, secret), int(session_hours * 3600)),
        templates=templates(),
        notifier=Notifier(settings),
        pool=Pool(settings),
        secure_cookies=secure_cookies,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(console.notifier.run())
        try:
            yield
        finally:
            console.notifier.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            console.pool.close()

    app = Starlette(
        # /healthz, /readyz and /metrics: no login, like the feeds (ops.http says why).
        routes=[*extra_routes, *ops_routes(settings), *feed_routes(settings), *routes()],
        middleware=[Middleware(SecurityHeaders)],
        lifespan=lifespan,
    )
    app.state.console = console
    return app


def console_of(app: Any) -> Console:
    console: Console = app.state.console
    return console


__all__ = ["console_of", "create_app", "resolve_secret", "routes", "templates"]
