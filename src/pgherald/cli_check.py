"""``pgherald check``: the monitoring plugin (``pgherald.ops.check`` does the work).

Registered by ``cli.py`` like the other ``cli_*`` modules. Unlike every other command it
never exits with 1 for its own failures, since 1 means WARNING to Nagios and Icinga: a bad
flag, a bad configuration or an unreachable database is UNKNOWN (3), on the same one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pgherald.errors import ConfigError, PgHeraldError
from pgherald.ops import check as plugin

T = TypeVar("T", int, float)


class PluginCommand(click.Command):
    """A command whose usage errors are UNKNOWN (3) on one line, not click's exit 2."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            click.echo(plugin.unknown(e.format_message()).line())
            raise click.exceptions.Exit(plugin.UNKNOWN) from None


def _limit(
    default: plugin.Limit,
    warn: str | None,
    crit: str | None,
    parse: Callable[[str, str], T],
    names: tuple[str, str],
) -> plugin.Limit:
    """The default thresholds with the ones given by flag in their place."""
    w = parse(warn, names[0]) if warn is not None else default.warn
    c = parse(crit, names[1]) if crit is not None else default.crit
    if warn is not None and crit is None and w > c:
        c = w  # only the warning was raised: it becomes critical at the same point
    if crit is not None and warn is None and w > c:
        w = c
    try:
        return plugin.Limit(w, c)
    except ConfigError as e:
        raise ConfigError(f"{names[0]}/{names[1]}: {e}") from None


def _snapshot_limit(warn: str | None, crit: str | None) -> plugin.Limit | None:
    if warn is None and crit is None:
        return None
    names = ("--snapshot-age-warn", "--snapshot-age-crit")
    w = plugin.parse_duration(warn, names[0]) if warn is not None else None
    c = plugin.parse_duration(crit, names[1]) if crit is not None else None
    if w is None:
        assert c is not None
        w = c / 2
    if c is None:
        c = w * 2
    return plugin.Limit(w, c)


def thresholds_from(settings: Any, flags: dict[str, str | None]) -> plugin.Thresholds:
    base = plugin.default_thresholds(settings)

    def pair(name: str) -> tuple[str | None, str | None]:
        return flags.get(f"{name}_warn"), flags.get(f"{name}_crit")

    def names(flag: str) -> tuple[str, str]:
        return f"--{flag}-warn", f"--{flag}-crit"

    return plugin.Thresholds(
        lag_bytes=_limit(base.lag_bytes, *pair("lag"), plugin.parse_size, names("lag")),
        lag_seconds=_limit(
            base.lag_seconds, *pair("lag_seconds"), plugin.parse_duration, names("lag-seconds")
        ),
        retained_bytes=_limit(
            base.retained_bytes, *pair("retained"), plugin.parse_size, names("retained")
        ),
        snapshot_age=_snapshot_limit(*pair("snapshot_age")),
        failed=_limit(base.failed, *pair("failed"), plugin.parse_count, names("failed")),
        dead=_limit(base.dead, *pair("dead"), plugin.parse_count, names("dead")),
        errors=_limit(base.errors, *pair("errors"), plugin.parse_count, names("errors")),
    )


def _pair(flag: str, what: str, metavar: str, warn: str, crit: str) -> list[Any]:
    return [
        click.option(
            f"--{flag}-warn", metavar=metavar, help=f"WARNING above this {what} (default {warn})."
        ),
        click.option(
            f"--{flag}-crit", metavar=metavar, help=f"CRITICAL above this {what} (default {crit})."
        ),
    ]


_OPTIONS = [
    *_pair("lag", "capture lag of the slot", "SIZE", "256MB", "1GB"),
    *_pair("lag-seconds", "capture lag in seconds", "DURATION", "60s", "5m"),
    *_pair(
        "retained",
        "WAL retained by the slot",
        "SIZE",
        "[slot_safety] warn_retained_wal, else 1GB",
        "[slot_safety] critical_retained_wal, else 4GB",
    ),
    *_pair(
        "snapshot-age",
        "age of a snapshot watch's last successful run",
        "DURATION",
        "2 schedule periods; unscheduled watches: none",
        "4 schedule periods; unscheduled watches: none",
    ),
    *_pair("failed", "number of deliveries failing now", "N", "0", "100"),
    *_pair("dead", "number of dead letters of the last 24 h", "N", "0", "10"),
    *_pair("errors", "number of errors recorded in the last hour", "N", "0", "10"),
]


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


@click.command("check", cls=PluginCommand)
@_options
@click.option(
    "--timeout",
    default="10",
    show_default=True,
    metavar="SECONDS",
    help="Give up (UNKNOWN) when the database takes longer to connect or to answer.",
)
@click.pass_context
def check(ctx: click.Context, /, timeout: str, **flags: str | None) -> None:
    """Check pgherald's health as a Nagios/Icinga plugin.

    Prints one line, e.g. `PGHERALD OK - ... | lag_bytes=1234B;268435456;1073741824;0 ...`,
    and exits 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN (the database cannot be reached, the
    configuration or a flag is wrong). Judges the slot's capture lag and retained WAL, the
    age of each snapshot watch's last successful run, failing and dead deliveries, and the
    errors of the last hour. Sizes as 512MB or 2GB, durations as 90s, 15m or 2h.
    """
    from pgherald import cli

    try:
        settings = cli.settings_of(ctx)
        thresholds = thresholds_from(settings, flags)
        seconds = plugin.parse_duration(timeout, "--timeout")
        result = plugin.run_check(settings, thresholds, seconds)
    except PgHeraldError as e:
        result = plugin.unknown(str(e))
    except Exception as e:  # a plugin must answer on its line, whatever happened
        logging.getLogger("pgherald").debug("check failed", exc_info=True)
        result = plugin.unknown(f"the check failed: {type(e).__name__}: {e}")
    click.echo(result.line())
    ctx.exit(result.state)


COMMANDS = [check]
LEAVES = [check]
