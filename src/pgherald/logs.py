"""Logging for the long-running commands: plain text or one JSON object per line, and never
a password.

``setup`` installs one handler on the root logger (calling it again, as a SIGHUP reload
does, changes its level and format in place). Every handler gets ``RedactFilter``, the
safety net that masks secrets whatever code logged them: passwords in connection strings
and URLs (``postgresql://u:pw@host``, ``amqp://u:pw@host``, ``password=pw``), values of
keys that name secrets (``"password": "..."``, ``token=...``, ``Authorization: Bearer ...``)
and the exact secret values pgherald knows of (``add_secrets``: the DSN's password, sink
options, ``PGPASSWORD``...). Messages are redacted before any formatter sees them, and so
are exception tracebacks.

Context fields (``watch``, ``sink``, ``slot``, ...) come from ``extra=`` or from ``bind``,
which sets them for the current thread or asyncio task; the JSON format writes them as
keys of their own, the text format appends them as ``key=value``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

MASK: Final = "***"
MIN_SECRET_LENGTH: Final = 4
"""Exact values shorter than this are not masked by value (they would mask ordinary words);
the patterns still mask them where they appear as a password."""

SECRET_WORDS: Final = (
    "password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "api-key",
    "private_key", "access_key", "authorization", "credentials",
)  # fmt: skip
"""Option and header names whose values are secrets (matched case-insensitively, also
inside longer names such as ``smtp_password`` or ``X-Api-Key``)."""

_WORDS: Final = "|".join(re.escape(w) for w in sorted(SECRET_WORDS, key=len, reverse=True))
_KEY: Final = rf"[\w.-]*(?:{_WORDS})[\w.-]*"

_URL_PASSWORD: Final = re.compile(
    r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/?#@]*:)[^\s/?#]*(?=@)"
)
"""``scheme://user:password@host``: the password runs to the last ``@`` before the host."""
_QUOTED_VALUE: Final = re.compile(
    rf"""(?P<pre>(?P<q>["']){_KEY}(?P=q)\s*[:=]\s*)(?P<v>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""",
    re.IGNORECASE,
)
"""``"password": "pw"`` and ``'token': 'x'`` (JSON and Python reprs)."""
_KEYWORD_VALUE: Final = re.compile(
    rf"""(?P<pre>(?<![\w.-]){_KEY}\s*=\s*)(?P<v>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&,;)\]}}]+)""",
    re.IGNORECASE,
)
"""``password=pw``, ``password = 'p w'`` (libpq keyword DSNs), ``?token=x&`` (queries)."""
_HEADER_VALUE: Final = re.compile(
    r"(?P<pre>\b(?:authorization|proxy-authorization)\s*:\s*)(?P<v>(?:(?:bearer|basic|token)\s+)?[^\s,;'\"]+)",
    re.IGNORECASE,
)
"""``Authorization: Bearer x`` as a header line."""

_known: set[str] = set()
_known_lock = threading.Lock()
_known_pattern: re.Pattern[str] | None = None

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "pgherald_log_context", default=None
)

_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
"""LogRecord attributes that are not context fields."""


# -- redaction ------------------------------------------------------------------------------


def add_secrets(values: Iterable[str]) -> None:
    """Values that must never appear in logs (masked wherever they appear)."""
    global _known_pattern
    with _known_lock:
        before = len(_known)
        _known.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH)
        if len(_known) != before:
            longest_first = sorted(_known, key=len, reverse=True)
            _known_pattern = re.compile("|".join(re.escape(v) for v in longest_first))


def redact(text: str) -> str:
    """``text`` with every password and secret pgherald can recognise replaced by ``***``."""
    pattern = _known_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URL_PASSWORD.sub(rf"\g<pre>{MASK}", text)
    text = _QUOTED_VALUE.sub(lambda m: f"{m['pre']}{m['v'][0]}{MASK}{m['v'][0]}", text)
    text = _HEADER_VALUE.sub(rf"\g<pre>{MASK}", text)
    return _KEYWORD_VALUE.sub(_keyword, text)


