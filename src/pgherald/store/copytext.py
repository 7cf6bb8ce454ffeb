"""PostgreSQL's COPY text format, written directly for the change log's staging rows.

psycopg's generic ``write_row`` adapts every list through its pure-Python array dumper,
which was most of the cost of an append; the change log's rows hold only texts, text
arrays, integers, booleans, timestamps and JSON, whose text forms are simple and fixed
by PostgreSQL's documentation ("COPY ... File Formats" and "Array Value Input").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

NULL: Final = "\\N"

# COPY text format: backslash, newline, carriage return and tab are escaped.
_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _escape(value: str) -> str:
    # Most texts need no escaping; four substring tests are much cheaper than translate().
    if "\\" in value or "\n" in value or "\t" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def text(value: str | None) -> str:
    """A text field."""
    return NULL if value is None else _escape(value)


def _element(value: str | None) -> str:
    if value is None:
        return "NULL"
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if '"' in value:
        value = value.replace('"', '\\"')
    return f'"{value}"'


def text_array(values: Sequence[str | None] | None) -> str:
    """A one-dimensional ``text[]`` field; every element quoted, so any text is safe.

    Most rows hold no NULL and no character that either the array syntax or COPY must
    escape: then the field is the elements joined with ``","`` inside ``{"`` and ``"}``,
    checked with a few substring tests over the joined text instead of per element.
    """
    if values is None:
        return NULL
    if values and None not in values:
        body = '","'.join(values)  # type: ignore[arg-type]  # no None, checked above
        if (
            body.count('"') == 2 * len(values) - 2  # only the separators' quotes
            and "\\" not in body
            and "\n" not in body
            and "\t" not in body
            and "\r" not in body
        ):
            return '{"' + body + '"}'
    return _escape("{" + ",".join([_element(v) for v in values]) + "}")


def array_literal(values: Sequence[str | None]) -> str:
    """A one-dimensional ``text[]`` literal, as a query parameter (not a COPY field):
    every element quoted, so any text is safe; ``NULL`` for ``None``."""
    if None not in values:
        body = '","'.join(values)  # type: ignore[arg-type]  # no None, checked above
        if body.count('"') == 2 * len(values) - 2 and "\\" not in body:
            return '{"' + body + '"}'
    return "{" + ",".join([_element(v) for v in values]) + "}"


def integer(value: int | None) -> str:
    return NULL if value is None else str(int(value))


def boolean(value: bool) -> str:
    return "t" if value else "f"


def timestamptz(value: datetime | None) -> str:
    """ISO 8601; a naive datetime is read in the session's time zone, as PostgreSQL does."""
    return NULL if value is None else value.isoformat()
