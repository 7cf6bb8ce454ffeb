"""Who is asking, and may they: signed session cookies, CSRF tokens and roles.

A session is a cookie signed with the console's secret (itsdangerous), holding the user's
name, the user's session generation and a CSRF token. It is checked against the store on
every request, so a removed user, a changed role or a new password (which bumps the
generation) takes effect at once. Every form carries the CSRF token, and every request
that changes something must present it (form field ``csrf`` or header ``X-CSRF-Token``);
the login form, which comes before any session, uses a signed double-submit cookie.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Final

from itsdangerous import BadSignature, URLSafeTimedSerializer

from pgherald.store.users import User

SESSION_COOKIE: Final = "pgherald_session"
LOGIN_COOKIE: Final = "pgherald_login"
SECRET_NAME: Final = "session"
MIN_SECRET: Final = 32


@dataclass(frozen=True)
class Session:
    user: str
    generation: int
    csrf: str


class Signer:
    """Makes and reads the console's signed cookies."""

    def __init__(self, secret: str, max_age: int) -> None:
        self.max_age = max_age
        self._sessions = URLSafeTimedSerializer(secret, salt="pgherald.web.session")
        self._login = URLSafeTimedSerializer(secret, salt="pgherald.web.login")

    def session(self, user: User) -> tuple[str, Session]:
        made = Session(user.name, user.generation, secrets.token_urlsafe(32))
        value = self._sessions.dumps({"u": made.user, "g": made.generation, "c": made.csrf})
        return value, made

    def read_session(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            data: Any = self._sessions.loads(cookie, max_age=self.max_age)
        except BadSignature:  # also SignatureExpired
            return None
        if not isinstance(data, dict):
            return None
        user, generation, csrf = data.get("u"), data.get("g"), data.get("c")
        if not (isinstance(user, str) and isinstance(generation, int) and isinstance(csrf, str)):
            return None
        return Session(user, generation, csrf)

    def login_token(self) -> tuple[str, str]:
        """A token for the login form and the signed cookie that must come back with it."""
        token = secrets.token_urlsafe(32)
        return token, self._login.dumps(token)

    def check_login_token(self, cookie: str | None, field: str | None) -> bool:
        if not cookie or not field:
            return False
        try:
            token = self._login.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return isinstance(token, str) and hmac.compare_digest(token, field)


def same_token(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def new_secret() -> str:
    return secrets.token_urlsafe(48)


@dataclass(frozen=True)
class Viewer:
    """The person behind a request, with what their role lets them do."""

    user: User
    session: Session

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def role(self) -> str:
        return self.user.role

    @property
    def csrf(self) -> str:
        return self.session.csrf

    @property
    def is_admin(self) -> bool:
        return self.user.role == "admin"

    @property
    def can_edit(self) -> bool:
        """Watches and subscriptions: admins and editors."""
        return self.user.role in ("admin", "editor")

    @property
    def watches(self) -> tuple[str, ...] | None:
        """The watches this viewer may read; None: every watch."""
        return None if self.can_edit else self.user.watches

    def may_read(self, watch: str) -> bool:
        allowed = self.watches
        return allowed is None or watch in allowed


__all__ = [
    "LOGIN_COOKIE",
    "MIN_SECRET",
    "SECRET_NAME",
    "SESSION_COOKIE",
    "Session",
    "Signer",
    "Viewer",
    "new_secret",
    "same_token",
]
