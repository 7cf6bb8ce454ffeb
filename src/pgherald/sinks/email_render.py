"""The words of an e-mail: a change, or a digest of changes, as plain text and as HTML.

The changes themselves are rendered by the shared renderer (``pgherald.render``: display
names, row labels, values formatted for the locale and time zone, NULL as "(empty)", long
values shortened with the full value kept, every value escaped and isolated so that
hostile or right-to-left text shows as it is). This module only puts those pieces into a
mail: a document around the HTML, a summary of a digest, and the lines around them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Final

import jinja2
from markupsafe import Markup

from pgherald.events import ChangeEvent
from pgherald.render import Group, Renderer
from pgherald.render.changes import OP_WORDS
from pgherald.render.values import visible
from pgherald.sinks.digest import Digest

__all__ = ["OP_WORDS", "MailBody", "render_change", "render_digest", "window_text"]


@dataclass(frozen=True)
class MailBody:
    text: str
    html: str


def clean(text: str, limit: int = 120) -> str:
    """One line of text fit to show: control characters escaped, long text cut with "…"."""
    shown = visible(text, newlines=False)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


_ENV: Final = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)

_DOCUMENT: Final = _ENV.from_string(
    """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: sans-serif; color: #222; max-width: 50em; }
.pgh-meta, .pgh-note, .pgh-foot { color: #666; }
.pgh-foot { margin-top: 2em; font-size: small; }
.pgh-fields { margin: .3em 0 1em; }
.pgh-field dt { font-weight: bold; float: left; clear: left; margin-right: .5em; }
.pgh-old { text-decoration: line-through; color: #933; }
.pgh-new { color: #363; }
table.pgh-counts { border-collapse: collapse; }
table.pgh-counts th, table.pgh-counts td { text-align: left; padding: 2px 12px 2px 0; }
table.pgh-counts td.n { text-align: right; }
</style>
</head><body>
{% if heading %}<h2>{{ title }}</h2>
{% endif %}
{%- if run_line %}<p>{{ run_line }}</p>
{% endif %}
{%- if summary %}<p class="pgh-summary">{{ summary }}</p>
{% endif %}
{%- if counts %}
<table class="pgh-counts">
<tr><th>watch</th><th>change</th><th>count</th></tr>
{%- for watch, words, n in counts %}
<tr><td><bdi>{{ watch }}</bdi></td><td>{{ words }}</td><td class="n">{{ n }}</td></tr>
{%- endfor %}
</table>
{% endif %}
{%- for html in changes %}
{{ html }}
{% endfor %}
{%- if more %}
<p class="pgh-more">… and {{ more }} more {{ "change" if more == 1 else "changes" }}
not listed here.</p>
{% endif %}
<p class="pgh-foot">pgherald · {{ footer }}</p>
</body></html>
"""
)


def render_change(event: ChangeEvent, renderer: Renderer, title: str) -> MailBody:
    """One change's mail: ``title`` is the subject (and the page's title)."""
    text = renderer.change_text(event).rstrip()
    text += f"\n\n-- pgherald · change {clean(event.event_id)}\n"
    html = _DOCUMENT.render(
        title=title,
        heading=False,
        run_line=None,
        summary=None,
        counts=[],
        changes=[renderer.change_html(event)],
        more=0,
        footer=f"change {event.event_id}",
    )
    return MailBody(text, html)


def window_text(digest: Digest) -> str:
    """What a digest covers, in words: ``2024-05-01 (CEST)``, ``2024-05-01 10:00–11:00
    UTC``, ``run 42 of employees``."""
    zone = digest.timezone or UTC
    if digest.run is not None:
        return f"run {digest.run.id} of {clean(digest.run.watch, 80)}"
    if digest.start is None or digest.end is None:
        return digest.key
    start, end = digest.start.astimezone(zone), digest.end.astimezone(zone)
    if digest.period == "day":
        return f"{start:%Y-%m-%d} ({start:%Z})"
    return f"{start:%Y-%m-%d %H:%M}–{end:%H:%M} {start:%Z}".strip()


def _run_line(digest: Digest, renderer: Renderer) -> str | None:
    run = digest.run
    if run is None:
        return None
    parts = [f"Snapshot run {run.id} of {clean(renderer.display(run.watch).title, 80)}"]
    if run.started_at is not None:
        parts.append(f"started {renderer.when(run.started_at)}")
    if run.ended_at is not None:
        parts.append(f"ended {renderer.when(run.ended_at)}")
    line = ", ".join(parts) + f" ({run.status})"
    if run.error:
        line += f": {clean(run.error, 200)}"
    return line


def _group(digest: Digest) -> Group:
    ops: Counter[str] = Counter()
    for (_, op), n in digest.counts.items():
        ops[op] += n
    return Group(
        key=digest.key,
        mode=digest.period,
        events=list(digest.events),
        total=digest.total,
        counts=ops,
        watches=list(digest.watches),
    )


def _counts(
    counts: Mapping[tuple[str, str], int], renderer: Renderer
) -> list[tuple[str, str, int]]:
    return [
        (clean(renderer.display(watch).title, 80), OP_WORDS.get(op, op), n)
        for (watch, op), n in sorted(counts.items())
    ]


def render_digest(digest: Digest, renderer: Renderer, title: str) -> MailBody:
    """A digest's mail: a summary, a count per watch and operation, then the listed changes
    (the first ``max_items``; the rest are counted)."""
    group = _group(digest)
    summary = "Nothing changed." if digest.empty else renderer.counts_text(group)
    counts = _counts(digest.counts, renderer) if len(digest.counts) > 1 else []
    run_line = _run_line(digest, renderer)
    lines = [title, "=" * min(len(title), 78), ""]
    if run_line:
        lines += [run_line, ""]
    lines.append(summary)
    if counts:
        width = max(len(w) for w, _, _ in counts)
        lines += [""] + [f"  {w:<{width}}  {words:<30} {n:>7}" for w, words, n in counts]
    for log_id, event in digest.events:
        lines += ["", renderer.change_text(event, log_id).rstrip()]
    if digest.omitted:
        noun = "change" if digest.omitted == 1 else "changes"
        lines += ["", f"… and {digest.omitted} more {noun} not listed here."]
    lines += ["", f"-- pgherald · digest {digest.key}", ""]
    html = _DOCUMENT.render(
        title=title,
        heading=True,
        run_line=run_line,
        summary=summary,
        counts=counts,
        changes=[Markup(renderer.change_html(e, log_id)) for log_id, e in digest.events],
        more=digest.omitted,
        footer=f"digest {digest.key}",
    )
    return MailBody("\n".join(lines), html)
