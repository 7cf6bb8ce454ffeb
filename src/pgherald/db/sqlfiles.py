"""SQL shipped in the package's ``sql/`` folder, loaded by file and by block name.

SQL longer than a line lives in ``.sql`` files as named blocks (a ``-- name: foo`` line
starts each), where it can be read, reviewed and syntax-highlighted as SQL. This sits in
``db`` so that the store and the sources load their SQL the same way.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Final, LiteralString

from psycopg import sql

_HEADER: Final = re.compile(r"^--\s*name:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$", re.MULTILINE)


def read_sql(relative: str) -> LiteralString:
    """The text of ``pgherald/sql/<relative>``.

    It is typed as a literal string because it is: SQL shipped inside the package, never
    built from input, which is exactly what psycopg's ``LiteralString`` guard is about.
    """
    text = resources.files("pgherald").joinpath("sql", relative).read_text(encoding="utf-8")
    return text


def parse_blocks(text: str) -> dict[str, LiteralString]:
    """``{name: sql}`` of every ``-- name: ...`` block; the text before the first is ignored."""
    headers = list(_HEADER.finditer(text))
    blocks: dict[str, LiteralString] = {}
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        name = header.group(1)
        if name in blocks:
            raise ValueError(f"query {name!r} is defined twice")
        body = text[header.end() : end].strip()
        if not body:
            raise ValueError(f"query {name!r} is empty")
        blocks[name] = body
    return blocks


@functools.cache
def blocks_of(relative: str) -> dict[str, LiteralString]:
    """The named blocks of one ``.sql`` file, parsed once."""
    return parse_blocks(read_sql(relative))


def named_query(relative: str, name: str) -> LiteralString:
    """One named block of ``sql/<relative>``; a missing name is a bug, said plainly."""
    try:
        return blocks_of(relative)[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/{relative}") from None


def ident(*names: str) -> sql.Identifier:
    """An identifier for a query that also has parameters.

    psycopg reads ``%`` in the composed text as the start of a placeholder, even inside a
    quoted name; doubling it makes a name such as ``"100% done"`` come out intact. Use it
    only in statements executed with parameters (elsewhere the ``%%`` would stay).
    """
    return sql.Identifier(*(n.replace("%", "%%") for n in names))
