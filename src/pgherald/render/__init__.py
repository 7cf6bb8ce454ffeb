"""Readable changes: one renderer for feeds, HTML pages, e-mail and the web console.

``Renderer`` turns change events into views (``ChangeView``: the watch's display name,
the row's label, the operation in words, each field ``old → new`` formatted for a locale
and time zone) and those into HTML and plain text through Jinja2 templates that a
templates folder can override, per watch if need be. ``render.feed`` makes Atom and RSS
documents, ``render.pages`` the HTML pages, ``render.digest`` groups changes into digests.

This package reads nothing itself: callers hand it events and watches (``pgherald.feeds``
and ``pgherald.pages`` read them from the store).
"""

from pgherald.render.changes import ChangeView, FieldView, row_key_text
from pgherald.render.digest import DIGEST_MODES, DigestMode, Group, group
from pgherald.render.display import Display, Label
from pgherald.render.links import Links, StaticLinks, WebLinks
from pgherald.render.renderer import RenderedDigest, Renderer
from pgherald.render.values import EMPTY, Formatter, Shown

__all__ = [
    "DIGEST_MODES",
    "EMPTY",
    "ChangeView",
    "DigestMode",
    "Display",
    "FieldView",
    "Formatter",
    "Group",
    "Label",
    "Links",
    "RenderedDigest",
    "Renderer",
    "Shown",
    "StaticLinks",
    "WebLinks",
    "group",
    "row_key_text",
]
