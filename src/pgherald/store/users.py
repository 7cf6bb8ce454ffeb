"""The web console's users, their roles and allow-lists, and its generated secrets.

Only hashes are stored here; hashing and checking passwords is the console's business
(``pgherald.web.accounts``). A user's ``generation`` is written into each session cookie,
so bumping it (a new password, "log out everywhere") makes every older cookie worthless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, LiteralString

import psycopg
from psycopg import errors as pg_errors

from pgherald.db.sqlfiles import named_query
from pgherald.errors import ConfigError
from pgherald.store.deliveries import notify_sinks_changed
from pgherald.store.session import in_schema

Role = Literal["admin", "editor", "viewer"]
ROLES: Final[tuple[Role, ...]] = ("admin", "editor", "viewer")


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    role: Role
    generation: int
    created_at: datetime
    last_login_at: datetime | None
    watches: tuple[str, ...]
    """The watches a viewer may read (admins and editors read every watch)."""
    email: str | None = None
    """Where the user's own e-mail subscriptions go (set on their "My subscriptions" page)."""


def _q(name: str) -> LiteralString:
    return named_query("web.sql", name)


def _user(r: Sequence[Any]) -> User:
    return User(r[0], r[1], r[2], int(r[3]), r[4], r[5], tuple(r[6] or ()), r[7])


def add_user(conn: psycopg.Connection[Any], schema: str, name: str, hash: str, role: Role) -> bool:
    """Stores a user; False when one of that name exists (nothing is changed then)."""
    with in_schema(conn, schema):
        row = conn.execute(_q("add_user"), {"name": name, "hash": hash, "role": role}).fetchone()
    return row is not None


def get_user(conn: psycopg.Connection[Any], schema: str, name: str) -> User | None:
    with in_schema(conn, schema):
        row = conn.execute(_q("get_user"), {"name": name}).fetchone()
    return _user(row) if row else None


def list_users(conn: psycopg.Connection[Any], schema: str) -> list[User]:
    with in_schema(conn, schema):
        return [_user(r) for r in conn.execute(_q("list_users")).fetchall()]


def _keep_an_admin(conn: psycopg.Connection[Any], name: str) -> None:
    """Refuses to take away the last admin: nobody could manage users any more."""
    conn.execute(_q("lock_users"))
    row = conn.execute(_q("count_admins")).fetchone()
    target = conn.execute(_q("get_user"), {"name": name}).fetchone()
    if target is not None and target[2] == "admin" and row is not None and row[0] <= 1:
        raise ConfigError(
            f"{name!r} is the only admin: make another user admin first, so that someone"
            " can still manage users"
        )


def remove_user(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    """Removes a user (never the last admin); False when there is no such user."""
    with in_schema(conn, schema):
        _keep_an_admin(conn, name)
        removed = conn.execute(_q("remove_user"), {"name": name}).fetchone() is not None
        if removed:
            notify_sinks_changed(conn, schema)  # their own sinks went with them
    return removed


def set_role(conn: psycopg.Connection[Any], schema: str, name: str, role: Role) -> bool:
    with in_schema(conn, schema):
        if role != "admin":
            _keep_an_admin(conn, name)
        done = conn.execute(_q("set_role"), {"name": name, "role": role}).fetchone() is not None
        _prune(conn, name)
        return done


def set_password(
    conn: psycopg.Connection[Any], schema: str, name: str, hash: str, end_sessions: bool = True
) -> bool:
    """Replaces a user's hash; ``end_sessions`` (the default) logs them out everywhere.

    ``end_sessions=False`` is for upgrading a hash to new parameters at login."""
    params = {"name": name, "hash": hash, "end_sessions": end_sessions}
    with in_schema(conn, schema):
        return conn.execute(_q("set_password"), params).fetchone() is not None


def end_sessions(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    with in_schema(conn, schema):
        return conn.execute(_q("end_sessions"), {"name": name}).fetchone() is not None


def record_login(conn: psycopg.Connection[Any], schema: str, name: str) -> None:
    with in_schema(conn, schema):
        conn.execute(_q("record_login"), {"name": name})


def set_watches(
    conn: psycopg.Connection[Any], schema: str, name: str, watches: Sequence[str]
) -> None:
    """Makes ``watches`` the user's whole allow-list; an unknown watch is an error."""
    with in_schema(conn, schema):
        conn.execute(_q("clear_watches"), {"name": name})
        _allow(conn, name, watches)
        _prune(conn, name)


def allow_watches(
    conn: psycopg.Connection[Any], schema: str, name: str, watches: Sequence[str]
) -> None:
    with in_schema(conn, schema):
        _allow(conn, name, watches)


def _allow(conn: psycopg.Connection[Any], name: str, watches: Sequence[str]) -> None:
    try:
        with conn.transaction():
            conn.execute(_q("allow_watches"), {"name": name, "watches": list(watches)})
    except pg_errors.ForeignKeyViolation as e:
        detail = e.diag.message_detail or ""
        what = "user" if "web_users" in detail else "watch"
        raise ConfigError(
            f"cannot allow {', '.join(map(repr, watches))} to {name!r}: no such {what}"
            " (see `pgherald watch list` and `pgherald user list`)"
        ) from None


def deny_watches(
    conn: psycopg.Connection[Any], schema: str, name: str, watches: Sequence[str]
) -> None:
    with in_schema(conn, schema):
        conn.execute(_q("deny_watches"), {"name": name, "watches": list(watches)})
        _prune(conn, name)


def _prune(conn: psycopg.Connection[Any], name: str) -> None:
    """A viewer who may no longer read a watch loses their own subscriptions to it, and
    what those delivered (their feed would still show it)."""
    conn.execute(_q("prune_own_subscriptions"), {"name": name})


def set_email(conn: psycopg.Connection[Any], schema: str, name: str, email: str | None) -> bool:
    """Sets (or with None clears) a user's e-mail address; their own e-mail sinks follow
    it. False when there is no such user."""
    with in_schema(conn, schema):
        done = conn.execute(_q("set_email"), {"name": name, "email": email}).fetchone()
        if done is not None and email is not None:
            changed = conn.execute(_q("set_own_email_recipients"), {"owner": name, "email": email})
            if changed.rowcount:
                notify_sinks_changed(conn, schema)  # their e-mail sinks mail the new address
    return done is not None


def secret(conn: psycopg.Connection[Any], schema: str, name: str, generated: str) -> str:
    """The stored secret called ``name``; ``generated`` becomes it if there is none yet.

    Two consoles starting at once agree: the second insert does nothing, and both read
    the first one's value."""
    with in_schema(conn, schema):
        conn.execute(_q("put_secret"), {"name": name, "value": generated})
        row = conn.execute(_q("get_secret"), {"name": name}).fetchone()
    assert row is not None
    return str(row[0])


__all__ = [
    "ROLES",
    "Role",
    "User",
    "add_user",
    "allow_watches",
    "deny_watches",
    "end_sessions",
    "get_user",
    "list_users",
    "record_login",
    "remove_user",
    "secret",
    "set_email",
    "set_password",
    "set_role",
    "set_watches",
]
