"""The store's SQL, loaded from the package's ``.sql`` files by name.

SQL longer than a line lives in ``sql/queries.sql`` as named blocks (a ``-- name: foo``
line starts each), where it can be read, reviewed and syntax-highlighted as SQL, and
where the migrations-equal-schema test and the queries see the same unqualified names.
"""

from __future__ import annotations

from typing import LiteralString

from pgherald.db.sqlfiles import blocks_of, named_query, parse_blocks, read_sql

__all__ = ["parse_blocks", "queries", "query", "read_sql"]


def queries() -> dict[str, LiteralString]:
    return blocks_of("queries.sql")


def query(name: str) -> LiteralString:
    """The named block of ``sql/queries.sql``."""
    return named_query("queries.sql", name)
