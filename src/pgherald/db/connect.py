"""Opening connections, and turning libpq's connection failures into one clear line.

libpq's own messages are multi-line, name every host it tried and sometimes quote the
connection string around a syntax error (which may be part of a password). pgherald's
users get one line instead: what failed (server unreachable, wrong password, unknown
database, ...), where, and what to do about it, and never a password.

This module takes a DSN (or anything with a ``dsn`` attribute, such as ``Settings``) rather
than importing the configuration, so that the capture sources can use it too without
depending on the front ends.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import Any, Final, Protocol

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from pgherald.errors import ConfigError, ConnectionFailed

DEFAULT_CONNECT_TIMEOUT: Final = 10
_SECRET_KEYS: Final = frozenset({"password", "sslpassword"})


class HasDsn(Protocol):
    """Anything that carries a libpq DSN, such as ``pgherald.config.Settings``."""

    @property
    def dsn(self) -> str: ...


def dsn_of(target: HasDsn | str) -> str:
    return target if isinstance(target, str) else target.dsn


def parse_dsn(dsn: str) -> dict[str, str]:
    """The DSN's parameters; the error never quotes the DSN (it may hold a password)."""
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError:
        raise ConfigError(
            "the DSN is not a valid libpq connection string or URI"
            " (e.g. 'host=db.example dbname=app user=me' or 'postgresql://me@db.example/app')"
        ) from None


def redact_dsn(dsn: str) -> str:
    """``dsn`` with passwords masked, as ``key=value`` pairs; never echoes an unparsable DSN."""
    if not dsn:
        return "(libpq defaults)"
    try:
        params = parse_dsn(dsn)
    except ConfigError:
        return "(unparsable connection string)"
    shown: dict[str, Any] = {k: ("***" if k in _SECRET_KEYS else v) for k, v in params.items()}
    return make_conninfo("", **shown)


