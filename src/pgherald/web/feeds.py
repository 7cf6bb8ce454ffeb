"""The feeds' routes: ``/feeds/<token>.atom`` and ``.rss``, answered without a login.

The unguessable token in the address is the credential (feed readers cannot log in);
any wrong token, and a disabled feed, gets the same 404. Links in the feed use the
configured ``public_url``, else the address the request came to.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from pgherald.config import Settings
from pgherald.feeds import feed_for_token
from pgherald.presentation import Presentation
from pgherald.render.feed import CONTENT_TYPES


def feed_routes(settings: Settings) -> list[BaseRoute]:
    async def feed(request: Request) -> Response:
        token = request.path_params["token"]
        kind = request.path_params["kind"]
        if kind not in CONTENT_TYPES:
            return Response("not found", status_code=404, media_type="text/plain")
        base = settings.public_url or str(request.base_url).rstrip("/")
        shown = Presentation.of(settings, public_url=base)
        body = await run_in_threadpool(feed_for_token, settings, token, kind, presentation=shown)
        if body is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(body, media_type=CONTENT_TYPES[kind])

    return [Route("/feeds/{token}.{kind}", feed, methods=["GET"])]
