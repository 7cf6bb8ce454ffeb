"""The web console's commands: ``pgherald web`` serves it, ``pgherald user ...`` manages
who may sign in.

Like ``cli_delivery``, this module is registered by ``cli.py`` (``COMMANDS`` on ``main``,
the connection options added to each of ``LEAVES``), and reads the settings from it at
call time.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from pgherald.errors import ConfigError


def _settings(ctx: click.Context) -> Any:
    from pgherald import cli

    return cli.settings_of(ctx)


def _watches(values: tuple[str, ...]) -> list[str]:
    return [w.strip() for value in values for w in value.split(",") if w.strip()]


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--secure-cookies/--no-secure-cookies",
    default=None,
    help="Mark cookies Secure (default: when the request came over https; behind a"
    " TLS-terminating proxy, say --secure-cookies).",
)
@click.pass_context
def web(ctx: click.Context, host: str, port: int, secure_cookies: bool | None) -> None:
    """Serve the web console until Ctrl-C.

    Cookies are signed with $PGHERALD_WEB_SECRET when set (at least 32 characters), else
    with a secret kept in the store. Add users first with `pgherald user add`.
    """
    from pgherald.web.server import serve

    settings = _settings(ctx)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"pgherald web console on http://{host}:{port}/ (Ctrl-C stops it)")
        serve(
            settings,
            stop,
            host=host,
            port=port,
            secret=os.environ.get("PGHERALD_WEB_SECRET") or None,
            secure_cookies=secure_cookies,
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@click.group("user")
def user() -> None:
    """Add, list, change and remove the web console's users."""


def _read_password(from_stdin: bool, confirm: bool = True) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        if not password:
            raise ConfigError("--password-stdin: no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise ConfigError("no terminal to ask for the password: pass it with --password-stdin")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=confirm)
    return value


@user.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["admin", "editor", "viewer"]),
    default="viewer",
    show_default=True,
    help="admin: everything; editor: watches and subscriptions; viewer: reads allowed watches.",
)
@click.option("--watch", "watches", multiple=True, help="A watch a viewer may read (repeatable).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.pass_context
def user_add(
    ctx: click.Context, name: str, role: str, watches: tuple[str, ...], password_stdin: bool
) -> None:
    """Add user NAME (asks for the password)."""
    from pgherald.web import accounts

    settings = _settings(ctx)
    accounts.check_name(name)
    accounts.check_role(role)
    password = accounts.check_password(_read_password(password_stdin))
    added = accounts.add_user(settings, name, password, role, _watches(watches))
    allowed = f", may read {', '.join(added.watches)}" if added.watches else ""
    click.echo(f"added user {added.name!r} ({added.role}{allowed})")


@user.command("list")
@click.pass_context
def user_list(ctx: click.Context) -> None:
    """List the users, their roles and (for viewers) the watches they may read."""
    from pgherald.web import accounts

    for u in accounts.list_users(_settings(ctx)):
        watches = "every watch" if u.role != "viewer" else (", ".join(u.watches) or "no watch")
        last = u.last_login_at.isoformat(timespec="seconds") if u.last_login_at else "never"
        click.echo(f"{u.name}\t{u.role}\t{watches}\tlast sign-in {last}")


@user.command("remove")
@click.argument("name")
@click.pass_context
def user_remove(ctx: click.Context, name: str) -> None:
    """Remove user NAME (never the last admin)."""
    from pgherald.web import accounts

    accounts.remove_user(_settings(ctx), name)
    click.echo(f"removed user {name!r}")


@user.command("password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.pass_context
def user_password(ctx: click.Context, name: str, password_stdin: bool) -> None:
    """Set NAME's password; it signs them out everywhere."""
    from pgherald.web import accounts

    settings = _settings(ctx)
    if accounts.get_user(settings, name) is None:
        raise ConfigError(f"there is no user named {name!r} (see `pgherald user list`)")
    accounts.set_password(settings, name, _read_password(password_stdin))
    click.echo(f"changed the password of {name!r}; their sessions have ended")


@user.command("role")
@click.argument("name")
@click.argument("role", type=click.Choice(["admin", "editor", "viewer"]))
@click.pass_context
def user_role(ctx: click.Context, name: str, role: str) -> None:
    """Give NAME another role."""
    from pgherald.web import accounts

    accounts.set_role(_settings(ctx), name, role)
    click.echo(f"{name!r} is now {role}")


@user.command("allow")
@click.argument("name")
@click.argument("watches", nargs=-1, required=True)
@click.pass_context
def user_allow(ctx: click.Context, name: str, watches: tuple[str, ...]) -> None:
    """Let viewer NAME read WATCHES."""
    from pgherald.web import accounts

    accounts.allow(_settings(ctx), name, _watches(watches))
    click.echo(f"{name!r} may read {', '.join(_watches(watches))}")


@user.command("deny")
@click.argument("name")
@click.argument("watches", nargs=-1, required=True)
@click.pass_context
def user_deny(ctx: click.Context, name: str, watches: tuple[str, ...]) -> None:
    """Stop viewer NAME from reading WATCHES."""
    from pgherald.web import accounts

    accounts.deny(_settings(ctx), name, _watches(watches))
    click.echo(f"{name!r} may no longer read {', '.join(_watches(watches))}")


COMMANDS = (web, user)
"""What ``cli`` registers on ``main``."""

LEAVES = (web, user_add, user_list, user_remove, user_password, user_role, user_allow, user_deny)
"""The commands that take the connection options."""
