"""Live updates: one LISTEN on the change log's channel, shared by every open page.

The change log sends a NOTIFY on ``changes_channel(schema)`` when a transaction that
appended commits. The notifier holds the console's one listening connection and wakes
the streams waiting on it; each stream then reads what is new for its own filters (the
log, not the notification, carries the data). Should the connection drop, the notifier
reconnects, and wakes everyone meanwhile every few seconds, so nothing is missed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import psycopg
from psycopg import sql

from pgherald.config import Settings
from pgherald.db.connect import DEFAULT_CONNECT_TIMEOUT, dsn_of, parse_dsn
from pgherald.store.changelog import changes_channel

log = logging.getLogger("pgherald.web")
RETRY_SECONDS: Final = 2.0


class Notifier:
    """Wakes waiting streams when the change log announces new events."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channel = changes_channel(settings.schema)
        self.connected = False
        self.closed = False
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _bump(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """Take one before reading the log, then ``wait`` with it: news that comes in
        between is not missed."""
        return self._wake

    async def wait(self, ticket: asyncio.Event, seconds: float) -> bool:
        """Waits for news since ``ticket`` (True) or ``seconds`` (False)."""
        if self.closed:
            return False
        try:
            async with asyncio.timeout(seconds):
                await ticket.wait()
        except TimeoutError:
            return False
        return not self.closed

    def close(self) -> None:
        """Ends every wait; safe to call from any thread."""
        loop = self._loop
        self.closed = True
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._bump)

    async def run(self) -> None:
        """Listens until cancelled, reconnecting after a failure."""
        self._loop = asyncio.get_running_loop()
        while not self.closed:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as e:
                if self.connected:
                    log.warning("live updates: lost the database connection (%s)", e)
                self.connected = False
                self._bump()  # streams look for themselves while we are away
                await asyncio.sleep(RETRY_SECONDS)

    async def _listen(self) -> None:
        dsn = dsn_of(self.settings)
        extra: dict[str, Any] = {"fallback_application_name": "pgherald-web"}
        if "connect_timeout" not in parse_dsn(dsn):
            extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, **extra)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self.connected = True
            self._bump()  # whatever came while we were not listening
            async for _ in conn.notifies():
                self._bump()
