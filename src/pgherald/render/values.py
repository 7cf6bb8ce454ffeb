"""Values as people read them: numbers and dates in the reader's locale and time zone,
NULL as "(empty)", control characters made visible, long texts shortened.

A value arrives typed (the change log's loader made it) or as PostgreSQL's text; either
way what is shown never loses the fact: a ``numeric(10,2)`` keeps its two decimals, a
``timestamptz`` is converted to the configured zone, and types without a locale form
(json, arrays, intervals, ranges...) are shown as PostgreSQL printed them.
"""

from __future__ import annotations

import decimal
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, time, tzinfo
from decimal import Decimal
from functools import cache
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime, format_time
from babel.numbers import format_decimal

from pgherald.errors import ConfigError
from pgherald.events.model import Unchanged

EMPTY: Final = "(empty)"
"""How NULL is shown (never as an empty string, which is a value of its own)."""
UNCHANGED: Final = "(unchanged)"
"""An unchanged TOAST value that the source did not resend."""
UNKNOWN: Final = "(unknown)"
"""An old value nobody recorded (an update captured without the old row)."""

DEFAULT_SHORTEN: Final = 200
"""Characters of a value shown before it is cut (the full value stays one click away)."""

# Characters that XML 1.0 cannot carry at all, and C0/C1 controls that would garble a line:
# shown as visible escapes (\x07, \u2028), never dropped, so nothing is silently lost.
_INVISIBLE: Final = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff\u2028\u2029]"
)
_RTL_OR_BIDI: Final = re.compile(
    "[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufeff\u200e\u200f\u202a-\u202e\u2066-\u2069"
    "\U00010800-\U00010fff\U0001e800-\U0001efff]"
)


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group(0)
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, *, newlines: bool = True) -> str:
    """``text`` with invisible or XML-illegal characters written as escapes; newlines and
    tabs are kept when ``newlines`` (a full value), else shown as ``↵`` (one line)."""
    shown = _INVISIBLE.sub(_escape_char, text)
    if not newlines:
        shown = shown.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "↵ ")
        shown = shown.replace("\t", " ")
    return shown


def has_bidi(text: str) -> bool:
    """Whether the text holds right-to-left letters or direction controls (then it is shown
    isolated, so it cannot reorder what is around it)."""
    return _RTL_OR_BIDI.search(text) is not None


def shorten(text: str, limit: int) -> str:
    """The first ``limit`` characters (not cutting a combining sequence), then ``…``."""
    if len(text) <= limit:
        return text
    cut = max(limit - 1, 1)
    while cut > 1 and unicodedata.combining(text[cut]):
        cut -= 1
    if 0xD800 <= ord(text[cut - 1]) <= 0xDBFF:  # never split a surrogate pair
        cut -= 1
    return text[:cut] + "…"


@dataclass(frozen=True)
class Shown:
    """One value ready for a template: ``short`` always fits a line; ``full`` is the whole
    value (equal to ``short`` when nothing was cut). ``missing`` marks NULL, unknown and
    unchanged, which templates show in a muted style."""

    short: str
    full: str
    truncated: bool = False
    missing: bool = False
    bidi: bool = False


