"""How changes are presented to people here: locale, time zone, templates folder, and the
public URL of the web app; and a ``Renderer`` that knows every watch's display options.

The values come from the settings when they have them (``locale``, ``timezone``,
``templates_dir``, ``public_url``), else from the defaults, and any can be given by the
caller (a command-line flag, the web app's request URL).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from pgherald.db.connect import connect
from pgherald.errors import ConfigError
from pgherald.render import Display, Links, Renderer
from pgherald.render.values import check_locale, check_timezone
from pgherald.store import history, migrations
from pgherald.store import watches as registry

log = logging.getLogger("pgherald.presentation")


@dataclass(frozen=True)
class Presentation:
    locale: str = "en"
    timezone: str = "UTC"
    templates_dir: Path | None = None
    public_url: str = ""
    """The web app's URL as readers reach it (``https://herald.example.com``): feeds need
    absolute links; pages use relative ones and do without."""

    def __post_init__(self) -> None:
        check_locale(self.locale)
        check_timezone(self.timezone)
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"public URL {self.public_url!r} must start with http:// or https://")

    @classmethod
    def of(cls, settings: Any = None, **overrides: Any) -> Presentation:
        """From the settings' fields of these names (where it has them) and ``overrides``
        (``None`` values are ignored, so flags can be passed as they are)."""
        values: dict[str, Any] = {}
        for name in ("locale", "timezone", "templates_dir", "public_url"):
            value = getattr(settings, name, None) if settings is not None else None
            if value is not None:
                values[name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("templates_dir") is not None:
            values["templates_dir"] = Path(values["templates_dir"])
        if "public_url" in values:
            values["public_url"] = str(values["public_url"]).rstrip("/")
        return cls(**values)

    def with_url(self, public_url: str | None) -> Presentation:
        return self if not public_url else replace(self, public_url=public_url.rstrip("/"))


def displays(conn: psycopg.Connection[Any], schema: str) -> dict[str, Display]:
    """Every watch's display options. A malformed one (edited by hand) is logged and the
    defaults are used, so one bad watch does not break every page and feed."""
    out: dict[str, Display] = {}
    for w in registry.list_watches(conn, schema):
        try:
            out[w.name] = Display.from_options(w.name, w.options)
        except ConfigError as e:
            log.warning("%s; showing watch %r with the default display", e, w.name)
            out[w.name] = Display(w.name)
    return out


def renderer(
    conn: psycopg.Connection[Any],
    schema: str,
    presentation: Presentation,
    links: Links | None,
) -> Renderer:
    return Renderer(
        locale=presentation.locale,
        timezone=presentation.timezone,
        templates_dir=presentation.templates_dir,
        displays=displays(conn, schema),
        links=links,
    )


def update_display(
    settings: Any,
    watch: str,
    *,
    name: str | None = None,
    label: str | None = None,
    columns: Mapping[str, str] | None = None,
    templates: str | None = None,
    clear: bool = False,
    presentation: Presentation | None = None,
) -> Display:
    """Changes a watch's display options: the parts given replace theirs (an empty string
    removes one, a column with an empty title loses its title), ``clear`` starts afresh.
    Checked whole before anything is stored."""
    shown = presentation or Presentation.of(settings)
    with connect(settings) as conn:
        migrations.require_current(conn, settings.schema)
        found = registry.get_watch(conn, settings.schema, watch)
        if found is None:
            raise ConfigError(f"no watch named {watch!r} (see `pgherald watch list`)")
        current = {} if clear else dict((found.options or {}).get("display") or {})
        for key, value in (("name", name), ("label", label), ("templates", templates)):
            if value is not None:
                if value:
                    current[key] = value
                else:
                    current.pop(key, None)
        if columns:
            titles = dict(current.get("columns") or {})
            for column, title in columns.items():
                if title:
                    titles[column] = title
                else:
                    titles.pop(column, None)
            current["columns"] = titles
        if not current.get("columns"):
            current.pop("columns", None)
        display = Display.from_mapping(watch, current)
        if display.templates is not None:
            if shown.templates_dir is None:
                raise ConfigError(
                    "a watch's templates folder is a folder inside the templates folder of the"
                    " settings: set templates_dir (or pass --templates-dir) first"
                )
            folder = shown.templates_dir / display.templates
            if not folder.is_dir():
                raise ConfigError(f"templates folder {str(folder)!r} does not exist")
        history.set_watch_display(conn, settings.schema, watch, display.to_mapping())
        conn.commit()
    return display
