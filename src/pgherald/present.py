"""Change events as one line of text, for terminals (``pgherald changes``, the demo).

Values are shown as PostgreSQL prints them, control characters escaped and long values
cut, so a hostile or huge value can never break the line or flood the terminal.
"""

from __future__ import annotations

import json
from typing import Final, Literal

from pgherald.events import UNCHANGED_TOAST, ChangeEvent, RowImage
from pgherald.events.model import describe_gap

VALUE_WIDTH: Final = 60
NAME_WIDTH: Final = 40


def clean(text: str, width: int = VALUE_WIDTH) -> str:
    """A value fit for one line: control characters escaped, long values cut with "…"."""
    shown = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def value(image: RowImage | None, column: str, null: str = "NULL") -> str:
    if image is None or column not in image.shape:
        return "?"
    text = image.text(column)
    if text is None:
        return null
    if text is UNCHANGED_TOAST:
        return "(unchanged)"
    return clean(str(text))


def describe(
    event: ChangeEvent,
    *,
    stamp: Literal["datetime", "time"] = "datetime",
    aligned: bool = False,
    null: str = "NULL",
    show_inserts: bool = False,
    width: int | None = None,
) -> str:
    """One readable line: time, watch, operation, key, and for updates ``col: old → new``.

    ``stamp="time"`` shows the local time of day only, ``aligned`` pads the watch and
    operation into columns, ``show_inserts`` lists an inserted row's other fields, and
    ``width`` cuts the whole line.
    """
    when = event.commit_time or event.captured_at
    shown_time = (
        when.astimezone().strftime("%H:%M:%S")
        if stamp == "time"
        else when.isoformat(sep=" ", timespec="seconds")
    )
    name = clean(event.watch, NAME_WIDTH)
    parts = [
        shown_time,
        f"{name:<9}" if aligned else name,
        f"{event.op:<8}" if aligned else event.op,
    ]
    key = ", ".join(
        f"{clean(k, NAME_WIDTH)}={null if v is None else clean(str(v))}"
        for k, v in event.key.items()
    )
    if key:
        parts.append(key)
    if event.op == "update":
        if event.changed:
            parts.append(
                ", ".join(
                    f"{clean(c, NAME_WIDTH)}: {value(event.old, c, null)}"
                    f" → {value(event.new, c, null)}"
                    for c in event.changed
                )
            )
        else:
            parts.append("(no column changed)" if event.old is not None else "(old values unknown)")
    elif event.op in ("insert", "read") and show_inserts and event.new is not None:
        parts.append(
            ", ".join(
                f"{clean(c, NAME_WIDTH)}={value(event.new, c, null)}"
                for c in event.new
                if c not in event.key
            )
        )
    elif event.op == "truncate":
        parts.append(f"{event.schema}.{event.table}")
    elif event.op == "message" and event.new is not None:
        parts.append(f"{event.table}: {clean(str(event.new.text('payload') or ''), 200)}")
    elif event.op == "schema":
        summary = {
            k: event.meta[k]
            for k in ("added", "dropped", "renamed", "retyped")
            if event.meta.get(k)
        }
        parts.append(clean(json.dumps(summary, ensure_ascii=False, default=str), 200))
    elif event.op == "gap":
        parts.append(clean(describe_gap(event.meta), 400))
    line = "  ".join(parts)
    if width is not None and len(line) > width:
        line = line[: width - 1] + "…"
    return line