@dataclass(frozen=True)
class Formatter:
    """Formats values for one locale and time zone (both checked when it is made)."""

    locale: str = "en"
    timezone: str = "UTC"
    limit: int = DEFAULT_SHORTEN

    def __post_init__(self) -> None:
        check_locale(self.locale)
        check_timezone(self.timezone)
        if self.limit < 10:
            raise ConfigError(f"values are shortened to at least 10 characters, not {self.limit}")

    @property
    def zone(self) -> tzinfo:
        return check_timezone(self.timezone)

    @property
    def babel_locale(self) -> Locale:
        return check_locale(self.locale)

    # -- single values ------------------------------------------------------------------

    def text(self, value: Any, fallback_text: str | None = None) -> str:
        """The whole value as one string in this locale (no shortening)."""
        if value is None:
            return EMPTY
        if isinstance(value, Unchanged):
            return UNCHANGED
        loc = self.babel_locale
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int):
            return self._number(value, None, fallback_text)
        if isinstance(value, Decimal):
            return self.decimal(value)
        if isinstance(value, float):
            if math.isnan(value) or math.isinf(value):
                return "NaN" if math.isnan(value) else ("-Infinity" if value < 0 else "Infinity")
            return self._number(value, None, fallback_text)
        if isinstance(value, datetime):
            return self.timestamp(value)
        if isinstance(value, date):
            return format_date(value, "medium", locale=loc)
        if isinstance(value, time):
            return format_time(value, "medium", locale=loc, tzinfo=None)
        if fallback_text is not None:
            return fallback_text
        return str(value)

    def decimal(self, value: Decimal) -> str:
        """A numeric with its scale kept: ``5000.00`` is ``5,000.00`` in English, ``5.000,00``
        in German; NaN and infinities as PostgreSQL writes them."""
        if not value.is_finite():
            return "NaN" if value.is_nan() else ("-Infinity" if value < 0 else "Infinity")
        exponent = value.as_tuple().exponent
        digits = -exponent if isinstance(exponent, int) and exponent < 0 else 0
        return self._number(value, _decimal_pattern(self.locale, digits), None)

    def _number(self, value: int | float | Decimal, pattern: str | None, text: str | None) -> str:
        """Babel's formatting, with enough decimal precision for any PostgreSQL number (its
        default context would fail on more than 28 digits); the text if it still fails."""
        with decimal.localcontext() as context:
            context.prec = max(28, len(str(value)) + 10)
            try:
                return format_decimal(
                    value, format=pattern, locale=self.babel_locale, decimal_quantization=False
                )
            except (decimal.InvalidOperation, ValueError, OverflowError):
                return text if text is not None else str(value)

    def timestamp(self, value: datetime) -> str:
        """A timestamp in the configured zone (a ``timestamp`` without zone as it is)."""
        loc = self.babel_locale
        if value.tzinfo is None:
            return format_datetime(value, "medium", tzinfo=ZoneInfo("UTC"), locale=loc)
        return format_datetime(value, "medium", tzinfo=self.zone, locale=loc)

    def when(self, value: datetime) -> str:
        """An event's time, with the zone's name so nobody has to guess."""
        return format_datetime(value, "medium", tzinfo=self.zone, locale=self.babel_locale) + (
            f" {self.zone_label(value)}"
        )

    def zone_label(self, value: datetime) -> str:
        return value.astimezone(self.zone).tzname() or self.timezone

    def shown(self, value: Any, fallback_text: str | None = None) -> Shown:
        """A value for a template: shortened, made visible, its direction noted."""
        if value is None or isinstance(value, Unchanged):
            return Shown(self.text(value), self.text(value), missing=True)
        full = visible(self.text(value, fallback_text))
        one_line = visible(full, newlines=False)
        short = shorten(one_line, self.limit)
        return Shown(short, full, truncated=short != full, bidi=has_bidi(full))


_UNKNOWN_SHOWN: Final = Shown(UNKNOWN, UNKNOWN, missing=True)


def unknown() -> Shown:
    return _UNKNOWN_SHOWN


@cache
def _decimal_pattern(locale: str, digits: int) -> str:
    """The locale's decimal pattern (its grouping) with exactly ``digits`` decimals."""
    base = str(check_locale(locale).decimal_formats[None].pattern).split(";")[0]
    integer = base.split(".")[0]
    return integer + ("." + "0" * digits if digits else "")


@cache
def check_locale(name: str) -> Locale:
    """The Babel locale of ``name`` (``en``, ``de_DE``, ``fr-CA``); one clear error otherwise."""
    try:
        return Locale.parse(name.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        raise ConfigError(
            f"unknown locale {name!r}: use a language tag such as en, en_GB, de_DE or fr"
        ) from None


@cache
def check_timezone(name: str) -> tzinfo:
    """The zone of an IANA name (``UTC``, ``Europe/Berlin``); one clear error otherwise."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {name!r}: use an IANA name such as UTC or Europe/Berlin"
        ) from None
