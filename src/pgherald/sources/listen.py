"""Raw LISTEN/NOTIFY channels, for programs that already NOTIFY.

NOTIFY is at most once: a notification reaches the sessions that are LISTENing when its
transaction commits, and nobody else, ever. So a listener that loses its connection
loses whatever is sent until it is back; what it can do is come back quickly, LISTEN
again on every channel, and tell the program (``on_reconnect``) so that the program can
resynchronise from the tables themselves. That is this module's whole job.

How it uses psycopg: one autocommit ``AsyncConnection`` per listener. Its
``notifies()`` generator holds the connection's lock while it waits, so no other
statement can run on that connection meanwhile (psycopg issue #340). The listener
therefore runs everything on the connection from one task (the *supervisor*): it reads
notifications in a child task (the *pump*) and, when a LISTEN, an UNLISTEN, a ping or
``close()`` is wanted, cancels the pump (safe: it is then only waiting for the socket to
become readable, with no statement in flight), runs the statement, and starts the pump
again. Notifications that arrive while the pump is stopped are kept by psycopg in its
backlog and yielded first by the next ``notifies()``. The pump never awaits anything
else, so a cancellation cannot fall between two notifications of one network read.

Notifications go from the pump into a queue that a second task (the *dispatcher*)
empties, in order, into the callbacks and the ``async for`` loops; a slow consumer
makes the listener stop reading from the socket (PostgreSQL keeps the notifications
meanwhile), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from pgherald.db.connect import DEFAULT_CONNECT_TIMEOUT, connection_failed, parse_dsn, redact_dsn
from pgherald.errors import CaptureError, ConfigError, PgHeraldError

log = logging.getLogger("pgherald.listen")

MAX_CHANNEL_BYTES: Final = 63
"""PostgreSQL's identifier limit (NAMEDATALEN - 1); a longer channel would be truncated."""

MAX_PAYLOAD_BYTES: Final = 7999
"""The longest payload NOTIFY accepts (in the server's encoding), for documentation."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification: the channel, the payload (``""`` when none was given), and the
    process id of the backend that sent it (a program can recognise its own)."""

    channel: str
    payload: str
    pid: int


Callback: TypeAlias = Callable[[Notification], Awaitable[object] | object]
"""A function called with each notification; a coroutine function is awaited."""

_Conn: TypeAlias = psycopg.AsyncConnection[TupleRow]

Hook: TypeAlias = Callable[[], Awaitable[object] | object]
"""``on_reconnect``: called with no argument; a coroutine function is awaited."""


