"""How long the change log keeps a watch's events: ``retain = "400d"``, or ``"forever"``.

A retention is written the way people say it, in hours, days, weeks or years
(``"36h"``, ``"90d"``, ``"2w"``, ``"1y"``, ``"1y30d"``; a year is 365 days). Minutes and
seconds are refused on purpose: ``"3m"`` could mean three months to whoever wrote it,
and read as three minutes it would empty the log. It is stored as written (normalised to
lower case without spaces), so that what a user set is what they see again.

This module only parses; ``pgherald.pruning`` applies retentions to the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from pgherald.errors import ConfigError

FOREVER: Final = "forever"
_PART: Final = re.compile(r"(\d+)([hdwy])")
_UNITS: Final = {"h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_MAX_SECONDS: Final = 1000 * 365 * 86400  # well inside PostgreSQL's timestamp range
_HINT: Final = 'write it like "36h", "90d", "2w", "1y" or "forever"'


@dataclass(frozen=True)
class Retention:
    """A parsed retention: ``text`` as stored, ``period`` (``None``: forever)."""

    text: str
    period: timedelta | None

    @property
    def forever(self) -> bool:
        return self.period is None

    def describe(self) -> str:
        return "forever" if self.period is None else self.text


def parse_retain(text: str, where: str = "retain") -> Retention:
    """Parses a retention; ``ConfigError`` naming ``where`` (the flag or key) if it is not one."""
    if not isinstance(text, str):
        raise ConfigError(f"{where} must be a string ({_HINT}), not {text!r}")
    compact = "".join(text.split()).lower()
    if compact == FOREVER:
        return Retention(FOREVER, None)
    pos, seconds = 0, 0
    for match in _PART.finditer(compact):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact):
        units = re.search(r"\d+\s*(m|min|mo|s|sec|months?|minutes?|seconds?)\b", text.lower())
        extra = (
            " (minutes and seconds are not accepted, and months are ambiguous: use d or w)"
            if units
            else ""
        )
        raise ConfigError(f"{where} {text!r} is not a retention; {_HINT}{extra}")
    if seconds < 3600:
        raise ConfigError(f"{where} {text!r} is too short: at least one hour (1h)")
    if seconds > _MAX_SECONDS:
        raise ConfigError(f'{where} {text!r} is too long: use "forever" to keep events for good')
    return Retention(compact, timedelta(seconds=seconds))


def check_retain(text: str, where: str = "retain") -> str:
    """The retention as stored (``parse_retain(...).text``), for settings and the CLI."""
    return parse_retain(text, where).text


def effective(watch_retain: str | None, default: str | None) -> Retention:
    """What applies to a watch: its own retention, else the configuration's, else forever."""
    if watch_retain is not None:
        return parse_retain(watch_retain, "the watch's retain")
    if default is not None:
        return parse_retain(default, "retain")
    return Retention(FOREVER, None)


_INTERVAL_PART: Final = re.compile(r"(\d+)([smhd])")
_INTERVAL_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str, where: str = "prune_interval") -> timedelta | None:
    """How often the daemon prunes: ``"1h"``, ``"30m"``, ``"1d"``; ``"off"`` (``None``): never."""
    compact = "".join(str(text).split()).lower()
    if compact == "off":
        return None
    pos, seconds = 0, 0
    for match in _INTERVAL_PART.finditer(compact):
        if match.start() != pos:
            break
        seconds += int(match.group(1)) * _INTERVAL_UNITS[match.group(2)]
        pos = match.end()
    if not compact or pos != len(compact) or seconds < 1:
        raise ConfigError(
            f'{where} {text!r} is not an interval; write it like "1h", "30m", "1d" or "off"'
        )
    return timedelta(seconds=seconds)


def check_interval(text: str, where: str = "prune_interval") -> str:
    """The interval as given, once it parses (for settings)."""
    parse_interval(text, where)
    return text
