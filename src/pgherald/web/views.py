"""Change events as the console's templates show them.

Values are PostgreSQL's text output, control characters escaped (``present.clean``), so a
value can never break a line or smuggle markup: the templates escape everything, and
what reaches them is already plain text. Lists cut long values; the event page shows them
whole up to ``FULL_LIMIT`` characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from pgherald import present
from pgherald.events import UNCHANGED_TOAST, ChangeEvent, RowImage
from pgherald.store.changelog import StoredEvent, row_key_of

LIST_WIDTH: Final = 80
FULL_LIMIT: Final = 10_000
OP_LABELS: Final = {
    "insert": "added",
    "update": "changed",
    "delete": "removed",
    "truncate": "emptied",
    "read": "initial",
    "schema": "schema",
    "message": "message",
}


@dataclass(frozen=True)
class FieldView:
    name: str
    old: str | None
    new: str | None
    changed: bool


@dataclass(frozen=True)
class EventView:
    id: int
    event_id: str
    watch: str
    op: str
    op_label: str
    when: str
    when_iso: str
    table: str
    key: str
    row_key: str | None
    fields: tuple[FieldView, ...]
    summary: str
    method: str
    position: str
    xid: int | None
    old_values: str


def when(moment: datetime) -> tuple[str, str]:
    """Local time for people, ISO 8601 with offset for machines (``<time datetime>``)."""
    local = moment.astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S"), local.isoformat(timespec="seconds")


def _text(image: RowImage | None, column: str, width: int) -> str | None:
    if image is None or column not in image.shape:
        return None
    text = image.text(column)
    if text is None:
        return "NULL"
    if text is UNCHANGED_TOAST:
        return "(unchanged)"
    return present.clean(str(text), width)


def key_text(event: ChangeEvent, width: int = LIST_WIDTH) -> str:
    return ", ".join(
        f"{present.clean(k, 40)}={'NULL' if v is None else present.clean(str(v), width)}"
        for k, v in event.key.items()
    )


def fields(event: ChangeEvent, width: int, everything: bool = False) -> tuple[FieldView, ...]:
    """The fields worth showing: an update's changed ones (all, with ``everything``), an
    insert's or delete's values."""
    changed = set(event.changed)
    if event.op == "update":
        names = list(event.new or ()) if everything else list(event.changed)
        if everything:
            names += [c for c in event.changed if c not in names]
        return tuple(
            FieldView(c, _text(event.old, c, width), _text(event.new, c, width), c in changed)
            for c in names
        )
    if event.op in ("insert", "read") and event.new is not None:
        return tuple(
            FieldView(c, None, _text(event.new, c, width), True)
            for c in event.new
            if everything or c not in event.key
        )
    if event.op == "delete" and event.old is not None:
        return tuple(
            FieldView(c, _text(event.old, c, width), None, True)
            for c in event.old
            if everything or c not in event.key
        )
    if event.op == "message" and event.new is not None:
        return (FieldView("payload", None, _text(event.new, "payload", width), True),)
    if event.op == "schema":
        summary = {
            k: event.meta[k] for k in ("added", "dropped", "renamed", "retyped") if k in event.meta
        }
        text = json.dumps(summary, ensure_ascii=False, default=str)
        return (FieldView("schema", None, present.clean(text, width), True),)
    return ()


def view(stored: StoredEvent, full: bool = False) -> EventView:
    e = stored.event
    width = FULL_LIMIT if full else LIST_WIDTH
    shown, iso = when(e.commit_time or e.captured_at)
    return EventView(
        id=stored.id,
        event_id=e.event_id,
        watch=e.watch,
        op=e.op,
        op_label=OP_LABELS.get(e.op, e.op),
        when=shown,
        when_iso=iso,
        table=f"{e.schema}.{e.table}",
        key=key_text(e, width),
        row_key=row_key_of(e.key),
        fields=fields(e, width, everything=full),
        summary=present.describe(e, width=200),
        method=e.method,
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


__all__ = ["EventView", "FieldView", "fields", "key_text", "row_key_from_text", "view", "when"]
