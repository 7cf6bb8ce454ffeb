"""Running the console: ``serve(settings, stop)`` serves until ``stop`` is set.

uvicorn runs in a thread of its own (so it installs no signal handlers: the caller owns
signals, as ``pgherald run`` does), and ``serve`` returns once it has shut down. Open
live streams are told to end first, so shutting down takes a moment, not a timeout.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

import uvicorn

from pgherald.config import Settings
from pgherald.web.app import console_of, create_app
from pgherald.web.console import check_store

log = logging.getLogger("pgherald.web")
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8080


class Server:
    """A console being served; ``url`` once ``start`` returned."""

    def __init__(
        self,
        settings: Settings,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        secret: str | None = None,
        secure_cookies: bool | None = None,
    ) -> None:
        check_store(settings)
        self.app = create_app(settings, secret=secret, secure_cookies=secure_cookies)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,  # its records go to pgherald's handlers (format, redaction)
            access_log=False,
            timeout_graceful_shutdown=3,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="pgherald-web", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise OSError(f"the web console could not listen on {self.host}:{self.port}")
            self.thread.join(0.02)
            timeout -= 0.02
            if timeout <= 0:
                raise TimeoutError("the web console did not start in time")
        sockets = [s for server in self.server.servers for s in server.sockets]
        if sockets and self.port == 0:
            self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self, timeout: float = 10.0) -> None:
        console_of(self.app).notifier.close()
        self.server.should_exit = True
        self.thread.join(timeout)


def serve(
    settings: Settings,
    stop: threading.Event,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    secret: str | None = None,
    secure_cookies: bool | None = None,
) -> None:
    """Serves the console on ``host:port`` until ``stop`` is set (for ``pgherald web`` and
    for the daemon, which runs it in a thread beside capture and delivery)."""
    server = Server(settings, host, port, secret, secure_cookies).start()
    log.info("web console on %s", server.url)
    try:
        while not stop.wait(0.5):
            if not server.thread.is_alive():
                raise RuntimeError("the web console stopped by itself")
    finally:
        server.stop()
