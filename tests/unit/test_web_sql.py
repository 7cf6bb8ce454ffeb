"""The console's SQL file: no placeholder hides in a comment (psycopg would want a value
for it, and the comments between sections belong to the block above them)."""

from __future__ import annotations

from pgherald.db.sqlfiles import blocks_of


def test_comments_hold_no_placeholders() -> None:
    for name, body in blocks_of("web.sql").items():
        for line in body.splitlines():
            if line.lstrip().startswith("--"):
                assert "%(" not in line and "%s" not in line, (name, line)
