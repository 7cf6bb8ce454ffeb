"""The condition language of subscriptions: ``status = 'shipped' and amount > 1000``.

A subscription may keep only the rows whose values satisfy a condition. The condition
is user input that reaches pgherald through the CLI, the TOML file and the web UI, so it
is parsed here into a small tree and evaluated in Python on the typed values of a
``RowImage``; it is never spliced into SQL. The grammar is a subset of SQL's, with SQL's
meaning:

- ``or``, ``and``, ``not`` (in rising precedence) and parentheses;
- comparisons ``=  !=  <>  <  <=  >  >=``, ``is [not] null``, ``[not] in (v, ...)``,
  ``[not] between a and b``, ``[not] like 'pat'`` and ``[not] ilike 'pat'`` (``%`` any
  run of characters, ``_`` one character, a backslash takes the next character
  literally);
- a bare boolean column (``paid and not cancelled``);
- literals: ``'text'`` (``''`` for a quote), integers, decimals (kept exact, as
  ``Decimal``), ``true``, ``false``, ``null``; columns are identifiers, folded to lower
  case unless written in double quotes (``"Order Total"``, ``""`` for a quote).

Evaluation follows SQL's three-valued logic: a comparison with NULL is *unknown*, ``not
unknown`` is unknown, and a condition matches only when it is true. A column the row
does not have is NULL. Where SQL would refuse to compare two types (a text column with
a number), the comparison is unknown rather than an error, because a condition is
checked once when it is written but evaluated on every row of a table whose columns may
change type later. A string literal has no type of its own, as in SQL: it takes the type
of the value it is compared with, so ``created_at >= '2024-01-01'`` compares instants
and ``amount = '10.5'`` compares numbers.

Parsing is bounded (:data:`MAX_LENGTH` characters, :data:`MAX_DEPTH` levels of nesting)
so that a hostile condition cannot exhaust memory or the interpreter's stack, and LIKE
patterns are matched without backtracking regular expressions, so no pattern can take
more than time proportional to the pattern's length times the value's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any, Final, Literal, TypeAlias
from uuid import UUID

from pgherald.errors import ConfigError
from pgherald.events.model import Unchanged
from pgherald.events.values import PgInfinity, PgInterval

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "Condition", "parse"]

MAX_LENGTH: Final = 10_000
"""Longest condition text accepted, in characters (a long ``in (...)`` list fits)."""

MAX_DEPTH: Final = 50
"""Deepest nesting of parentheses and ``not`` accepted."""

_MAX_NUMBER: Final = 1_000
"""Longest number literal, in characters (Python refuses to read longer integers anyway)."""

Truth: TypeAlias = bool | None
"""SQL's three truth values: True, False, and None for unknown."""

# --- tokens ---------------------------------------------------------------------------

_KEYWORDS: Final = frozenset(
    {"and", "or", "not", "is", "null", "true", "false", "in", "between", "like", "ilike"}
)
_COMPARISONS: Final = frozenset({"=", "!=", "<>", "<", "<=", ">", ">="})
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_IDENT = re.compile(r"[^\W\d][\w$]*")
_PLAIN_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