def connect(
    target: HasDsn | str,
    *,
    autocommit: bool = False,
    application_name: str = "pgherald",
    **params: Any,
) -> psycopg.Connection[TupleRow]:
    """Connects like libpq would (DSN, then ``PG*`` variables, then ``~/.pgpass``).

    ``application_name`` is only a fallback: one set in the DSN or in ``PGAPPNAME`` wins,
    because people use it to tell their own deployments apart in ``pg_stat_activity``.
    Without a ``connect_timeout`` from the DSN or ``PGCONNECT_TIMEOUT``, a 10 s one applies,
    so that an unreachable server gives an error rather than a hang.
    """
    dsn = dsn_of(target)
    given = parse_dsn(dsn)
    extra: dict[str, Any] = {"fallback_application_name": application_name}
    if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
        extra["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
    extra.update(params)
    try:
        return psycopg.connect(dsn, autocommit=autocommit, **extra)
    except psycopg.OperationalError as e:
        raise connection_failed(dsn, str(e), _pgconn_params(e.pgconn)) from None


# -- explaining failures ------------------------------------------------------------------


def _pgconn_params(pgconn: pq.abc.PGconn | None) -> dict[str, str]:
    """What libpq actually tried (host, port, user, database), where it tells us."""
    if pgconn is None:
        return {}
    out: dict[str, str] = {}
    for key, attr in (("host", "host"), ("port", "port"), ("user", "user"), ("dbname", "db")):
        try:
            value = getattr(pgconn, attr)
        except Exception:  # a finished PGconn may refuse some attributes
            continue
        if value:
            out[key] = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    for flag in ("needs_password", "used_password"):
        try:
            out[flag] = "1" if getattr(pgconn, flag) else ""
        except Exception:
            continue
    return out


def _effective_params(dsn: str, tried: Mapping[str, str]) -> dict[str, str]:
    """The DSN's parameters over libpq's defaults (which include the ``PG*`` variables)."""
    merged: dict[str, str] = {}
    for option in pq.Conninfo.get_defaults():
        if option.val is not None:
            merged[option.keyword.decode()] = option.val.decode(errors="replace")
    with contextlib.suppress(ConfigError):
        merged.update(parse_dsn(dsn))
    merged.update({k: v for k, v in tried.items() if v})
    return merged


def _where(params: Mapping[str, str]) -> str:
    host = params.get("host") or params.get("hostaddr") or ""
    port = params.get("port") or "5432"
    if not host:
        return f"the local socket (port {port})"
    if host.startswith("/") or host.startswith("@"):
        return f"the socket in {host} (port {port})"
    if "," in host:
        return f"hosts {host}"
    return f"{host}:{port}"


_RULES: Final[tuple[tuple[re.Pattern[str], str], ...]] = tuple(
    (re.compile(pattern, re.IGNORECASE), text)
    for pattern, text in (
        (
            r"password authentication failed|authentication failed for user",
            "password authentication failed: check the password in the DSN, PGPASSWORD"
            " or ~/.pgpass",
        ),
        (
            r"no password supplied|password is required",
            "the server asks for a password and none was given: put it in ~/.pgpass, PGPASSWORD"
            " or the DSN",
        ),
        (
            r"database \".*\" does not exist",
            "that database does not exist: create it (createdb) or fix the DSN's dbname",
        ),
        (
            r"role \".*\" does not exist",
            "that role does not exist: create it or fix the DSN's user",
        ),
        (
            r"no pg_hba\.conf entry|pg_hba\.conf rejects",
            "no pg_hba.conf entry lets this user reach this database from here:"
            " ask the server's administrator to allow it",
        ),
        (
            r"connection refused|no such file or directory|could not connect to server",
            "connection refused: is PostgreSQL running there and accepting connections?",
        ),
        (
            r"timeout expired|timed out",
            "no answer within the connection timeout: check the host, port and firewall",
        ),
        (
            r"failed to resolve host|could not translate host name|name or service not known",
            "unknown host name: check the DSN's host",
        ),
        (
            r"too many (connections|clients)|remaining connection slots",
            "the server has no free connection slots (max_connections): try again later",
        ),
        (
            r"starting up|shutting down|in recovery mode|not yet accepting connections",
            "the server is starting up or shutting down: try again in a moment",
        ),
        (
            r"server does not support SSL|SSL.*required|certificate",
            "SSL negotiation failed: check sslmode and the certificates in the DSN",
        ),
    )
)


def _last_reason(message: str) -> str:
    """The last meaningful line of a libpq message, without its "connection to ..." prefix."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.lower().startswith("is the server running")]
    reason = reasons[-1] if reasons else message.strip()
    reason = re.sub(r"^(connection (failed|is bad):\s*)", "", reason)
    reason = re.sub(r"^connection to server (at|on socket) .*? failed:\s*", "", reason)
    return re.sub(r"^(FATAL|ERROR):\s*", "", reason)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def connection_failed(
    dsn: str, message: str, tried: Mapping[str, str] | None = None
) -> ConnectionFailed:
    """One line explaining a libpq connection failure ``message``, without any password.

    Usable for psycopg 3 and psycopg2 errors alike (the replication connection is psycopg2);
    ``tried`` may hold the host, port, user and dbname that libpq reports it used.
    """
    params = _effective_params(dsn, tried or {})
    user = params.get("user", "?")
    dbname = params.get("dbname") or user
    where = _where(params)
    for pattern, text in _RULES:
        if pattern.search(message):
            reason = text.format(user=repr(user), dbname=repr(dbname))
            break
    else:
        reason = _last_reason(message)
    secrets = [params.get(k, "") for k in _SECRET_KEYS] + [os.environ.get("PGPASSWORD", "")]
    line = f"cannot connect to PostgreSQL at {where} (database {dbname!r}, user {user!r}): {reason}"
    return ConnectionFailed(_scrub(" ".join(line.split()), secrets))
