"""One exception root, so callers can catch everything pgherald raises on purpose.

Every error carries a message meant for a person: what is wrong and how to fix it,
on one line, without passwords.
"""


class PgHeraldError(Exception):
    """Root of every error pgherald raises on purpose."""


class ConfigError(PgHeraldError):
    """The configuration or the command line asks for something impossible."""


class ConnectionFailed(PgHeraldError):
    """A server could not be reached or refused us; worth retrying later."""


class SchemaError(PgHeraldError):
    """pgherald's own schema is missing, too old or too new for this version."""


class WatchError(PgHeraldError):
    """A watch cannot be created or used as asked (unknown table, no key, ...)."""


class CaptureError(PgHeraldError):
    """A capture source cannot go on (slot gone, wal_level wrong, privilege missing)."""


class DecodeError(CaptureError):
    """The replication stream held something the decoder does not understand."""


class SinkError(PgHeraldError):
    """A sink could not deliver; subclasses say whether trying again can help."""


class RetryableSinkError(SinkError):
    """Timeouts, connection errors, HTTP 429/5xx: the same delivery may succeed later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds the destination asked us to wait before trying again (HTTP
        ``Retry-After``), or None: the delivery engine waits at least that long."""


class PermanentSinkError(SinkError):
    """Bad payload, HTTP 4xx: retrying the same delivery cannot succeed."""