TokenKind = Literal["keyword", "ident", "string", "number", "op", "eof"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    value: str  # keywords lower-cased, identifiers folded, strings unescaped
    pos: int  # 0-based offset of the token's first character
    source: str  # the token as written

    def describe(self) -> str:
        """The token as an error message names it."""
        shown = self.source if len(self.source) <= 30 else self.source[:29] + "…"
        shown = _printable(shown)
        if self.kind == "string":
            return f"the string {shown}"
        if self.kind == "number":
            return f"the number {shown}"
        return f"'{shown}'"


def _printable(text: str) -> str:
    """Text safe to echo on one line of a terminal: control characters become spaces."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _error(text: str, pos: int, message: str) -> ConfigError:
    """One line: what is wrong, the 1-based column, and the condition (or the part around)."""
    shown = text
    if len(text) > 120:
        start = max(0, pos - 80)
        end = min(len(text), pos + 30)
        shown = ("…" if start else "") + text[start:end] + ("…" if end < len(text) else "")
    return ConfigError(f"condition: {message} at column {pos + 1}: {_printable(shown)}")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "'\"":
            end, value = _quoted(text, i)
            if ch == '"' and not value:
                raise _error(text, i, "empty quoted column name")
            kind: TokenKind = "string" if ch == "'" else "ident"
            tokens.append(_Token(kind, value, i, text[i:end]))
            i = end
        elif "0" <= ch <= "9" or (ch == "." and i + 1 < n and "0" <= text[i + 1] <= "9"):
            m = _NUMBER.match(text, i)
            assert m is not None  # a digit, or a dot and a digit, always start a number
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] in "_$."):
                stop = end
                while stop < n and (text[stop].isalnum() or text[stop] in "_$."):
                    stop += 1
                raise _error(text, i, f"malformed number '{_printable(text[i:stop])}'")
            if end - i > _MAX_NUMBER:
                raise _error(text, i, f"number longer than {_MAX_NUMBER} characters")
            tokens.append(_Token("number", m.group(), i, m.group()))
            i = end
        elif m := _IDENT.match(text, i):
            word = m.group()
            folded = word.translate(_ASCII_LOWER)
            kind = "keyword" if folded in _KEYWORDS else "ident"
            tokens.append(_Token(kind, folded, i, word))
            i = m.end()
        else:
            two = text[i : i + 2]
            if two in _COMPARISONS:
                tokens.append(_Token("op", two, i, two))
                i += 2
            elif ch in "=<>(),+-":
                tokens.append(_Token("op", ch, i, ch))
                i += 1
            else:
                shown = f"'{ch}'" if ch.isprintable() else f"U+{ord(ch):04X}"
                raise _error(text, i, f"unexpected character {shown}")
    tokens.append(_Token("eof", "", len(text.rstrip()), ""))
    return tokens


def _quoted(text: str, start: int) -> tuple[int, str]:
    """Reads a '...' string or a "..." identifier; a doubled quote stands for one."""
    quote = text[start]
    parts: list[str] = []
    i = start + 1
    while True:
        close = text.find(quote, i)
        if close < 0:
            what = "string" if quote == "'" else "quoted column name"
            raise _error(text, start, f"unterminated {what}")
        parts.append(text[i:close])
        if text.startswith(quote, close + 1):
            parts.append(quote)
            i = close + 2
        else:
            return close + 1, "".join(parts)


# --- the tree ----------------------------------------------------------------------------

LiteralKind = Literal["string", "number", "boolean", "null"]


@dataclass(frozen=True, slots=True)
class Column:
    """A column of the row; a missing column reads as NULL."""

    name: str

    def value(self, row: Mapping[str, Any]) -> Any:
        return row.get(self.name)

    def __str__(self) -> str:
        if _PLAIN_IDENT.fullmatch(self.name) and self.name not in _KEYWORDS:
            return self.name
        return '"' + self.name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class Const:
    """A literal. ``kind`` is part of equality, so ``true`` is never equal to ``1``."""

    literal: str | int | Decimal | bool | None
    kind: LiteralKind
    _coerced: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def value(self, row: Mapping[str, Any]) -> Any:
        return self.literal

    def coerced(self, family: str) -> Any:
        """A string literal read as a value of ``family`` (or ``_BAD``), read once per family."""
        try:
            return self._coerced[family]
        except KeyError:
            assert isinstance(self.literal, str)
            value = self._coerced[family] = _coerce(family, self.literal)
            return value

    def __str__(self) -> str:
        if self.kind == "string":
            assert isinstance(self.literal, str)
            return "'" + self.literal.replace("'", "''") + "'"
        if self.kind == "boolean":
            return "true" if self.literal else "false"
        if self.kind == "null":
            return "null"
        return str(self.literal)


Operand: TypeAlias = Column | Const

_PREC_OR: Final = 1
_PREC_AND: Final = 2
_PREC_NOT: Final = 3
_PREC_PREDICATE: Final = 4


class _Node:
    """A boolean expression: evaluates to True, False or None (unknown)."""

    __slots__ = ()
    precedence: int = _PREC_PREDICATE

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        raise NotImplementedError

    def operands(self) -> Iterator[Operand]:
        raise NotImplementedError

    def wrapped(self, least: int) -> str:
        """The text, parenthesised when this binds more loosely than ``least``."""
        return str(self) if self.precedence >= least else f"({self})"


@dataclass(frozen=True, slots=True)
class Or(_Node):
    items: tuple[_Node, ...]
    precedence = _PREC_OR

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        result: Truth = False
        for item in self.items:
            value = item.evaluate(row)
            if value is True:
                return True
            if value is None:
                result = None
        return result

    def operands(self) -> Iterator[Operand]:
        for item in self.items:
            yield from item.operands()

    def __str__(self) -> str:
        return " or ".join(item.wrapped(_PREC_AND) for item in self.items)


@dataclass(frozen=True, slots=True)
class And(_Node):
    items: tuple[_Node, ...]
    precedence = _PREC_AND

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        result: Truth = True
        for item in self.items:
            value = item.evaluate(row)
            if value is False:
                return False
            if value is None:
                result = None
        return result

    def operands(self) -> Iterator[Operand]:
        for item in self.items:
            yield from item.operands()

    def __str__(self) -> str:
        return " and ".join(item.wrapped(_PREC_NOT) for item in self.items)


@dataclass(frozen=True, slots=True)
class Not(_Node):
    item: _Node
    precedence = _PREC_NOT

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        return _not(self.item.evaluate(row))

    def operands(self) -> Iterator[Operand]:
        return self.item.operands()

    def __str__(self) -> str:
        return "not " + self.item.wrapped(_PREC_NOT)


@dataclass(frozen=True, slots=True)
class Compare(_Node):
    op: str  # one of = != < <= > >=
    left: Operand
    right: Operand

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        order = _order(self.left, self.right, row)
        return None if order is None else _OPS[self.op](order)

    def operands(self) -> Iterator[Operand]:
        yield self.left
        yield self.right

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True, slots=True)
class IsNull(_Node):
    """``x is [not] null``: never unknown.

    An unchanged TOAST value is not NULL: PostgreSQL stores only non-NULL values out of
    line, so a value it did not resend because it was TOASTed and unchanged is known to be
    there, only not known here.
    """

    operand: Operand
    negated: bool

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        return (self.operand.value(row) is None) != self.negated

    def operands(self) -> Iterator[Operand]:
        yield self.operand

    def __str__(self) -> str:
        return f"{self.operand} is {'not ' if self.negated else ''}null"


@dataclass(frozen=True, slots=True)
class In(_Node):
    operand: Operand
    items: tuple[Operand, ...]
    negated: bool

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        result: Truth = False
        for item in self.items:
            order = _order(self.operand, item, row)
            if order == 0:
                result = True
                break
            if order is None:
                result = None
        return _not(result) if self.negated else result

    def operands(self) -> Iterator[Operand]:
        yield self.operand
        yield from self.items

    def __str__(self) -> str:
        items = ", ".join(str(item) for item in self.items)
        return f"{self.operand} {'not ' if self.negated else ''}in ({items})"


@dataclass(frozen=True, slots=True)
class Between(_Node):
    operand: Operand
    low: Operand
    high: Operand
    negated: bool

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        low = _order(self.operand, self.low, row)
        high = _order(self.operand, self.high, row)
        above: Truth = None if low is None else low >= 0
        below: Truth = None if high is None else high <= 0
        result: Truth = False if above is False or below is False else above and below
        return _not(result) if self.negated else result

    def operands(self) -> Iterator[Operand]:
        yield self.operand
        yield self.low
        yield self.high

    def __str__(self) -> str:
        not_ = "not " if self.negated else ""
        return f"{self.operand} {not_}between {self.low} and {self.high}"


@dataclass(frozen=True, slots=True)
class Like(_Node):
    operand: Operand
    pattern: str
    insensitive: bool
    negated: bool
    matcher: _LikeMatcher = field(compare=False, repr=False)

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        value = self.operand.value(row)
        if not isinstance(value, str):
            return None  # NULL, unchanged TOAST, or not text
        return self.matcher.matches(value) != self.negated

    def operands(self) -> Iterator[Operand]:
        yield self.operand

    def __str__(self) -> str:
        not_ = "not " if self.negated else ""
        op = "ilike" if self.insensitive else "like"
        return f"{self.operand} {not_}{op} {Const(self.pattern, 'string')}"


@dataclass(frozen=True, slots=True)
class Is(_Node):
    """A bare operand as a condition: a boolean column (``paid``), ``true``, ``null``."""

    operand: Operand

    def evaluate(self, row: Mapping[str, Any]) -> Truth:
        value = self.operand.value(row)
        return value if isinstance(value, bool) else None

    def operands(self) -> Iterator[Operand]:
        yield self.operand

    def __str__(self) -> str:
        return str(self.operand)


def _not(value: Truth) -> Truth:
    return None if value is None else not value


_OPS: Final[dict[str, Callable[[int], bool]]] = {
    "=": lambda o: o == 0,
    "!=": lambda o: o != 0,
    "<": lambda o: o < 0,
    "<=": lambda o: o <= 0,
    ">": lambda o: o > 0,
    ">=": lambda o: o >= 0,
}


# --- LIKE -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LikeMatcher:
    """A LIKE pattern as fixed-length segments between its ``%`` wildcards.

    Each segment (literal characters and ``_``) is a regular expression without
    repetition, so it cannot backtrack; the first segment must match at the start, the
    last at the end, and each one between at its leftmost place after the previous one,
    which is where a match can always be found if there is one.
    """

    segments: tuple[re.Pattern[str], ...]
    lengths: tuple[int, ...]

    @classmethod
    def compile(cls, pattern: str, insensitive: bool) -> _LikeMatcher:
        flags = re.DOTALL | (re.IGNORECASE if insensitive else 0)
        segments: list[re.Pattern[str]] = []
        lengths: list[int] = []
        parts: list[str] = []
        length = 0
        chars = iter(pattern)
        for ch in chars:
            if ch == "%":
                segments.append(re.compile("".join(parts), flags))
                lengths.append(length)
                parts, length = [], 0
                continue
            if ch == "_":
                parts.append(".")
            else:
                if ch == "\\":
                    ch = next(chars)  # the parser has refused a pattern ending in an escape
                parts.append(re.escape(ch))
            length += 1
        segments.append(re.compile("".join(parts), flags))
        lengths.append(length)
        return cls(tuple(segments), tuple(lengths))

    def matches(self, text: str) -> bool:
        segments, lengths = self.segments, self.lengths
        if len(segments) == 1:
            return segments[0].fullmatch(text) is not None
        end = len(text) - lengths[-1]
        if end < lengths[0]:
            return False
        if segments[0].match(text) is None or segments[-1].fullmatch(text, end) is None:
            return False
        pos = lengths[0]
        for segment, length in zip(segments[1:-1], lengths[1:-1], strict=True):
            if length == 0:
                continue
            found = segment.search(text, pos, end)
            if found is None:
                return False
            pos = found.end()
        return True


def _like_escape_error(pattern: str) -> bool:
    """True when the pattern ends in a lone escape character, which SQL refuses."""
    trailing = len(pattern) - len(pattern.rstrip("\\"))
    return trailing % 2 == 1


# --- comparing typed values -------------------------------------------------------------

_BAD: Final = object()
"""A string literal that cannot be read as the type it is compared with."""

_INET_TYPES: Final = (
    IPv4Address,
    IPv6Address,
    IPv4Interface,
    IPv6Interface,
    IPv4Network,
    IPv6Network,
)


def _family(value: Any) -> str | None:
    """Which values ``value`` can be compared with, or None for none at all."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, date):  # datetime too
        return "instant"
    if isinstance(value, PgInfinity):
        return "infinity"
    if isinstance(value, time):
        return "time"
    if isinstance(value, PgInterval | timedelta):
        return "interval"
    if isinstance(value, UUID):
        return "uuid"
    if isinstance(value, _INET_TYPES):
        return type(value).__name__  # an address compares with an address of its kind
    return None  # NULL, unchanged TOAST, bytes, arrays, json, ranges, unknown types


def _order(left: Operand, right: Operand, row: Mapping[str, Any]) -> int | None:
    """-1, 0 or 1 as SQL would order the two operands' values, or None for unknown.

    A string literal compared with a value of another type is read as that type, as SQL
    reads an untyped literal; one that does not read as it makes the comparison unknown.
    """
    a = left.value(row)
    b = right.value(row)
    if a is None or b is None or isinstance(a, Unchanged) or isinstance(b, Unchanged):
        return None
    left_text = isinstance(left, Const) and left.kind == "string"
    right_text = isinstance(right, Const) and right.kind == "string"
    if left_text != right_text:
        if isinstance(left, Const) and left_text:
            a = _coerce_like(left, b)
        elif isinstance(right, Const):
            b = _coerce_like(right, a)
        if a is _BAD or b is _BAD:
            return None
    try:
        return _compare(a, b)
    except (TypeError, ValueError, ArithmeticError):
        return None  # e.g. extreme aware datetimes whose offsets overflow


def _coerce_like(literal: Const, typed: Any) -> Any:
    family = _family(typed)
    if family == "instant" and not isinstance(typed, datetime):
        family = "date"  # read as a date, as SQL casts the literal to the column's type
    return _BAD if family is None else literal.coerced(family)


def _compare(a: Any, b: Any) -> int | None:
    fa, fb = _family(a), _family(b)
    if fa is None or fb is None:
        return None
    if fa == "infinity" or fb == "infinity":
        return _compare_infinity(a, fa, b, fb)
    if fa != fb:
        return None
    if fa == "number":
        return _compare_numbers(a, b)
    if fa == "instant":
        a, b = _instant(a), _instant(b)
    elif fa == "time":
        a, b = _utc_time(a), _utc_time(b)
    elif fa == "interval":
        a, b = _interval_key(a), _interval_key(b)
    return _sign(a, b)


def _sign(a: Any, b: Any) -> int:
    return (a > b) - (a < b)  # type: ignore[no-any-return]


def _compare_infinity(a: Any, fa: str, b: Any, fb: str) -> int | None:
    """``±infinity`` of timestamps, dates and intervals sorts beyond every finite value."""
    if fa == fb:
        return _sign(not a.negative, not b.negative)
    if fa == "infinity":
        if fb not in ("instant", "interval"):
            return None
        return -1 if a.negative else 1
    if fa not in ("instant", "interval"):
        return None
    return 1 if b.negative else -1


def _is_nan(value: int | float | Decimal) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, Decimal) and value.is_nan()


