"""How a watch presents itself to people: its display name, each row's label, column
titles and (optionally) its own templates. Stored in the watch's options as ``display``::

    {"name": "Employees", "label": "{last_name}, {first_name}",
     "columns": {"salary": "Salary"}, "templates": "employees"}

``label`` is a column name or a template of column names in braces (``{{`` and ``}}`` are
literal braces). Only plain names are allowed in it: no attribute access, indexing or
format specs, so a label can never reach beyond the row's values.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final

from pgherald.errors import ConfigError

DISPLAY_KEYS: Final = frozenset({"name", "label", "columns", "templates"})
_MAX_TEXT: Final = 500


_ACRONYMS: Final = frozenset({"id", "uuid", "url", "uri", "ip", "api", "iban", "vat", "sku"})


def humanize(column: str) -> str:
    """A column's default title: ``hired_on`` becomes ``Hired on``, ``user_id`` ``User ID``;
    an all-caps or mixed-case name is left as it is (someone chose it)."""
    if column != column.lower():
        return column
    words = [w.upper() if w in _ACRONYMS else w for w in column.replace("_", " ").split()]
    if not words:
        return column
    shown = " ".join(words)
    return shown[:1].upper() + shown[1:]


@dataclass(frozen=True)
class Label:
    """A row label: literal text and column names, in order."""

    parts: tuple[tuple[str, bool], ...]
    """``(text, is_column)`` pairs."""
    source: str

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(t for t, is_column in self.parts if is_column)

    @classmethod
    def parse(cls, text: str, where: str = "label") -> Label:
        if not text or len(text) > _MAX_TEXT:
            raise ConfigError(f"{where} must be 1 to {_MAX_TEXT} characters")
        if "{" not in text and "}" not in text:
            return cls(((text, True),), text)
        parts: list[tuple[str, bool]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise ConfigError(f"{where} {text!r} is not a valid template: {e}") from None
        for literal, name, spec, conversion in parsed:
            if literal:
                parts.append((literal, False))
            if name is None:
                continue
            if not name or spec or conversion or any(c in name for c in ".[]"):
                raise ConfigError(
                    f"{where} {text!r}: write plain column names in braces, like"
                    " {last_name}, {first_name} (no formats, indexes or attributes)"
                )
            parts.append((name, True))
        if not any(is_column for _, is_column in parts):
            raise ConfigError(f"{where} {text!r} names no column: write one in braces")
        return cls(tuple(parts), text)

    def render(self, values: Mapping[str, str]) -> str:
        """The label with each column's shown value (``?`` for a column the row lacks)."""
        return "".join(values.get(t, "?") if is_column else t for t, is_column in self.parts)


@dataclass(frozen=True)
class Display:
    """A watch's presentation (see the module's docstring); defaults when nothing is set."""

    watch: str
    name: str | None = None
    label: Label | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    templates: str | None = None
    """A folder under the configured templates folder with this watch's own templates."""

    @property
    def title(self) -> str:
        return self.name or self.watch

    def column_title(self, column: str) -> str:
        return self.columns.get(column) or humanize(column)

    @classmethod
    def from_options(cls, watch: str, options: Mapping[str, Any] | None) -> Display:
        """Reads ``options["display"]``; a malformed one is one ConfigError naming the watch."""
        raw = (options or {}).get("display")
        if raw is None:
            return cls(watch)
        return cls.from_mapping(watch, raw)

    @classmethod
    def from_mapping(cls, watch: str, raw: Any) -> Display:
        where = f"watch {watch!r}: display"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a table of name, label, columns, templates")
        unknown = sorted(set(raw) - DISPLAY_KEYS)
        if unknown:
            raise ConfigError(
                f"{where} has unknown key(s) {', '.join(map(repr, unknown))};"
                f" known: {', '.join(sorted(DISPLAY_KEYS))}"
            )
        name = raw.get("name")
        if name is not None and (not isinstance(name, str) or not name or len(name) > _MAX_TEXT):
            raise ConfigError(f"{where}.name must be 1 to {_MAX_TEXT} characters")
        label = raw.get("label")
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"{where}.label must be a string")
        columns = raw.get("columns") or {}
        if not isinstance(columns, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v and len(v) <= _MAX_TEXT
            for k, v in columns.items()
        ):
            raise ConfigError(f"{where}.columns must map column names to non-empty titles")
        templates = raw.get("templates")
        if templates is not None:
            templates = check_template_folder(templates, f"{where}.templates")
        return cls(
            watch=watch,
            name=name,
            label=Label.parse(label, f"{where}.label") if label is not None else None,
            columns=dict(columns),
            templates=templates,
        )

    def to_mapping(self) -> dict[str, Any]:
        """The stored form (only what is set)."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.label is not None:
            out["label"] = self.label.source
        if self.columns:
            out["columns"] = dict(self.columns)
        if self.templates is not None:
            out["templates"] = self.templates
        return out


def check_template_folder(value: Any, where: str) -> str:
    """A relative folder without ``..``: watch options can pick a folder of templates, but
    only inside the templates folder the configuration (an administrator) names."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a folder name")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value or "\x00" in value:
        raise ConfigError(
            f"{where} {value!r} must be a folder inside the configured templates folder"
            " (relative, without '..')"
        )
    return str(path)
