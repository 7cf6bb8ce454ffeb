"""Where pages live: the web app's routes, or the files of a static export.

Templates never build URLs themselves; they get them from a ``Links``, so the same
templates serve the live web app (absolute paths under a base URL) and a static site
(relative file names that work from any folder, or from a file:// URL).
"""

from __future__ import annotations

import hashlib
import re
from typing import Final, Protocol
from urllib.parse import quote

_SLUG_UNSAFE: Final = re.compile(r"[^a-z0-9]+")


class Links(Protocol):
    def index(self) -> str: ...

    def watch(self, watch: str) -> str: ...

    def run(self, run_id: int) -> str: ...

    def row(self, watch: str, row_key: str) -> str: ...


class WebLinks:
    """The web app's routes under ``base`` (``https://herald.example.com`` or ``""`` for
    site-relative paths): ``/watches/<name>``, ``/watches/<name>/rows/<key>``, ``/runs/<id>``.
    Every part is percent-encoded, so a hostile name cannot escape its path segment."""

    def __init__(self, base: str = "") -> None:
        self.base = base.rstrip("/")

    def index(self) -> str:
        return f"{self.base}/"

    def watch(self, watch: str) -> str:
        return f"{self.base}/watches/{quote(watch, safe='')}"

    def run(self, run_id: int) -> str:
        return f"{self.base}/runs/{int(run_id)}"

    def row(self, watch: str, row_key: str) -> str:
        return f"{self.base}/watches/{quote(watch, safe='')}/rows/{quote(row_key, safe='')}"

    def feed(self, token: str, kind: str) -> str:
        return f"{self.base}/feeds/{quote(token, safe='')}.{kind}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def slug(name: str) -> str:
    """A file name for any watch name: readable where it can be, unique by a digest."""
    readable = _SLUG_UNSAFE.sub("-", name.lower()).strip("-")[:40]
    return f"{readable}-{_digest(name)[:8]}" if readable else _digest(name)


class StaticLinks:
    """The files of ``pgherald export --html``: ``index.html``, ``watches/<slug>.html``,
    ``runs/<id>.html``, ``rows/<digest>.html``; ``root`` leads from the page being written
    to the export's top folder (``""`` or ``"../"``)."""

    def __init__(self, root: str = "") -> None:
        self.root = root

    def index(self) -> str:
        return f"{self.root}index.html"

    def watch(self, watch: str) -> str:
        return f"{self.root}{self.watch_file(watch)}"

    def run(self, run_id: int) -> str:
        return f"{self.root}{self.run_file(run_id)}"

    def row(self, watch: str, row_key: str) -> str:
        return f"{self.root}{self.row_file(watch, row_key)}"

    @staticmethod
    def watch_file(watch: str) -> str:
        return f"watches/{slug(watch)}.html"

    @staticmethod
    def run_file(run_id: int) -> str:
        return f"runs/{int(run_id)}.html"

    @staticmethod
    def row_file(watch: str, row_key: str) -> str:
        return f"rows/{_digest(watch, row_key)}.html"