def _compare_numbers(a: int | float | Decimal, b: int | float | Decimal) -> int:
    """Numbers of any kind compare by value; NaN equals NaN and sorts above all, as in SQL.

    Against a float, the other side is made a float first, as PostgreSQL casts numeric
    to double precision: ``ratio = 0.1`` must match the float 0.1, which is not exactly
    one tenth. A number a float cannot hold (``1e400``, ``1e-400``) is compared exactly
    instead of as the infinity or zero it would become.
    """
    if isinstance(a, float) and not isinstance(b, float):
        b = _as_float(b)
    elif isinstance(b, float) and not isinstance(a, float):
        a = _as_float(a)
    nan_a, nan_b = _is_nan(a), _is_nan(b)
    if nan_a or nan_b:
        return _sign(nan_a, nan_b)
    return _sign(a, b)


def _as_float(value: int | Decimal) -> float | int | Decimal:
    """``value`` as a float, or as it is when a float would not be near it."""
    try:
        result = float(value)
    except OverflowError:
        return value  # an integer beyond any float
    if math.isinf(result) and not (isinstance(value, Decimal) and value.is_infinite()):
        return value
    if result == 0 and value != 0:
        return value
    return result


def _instant(value: date) -> datetime:
    """Dates and datetimes on one line; naive ones are UTC (pgherald's session time zone)."""
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if value.utcoffset() is None:
        value = value.replace(tzinfo=UTC)
    return value


