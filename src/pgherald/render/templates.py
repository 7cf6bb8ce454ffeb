"""The Jinja2 templates that turn views into HTML and plain text.

Built-in templates live in ``render/templates/``. A templates folder in the settings
overrides them for every watch (a file of the same name wins), and a watch's
``display.templates`` names a folder inside it that overrides them for that watch only.
HTML templates are autoescaped; every environment is sandboxed, so an overriding template
can read the views it is given and nothing else of the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup

from pgherald.errors import ConfigError
from pgherald.render.values import has_bidi

BUILTIN: Final = jinja2.PackageLoader("pgherald.render", "templates")


def isolate(text: Any) -> str:
    """Plain text of a value wrapped in Unicode isolates when it holds right-to-left text,
    so it cannot reorder the rest of its line (HTML templates use <bdi> instead)."""
    shown = str(text)
    return f"\u2068{shown}\u2069" if has_bidi(shown) else shown


def _autoescape(name: str | None) -> bool:
    return name is not None and name.endswith((".html", ".xml"))


class Templates:
    """One sandboxed environment per folder of overrides (made on first use)."""

    def __init__(self, folder: Path | str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise ConfigError(f"templates folder {str(self.folder)!r} is not a folder")
        self._envs: dict[str | None, SandboxedEnvironment] = {}

    def environment(self, watch_folder: str | None = None) -> SandboxedEnvironment:
        key = watch_folder if self.folder is not None else None
        env = self._envs.get(key)
        if env is None:
            loaders: list[jinja2.BaseLoader] = []
            if self.folder is not None:
                if key is not None:
                    loaders.append(jinja2.FileSystemLoader(self.folder / key))
                loaders.append(jinja2.FileSystemLoader(self.folder))
            loaders.append(BUILTIN)
            env = SandboxedEnvironment(
                loader=jinja2.ChoiceLoader(loaders),
                autoescape=_autoescape,
                undefined=jinja2.StrictUndefined,
                trim_blocks=True,
                lstrip_blocks=True,
                keep_trailing_newline=True,
            )
            env.filters["isolate"] = isolate
            self._envs[key] = env
        return env

    def render(self, name: str, watch_folder: str | None = None, **context: Any) -> str:
        try:
            template = self.environment(watch_folder).get_template(name)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                f"template {e.filename or name} line {e.lineno}: {e.message}"
            ) from None
        return template.render(**context)

    def html(self, name: str, watch_folder: str | None = None, **context: Any) -> Markup:
        """Rendered HTML, marked safe to embed in another (autoescaped) template."""
        return Markup(self.render(name, watch_folder, **context))
