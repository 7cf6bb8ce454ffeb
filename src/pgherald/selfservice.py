"""Self-service: a console user subscribes themselves to the watches they may read, by feed
or by e-mail, and sees what was delivered to them.

Each user gets their own sinks, made on first use and named ``user:<name>:<how>``: one
feed (Atom and RSS at its token's URL) and up to three e-mail sinks (a mail per change, an
hourly digest, a daily digest) that mail the user's own address through the mail server
of the settings (``[smtp]``; the sink says ``smtp = "settings"``, so the password stays in
the configuration and out of the store). The sinks belong to the user (``sinks.owner``):
every change here is scoped to the user's own sinks, and removing the user removes them.

A viewer's subscriptions follow their allow-list: a watch taken off it takes their
subscriptions to it along (``store.users``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from pgherald.errors import ConfigError, PgHeraldError
from pgherald.render import WebLinks
from pgherald.sinks.email import check_address, shared_server
from pgherald.sinks.feed import new_token
from pgherald.store import deliveries, history, own, users
from pgherald.store import watches as registry
from pgherald.store.users import User

log = logging.getLogger("pgherald.selfservice")

HOWS: Final[dict[str, str]] = {
    "feed": "a feed (Atom and RSS)",
    "email-change": "e-mail, one per change",
    "email-hour": "e-mail, an hourly digest",
    "email-day": "e-mail, a daily digest",
}
"""The ways to subscribe, in words."""
FEED: Final = "feed"
EMAIL_LIMIT: Final = 254


class SelfServiceError(PgHeraldError):
    """A request the user can fix (said in one line, nothing changed)."""


class NotYours(SelfServiceError):
    """What does not exist and what belongs to someone else look the same."""


def sink_name(user: str, how: str) -> str:
    return f"user:{user}:{how}"


def how_of(user: str, sink: str) -> str | None:
    """Which of ``user``'s ways a sink of theirs is (None: not one of them)."""
    prefix = f"user:{user}:"
    if sink.startswith(prefix) and sink[len(prefix) :] in HOWS:
        return sink[len(prefix) :]
    return None


def may_read(user: User, watch: str) -> bool:
    """Admins and editors read every watch; a viewer, those on their allow-list."""
    return user.role != "viewer" or watch in user.watches


def mail_problem(smtp: Mapping[str, Any]) -> str | None:
    """Why e-mail subscriptions cannot be made here, in words for the user (None: they
    can). The detail of a malformed ``[smtp]`` table goes to the log, not to the page."""
    if not smtp:
        return (
            "This pgherald has no mail server configured ([smtp] in its configuration file),"
            " so it cannot send e-mail: ask an admin, or subscribe by feed."
        )
    try:
        shared_server(smtp)
    except ConfigError as e:
        log.warning("self-service e-mail is off: %s", e)
        return (
            "The mail server settings of this pgherald are incomplete, so it cannot send"
            " e-mail: ask an admin, or subscribe by feed."
        )
    return None


def _options(user: User, how: str) -> dict[str, Any]:
    if how == FEED:
        return {"token": new_token(), "title": f"pgherald: {user.name}"}
    assert user.email is not None
    options: dict[str, Any] = {"smtp": "settings", "to": [user.email]}
    if how == "email-change":
        options["mode"] = "change"
    else:
        options.update(mode="digest", period=how.removeprefix("email-"))
    return options


def _own_sink(conn: psycopg.Connection[Any], schema: str, user: User, how: str) -> str:
    """The user's sink for ``how``, made now if they have none."""
    from pgherald import app  # the composition root knows the sink kinds
    from pgherald.sinks.base import SinkConfig

    name = sink_name(user.name, how)
    exists, owner = own.owner_of(conn, schema, name)
    if exists:
        if owner != user.name:
            raise SelfServiceError(
                f"a sink named {name!r} exists and is not yours: ask an admin to rename it"
            )
        return name
    kind = "feed" if how == FEED else "email"
    options = _options(user, how)
    app.build_sink(SinkConfig(name=name, kind=kind, options=options))  # checks the options
    if not own.add_sink(conn, schema, user.name, name, kind, options):
        raise SelfServiceError(f"sink {name!r} was just made by someone else: try again")
    return name