def check_channel(channel: object) -> str:
    """``channel`` if PostgreSQL can LISTEN on it exactly as written, else a ``ConfigError``.

    Channel names are identifiers: any text of 1 to 63 bytes without a NUL character.
    Longer ones are refused because PostgreSQL would silently truncate them, and a
    listener on the truncated name would not be the one the program asked for.
    """
    if not isinstance(channel, str):
        raise ConfigError(f"a channel name must be a string, not {type(channel).__name__}")
    if not channel:
        raise ConfigError("a channel name cannot be empty")
    if "\x00" in channel:
        raise ConfigError(f"channel name {channel!r} contains a NUL character")
    try:
        size = len(channel.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigError(f"channel name {channel!r} is not valid Unicode text") from None
    if size > MAX_CHANNEL_BYTES:
        raise ConfigError(
            f"channel name {channel[:20]!r}... is {size} bytes long; PostgreSQL channel names"
            f" are at most {MAX_CHANNEL_BYTES} bytes (longer ones would be truncated)"
        )
    return channel


class _Reconnected:
    """The dispatcher's cue to call ``on_reconnect`` (in order with the notifications)."""


_RECONNECTED: Final = _Reconnected()


class _ConnectionLost(Exception):
    """The connection stopped answering; reconnect."""


class Listener:
    """LISTENs on channels and hands each notification to callbacks and ``async for`` loops.

    ::

        async with Listener(dsn, ["orders", "Prices EU"], on_reconnect=resync) as listener:
            listener.add_callback(print)
            async for n in listener:
                ...

    - ``async with`` (or ``await start()``) connects and LISTENs; a bad DSN, an unreachable
      server or a refused LISTEN raise there (``ConfigError``, ``ConnectionFailed``,
      ``CaptureError``). After that the listener never gives up: when the connection is
      lost it reconnects with exponential backoff and jitter (``reconnect_delay`` doubling
      up to ``max_reconnect_delay``), LISTENs again on every channel, and then calls
      ``on_reconnect`` before delivering anything received on the new connection.
    - ``listen()`` and ``unlisten()`` change the channels at any time; they return once the
      statement ran on the connection (or at once while disconnected: the channel set is
      applied when the connection is back).
    - Each notification goes to every callback, in registration order, and to every
      ``async for`` loop that is running: a loop sees what arrives while it runs
      (``aiter(listener)`` starts one ahead of its loop). What arrives before the first
      loop starts is kept for it, unless a callback is registered (a program with
      callbacks need not iterate, and nothing should pile up for a loop that never
      comes). A callback that raises is logged and the others still run.
    - An idle connection is pinged every ``ping_interval`` seconds, so a connection that
      died silently is noticed and replaced.
    - At most ``max_pending`` notifications wait for a slow callback or loop; beyond
      that the listener stops reading and PostgreSQL holds them.
    """

    def __init__(
        self,
        dsn: str,
        channels: Iterable[str] = (),
        *,
        on_reconnect: Hook | None = None,
        application_name: str = "pgherald-listen",
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 30.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        max_pending: int = 10_000,
    ) -> None:
        if isinstance(channels, str):
            raise ConfigError("channels must be a list of names, not one string")
        parse_dsn(dsn)  # a malformed DSN is refused now, not at the first connection
        if reconnect_delay <= 0 or max_reconnect_delay < reconnect_delay:
            raise ConfigError("reconnect delays must be positive, the maximum not below the first")
        if ping_interval <= 0 or ping_timeout <= 0 or max_pending < 1:
            raise ConfigError("ping_interval, ping_timeout and max_pending must be positive")
        self._dsn = dsn
        self._wanted: dict[str, None] = {check_channel(c): None for c in channels}
        self._on_reconnect = on_reconnect
        self._application_name = application_name
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._max_pending = max_pending

        self._callbacks: list[Callback] = []
        self._subscriptions: weakref.WeakSet[_Subscription] = weakref.WeakSet()
        self._first_loop: _Subscription | None = None
        self._conn: _Conn | None = None
        self._listening: set[str] = set()
        self._requests: list[tuple[str, asyncio.Future[None]]] = []
        self._incoming: deque[Notification | _Reconnected] = deque()
        self._has_incoming = asyncio.Event()
        self._wake = asyncio.Event()
        self._paused = False
        self._supervisor: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._dispatch_done = False
        self._started = False
        self._closing = False
        self._failure: BaseException | None = None
        self._reconnects = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and LISTENing on the channels."""
        return self._conn is not None and not self._conn.closed

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels asked for, in the order they were added."""
        return tuple(self._wanted)

    @property
    def backend_pid(self) -> int | None:
        """The listening session's process id (``pg_stat_activity.pid``), while connected."""
        conn = self._conn
        return conn.info.backend_pid if conn is not None and not conn.closed else None

    @property
    def reconnects(self) -> int:
        """How many times the connection was lost and made again."""
        return self._reconnects

    # -- callbacks --------------------------------------------------------------------------

    def add_callback(self, callback: Callback) -> Callback:
        """Calls ``callback(notification)`` for each notification; usable as a decorator."""
        self._callbacks.append(callback)
        self._first_loop = None  # a program with callbacks need not iterate: keep nothing
        return callback

    def remove_callback(self, callback: Callback) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    # -- channels ---------------------------------------------------------------------------

    async def listen(self, channel: str) -> None:
        """LISTENs on ``channel`` too (harmless if it already does)."""
        channel = check_channel(channel)
        self._check_usable()
        self._wanted[channel] = None
        await self._apply(channel)

    async def unlisten(self, channel: str) -> None:
        """Stops LISTENing on ``channel`` (harmless if it does not)."""
        channel = check_channel(channel)
        self._check_usable()
        self._wanted.pop(channel, None)
        await self._apply(channel)

    def _check_usable(self) -> None:
        if self._closing:
            raise PgHeraldError("this listener is closed")
        if self._failure is not None:
            raise CaptureError(f"the listener stopped: {self._failure!r}")

    async def _apply(self, channel: str) -> None:
        if self._supervisor is None or self._conn is None:
            return  # not started, or disconnected: the whole set is LISTENed on connection
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests.append((channel, future))
        self._wake.set()
        await future

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Listener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connects and LISTENs; errors are raised here, later losses are retried."""
        if self._started:
            raise PgHeraldError("this listener was already started")
        self._started = True
        try:
            conn = await self._connect()
        except BaseException:
            self._closing = True
            raise
        try:
            await self._listen_all(conn)
        except psycopg.Error as e:
            self._closing = True
            await conn.close()
            raise CaptureError(f"cannot LISTEN: {_server_said(e)}") from None
        except BaseException:
            self._closing = True
            await conn.close()
            raise
        self._conn = conn
        if not self._callbacks and not self._subscriptions:
            # Keep what arrives for the first `async for` loop, which usually starts a
            # few awaits later; the listener holds it, so it lives until adopted.
            self._first_loop = _Subscription(self, self._max_pending)
            self._subscriptions.add(self._first_loop)
        self._supervisor = asyncio.create_task(self._supervise(conn), name="pgherald-listen")
        self._dispatcher = asyncio.create_task(self._dispatch(), name="pgherald-listen-dispatch")
        log.debug("listening on %d channel(s) at %s", len(self._wanted), redact_dsn(self._dsn))

    async def close(self) -> None:
        """Stops listening and closes the connection; ``async for`` loops end.

        Notifications already received are still delivered first.
        """
        if self._closing and self._supervisor is None:
            return
        self._closing = True
        self._wake.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            # An unexpected failure was logged where it happened, and loops raise it.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await supervisor
        conn, self._conn = self._conn, None
        if conn is not None:  # the supervisor was cancelled before it ever ran
            await conn.close()
        for subscription in list(self._subscriptions):
            subscription.wake()
        self._has_incoming.set()
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher

    # -- async iteration --------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Notification]:
        first, self._first_loop = self._first_loop, None
        if first is not None:
            return first
        subscription = _Subscription(self, self._max_pending)
        self._subscriptions.add(subscription)
        return subscription

    @property
    def _finished(self) -> bool:
        """No more notifications will be read: closed, or failed."""
        return self._closing or self._failure is not None

    @property
    def _all_delivered(self) -> bool:
        """Finished, and the dispatcher has handed out everything it had."""
        return self._finished and (self._dispatcher is None or self._dispatch_done)

    # -- the connection ---------------------------------------------------------------------

    async def _connect(self) -> _Conn:
        extra: dict[str, Any] = {"fallback_application_name": self._application_name}
        if "connect_timeout" not in parse_dsn(self._dsn) and not os.environ.get(
            "PGCONNECT_TIMEOUT"
        ):
            extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        try:
            return await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, **extra)
        except psycopg.OperationalError as e:
            raise connection_failed(self._dsn, str(e)) from None

    async def _listen_all(self, conn: _Conn) -> None:
        self._listening = set()
        for channel in list(self._wanted):
            await conn.execute(_statement("LISTEN", channel))
            self._listening.add(channel)

    async def _supervise(self, conn: _Conn | None) -> None:
        try:
            while not self._closing:
                if conn is None:
                    conn = await self._reconnect()
                    self._conn = conn
                    self._reconnects += 1
                    self._push(_RECONNECTED)
                    log.info("reconnected to %s", redact_dsn(self._dsn))
                try:
                    await self._serve(conn)
                except (psycopg.Error, _ConnectionLost) as e:
                    if self._closing:
                        break
                    log.warning(
                        "lost the connection to %s (%s); notifications sent until it is back"
                        " are not received; reconnecting",
                        redact_dsn(self._dsn),
                        _first_line(e),
                    )
                self._disconnected()
                await conn.close()
                conn = None
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._failure = e
            log.error("the listener stopped after an unexpected error", exc_info=True)
            raise
        finally:
            self._disconnected()
            if conn is not None:
                await conn.close()
            self._has_incoming.set()
            for subscription in list(self._subscriptions):
                subscription.wake()

    def _disconnected(self) -> None:
        self._conn = None
        self._listening = set()
        requests, self._requests = self._requests, []
        for _, future in requests:
            if not future.done():
                future.set_result(None)  # the channel set is applied on reconnection

    async def _reconnect(self) -> _Conn:
        """A new connection LISTENing on every channel; tries until it gets one."""
        attempt = 0
        while True:
            if attempt:
                delay = self._backoff(attempt)
                log.info("reconnecting in %.1f s (attempt %d)", delay, attempt + 1)
                await asyncio.sleep(delay)
            attempt += 1
            conn = None
            try:
                conn = await self._connect()
                await self._listen_all(conn)
                return conn
            except (PgHeraldError, psycopg.Error) as e:
                log.warning("reconnection attempt %d failed: %s", attempt, _first_line(e))
                if conn is not None:
                    await conn.close()

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter so that many listeners do not return in step."""
        ceiling = min(self._max_reconnect_delay, self._reconnect_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def _serve(self, conn: _Conn) -> None:
        """Reads notifications until the connection fails; runs the wanted statements."""
        while True:
            self._wake.clear()
            await self._sync(conn)
            if self._closing:
                return
            if self._paused:
                await self._wake.wait()  # the dispatcher wakes us when it caught up
                continue
            pump = asyncio.create_task(self._pump(conn))
            woken = asyncio.create_task(self._wake.wait())
            try:
                done, _ = await asyncio.wait(
                    {pump, woken},
                    timeout=self._ping_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                pump.cancel()
                woken.cancel()
                await asyncio.wait({pump, woken})
            if not pump.cancelled() and (error := pump.exception()) is not None:
                raise error
            if not done:
                await self._ping(conn)

    async def _pump(self, conn: _Conn) -> None:
        async for n in conn.notifies():
            self._push(Notification(n.channel, n.payload, n.pid))
            if len(self._incoming) >= self._max_pending and not self._paused:
                self._paused = True
                self._wake.set()
        raise _ConnectionLost("the notification stream ended")

    def _push(self, item: Notification | _Reconnected) -> None:
        self._incoming.append(item)
        self._has_incoming.set()

    async def _ping(self, conn: _Conn) -> None:
        try:
            async with asyncio.timeout(self._ping_timeout):
                await conn.execute("SELECT 1")
        except TimeoutError:
            raise _ConnectionLost(f"no answer to a ping within {self._ping_timeout:g} s") from None

    async def _sync(self, conn: _Conn) -> None:
        """Makes the connection LISTEN on exactly the wanted channels, then answers the
        ``listen()``/``unlisten()`` calls waiting for it."""
        requests, self._requests = self._requests, []
        refused: dict[str, Exception] = {}
        try:
            for channel in [c for c in self._listening if c not in self._wanted]:
                await conn.execute(_statement("UNLISTEN", channel))
                self._listening.discard(channel)
            for channel in [c for c in self._wanted if c not in self._listening]:
                try:
                    await conn.execute(_statement("LISTEN", channel))
                except psycopg.Error as e:
                    if conn.broken or conn.closed or isinstance(e, psycopg.OperationalError):
                        raise
                    self._wanted.pop(channel, None)
                    refused[channel] = CaptureError(
                        f"cannot LISTEN on channel {channel!r}: {_server_said(e)}"
                    )
                else:
                    self._listening.add(channel)
        finally:
            for channel, future in requests:
                if future.done():
                    continue
                if channel in refused:
                    future.set_exception(refused[channel])
                else:
                    future.set_result(None)

    # -- delivery ---------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        try:
            while True:
                while not self._incoming:
                    if self._finished:
                        return
                    self._has_incoming.clear()
                    await self._has_incoming.wait()
                item = self._incoming.popleft()
                if self._paused and len(self._incoming) <= self._max_pending // 2:
                    self._paused = False
                    self._wake.set()
                if isinstance(item, _Reconnected):
                    await self._call("on_reconnect", self._on_reconnect)
                    continue
                for subscription in list(self._subscriptions):
                    await subscription.put(item)
                for callback in list(self._callbacks):
                    await self._call("callback", callback, item)
        finally:
            self._dispatch_done = True
            for subscription in list(self._subscriptions):
                subscription.wake()

    async def _call(self, what: str, function: Callable[..., object] | None, *args: object) -> None:
        if function is None:
            return
        try:
            result = function(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("%s %r raised; the listener goes on", what, function)


class _Subscription:
    """What one ``async for`` loop has yet to see."""

    def __init__(self, listener: Listener, limit: int) -> None:
        self._listener = listener
        self._limit = limit
        self._items: deque[Notification] = deque()
        self._changed = asyncio.Event()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Notification:
        while not self._items:
            if self._listener._all_delivered:
                failure = self._listener._failure
                if failure is not None:
                    raise CaptureError(f"the listener stopped: {failure!r}") from failure
                raise StopAsyncIteration
            self._changed.clear()
            await self._changed.wait()
        item = self._items.popleft()
        self._changed.set()  # room again, for a dispatcher waiting in put()
        return item

    async def put(self, item: Notification) -> None:
        while len(self._items) >= self._limit and not self._listener._finished:
            self._changed.clear()
            await self._changed.wait()
        self._items.append(item)
        self._changed.set()

    def wake(self) -> None:
        self._changed.set()


_VERBS: Final = {"LISTEN": sql.SQL("LISTEN {}"), "UNLISTEN": sql.SQL("UNLISTEN {}")}


def _statement(verb: str, channel: str) -> sql.Composed:
    return _VERBS[verb].format(sql.Identifier(channel))


def _server_said(e: psycopg.Error) -> str:
    primary = e.diag.message_primary if e.diag is not None else None
    text = primary or _one_line(str(e)) or type(e).__name__
    return f"PostgreSQL said: {text}" + (f" [{e.sqlstate}]" if e.sqlstate else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(e: BaseException) -> str:
    """libpq's first line says what happened; the next ones guess at why."""
    lines = str(e).strip().splitlines()
    return _one_line(lines[0]) if lines else type(e).__name__


__all__ = [
    "MAX_CHANNEL_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Callback",
    "Hook",
    "Listener",
    "Notification",
    "check_channel",
]
