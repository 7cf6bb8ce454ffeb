"""The words of an e-mail: a change, or a digest of changes, as plain text and as HTML.

A stand-in, kept behind two functions (``render_change``, ``render_digest``), until the
shared rendering module (``pgherald.render``) can make these mails; the sink calls only
these two. Values are shown as PostgreSQL printed them: NULL as "(empty)", unchanged TOAST
values as "(unchanged)", control characters escaped, long values cut. HTML is made by
Jinja2 with autoescaping, so a hostile value is shown, never run; values sit in ``<bdi>``
so right-to-left text cannot reorder the line around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Final

import jinja2

from pgherald.events import UNCHANGED_TOAST, ChangeEvent, RowImage
from pgherald.sinks.digest import Digest

VALUE_LIMIT: Final = 300
OP_WORDS: Final = {
    "insert": "added",
    "update": "changed",
    "delete": "deleted",
    "truncate": "emptied (all rows deleted)",
    "read": "present at the first snapshot",
    "schema": "table structure changed",
    "message": "notification",
}


@dataclass(frozen=True)
class MailBody:
    text: str
    html: str


@dataclass(frozen=True)
class FieldLine:
    name: str
    old: str | None
    new: str | None


@dataclass(frozen=True)
class ChangeLines:
    """One change, in words and values fit for text and HTML alike."""

    watch: str
    table: str
    op: str
    op_words: str
    key: str
    when: str
    method: str
    fields: tuple[FieldLine, ...]
    note: str | None

    @property
    def headline(self) -> str:
        row = f" {self.key}" if self.key else ""
        return f"{self.watch}:{row} {self.op_words}"


def clean(text: str, limit: int = VALUE_LIMIT) -> str:
    """One value fit to show: control characters escaped (newlines and tabs kept in a
    multi-line value would break the plain-text layout), long values cut with "…"."""
    shown = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _value(image: RowImage | None, column: str) -> str:
    if image is None or column not in image.shape:
        return "(unknown)"
    text = image.text(column)
    if text is None:
        return "(empty)"
    if text is UNCHANGED_TOAST:
        return "(unchanged)"
    return clean(str(text))


def when_text(moment: datetime, zone: tzinfo | None) -> str:
    return moment.astimezone(zone or UTC).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def change_lines(event: ChangeEvent, zone: tzinfo | None) -> ChangeLines:
    key = ", ".join(
        f"{clean(k, 60)}={'(empty)' if v is None else clean(str(v), 60)}"
        for k, v in event.key.items()
    )
    fields: tuple[FieldLine, ...] = ()
    note = None
    if event.op == "update":
        fields = tuple(
            FieldLine(clean(c, 60), _value(event.old, c), _value(event.new, c))
            for c in event.changed
        )
        if event.old is None:
            note = "the old values were not recorded"
        elif not event.changed:
            note = "no watched column changed"
    elif event.op in ("insert", "read") and event.new is not None:
        fields = tuple(FieldLine(clean(c, 60), None, _value(event.new, c)) for c in event.new)
    elif event.op == "delete" and event.old is not None:
        fields = tuple(FieldLine(clean(c, 60), _value(event.old, c), None) for c in event.old)
    elif event.op == "message" and event.new is not None:
        fields = (FieldLine("payload", None, _value(event.new, "payload")),)
    when = event.commit_time or event.captured_at
    return ChangeLines(
        watch=clean(event.watch, 80),
        table=clean(f"{event.schema}.{event.table}" if event.schema else event.table, 120),
        op=event.op,
        op_words=OP_WORDS.get(event.op, event.op),
        key=key,
        when=when_text(when, zone),
        method=event.method,
        fields=fields,
        note=note,
    )


def _text_change(c: ChangeLines, indent: str = "") -> list[str]:
    lines = [f"{indent}{c.headline}", f"{indent}  {c.table}, {c.when}, by {c.method} capture"]
    for f in c.fields:
        if f.old is not None and f.new is not None:
            lines.append(f"{indent}  {f.name}: {f.old} → {f.new}")
        else:
            lines.append(f"{indent}  {f.name}: {f.new if f.new is not None else f.old}")
    if c.note:
        lines.append(f"{indent}  ({c.note})")
    return lines


_ENV: Final = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)

_STYLE: Final = """\
<style>
body { font-family: sans-serif; color: #222; }
h3 { margin: 1em 0 .2em; }
p.how, p.foot { margin: 0; color: #666; }
p.foot { margin-top: 2em; font-size: small; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { text-align: left; padding: 2px 8px 2px 0; vertical-align: top; }
td.n { text-align: right; }
</style>"""

_CHANGE_HTML: Final = """\
{%- macro change(c) -%}
<h3>{{ c.watch }}:{% if c.key %} <bdi>{{ c.key }}</bdi>{% endif %} {{ c.op_words }}</h3>
<p class="how">{{ c.table }}, {{ c.when }}, by {{ c.method }} capture</p>
{%- if c.fields %}
<table>
{%- for f in c.fields %}
<tr><th>{{ f.name }}</th>
{%- if f.old is not none and f.new is not none %}
<td><del><bdi>{{ f.old }}</bdi></del></td><td>→</td><td><ins><bdi>{{ f.new }}</bdi></ins></td>
{%- else %}
<td colspan="3"><bdi>{{ f.new if f.new is not none else f.old }}</bdi></td>
{%- endif %}</tr>
{%- endfor %}
</table>
{%- endif %}
{%- if c.note %}<p><em>({{ c.note }})</em></p>{% endif %}
{%- endmacro -%}
"""

_CHANGE_PAGE: Final = _ENV.from_string(
    _CHANGE_HTML
    + """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
"""
    + _STYLE
    + """
</head><body>
{{ change(c) }}
<p class="foot">pgherald · change {{ event_id }}</p>
</body></html>
"""
)

_DIGEST_PAGE: Final = _ENV.from_string(
    _CHANGE_HTML
    + """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
"""
    + _STYLE
    + """
</head><body>
<h2>{{ title }}</h2>
{%- if run_line %}<p>{{ run_line }}</p>{% endif %}
{%- if total == 0 %}
<p>Nothing changed.</p>
{%- else %}
<table>
<tr><th>watch</th><th>change</th><th>count</th></tr>
{%- for watch, words, n in counts %}
<tr><td>{{ watch }}</td><td>{{ words }}</td><td class="n">{{ n }}</td></tr>
{%- endfor %}
</table>
{%- for c in changes %}
{{ change(c) }}
{%- endfor %}
{%- if omitted %}
<p><strong>… and {{ omitted }} more change{{ "s" if omitted != 1 else "" }},
not listed here.</strong></p>
{%- endif %}
{%- endif %}
<p class="foot">pgherald · digest {{ key }}</p>
</body></html>
"""
)


def render_change(event: ChangeEvent, zone: tzinfo | None, title: str) -> MailBody:
    """One change's mail: ``title`` is the subject (shown as the page's title)."""
    c = change_lines(event, zone)
    text = "\n".join([*_text_change(c), "", f"-- pgherald · change {clean(event.event_id)}", ""])
    html = _CHANGE_PAGE.render(c=c, title=title, event_id=event.event_id)
    return MailBody(text, html)


def window_text(digest: Digest) -> str:
    """What a digest covers, in words: ``2024-05-01``, ``2024-05-01 10:00–11:00 UTC``,
    ``run 42 of employees``."""
    zone = digest.timezone or UTC
    if digest.run is not None:
        return f"run {digest.run.id} of {clean(digest.run.watch, 80)}"
    if digest.start is None or digest.end is None:
        return digest.key
    start, end = digest.start.astimezone(zone), digest.end.astimezone(zone)
    if digest.period == "day":
        return f"{start:%Y-%m-%d} ({start:%Z})"
    return f"{start:%Y-%m-%d %H:%M}–{end:%H:%M} {start:%Z}".strip()


def _run_line(digest: Digest) -> str | None:
    run = digest.run
    if run is None:
        return None
    parts = [f"Snapshot run {run.id} of {clean(run.watch, 80)}"]
    if run.started_at is not None:
        parts.append(f"started {when_text(run.started_at, digest.timezone)}")
    if run.ended_at is not None:
        parts.append(f"ended {when_text(run.ended_at, digest.timezone)}")
    line = ", ".join(parts) + f" ({run.status})"
    if run.error:
        line += f": {clean(run.error, 200)}"
    return line


def _counts(counts: Mapping[tuple[str, str], int]) -> list[tuple[str, str, int]]:
    return [
        (clean(watch, 80), OP_WORDS.get(op, op), n) for (watch, op), n in sorted(counts.items())
    ]


def render_digest(digest: Digest, title: str) -> MailBody:
    """A digest's mail: a count per watch and operation, then the listed changes."""
    changes = [change_lines(e, digest.timezone) for _, e in digest.events]
    counts = _counts(digest.counts)
    run_line = _run_line(digest)
    lines = [title, "=" * min(len(title), 78), ""]
    if run_line:
        lines += [run_line, ""]
    if digest.empty:
        lines.append("Nothing changed.")
    else:
        width = max(len(w) for w, _, _ in counts)
        for watch, words, n in counts:
            lines.append(f"  {watch:<{width}}  {words:<28} {n:>7}")
        for c in changes:
            lines += ["", *_text_change(c)]
        if digest.omitted:
            plural = "s" if digest.omitted != 1 else ""
            lines += ["", f"… and {digest.omitted} more change{plural}, not listed here."]
    lines += ["", f"-- pgherald · digest {digest.key}", ""]
    html = _DIGEST_PAGE.render(
        title=title,
        run_line=run_line,
        total=digest.total,
        counts=counts,
        changes=changes,
        omitted=digest.omitted,
        key=digest.key,
    )
    return MailBody("\n".join(lines), html)
