"""A TCP proxy of the test's own, to cause outages without touching the machine's shared servers.

Integration tests of sinks and sources must show that a client survives its server going away
and coming back, but the servers on this machine (PostgreSQL clusters aside) are shared by
every test run and must never be stopped. So the client is pointed at this proxy instead,
and the test cuts the proxy:

- ``cut()`` drops every current connection (both ends closed, so the client sees a reset or
  EOF at once) and stops listening, so new connections are *refused* (ECONNREFUSED), as
  when a server is down;
- ``stall()`` keeps connections open and accepts new ones but forwards nothing, as when a
  server or the network hangs: the client has to rely on its own timeouts;
- ``restore()`` listens again on the same port and forwards as before.

``TcpProxy`` runs in the test's event loop (async API). ``ThreadedTcpProxy`` runs the same
proxy in a thread with its own loop and offers a blocking API, for tests whose client is
synchronous or runs in another loop. Both are context managers::

    async with TcpProxy("127.0.0.1", 6379) as proxy:
        sink = RedisSink(url=f"redis://127.0.0.1:{proxy.port}/0", ...)
        ...
        await proxy.cut()
        ...
        await proxy.restore()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

_CHUNK = 65536


class TcpProxy:
    """Forwards connections on ``host:port`` (a free port unless given) to the target."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections_total = 0
        """Connections accepted since start (a test can see that a client reconnected)."""

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def is_cut(self) -> bool:
        return self._server is None

    async def start(self) -> TcpProxy:
        await self._listen()
        return self

    async def stop(self) -> None:
        """Stops listening and drops every connection."""
        await self.cut()

    async def cut(self) -> None:
        """Drops current connections and refuses new ones until ``restore()``."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._drop_connections()
        if server is not None:
            await server.wait_closed()

    async def stall(self) -> None:
        """Keeps connections (and accepts new ones) but forwards nothing until ``restore()``."""
        self._flowing.clear()
        if self._server is None:
            await self._listen()

    async def restore(self) -> None:
        """Forwards again; listens on the same port if it was cut."""
        self._flowing.set()
        if self._server is None:
            await self._listen()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _drop_connections(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                transport = writer.transport
                # abort(), not close(): the peer sees a reset now, not after a flush.
                transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writers.clear()

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Tracked as a task of ours so that cut() can cancel a connection still waiting.
        self.connections_total += 1
        self._writers.add(client_w)
        self._track(self._connect(client_r, client_w))

    async def _connect(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            await self._flowing.wait()
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.transport.abort()
            self._writers.discard(client_w)
            return
        except asyncio.CancelledError:
            client_w.transport.abort()
            self._writers.discard(client_w)
            raise
        self._writers.add(server_w)
        self._track(self._pipe(client_r, server_w))
        self._track(self._pipe(server_r, client_w))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side finished or failed: end the other side too, as a real server would.
            with contextlib.suppress(Exception):
                writer.transport.abort()
            self._writers.discard(writer)


class ThreadedTcpProxy:
    """The same proxy in a thread of its own, with a blocking API."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._args = (target_host, target_port, host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._proxy: TcpProxy | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    @property
    def proxy(self) -> TcpProxy:
        assert self._proxy is not None, "start() first"
        return self._proxy

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def connections_total(self) -> int:
        return self.proxy.connections_total

    def start(self) -> ThreadedTcpProxy:
        self._thread.start()
        target_host, target_port, host, port = self._args

        async def make() -> TcpProxy:
            return await TcpProxy(target_host, target_port, host=host, port=port).start()

        self._proxy = self._run(make())
        return self

    def cut(self) -> None:
        self._run(self.proxy.cut())

    def stall(self) -> None:
        self._run(self.proxy.stall())

    def restore(self) -> None:
        self._run(self.proxy.restore())

    def stop(self) -> None:
        if self._proxy is not None:
            self._run(self._proxy.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ThreadedTcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
