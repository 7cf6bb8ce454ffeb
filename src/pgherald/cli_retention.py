"""``pgherald prune`` and ``pgherald watch set NAME --retain D``: the change log's retention.

``cli`` registers them and adds the connection options (``LEAVES``), as for
``cli_delivery``. ``pgherald run`` prunes by itself every ``prune_interval``; ``prune``
is the same pass once, for cron jobs and for seeing what a retention would remove.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from pgherald.retain import parse_retain


def _settings(ctx: click.Context) -> Any:
    from pgherald import cli

    return cli.settings_of(ctx)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if value is not None else "-"


@click.command("prune")
@click.option("--watch", "watch_name", help="Only this watch (its runs and errors too).")
@click.option("--dry-run", is_flag=True, help="Count what would be pruned; change nothing.")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_context
def prune(ctx: click.Context, watch_name: str | None, dry_run: bool, fmt: str) -> None:
    """Delete events older than their watch's retention (and their fields, finished
    deliveries, old runs and errors), in short batches; print what went and what stayed."""
    from pgherald import pruning

    settings = _settings(ctx)
    report = pruning.prune(settings, watch=watch_name, dry_run=dry_run)
    if fmt == "json":
        out = {
            "dry_run": report.dry_run,
            "now": report.now.isoformat(),
            "watches": [
                {
                    "watch": w.watch,
                    "registered": w.registered,
                    "retain": w.retention.describe(),
                    "cutoff": w.cutoff.isoformat() if w.cutoff else None,
                    **w.counts.as_dict(),
                }
                for w in report.watches
            ],
            "sources": (
                {
                    "cutoff": report.sources_cutoff.isoformat() if report.sources_cutoff else None,
                    **report.sources.as_dict(),
                }
                if report.sources is not None
                else None
            ),
            "total": report.total.as_dict(),
        }
        click.echo(json.dumps(out, indent=2))
        return
    verb = "would prune" if dry_run else "pruned"
    if not any(w.cutoff for w in report.watches) and report.sources is None:
        click.echo(
            "nothing to prune: every watch keeps its events forever (set `retain` in the"
            " configuration, or `pgherald watch set NAME --retain 90d`)"
        )
        return
    for w in report.watches:
        label = w.watch if w.registered else f"{w.watch} (removed)"
        if w.cutoff is None:
            click.echo(f"{label}: retain forever, nothing to prune")
            continue
        click.echo(
            f"{label}: retain {w.retention.describe()} (before {_when(w.cutoff)}):"
            f" {verb} {pruning.describe(w.counts)}"
        )
    if report.sources is not None:
        click.echo(
            f"runs and errors of no watch (before {_when(report.sources_cutoff)}):"
            f" {verb} {report.sources.runs:,} runs, {report.sources.errors:,} errors"
        )


@click.command("set")
@click.argument("name")
@click.option(
    "--retain",
    required=True,
    help='Keep its events this long: e.g. 90d, 400d, 1y, 36h, "forever", or "default" for'
    " the configuration's retain.",
)
@click.pass_context
def watch_set(ctx: click.Context, name: str, retain: str) -> None:
    """Change a watch's settings (for now: how long its events are kept)."""
    from pgherald import pruning

    wanted = None if retain.strip().lower() == "default" else parse_retain(retain, "--retain")
    pruning.set_retain(_settings(ctx), name, wanted)
    if wanted is None:
        default = _settings(ctx).retain
        click.echo(
            f"watch {name!r} keeps its events as the configuration says"
            f" ({'retain ' + default if default else 'forever'})"
        )
    else:
        click.echo(f"watch {name!r} keeps its events {_describe(wanted.describe())}")


def _describe(retain: str) -> str:
    return "forever" if retain == "forever" else f"for {retain}"


COMMANDS = (prune,)
"""What ``cli`` registers on ``main``."""

COMMANDS_ON_WATCH = (watch_set,)
"""What ``cli`` registers on the ``watch`` group."""

LEAVES = (prune, watch_set)
"""The commands that take the connection options (``cli`` adds them)."""
