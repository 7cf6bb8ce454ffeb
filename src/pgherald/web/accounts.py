"""Users of the web console: adding and changing them, and checking their passwords.

Passwords are hashed with argon2id (argon2-cffi's defaults, which follow RFC 9106's
recommendations); a hash made with older parameters is replaced at the next good login.
Checking a name that does not exist still costs one hash verification, so a response's
timing does not tell which names exist.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Sequence
from typing import Any, Final

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.errors import ConfigError
from pgherald.store import migrations
from pgherald.store import users as store
from pgherald.store.users import ROLES, Role, User

MIN_PASSWORD: Final = 10
MAX_PASSWORD: Final = 1024
_NAME: Final = re.compile(r"[^\s\x00-\x1f\x7f]{1,100}")
_hasher: Final = PasswordHasher()
_DUMMY_HASH: Final = _hasher.hash(secrets.token_urlsafe(16))


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"user name {name!r} must be 1 to 100 characters without spaces or control characters"
        )
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ConfigError(f"a password may have at most {MAX_PASSWORD} characters")
    return password


def _normal(password: str) -> bytes:
    """The same password typed on another keyboard (composed or not) is the same password."""
    return unicodedata.normalize("NFC", password).encode("utf-8")


def hash_password(password: str) -> str:
    return _hasher.hash(_normal(check_password(password)))


def rehash(password: str) -> str:
    """A new hash of a password already accepted (at login, for new parameters)."""
    return _hasher.hash(_normal(password))


def verify(user: User | None, password: str) -> bool:
    """Whether ``password`` is ``user``'s; for no user, as slow as a wrong password."""
    try:
        return _hasher.verify(user.password_hash if user else _DUMMY_HASH, _normal(password)) and (
            user is not None
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(user: User) -> bool:
    try:
        return _hasher.check_needs_rehash(user.password_hash)
    except InvalidHashError:
        return True


def _store(settings: Settings) -> psycopg.Connection[Any]:
    conn = connect(settings)
    migrations.require_current(conn, settings.schema)
    return conn


def add_user(
    settings: Settings, name: str, password: str, role: str, watches: Sequence[str] = ()
) -> User:
    """Adds a user; ``watches`` is a viewer's allow-list (other roles read every watch)."""
    check_name(name)
    checked = check_role(role)
    hashed = hash_password(password)
    with _store(settings) as conn:
        if not store.add_user(conn, settings.schema, name, hashed, checked):
            raise ConfigError(f"a user named {name!r} exists already")
        if watches:
            store.allow_watches(conn, settings.schema, name, watches)
        conn.commit()
        user = store.get_user(conn, settings.schema, name)
    assert user is not None
    return user


def list_users(settings: Settings) -> list[User]:
    with _store(settings) as conn:
        return store.list_users(conn, settings.schema)


def get_user(settings: Settings, name: str) -> User | None:
    with _store(settings) as conn:
        return store.get_user(conn, settings.schema, name)


def _missing(name: str) -> ConfigError:
    return ConfigError(f"there is no user named {name!r} (see `pgherald user list`)")


def remove_user(settings: Settings, name: str) -> None:
    with _store(settings) as conn:
        if not store.remove_user(conn, settings.schema, name):
            raise _missing(name)
        conn.commit()


def set_role(settings: Settings, name: str, role: str) -> None:
    checked = check_role(role)
    with _store(settings) as conn:
        if not store.set_role(conn, settings.schema, name, checked):
            raise _missing(name)
        conn.commit()


def set_password(settings: Settings, name: str, password: str) -> None:
    """A new password, and the end of every session the user had."""
    hashed = hash_password(password)
    with _store(settings) as conn:
        if not store.set_password(conn, settings.schema, name, hashed):
            raise _missing(name)
        conn.commit()


def set_watches(settings: Settings, name: str, watches: Sequence[str]) -> None:
    with _store(settings) as conn:
        if store.get_user(conn, settings.schema, name) is None:
            raise _missing(name)
        store.set_watches(conn, settings.schema, name, watches)
        conn.commit()


def allow(settings: Settings, name: str, watches: Sequence[str]) -> None:
    with _store(settings) as conn:
        if store.get_user(conn, settings.schema, name) is None:
            raise _missing(name)
        store.allow_watches(conn, settings.schema, name, watches)
        conn.commit()


def deny(settings: Settings, name: str, watches: Sequence[str]) -> None:
    with _store(settings) as conn:
        if store.get_user(conn, settings.schema, name) is None:
            raise _missing(name)
        store.deny_watches(conn, settings.schema, name, watches)
        conn.commit()


__all__ = [
    "add_user",
    "allow",
    "check_name",
    "check_password",
    "check_role",
    "deny",
    "get_user",
    "hash_password",
    "list_users",
    "needs_rehash",
    "rehash",
    "remove_user",
    "set_password",
    "set_role",
    "set_watches",
    "verify",
]
