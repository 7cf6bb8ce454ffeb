"""The Python API: ``Herald`` tells a program what changed, whichever method captures it.

A ``Herald`` installs pgherald's store if needed, adds a watch for each table a program
asks about (``method = "auto"`` unless configured), runs capture in background threads
(unless another pgherald already captures: the replication slot is in use, or another
drainer leads the trigger queue), and follows the change log. Every consumer, an
``async for`` over ``changes()`` or a callback registered with ``on()``, reads the log
with its own cursor, so a slow consumer holds back nobody else. It wakes on the log's
NOTIFY channel and polls as a fallback, so a lost notification costs latency only.

Consumers start at the end of the log by default ("now"); ``since`` takes a log id or
``"beginning"``. Positions are not saved across restarts: programs that must not miss
what happened while they were down use a subscription (the delivery engine) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import Any, Literal

from pgherald import admin, app
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry
from pgherald.errors import ConfigError
from pgherald.events import ChangeEvent
from pgherald.events.model import OPERATIONS
from pgherald.sources import logical_admin
from pgherald.sources.listen import Listener
from pgherald.store import deliveries
from pgherald.store.changelog import ChangeLog, StoredEvent, changes_channel

log = logging.getLogger("pgherald.api")

Since = int | Literal["now", "beginning"]
Callback = Callable[[ChangeEvent], Any]


@dataclass(frozen=True)
class Handler:
    """A callback registered with ``Herald.on``."""

    fn: Callback
    table: str | None
    ops: frozenset[str] | None
    name: str
    retries: int
    retry_delay: float


def _check_ops(ops: Collection[str] | None) -> frozenset[str] | None:
    if ops is None:
        return None
    if isinstance(ops, str):
        ops = {ops}
    unknown = sorted(set(ops) - set(OPERATIONS))
    if unknown:
        raise ConfigError(
            f"unknown operation(s) {', '.join(map(repr, unknown))}; use {', '.join(OPERATIONS)}"
        )
    return frozenset(ops)


def _callable_name(fn: Callback) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"python:{module}.{getattr(fn, '__qualname__', repr(fn))}"


class Herald:
    """Tells a Python program what changed in its tables.

    ``dsn`` (or ``settings``) says where; ``capture=False`` only follows a change log that
    another pgherald fills; ``install=False`` refuses to install the store. Callbacks are
    retried ``retries`` times (delay doubling from ``retry_delay`` seconds), then recorded
    as a dead delivery to the sink ``python:<module>.<name>`` and skipped.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        settings: Settings | None = None,
        capture: bool = True,
        install: bool = True,
        poll_interval: float = 1.0,
        retries: int = 3,
        retry_delay: float = 0.5,
    ) -> None:
        if settings is None:
            if dsn is None:
                raise ConfigError("Herald needs a DSN (or settings)")
            settings = Settings(dsn=dsn)
        elif dsn is not None:
            settings = replace(settings, dsn=dsn)
        self.settings = settings
        self.capture_enabled = capture
        self.install = install
        self.poll_interval = poll_interval
        self.retries = retries
        self.retry_delay = retry_delay
        self.handlers: list[Handler] = []
        self.capture: app.Capture | None = None
        self._loader: TypeRegistry | None = None
        self._generation = 0
        self._woken: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[str, str] = {}  # table as asked -> watch name

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Herald:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Installs the store if needed, starts capture, the wake-up listener and callbacks."""
        if self._started:
            return
        self._woken = asyncio.Condition()
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._prepare)
        for h in self.handlers:
            if h.table is not None:
                self._watches[h.table] = await asyncio.to_thread(self._watch_for, h.table)
        await asyncio.to_thread(self._restart_capture)
        self._started = True
        self._tasks.append(asyncio.create_task(self._listen(), name="pgherald-wake"))
        start = await asyncio.to_thread(self._last_id)
        for h in self.handlers:
            self._tasks.append(asyncio.create_task(self._serve(h, start), name=h.name))

    async def close(self) -> None:
        """Stops callbacks, the listener and capture (what capture holds is committed first)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.capture is not None:
            capture, self.capture = self.capture, None
            await asyncio.to_thread(capture.close, 30.0)
        self._started = False

    def stop(self) -> None:
        """Ends ``run()``; callable from a callback and from any thread."""
        if self._stop is None or self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._stop.set()
        else:
            self._loop.call_soon_threadsafe(self._stop.set)

    def run(self) -> None:
        """Runs the registered callbacks until Ctrl-C, SIGTERM or ``stop()``; for scripts."""

        async def main() -> None:
            async with self:
                assert self._stop is not None
                loop = asyncio.get_running_loop()
                if threading.current_thread() is threading.main_thread():
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.add_signal_handler(signal.SIGTERM, self.stop)
                await self._stop.wait()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())

    # -- consuming ----------------------------------------------------------------------

    def on(
        self,
        table: str | None = None,
        *,
        ops: Collection[str] | None = None,
        retries: int | None = None,
    ) -> Callable[[Callback], Callback]:
        """Registers ``fn(change)`` (sync or async) for changes of ``table`` (all if None)."""
        wanted = _check_ops(ops)
        if table is not None:
            admin.parse_table_name(table)  # a bad name fails here, not in a background task

        def register(fn: Callback) -> Callback:
            if self._started:
                raise ConfigError("register callbacks before the Herald starts")
            self.handlers.append(
                Handler(
                    fn,
                    table,
                    wanted,
                    _callable_name(fn),
                    self.retries if retries is None else retries,
                    self.retry_delay,
                )
            )
            return fn

        return register

    async def changes(
        self,
        table: str | None = None,
        *,
        ops: Collection[str] | None = None,
        since: Since = "now",
    ) -> AsyncIterator[ChangeEvent]:
        """The changes of ``table`` (every watch if None) as they are captured, in log order."""
        wanted = _check_ops(ops)
        if not self._started:
            raise ConfigError("use changes() inside `async with Herald(...)`")
        watch = None
        if table is not None:
            watch = self._watches.get(table)
            if watch is None:
                watch = await asyncio.to_thread(self._watch_for, table)
                self._watches[table] = watch
        start = await asyncio.to_thread(self._start_id, since)
        async for stored in self._follow(watch, start):
            if wanted is None or stored.event.op in wanted:
                yield stored.event

    # -- internals ----------------------------------------------------------------------

    def _prepare(self) -> None:
        if self.install:
            admin.init(self.settings)
        with connect(self.settings, autocommit=True) as conn:
            self._loader = TypeRegistry.load(conn)

    def _watch_for(self, table: str) -> str:
        """The watch on ``table``, added (and capture restarted) if there is none."""
        schema, name = admin.parse_table_name(table)
        for w in admin.list_watches(self.settings):
            if (w.schema_name, w.table_name) == (schema, name):
                return w.name
        added = admin.add_watch(self.settings, (schema, name))
        for note in added.notes:
            log.info("watch %s: %s", added.watch.name, note)
        if self._started:
            self._restart_capture()
        return added.watch.name

    def _restart_capture(self) -> None:
        if not self.capture_enabled:
            return
        if self.capture is not None:
            self.capture.close(30.0)
            self.capture = None
        with connect(self.settings, autocommit=True) as conn:
            slot = logical_admin.slot_info(conn, self.settings.slot)
        if slot is not None and slot.active:
            log.info(
                "replication slot %r is in use by process %s: another pgherald captures;"
                " following its change log",
                self.settings.slot,
                slot.active_pid,
            )
            return
        try:
            capture = app.Capture(self.settings)
        except ConfigError:
            return  # no watches yet
        capture.start()
        capture.wait_ready()
        self.capture = capture

    def _last_id(self) -> int:
        with connect(self.settings, autocommit=True) as conn:
            return ChangeLog(conn, self.settings.schema).last_id()

    def _start_id(self, since: Since) -> int:
        if since == "beginning":
            return 0
        if since == "now":
            return self._last_id()
        if isinstance(since, int) and not isinstance(since, bool) and since >= 0:
            return since
        raise ConfigError(f"since must be 'now', 'beginning' or a log id, not {since!r}")

    async def _listen(self) -> None:
        """Bumps the wake-up generation on every append NOTIFY, and after a reconnection
        (notifications sent meanwhile are lost: the consumers look again)."""
        channel = changes_channel(self.settings.schema)

        async def woken(_: object = None) -> None:
            await self._wake()

        async with Listener(self.settings.dsn, [channel], on_reconnect=woken) as listener:
            listener.add_callback(woken)
            await asyncio.Event().wait()  # until cancelled by close()

    async def _wake(self) -> None:
        assert self._woken is not None
        async with self._woken:
            self._generation += 1
            self._woken.notify_all()

    async def _wait(self, generation: int) -> None:
        assert self._woken is not None
        async with self._woken:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._woken.wait_for(lambda: self._generation != generation),
                    self.poll_interval,
                )

    async def _follow(self, watch: str | None, after: int) -> AsyncIterator[StoredEvent]:
        conn = await asyncio.to_thread(connect, self.settings, autocommit=True)
        try:
            changelog = ChangeLog(conn, self.settings.schema)
            while True:
                generation = self._generation
                batch = await asyncio.to_thread(
                    changelog.read, watch, after, 500, None, self._loader
                )
                for stored in batch:
                    after = stored.id
                    yield stored
                if not batch:
                    await self._wait(generation)
        finally:
            await asyncio.to_thread(conn.close)

    async def _serve(self, handler: Handler, after: int) -> None:
        watch = self._watches.get(handler.table) if handler.table is not None else None
        async for stored in self._follow(watch, after):
            if handler.ops is None or stored.event.op in handler.ops:
                await self._deliver(handler, stored)

    async def _deliver(self, handler: Handler, stored: StoredEvent) -> None:
        """Calls the handler, retrying; a handler that keeps failing costs only its own event."""
        attempts = 0
        while True:
            attempts += 1
            try:
                result = (
                    handler.fn(stored.event)
                    if inspect.iscoroutinefunction(handler.fn)
                    else await asyncio.to_thread(handler.fn, stored.event)
                )
                if isinstance(result, Awaitable):
                    await result
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if attempts <= handler.retries:
                    await asyncio.sleep(handler.retry_delay * 2 ** (attempts - 1))
                    continue
                log.error(
                    "%s failed on event %s after %d attempt(s): %r; recorded as dead",
                    handler.name,
                    stored.event.event_id,
                    attempts,
                    e,
                )
                await asyncio.to_thread(self._record_dead, handler, stored, attempts, e)
                return

    def _record_dead(
        self, handler: Handler, stored: StoredEvent, attempts: int, error: Exception
    ) -> None:
        with connect(self.settings) as conn:
            deliveries.ensure_sink(
                conn, self.settings.schema, handler.name, "python", {"table": handler.table}
            )
            deliveries.record_outcome(
                conn,
                self.settings.schema,
                event_id=stored.id,
                sink=handler.name,
                status="dead",
                attempts=attempts,
                error=f"{type(error).__name__}: {error}",
            )
            conn.commit()


__all__ = ["Handler", "Herald"]
