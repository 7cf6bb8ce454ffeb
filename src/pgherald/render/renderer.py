"""One object that renders changes and digests to HTML and plain text, for feeds, pages,
e-mail and the web console alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from babel.dates import format_date, format_time
from markupsafe import Markup

from pgherald.events.model import ChangeEvent
from pgherald.render.changes import OP_WORDS, ChangeView, ChangeViews
from pgherald.render.digest import Group
from pgherald.render.display import Display
from pgherald.render.links import Links
from pgherald.render.templates import Templates
from pgherald.render.values import DEFAULT_SHORTEN, Formatter, visible


@dataclass(frozen=True)
class RenderedDigest:
    title: str
    html: Markup
    text: str
    group: Group


class Renderer:
    """Renders with one locale, time zone and templates folder.

    ``displays`` gives each watch's ``Display`` (a mapping by watch name, or a function);
    a watch it does not know is shown with the defaults.
    """

    def __init__(
        self,
        *,
        locale: str = "en",
        timezone: str = "UTC",
        templates_dir: Path | str | None = None,
        displays: Mapping[str, Display] | Callable[[str], Display] | None = None,
        links: Links | None = None,
        shorten: int = DEFAULT_SHORTEN,
    ) -> None:
        self.formatter = Formatter(locale, timezone, shorten)
        self.templates = Templates(templates_dir)
        if displays is None or isinstance(displays, Mapping):
            known = dict(displays or {})
            self.display: Callable[[str], Display] = lambda w: known.get(w) or Display(w)
        else:
            self.display = displays
        self.links = links
        self.views = ChangeViews(self.formatter, self.display, links)

    def with_links(self, links: Links | None) -> Renderer:
        """The same renderer with other links (each page of a static export has its own)."""
        other = object.__new__(Renderer)
        other.__dict__.update(self.__dict__)
        other.links = links
        other.views = ChangeViews(self.formatter, self.display, links)
        return other

    def _folder(self, watch: str) -> str | None:
        return self.display(watch).templates

    def _render(self, name: str, folder: str | None, **context: Any) -> str:
        return self.templates.render(name, folder, **context)

    # -- one change --------------------------------------------------------------------

    def view(self, event: ChangeEvent, log_id: int | None = None) -> ChangeView:
        return self.views.view(event, log_id)

    def change_html(self, event: ChangeEvent | ChangeView, log_id: int | None = None) -> Markup:
        view = event if isinstance(event, ChangeView) else self.view(event, log_id)
        return Markup(self._render("change.html", self._folder(view.watch), c=view))

    def change_text(self, event: ChangeEvent | ChangeView, log_id: int | None = None) -> str:
        view = event if isinstance(event, ChangeView) else self.view(event, log_id)
        return self._render("change.txt", self._folder(view.watch), c=view)

    # -- digests -----------------------------------------------------------------------

    def counts_text(self, group: Group) -> str:
        parts = [
            f"{group.counts[op]} {OP_WORDS[op]}"
            for op in ("insert", "update", "delete", "read", "truncate", "schema", "message", "gap")
            if group.counts.get(op)
        ]
        noun = "change" if group.total == 1 else "changes"
        return f"{group.total} {noun}" + (f": {', '.join(parts)}" if parts else "")

    def digest_title(self, group: Group) -> str:
        names = [visible(self.display(w).title, newlines=False) for w in group.watches[:3]]
        who = ", ".join(names) + (
            f" and {len(group.watches) - 3} more" if len(group.watches) > 3 else ""
        )
        count = f"{group.total} {'change' if group.total == 1 else 'changes'}"
        loc = self.formatter.babel_locale
        zone = self.formatter.zone
        period = group.period(zone)
        if period is not None:
            start, end = period
            day = format_date(start.date(), "long", locale=loc)
            if group.mode == "day":
                return f"{who}: {count} on {day}"
            return (
                f"{who}: {count} on {day},"
                f" {format_time(start, 'short', tzinfo=zone, locale=loc)}–"
                f"{format_time(end, 'short', tzinfo=zone, locale=loc)}"
                f" {self.formatter.zone_label(start)}"
            )
        if group.key.startswith("run:"):
            run_id = group.key.rsplit(":", 1)[1]
            return f"{who}: {count} in snapshot run {run_id}"
        assert group.last is not None
        return f"{who}: {count} in one transaction, {self.formatter.when(group.last)}"

    def digest(self, group: Group) -> RenderedDigest:
        views = [self.view(e, log_id) for log_id, e in group.events]
        summary = self.counts_text(group)
        context = {"summary": summary, "more": group.more, "total": group.total}
        html = Markup(
            self._render(
                "digest.html", None, d=context, changes=[self.change_html(v) for v in views]
            )
        )
        text = self._render(
            "digest.txt", None, d=context, changes=[self.change_text(v) for v in views]
        )
        return RenderedDigest(self.digest_title(group), html, text, group)

    def when(self, value: datetime) -> str:
        return self.formatter.when(value)

    def changes_html(self, events: Sequence[tuple[int, ChangeEvent]]) -> list[Markup]:
        return [self.change_html(e, log_id) for log_id, e in events]
