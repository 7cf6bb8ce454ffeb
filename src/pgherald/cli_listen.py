"""``pgherald listen CHANNEL...``: raw notifications as JSON lines, for people and pipes.

Each notification is one line on stdout, flushed at once, so that ``| jq`` or a reading
program sees it immediately::

    {"channel":"orders","payload":"42","pid":8123,"received_at":"2025-01-31T09:15:02.123456+00:00"}

Everything else (listening, connection lost, reconnected, stopped) goes to stderr. Ctrl-C
or SIGTERM stops it with exit status 0; a bad DSN, an unreachable server or a bad channel
name is one ``pgherald: ...`` line and exit status 1, as for every other command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import click

from pgherald.errors import PgHeraldError
from pgherald.sources.listen import Listener, Notification, check_channel

log = logging.getLogger("pgherald.listen")


class _ListenCommand(click.Command):
    """A command that takes pgherald's connection options from ``pgherald.cli`` lazily.

    ``pgherald.cli`` imports this module to register the command, so this module cannot
    import ``pgherald.cli`` while being imported itself (whichever of the two came first
    would find the other half-built). Click asks for a command's parameters only when it
    parses or documents it, and by then both modules are complete.
    """

    _has_connection_options = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._has_connection_options:
            from pgherald.cli import connection_options

            first = len(self.params)
            connection_options(self)  # appends to self.params, last option first
            self.params[first:] = reversed(self.params[first:])
            self._has_connection_options = True
        return super().get_params(ctx)


@click.command("listen", cls=_ListenCommand)
@click.argument("channels", metavar="CHANNEL...", nargs=-1, required=True)
@click.pass_context
def listen(ctx: click.Context, channels: tuple[str, ...]) -> None:
    """Print the notifications sent on CHANNEL... as JSON lines, until Ctrl-C or SIGTERM.

    Channel names are taken exactly as written (case, spaces and all), as pg_notify()
    takes them; remember that NOTIFY without double quotes folds a name to lower case.
    Notifications sent while pgherald is not connected are lost: NOTIFY is not stored.
    """
    from pgherald.cli import settings_of

    try:
        for channel in channels:
            check_channel(channel)
        settings = settings_of(ctx)
        _setup_logging(settings.log_level)
        status = asyncio.run(_run(settings.dsn, channels))
    except PgHeraldError as e:
        click.echo(f"pgherald: {' '.join(str(e).split())}", err=True)
        ctx.exit(1)
    ctx.exit(status)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def as_json_line(n: Notification, received_at: datetime) -> str:
    """One notification in the command's JSON line format (without the newline)."""
    record: dict[str, Any] = {
        "channel": n.channel,
        "payload": n.payload,
        "pid": n.pid,
        "received_at": received_at.isoformat(),
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _reconnected(channels: int) -> None:
    log.warning(
        "listening again on %d channel(s); notifications sent while disconnected were lost",
        channels,
    )


async def _print_all(listener: Listener) -> None:
    async for n in listener:
        sys.stdout.write(as_json_line(n, datetime.now(UTC)) + "\n")
        sys.stdout.flush()


async def _run(dsn: str, channels: tuple[str, ...]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    listener = Listener(
        dsn,
        channels,
        application_name="pgherald listen",
        on_reconnect=lambda: _reconnected(len(listener.channels)),
    )
    stopping = asyncio.create_task(stop.wait())
    try:
        starting = asyncio.create_task(listener.start())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while still connecting
            starting.cancel()
            await asyncio.wait({starting})
            return 0
        starting.result()
        log.info(
            "listening on %s (Ctrl-C to stop)",
            ", ".join(json.dumps(c, ensure_ascii=False) for c in channels),
        )
        printing = asyncio.create_task(_print_all(listener))
        await asyncio.wait({printing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        await listener.close()  # the loop prints what was already received, then ends
        await printing
        log.info("stopped")
        return 0
    except BrokenPipeError:
        # `pgherald listen x | head -3`: the reader has what it wanted.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        stopping.cancel()
        await listener.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