def _utc_time(value: time) -> time:
    return value.replace(tzinfo=UTC) if value.utcoffset() is None else value


_DAY_US: Final = 86_400_000_000


def _interval_key(value: PgInterval | timedelta) -> int:
    """Microseconds, a month counting 30 days, as PostgreSQL orders intervals."""
    if isinstance(value, timedelta):
        return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    return (value.months * 30 + value.days) * _DAY_US + value.microseconds


_NUMERIC_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPECIAL_NUMBERS: Final = {
    "nan": Decimal("NaN"),
    "infinity": Decimal("Infinity"),
    "+infinity": Decimal("Infinity"),
    "-infinity": Decimal("-Infinity"),
    "inf": Decimal("Infinity"),
    "+inf": Decimal("Infinity"),
    "-inf": Decimal("-Infinity"),
}
_TRUE_TEXTS: Final = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE_TEXTS: Final = frozenset({"f", "false", "n", "no", "off", "0"})
_INFINITIES: Final = {"infinity": PgInfinity(False), "-infinity": PgInfinity(True)}
_INET_BY_NAME: Final[dict[str, Callable[[str], Any]]] = {t.__name__: t for t in _INET_TYPES}


def _coerce(family: str, text: str) -> Any:
    """A string literal read as a value of ``family``, or ``_BAD``."""
    stripped = text.strip()
    lowered = stripped.lower()
    try:
        if family == "text":
            return text
        if family == "number":
            if _NUMERIC_TEXT.fullmatch(stripped):
                return Decimal(stripped)
            return _SPECIAL_NUMBERS.get(lowered, _BAD)
        if family == "bool":
            return True if lowered in _TRUE_TEXTS else False if lowered in _FALSE_TEXTS else _BAD
        if family in ("instant", "date", "infinity") and lowered in _INFINITIES:
            return _INFINITIES[lowered]
        if family == "instant":
            return datetime.fromisoformat(stripped)
        if family == "date":  # a time of day, if any, is dropped, as PostgreSQL does
            return datetime.fromisoformat(stripped).date()
        if family == "time":
            return time.fromisoformat(stripped)
        if family == "interval":
            return _interval(stripped)
        if family == "infinity":  # an infinite timestamp, date or interval: try each
            try:
                return datetime.fromisoformat(stripped)
            except ValueError:
                return _interval(stripped)
        if family == "uuid":
            return UUID(stripped)
        return _INET_BY_NAME[family](stripped)
    except (ValueError, TypeError, ArithmeticError):
        return _BAD