def subscribe(
    conn: psycopg.Connection[Any],
    schema: str,
    user: User,
    watch: str,
    how: str,
    smtp: Mapping[str, Any],
) -> str:
    """Subscribes the user's own sink for ``how`` to ``watch`` (a watch they may read);
    returns the sink's name. Subscribing again changes nothing."""
    if how not in HOWS:
        raise SelfServiceError(f"choose how: {', '.join(HOWS)}")
    if not may_read(user, watch) or registry.get_watch(conn, schema, watch) is None:
        raise NotYours("There is no such watch.")
    if how != FEED:
        problem = mail_problem(smtp)
        if problem is not None:
            raise SelfServiceError(problem)
        if user.email is None:
            raise SelfServiceError("Set your e-mail address first (below), then subscribe.")
    with conn.transaction():
        name = _own_sink(conn, schema, user, how)
        mine = {(s.sink, s.watch) for s in own.subscriptions(conn, schema, user.name)}
        if (name, watch) not in mine:
            deliveries.subscribe(conn, schema, name, watch, {}, ())
    return name


def unsubscribe(
    conn: psycopg.Connection[Any], schema: str, user: User, sink: str, watch: str
) -> None:
    """Ends one of the user's own subscriptions; someone else's is ``NotYours``."""
    if not own.unsubscribe(conn, schema, user.name, sink, watch):
        raise NotYours("There is no such subscription.")


@dataclass(frozen=True)
class FeedAddress:
    sink: str
    token: str
    atom: str
    rss: str


def feed_address(
    conn: psycopg.Connection[Any], schema: str, user: User, base_url: str
) -> FeedAddress | None:
    """The user's own feed's URLs under ``base_url`` (None: they have no feed yet)."""
    name = sink_name(user.name, FEED)
    for s in own.sinks(conn, schema, user.name):
        if s.name == name and s.kind == "feed":
            token = s.options.get("token")
            if not isinstance(token, str) or not token:
                return None
            links = WebLinks(base_url)
            return FeedAddress(name, token, links.feed(token, "atom"), links.feed(token, "rss"))
    return None


def rotate_feed_token(conn: psycopg.Connection[Any], schema: str, user: User) -> str:
    """A new token for the user's own feed: the old URLs stop working at once."""
    name = sink_name(user.name, FEED)
    exists, owner = own.owner_of(conn, schema, name)
    if not exists or owner != user.name:
        raise NotYours("You have no feed yet: subscribe to a watch by feed first.")
    token = new_token()
    history.set_feed_token(conn, schema, name, token, replace=True)
    return token


def set_email(conn: psycopg.Connection[Any], schema: str, user: User, email: str | None) -> None:
    """Sets (None: clears) the user's e-mail address; their e-mail sinks follow it. An
    address is needed while they have e-mail subscriptions."""
    address: str | None = None
    if email is not None:
        email = email.strip()
        if len(email) > EMAIL_LIMIT:
            raise SelfServiceError(f"an e-mail address has at most {EMAIL_LIMIT} characters")
        address = check_address(email, SelfServiceError)
    elif any(s.kind == "email" for s in own.subscriptions(conn, schema, user.name)):
        raise SelfServiceError(
            "Your e-mail subscriptions need an address: unsubscribe them first, or give a new"
            " address."
        )
    with conn.transaction():
        users.set_email(conn, schema, user.name, address)


__all__ = [
    "FEED",
    "HOWS",
    "FeedAddress",
    "NotYours",
    "SelfServiceError",
    "feed_address",
    "how_of",
    "mail_problem",
    "may_read",
    "rotate_feed_token",
    "set_email",
    "sink_name",
    "subscribe",
    "unsubscribe",
]
