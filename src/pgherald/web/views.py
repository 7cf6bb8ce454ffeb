"""Change events as the console's templates show them, made by the shared renderer
(``pgherald.render``): the watch's display name, the row's label, the operation in words,
values and times in the configured locale and time zone, NULL as "(empty)".

On top of what the renderer escapes, the console writes every character that is not
printable (bidirectional overrides among them) as an escape, so a value can never reorder
or break the page; the templates escape markup, and right-to-left text sits in ``<bdi>``.
Lists cut values at ``LIST_WIDTH`` characters (the whole value is one click away: in place
when short enough, else on the change's own page); a change's page shows each value whole
up to ``FULL_LIMIT`` characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from pgherald.events import ChangeEvent
from pgherald.render import Formatter, Renderer, Shown
from pgherald.render.values import shorten
from pgherald.store.changelog import StoredEvent, row_key_of

LIST_WIDTH: Final = 80
FULL_LIMIT: Final = 10_000
INLINE_LIMIT: Final = 2_000
"""A value cut in a list opens in place up to this length; longer ones on their own page."""
KEY_WIDTH: Final = 40
OP_LABELS: Final = {
    "insert": "added",
    "update": "changed",
    "delete": "removed",
    "truncate": "emptied",
    "read": "initial",
    "schema": "schema",
    "message": "message",
    "gap": "gap",
}


@dataclass(frozen=True)
class Value:
    """One side of a field: ``text`` to show (one line in lists; in a change's page the
    value with its line breaks, up to ``FULL_LIMIT``), and in lists ``whole`` when the
    value was cut and is short enough to open in place."""

    text: str
    cut: bool = False
    whole: str | None = None
    missing: bool = False
    size: int = 0
    """Characters of the whole value (to say how much a cut value holds)."""


@dataclass(frozen=True)
class FieldView:
    name: str
    title: str
    old: Value | None
    new: Value | None
    changed: bool


@dataclass(frozen=True)
class EventView:
    id: int
    event_id: str
    watch: str
    watch_title: str
    op: str
    op_label: str
    op_words: str
    when: str
    when_iso: str
    table: str
    label: str
    """The row's label (the watch's label template, or its key), or the table."""
    key: str
    """The key as ``column=value`` pairs."""
    row_key: str | None
    fields: tuple[FieldView, ...]
    note: str | None
    method: str
    method_words: str
    position: str
    xid: int | None
    old_values: str


def strict(text: str, keep_lines: bool = False) -> str:
    """``text`` with every character that is not printable written as an escape
    (``\\u202e``, ``\\x1b``); line breaks and tabs kept when ``keep_lines``."""
    if text.isprintable():
        return text
    return "".join(
        ch
        if ch.isprintable() or (keep_lines and ch in "\n\t")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def when(moment: datetime, formatter: Formatter) -> tuple[str, str]:
    """A time for people (the configured locale and zone, with the zone's name) and ISO
    8601 with offset for machines (``<time datetime>``)."""
    local = moment.astimezone(formatter.zone)
    return formatter.when(moment), local.isoformat(timespec="seconds")


def _value(shown: Shown | None, full: bool) -> Value | None:
    if shown is None:
        return None
    size = len(shown.full)
    if shown.missing:
        return Value(shown.short, missing=True, size=size)
    if full:
        if size <= FULL_LIMIT:
            return Value(strict(shown.full, keep_lines=True), size=size)
        return Value(strict(shorten(shown.full, FULL_LIMIT), keep_lines=True), cut=True, size=size)
    short = strict(shown.short)
    if not shown.truncated:
        return Value(short, size=size)
    whole = strict(shown.full, keep_lines=True) if size <= INLINE_LIMIT else None
    return Value(short, cut=True, whole=whole, size=size)


def _fields(
    event: ChangeEvent, r: Renderer, full: bool, changed_only: tuple[FieldView, ...]
) -> tuple[FieldView, ...]:
    """An update's every column (on its own page) or the renderer's fields."""
    if not (full and event.op == "update" and event.new is not None):
        return changed_only
    display = r.display(event.watch)
    names = list(event.new)
    names += [c for c in event.changed if c not in names]
    return tuple(
        FieldView(
            strict(c),
            strict(display.column_title(c)),
            _value(r.views.value(event.old, c), full),
            _value(r.views.value(event.new, c), full),
            c in event.changed,
        )
        for c in names
    )


def key_text(event: ChangeEvent) -> str:
    return ", ".join(
        f"{strict(shorten(k, KEY_WIDTH))}="
        f"{'NULL' if v is None else strict(shorten(str(v), LIST_WIDTH))}"
        for k, v in event.key.items()
    )


def view(stored: StoredEvent, r: Renderer, full: bool = False) -> EventView:
    """``stored`` for a template; ``r`` cuts values at its formatter's limit (make it with
    ``Console.renderer(conn, LIST_WIDTH or FULL_LIMIT)``)."""
    e = stored.event
    c = r.view(e, stored.id)
    listed = tuple(
        FieldView(strict(f.column), strict(f.title), _value(f.old, full), _value(f.new, full), True)
        for f in c.fields
    )
    key = key_text(e)
    table = strict(f"{e.schema}.{e.table}" if e.schema else e.table)
    return EventView(
        id=stored.id,
        event_id=e.event_id,
        watch=e.watch,
        watch_title=strict(c.watch_title),
        op=e.op,
        op_label=OP_LABELS.get(e.op, e.op),
        op_words=c.op_words,
        when=c.when_text,
        when_iso=c.when.astimezone(r.formatter.zone).isoformat(timespec="seconds"),
        table=table,
        label=strict(c.label) if c.label is not None else table,
        key=key,
        row_key=row_key_of(e.key),
        fields=_fields(e, r, full, listed),
        note=strict(c.note) if c.note else None,
        method=e.method,
        method_words=c.method_words,
        position=e.position,
        xid=e.xid,
        old_values=e.old_values,
    )


def row_key_from_text(text: str, key_columns: tuple[str, ...]) -> str | None:
    """What a person typed as a row's key, as the log stores it (``row_key``).

    A JSON array is taken as it is; otherwise the text is one key value, or, for a key of
    several columns, the values separated by commas.
    """
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if isinstance(values, list):
            return row_key_of({str(i): None if v is None else str(v) for i, v in enumerate(values)})
    parts = [text] if len(key_columns) <= 1 else [p.strip() for p in text.split(",")]
    return row_key_of({str(i): p for i, p in enumerate(parts)})


__all__ = [
    "EventView",
    "FieldView",
    "Value",
    "key_text",
    "row_key_from_text",
    "strict",
    "view",
    "when",
]