def _keyword(m: re.Match[str]) -> str:
    value = m["v"]
    if value == MASK or value.startswith(f"{MASK}@"):
        return m[0]
    quote = value[0] if value[0] in "'\"" else ""
    return f"{m['pre']}{quote}{MASK}{quote}"


def secrets_in_dsn(dsn: str) -> set[str]:
    """The password of a libpq DSN (keyword or URI form), if it has one."""
    from pgherald.db.connect import parse_dsn
    from pgherald.errors import ConfigError

    try:
        params = parse_dsn(dsn)
    except ConfigError:
        return set()
    return {str(v) for k, v in params.items() if k in ("password", "sslpassword") and v}


def secrets_in_options(options: Any, secret: bool = False) -> set[str]:
    """Secret values in a sink's options: values of keys that name secrets (and everything
    under such a key), and the passwords of URLs with user information."""
    found: set[str] = set()
    if isinstance(options, Mapping):
        for key, value in options.items():
            named = secret or _is_secret_key(str(key))
            found |= secrets_in_options(value, named)
    elif isinstance(options, list | tuple):
        for value in options:
            found |= secrets_in_options(value, secret)
    elif isinstance(options, str):
        if secret:
            found.add(options)
            # "Bearer abc": the token alone, too (it may be logged without its scheme)
            found.update(part for part in options.split() if len(part) >= 8)
        found |= _url_password(options)
    return found


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in SECRET_WORDS)


def _url_password(text: str) -> set[str]:
    if "://" not in text or "@" not in text:
        return set()
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        return set()
    out = {parts.password} if parts.password else set()
    from urllib.parse import unquote

    return out | {unquote(p) for p in out}


class RedactFilter(logging.Filter):
    """Masks secrets in a record's message and traceback before it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: show it as it is, masked
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in _fields(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, redact(value) if isinstance(value, str) else value)
        return True


# -- context ----------------------------------------------------------------------------------


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Adds context fields to every record logged in this block (this thread or task)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Adds context fields for the rest of this thread or asyncio task."""
    _context.set({**(_context.get() or {}), **fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


# -- formats ------------------------------------------------------------------------------------


def _part(thread: str | None) -> str | None:
    """The pgherald part a thread runs (``pgherald-logical`` -> ``logical``)."""
    if thread and thread.startswith("pgherald-"):
        return thread.removeprefix("pgherald-")
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the part
    of pgherald that logged it, context fields, and the error's traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        part = _part(record.threadName)
        if part:
            out["part"] = part
        for key, value in _fields(record).items():
            out.setdefault(
                key, value if isinstance(value, str | int | float | bool) else str(value)
            )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["error"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2024-05-02 09:14:03,123 INFO pgherald: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if not text or re.search(r"[\s\"=]", text) else text


# -- setup ---------------------------------------------------------------------------------------


NOISY_LIBRARIES: Final = (
    "httpx",
    "httpcore",
    "aio_pika",
    "aiormq",
    "aiosmtplib",
    "nats",
    "asyncio",
)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """pgherald's own handler, so ``setup`` finds it again."""


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Logs to stderr at ``level`` in ``fmt`` (``text`` or ``json``), redacted; again
    changes the level and format in place."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler(stream or sys.stderr)
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.setLevel(level.upper())
    # Libraries that log every request at INFO would drown what pgherald says; their
    # warnings and errors still show, and everything with --log-level debug.
    quiet = logging.NOTSET if level.lower() == "debug" else logging.WARNING
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    logging.captureWarnings(True)
    protect_handlers()


def protect_handlers() -> None:
    """Adds the redaction filter to every handler there is (root's and any logger's)."""
    loggers: list[logging.Logger | logging.PlaceHolder] = [logging.getLogger()]
    loggers += list(logging.Logger.manager.loggerDict.values())
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if not any(isinstance(f, RedactFilter) for f in handler.filters):
                handler.addFilter(RedactFilter())
