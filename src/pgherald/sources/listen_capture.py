"""Listen watches: notifications of NOTIFY channels stored in the change log as ``message`` events.

For programs that already send ``NOTIFY``: a watch with ``method = "listen"`` turns each
notification on its channels into a change event (``op = "message"``, ``table`` = the
channel, the payload and the sender's process id as the row), so subscribers, the Python
API and later the sinks get them like any other change.

NOTIFY is at most once: a notification sent while nobody listens (pgherald stopped, or
reconnecting) is gone, and the events say so by what they are. Where that matters, use
trigger or logical capture of a table instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pgherald.events import ChangeEvent
from pgherald.events.model import ColumnSpec, RowImage, RowShape
from pgherald.sources.listen import Listener, Notification
from pgherald.sources.logical import CaptureSink

log = logging.getLogger("pgherald.listen")

MESSAGE_SHAPE = RowShape(
    (
        ColumnSpec("channel", 25, "text"),
        ColumnSpec("payload", 25, "text"),
        ColumnSpec("pid", 23, "int4"),
    )
)
"""The row of a ``message`` event."""


def checkpoint_name(store: str) -> str:
    return f"listen:{store}"


@dataclass(frozen=True)
class ListenWatch:
    name: str
    channels: tuple[str, ...]


def message_event(watch: str, note: Notification, received: datetime) -> ChangeEvent:
    return ChangeEvent(
        event_id=f"N/{uuid.uuid4().hex}",
        watch=watch,
        op="message",
        schema="",
        table=note.channel,
        key={},
        old=None,
        new=RowImage(MESSAGE_SHAPE, (note.channel, note.payload, str(note.pid))),
        changed=(),
        xid=None,
        position=received.isoformat(),
        commit_time=None,
        captured_at=received,
        method="listen",
    )


class ListenSource:
    """Stores the notifications of the listen watches' channels until stopped."""

    def __init__(
        self,
        dsn: str,
        watches: Sequence[ListenWatch],
        reload: Callable[[], Sequence[ListenWatch]] | None = None,
        reload_interval: float = 5.0,
        batch_size: int = 1000,
    ) -> None:
        self.dsn = dsn
        self.watches = list(watches)
        self.reload = reload
        self.reload_interval = reload_interval
        self.batch_size = batch_size
        self.connected = threading.Event()
        self.stored = 0

    def _channels(self) -> set[str]:
        return {c for w in self.watches for c in w.channels}

    def run(self, sink: CaptureSink, stop: threading.Event) -> None:
        asyncio.run(self._main(sink, stop))

    async def _main(self, sink: CaptureSink, stop: threading.Event) -> None:
        queue: asyncio.Queue[tuple[Notification, datetime]] = asyncio.Queue()

        def received(note: Notification) -> None:
            queue.put_nowait((note, datetime.now(UTC)))

        def reconnected() -> None:
            log.warning(
                "listen capture reconnected: notifications sent while it was disconnected are"
                " lost (NOTIFY is at most once)"
            )

        async with Listener(
            self.dsn, sorted(self._channels()), on_reconnect=reconnected
        ) as listener:
            listener.add_callback(received)
            self.connected.set()
            reloaded = time.monotonic()
            while not stop.is_set():
                try:
                    first = await asyncio.wait_for(queue.get(), 0.2)
                except TimeoutError:
                    first = None
                if first is not None:
                    batch = [first]
                    while len(batch) < self.batch_size and not queue.empty():
                        batch.append(queue.get_nowait())
                    await asyncio.to_thread(self._store, sink, batch)
                if self.reload is not None and time.monotonic() - reloaded > self.reload_interval:
                    reloaded = time.monotonic()
                    await self._reload(listener)

    def _store(self, sink: CaptureSink, batch: list[tuple[Notification, datetime]]) -> None:
        by_channel: dict[str, list[str]] = {}
        for w in self.watches:
            for c in w.channels:
                by_channel.setdefault(c, []).append(w.name)
        events = [
            message_event(watch, note, at)
            for note, at in batch
            for watch in by_channel.get(note.channel, ())
        ]
        try:
            sink.write(events)
            sink.commit(batch[-1][1].isoformat())
        except BaseException:
            sink.rollback()
            raise
        self.stored += len(events)

    async def _reload(self, listener: Listener) -> None:
        assert self.reload is not None
        found = list(await asyncio.to_thread(self.reload))
        if found == self.watches:
            return
        before, self.watches = self._channels(), found
        after = self._channels()
        for channel in sorted(after - before):
            await listener.listen(channel)
        for channel in sorted(before - after):
            await listener.unlisten(channel)
        log.info("listen capture: now listening on %s", ", ".join(sorted(after)) or "nothing")
