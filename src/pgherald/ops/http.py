"""``/healthz``, ``/readyz`` and ``/metrics`` over HTTP, without login.

The web console mounts ``routes(settings)`` beside its pages; ``pgherald run --http
HOST:PORT`` (and ``pgherald deliver --http``) serves them alone with ``OpsServer``, for a
daemon that runs without the console. They show no data of the change log: figures and
states only, which is why they need no login (bind them to an address only your monitoring
reaches, like any metrics endpoint).

- ``/healthz``: 200 whenever the process serves at all (liveness).
- ``/readyz``: 200 when ready, else 503, with a JSON body that says why
  (``ops.readiness``).
- ``/metrics``: Prometheus' text format (``ops.metrics`` and ``ops.collector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from pgherald.config import Settings
from pgherald.errors import ConfigError
from pgherald.ops import readiness
from pgherald.ops.collector import exposition

log = logging.getLogger("pgherald.http")
_NO_STORE = {"Cache-Control": "no-store"}


def routes(settings: Settings, expect: Sequence[str] = ()) -> list[BaseRoute]:
    """The three endpoints, for the store of ``settings``; ``expect``: the parts this
    process runs, which ``/readyz`` waits for (``readiness.check``)."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n", headers=_NO_STORE)

    async def readyz(request: Request) -> Response:
        found = await asyncio.to_thread(readiness.check, settings, expect=expect)
        return JSONResponse(
            found.to_dict(), status_code=200 if found.ready else 503, headers=_NO_STORE
        )

    async def metrics(request: Request) -> Response:
        body = await asyncio.to_thread(exposition, settings)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers=_NO_STORE)

    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def create_app(settings: Settings, expect: Sequence[str] = ()) -> Starlette:
    return Starlette(routes=routes(settings, expect))


class OpsServer:
    """The endpoints served by uvicorn in a thread of their own (no signal handlers: the
    caller owns signals). ``port`` 0 picks a free port.

    The listening socket is bound here, before uvicorn starts, so that an address in use
    is one clear error (uvicorn would log its own and end its thread).
    """

    def __init__(
        self, settings: Settings, host: str, port: int, expect: Sequence[str] = ()
    ) -> None:
        self.socket = _listen(host, port)
        self.host = host
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(
            create_app(settings, expect),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run,
            kwargs={"sockets": [self.socket]},
            name="pgherald-http",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> OpsServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise ConfigError(f"cannot serve health and metrics on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                raise TimeoutError("the health and metrics server did not start in time")
            self.thread.join(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (IPv4 or IPv6, as the host resolves)."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot serve health and metrics on {host}:{port}: {reason}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    except OSError as e:
        sock.close()
        in_use = e.errno == errno.EADDRINUSE
        reason = "the address is in use" if in_use else (e.strerror or str(e))
        raise ConfigError(f"cannot serve health and metrics on {host}:{port}: {reason}") from None
    return sock


@contextlib.contextmanager
def serving(
    settings: Settings, address: tuple[str, int] | None, expect: Sequence[str] = ()
) -> Iterator[OpsServer | None]:
    """Serves the endpoints on ``address`` for the duration of the block (nothing if None)."""
    if address is None:
        yield None
        return
    server = OpsServer(settings, *address, expect=expect).start()
    log.info("health and metrics on %shealthz, /readyz and /metrics", server.url)
    try:
        yield server
    finally:
        server.stop()


def parse_address(text: str | None, flag: str = "--http") -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9187`` for IPv6) as a pair; one clear error otherwise."""
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {text!r} is not HOST:PORT (e.g. 127.0.0.1:9187)")
    return host.strip("[]"), int(port)


__all__ = ["OpsServer", "create_app", "parse_address", "routes", "serving"]
