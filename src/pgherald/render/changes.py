"""A change event as a person reads it: who (the watch and the row's label), what (the
operation in words, each field ``old → new``), when (in the reader's zone) and how (the
capture method). Templates get these views, never raw events, so every template shows
NULL, unknown and unchanged values, long texts and hostile texts the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pgherald.events.model import ChangeEvent, RowImage, describe_gap
from pgherald.render.display import Display
from pgherald.render.links import Links
from pgherald.render.values import Formatter, Shown, has_bidi, shorten, unknown, visible

OP_WORDS: Final[dict[str, str]] = {
    "insert": "added",
    "update": "changed",
    "delete": "deleted",
    "read": "present at the first snapshot",
    "truncate": "emptied (all rows deleted)",
    "schema": "table structure changed",
    "message": "notification",
    "gap": "changes may be missing (the table was read again)",
}
METHOD_WORDS: Final[dict[str, str]] = {
    "logical": "logical replication",
    "trigger": "trigger",
    "snapshot": "snapshot comparison",
    "listen": "notification channel",
}
LABEL_LIMIT: Final = 120


@dataclass(frozen=True)
class FieldView:
    """One field: ``old`` and ``new`` for an update; only ``new`` for an added row; only
    ``old`` for a deleted one."""

    column: str
    title: str
    old: Shown | None
    new: Shown | None

    @property
    def title_bidi(self) -> bool:
        return has_bidi(self.title)


@dataclass(frozen=True)
class ChangeView:
    event_id: str
    log_id: int | None
    watch: str
    watch_title: str
    op: str
    op_words: str
    label: str | None
    """The row's label (``None`` for table-wide events)."""
    row_key: str | None
    """The row's key as the change log stores it (compact JSON), for its history."""
    table: str
    when: datetime
    when_text: str
    method: str
    method_words: str
    fields: tuple[FieldView, ...]
    note: str | None
    watch_url: str | None
    row_url: str | None

    @property
    def headline(self) -> str:
        """One line: ``Employees: Lovelace, Ada changed``."""
        if self.label is None:
            return f"{self.watch_title}: {self.op_words}"
        return f"{self.watch_title}: {self.label} {self.op_words}"

    @property
    def when_iso(self) -> str:
        return self.when.isoformat()


def row_key_text(key: Mapping[str, Any]) -> str | None:
    """The row key as the change log writes it (``store.changelog.row_key_of``): a compact
    JSON array of the key columns' texts."""
    if not key:
        return None
    values = [v if v is None or isinstance(v, str) else str(v) for v in key.values()]
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


class ChangeViews:
    """Makes ``ChangeView``s with one formatter, each watch's display, and links."""

    def __init__(
        self,
        formatter: Formatter,
        display: Callable[[str], Display],
        links: Links | None = None,
    ) -> None:
        self.formatter = formatter
        self.display = display
        self.links = links

    def value(self, image: RowImage | None, column: str) -> Shown:
        """One column of a row image as shown (unknown when the image lacks it)."""
        return self._value(image, column)

    def _value(self, image: RowImage | None, column: str) -> Shown:
        if image is None or column not in image.shape:
            return unknown()
        text = image.text(column)
        if text is None or not isinstance(text, str):
            return self.formatter.shown(text)
        try:
            value = image[column]
        except Exception:  # a loader that cannot read it: the text is the truth
            value = text
        return self.formatter.shown(value, text)

    def _label(self, event: ChangeEvent, display: Display) -> str | None:
        if event.op in ("truncate", "schema", "gap"):
            return None
        row = event.row
        if display.label is not None and row is not None:
            values: dict[str, str] = {}
            for column in display.label.columns:
                if column not in row.shape:
                    continue
                text = row.text(column)
                if text is None or not isinstance(text, str):
                    values[column] = self.formatter.text(text)
                    continue
                try:
                    value = row[column]
                except Exception:
                    value = text
                # Whole numbers in labels are identifiers: no grouping (#1234, not 1,234).
                values[column] = (
                    text if isinstance(value, int) else self.formatter.text(value, text)
                )
            return shorten(visible(display.label.render(values), newlines=False), LABEL_LIMIT)
        if event.op == "message":
            return visible(event.table, newlines=False)
        if not event.key:
            return "a row"
        parts = [
            f"{display.column_title(k)} {'(empty)' if v is None else v}"
            for k, v in event.key.items()
        ]
        return shorten(visible(", ".join(parts), newlines=False), LABEL_LIMIT)

    def _fields(
        self, event: ChangeEvent, display: Display
    ) -> tuple[tuple[FieldView, ...], str | None]:
        def field(column: str, old: Shown | None, new: Shown | None) -> FieldView:
            return FieldView(
                column, visible(display.column_title(column), newlines=False), old, new
            )

        if event.op == "update":
            note = None
            if event.old is None:
                note = "the old values were not recorded"
            elif not event.changed:
                note = "no watched column changed"
            return (
                tuple(
                    field(c, self._value(event.old, c), self._value(event.new, c))
                    for c in event.changed
                ),
                note,
            )
        if event.op in ("insert", "read") and event.new is not None:
            return tuple(field(c, None, self._value(event.new, c)) for c in event.new), None
        if event.op == "delete":
            if event.old is None:
                return (), "the deleted row's values were not recorded"
            note = None
            if event.key and set(event.old.shape.names) <= set(event.key):
                note = "only the key of the deleted row was recorded"
            return tuple(field(c, self._value(event.old, c), None) for c in event.old), note
        if event.op == "message" and event.new is not None:
            return tuple(field(c, None, self._value(event.new, c)) for c in event.new), None
        if event.op == "schema":
            parts = []
            for what in ("added", "dropped", "renamed", "retyped"):
                found = event.meta.get(what)
                if found:
                    parts.append(f"{what}: {json.dumps(found, ensure_ascii=False, default=str)}")
            return (), visible("; ".join(parts), newlines=False) or None
        if event.op == "gap":
            return (), visible(describe_gap(event.meta), newlines=False)
        return (), None

    def view(self, event: ChangeEvent, log_id: int | None = None) -> ChangeView:
        display = self.display(event.watch)
        when = event.commit_time or event.captured_at
        fields, note = self._fields(event, display)
        row_key = row_key_text(event.key)
        links = self.links
        label = self._label(event, display)
        return ChangeView(
            event_id=event.event_id,
            log_id=log_id,
            watch=event.watch,
            watch_title=visible(display.title, newlines=False),
            op=event.op,
            op_words=OP_WORDS.get(event.op, event.op),
            label=label,
            row_key=row_key,
            table=visible(f"{event.schema}.{event.table}" if event.schema else event.table),
            when=when,
            when_text=self.formatter.when(when),
            method=event.method,
            method_words=METHOD_WORDS.get(event.method, event.method),
            fields=fields,
            note=note,
            watch_url=links.watch(event.watch) if links else None,
            row_url=(
                links.row(event.watch, row_key)
                if links is not None and row_key is not None and label is not None
                else None
            ),
        )