def _interval(text: str) -> PgInterval:
    """An interval as ISO 8601 (``P1DT2H``) or PostgreSQL writes it (``1 day 02:00:00``)."""
    if text.startswith("P"):
        return PgInterval.fromisoformat(text)
    return PgInterval.from_postgres(text)


# --- the parser -----------------------------------------------------------------------


class _Parser:
    """Recursive descent over the tokens; nesting is counted, so recursion is bounded."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    # token helpers

    @property
    def token(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def at(self, kind: TokenKind, *values: str) -> bool:
        token = self.token
        return token.kind == kind and (not values or token.value in values)

    def expected(self, what: str) -> ConfigError:
        token = self.token
        message = f"expected {what}"
        if self.i > 0:
            message += f" after {self.tokens[self.i - 1].describe()}"
        if token.kind != "eof":
            message += f", found {token.describe()}"
        return _error(self.text, token.pos, message)

    def deeper(self, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise _error(self.text, self.token.pos, f"nested deeper than {MAX_DEPTH} levels")
        return depth + 1

    # grammar

    def condition(self) -> _Node:
        if self.at("eof"):
            raise ConfigError("condition: is empty; write one such as status = 'shipped'")
        node = self.disjunction(0)
        if self.at("op", ")"):
            raise _error(self.text, self.token.pos, "unmatched ')'")
        if not self.at("eof"):
            raise self.expected("'and', 'or' or the end")
        return node

    def disjunction(self, depth: int) -> _Node:
        items = [self.conjunction(depth)]
        while self.at("keyword", "or"):
            self.advance()
            items.append(self.conjunction(depth))
        return _flat(Or, items)

    def conjunction(self, depth: int) -> _Node:
        items = [self.negation(depth)]
        while self.at("keyword", "and"):
            self.advance()
            items.append(self.negation(depth))
        return _flat(And, items)

    def negation(self, depth: int) -> _Node:
        if self.at("keyword", "not"):
            inner = self.deeper(depth)
            self.advance()
            return Not(self.negation(inner))
        if self.at("op", "("):
            inner = self.deeper(depth)
            opening = self.advance()
            node = self.disjunction(inner)
            if self.at("eof"):
                raise _error(self.text, opening.pos, "unclosed '('")
            if not self.at("op", ")"):
                raise self.expected("'and', 'or' or ')'")
            self.advance()
            return node
        return self.predicate()

    def predicate(self) -> _Node:
        left = self.operand("a condition")
        token = self.token
        if token.kind == "op" and token.value in _COMPARISONS:
            self.advance()
            op = "!=" if token.value == "<>" else token.value
            return Compare(op, left, self.operand("a value"))
        if self.at("keyword", "is"):
            self.advance()
            negated = self.at("keyword", "not")
            if negated:
                self.advance()
            if not self.at("keyword", "null"):
                raise self.expected("'null'" if negated else "'null' or 'not null'")
            self.advance()
            return IsNull(left, negated)
        negated = self.at("keyword", "not")
        if negated:
            self.advance()
        if self.at("keyword", "in"):
            self.advance()
            return In(left, self.in_list(), negated)
        if self.at("keyword", "between"):
            self.advance()
            low = self.operand("a value")
            if not self.at("keyword", "and"):
                raise self.expected("'and'")
            self.advance()
            return Between(left, low, self.operand("a value"), negated)
        if self.at("keyword", "like", "ilike"):
            return self.like(left, negated)
        if negated:
            raise self.expected("'in', 'between', 'like' or 'ilike'")
        if isinstance(left, Const) and left.kind in ("string", "number"):
            raise self.expected("an operator")
        if not (self.at("eof") or self.at("keyword", "and", "or") or self.at("op", ")")):
            raise self.expected("an operator")
        return Is(left)

    def in_list(self) -> tuple[Operand, ...]:
        if not self.at("op", "("):
            raise self.expected("'('")
        self.advance()
        items = [self.operand("a value")]
        while self.at("op", ","):
            self.advance()
            items.append(self.operand("a value"))
        if not self.at("op", ")"):
            raise self.expected("',' or ')'")
        self.advance()
        return tuple(items)

    def like(self, left: Operand, negated: bool) -> _Node:
        insensitive = self.advance().value == "ilike"
        if not self.at("string"):
            raise self.expected("a quoted pattern")
        token = self.advance()
        if _like_escape_error(token.value):
            raise _error(self.text, token.pos, "a LIKE pattern cannot end with a lone backslash")
        matcher = _LikeMatcher.compile(token.value, insensitive)
        return Like(left, token.value, insensitive, negated, matcher)

    def operand(self, what: str) -> Operand:
        token = self.token
        if token.kind == "ident":
            self.advance()
            return Column(token.value)
        if token.kind == "string":
            self.advance()
            return Const(token.value, "string")
        if token.kind == "number":
            self.advance()
            return Const(_number(token.value), "number")
        if token.kind == "keyword" and token.value in ("true", "false"):
            self.advance()
            return Const(token.value == "true", "boolean")
        if token.kind == "keyword" and token.value == "null":
            self.advance()
            return Const(None, "null")
        if token.kind == "op" and token.value in ("+", "-"):
            self.advance()
            if not self.at("number"):
                raise self.expected("a number")
            value = _number(self.advance().value)
            if token.value == "-":
                value = value.copy_negate() if isinstance(value, Decimal) else -value
            return Const(value, "number")
        raise self.expected(what)


def _number(text: str) -> int | Decimal:
    if any(c in text for c in ".eE"):
        return Decimal(text)
    return int(text)


def _flat(kind: type[Or] | type[And], items: list[_Node]) -> _Node:
    """One node for a chain, with nested chains of the same kind spliced in.

    ``a and (b and c)`` is ``a and b and c``: the normal form drops what cannot matter.
    """
    if len(items) == 1:
        return items[0]
    flat: list[_Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, kind) else (item,))
    return kind(tuple(flat))


# --- the API ----------------------------------------------------------------------------


class Condition:
    """A parsed condition: which columns it reads, whether a row satisfies it, its text.

    Two conditions are equal when their normal forms are; ``str()`` gives that form,
    which :func:`parse` reads back into an equal condition.
    """

    __slots__ = ("_root", "columns")

    def __init__(self, root: _Node) -> None:
        self._root = root
        names: dict[str, None] = {}
        for operand in root.operands():
            if isinstance(operand, Column):
                names.setdefault(operand.name)
        self.columns: tuple[str, ...] = tuple(names)
        """The column names the condition reads, in order of first appearance."""

    def matches(self, row: Mapping[str, Any]) -> bool:
        """True only when the condition is true for the row: false and unknown are no match."""
        return self._root.evaluate(row) is True

    def evaluate(self, row: Mapping[str, Any]) -> bool | None:
        """The condition's three-valued result for the row: True, False or None (unknown)."""
        return self._root.evaluate(row)

    def __str__(self) -> str:
        return str(self._root)

    def __repr__(self) -> str:
        return f"Condition({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and other._root == self._root

    def __hash__(self) -> int:
        return hash(self._root)


def parse(text: str) -> Condition:
    """Reads a condition; anything wrong with it is one ``ConfigError`` line.

    The message says what was expected, at which column (counting from 1), and echoes
    the condition (or, for a long one, the part around the column).
    """
    if not isinstance(text, str):
        raise ConfigError(f"condition: expected text, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ConfigError(
            f"condition: {len(text)} characters is longer than the {MAX_LENGTH} allowed"
        )
    return Condition(_Parser(text).condition())
