"""``pgherald digests send``: sends the e-mail digests that are due, once, and says what
became of each; for deployments that run it from cron instead of keeping ``pgherald run``
(which sends digests by itself) going.

``cli`` registers it and adds the connection options (``LEAVES``), as for
``cli_delivery``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click


def _settings(ctx: click.Context) -> Any:
    from pgherald import cli

    return cli.settings_of(ctx)


@click.group("digests")
def digests() -> None:
    """Send e-mail digests (pgherald run and pgherald deliver send them by themselves)."""


@digests.command("send")
@click.option("--sink", "names", multiple=True, help="Only this digest sink (repeatable).")
@click.pass_context
def digests_send(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Send every digest that is due now, once; exit 1 when one could not be sent."""
    from pgherald import mailing

    job = mailing.digest_job(_settings(ctx), names)
    results = asyncio.run(job.run_once())
    if not results:
        click.echo("no digest is due")
    for r in results:
        noun = "change" if r.changes == 1 else "changes"
        line = f"{r.sink}: {r.key}: {r.changes} {noun}, {r.outcome}"
        click.echo(line + (f" ({r.error})" if r.error else ""))
    if any(r.outcome != "sent" for r in results):
        ctx.exit(1)


COMMANDS = (digests,)
"""What ``cli`` registers on ``main``."""

LEAVES = (digests_send,)
"""The commands that take the connection options (``cli`` adds them)."""
