"""The lossless JSON encoding of typed PostgreSQL values, and its inverse.

Every wire format of pgherald carries row values as JSON. JSON has one number type
(which most readers hold in a double) and no bytes, dates or infinities, so a naive
``json.dumps`` would silently round big integers and numerics, drop NaN and
infinities, and lose an interval's months. The rules here keep every value exact:

==========================  ===============================================================
typed value                 JSON
==========================  ===============================================================
``int``                     a number within ±(2**53 − 1), beyond that a string of digits
``Decimal`` (numeric)       always a string in plain notation; ``"NaN"``, ``"Infinity"``,
                            ``"-Infinity"`` kept
``float``                   a number; NaN and ±inf as ``"NaN"``/``"Infinity"``/``"-Infinity"``
``bytes`` (bytea)           base64
``datetime``                ISO 8601, with the offset when it has one (timestamptz)
``PgInfinity``              ``"infinity"`` / ``"-infinity"`` (timestamps, dates)
``date``, ``time``          ISO 8601 (``time`` with its offset for timetz)
``PgInterval``              an ISO 8601 duration, months kept (``"P1Y2M3DT4H5M6.789S"``)
``UUID``, inet, cidr        strings
json/jsonb content          the nested JSON itself, untouched
``list`` (arrays)           nested lists, ``null`` for NULL elements
``Range``                   ``{"lower": …, "upper": …, "bounds": "[)", "empty": false}``
``Multirange``              a list of ranges
``PgText`` (unknown types)  ``{"pg_type": "point", "text": "(1,2)"}``
``str`` (text, enum, money, bit)  the string
==========================  ===============================================================

The inverse, :func:`from_json_value`, needs the column's type name: ``"12"`` is a
numeric, a bigint or a text depending on it. It understands both ``pg_type`` spellings
(``int4``, ``_int4``, ``timestamptz``) and ``format_type`` ones (``integer[]``,
``timestamp(3) with time zone``, ``character varying(20)``), and the names the type
registry gives custom types (``range<float8>``, ``multirange<float8>``).

Known limit: json/jsonb content is what psycopg's JSON loader makes of it (Python's
``json``), so a JSON number with more significant digits than a double holds is rounded
in the typed value; the change log's text keeps it exactly.

This module imports nothing of pgherald but :mod:`pgherald.events.model`, so sinks and
external consumers can use it without a database.
"""

from __future__ import annotations

import base64
import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any, Final, TypeAlias
from uuid import UUID

from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from pgherald.events.model import RowImage, Unchanged

JSONValue: TypeAlias = bool | int | float | str | list[Any] | dict[str, Any] | None
"""What :func:`to_json_value` returns: plain data that ``json.dumps`` writes as is."""

MAX_SAFE_INTEGER: Final = 2**53 - 1
"""The largest integer every JSON reader (a double) holds exactly."""

UNCHANGED_TOAST_JSON: Final[dict[str, Any]] = {"unchanged_toast": True}
"""How a row's unchanged TOAST value is written: an object, so it can never be a value of
the column's own type mistaken for the real one; formats also list such columns."""


class ValueEncodingError(ValueError):
    """A value or a JSON document cannot be encoded or decoded as the type asks."""


@dataclass(frozen=True, slots=True)
class PgInfinity:
    """PostgreSQL's ``infinity``/``-infinity`` for timestamps, dates (and PG17 intervals).

    Python's ``datetime`` and ``date`` have no infinities (psycopg refuses to load
    them), so an infinite value gets a dedicated object instead of being clamped to
    ``datetime.max``, which would be a different, real instant.
    """

    negative: bool = False

    def __str__(self) -> str:
        return "-infinity" if self.negative else "infinity"

    def __repr__(self) -> str:
        return "PG_NEG_INFINITY" if self.negative else "PG_INFINITY"


PG_INFINITY: Final = PgInfinity(False)
PG_NEG_INFINITY: Final = PgInfinity(True)

_ISO_DURATION = re.compile(
    r"""^P(?!$)
    (?:(?P<years>[-+]?\d+)Y)?
    (?:(?P<months>[-+]?\d+)M)?
    (?:(?P<weeks>[-+]?\d+)W)?
    (?:(?P<days>[-+]?\d+)D)?
    (?:T(?!$)
        (?:(?P<hours>[-+]?\d+)H)?
        (?:(?P<minutes>[-+]?\d+)M)?
        (?:(?P<seconds>[-+]?\d+(?:\.\d{1,6})?)S)?
    )?$""",
    re.VERBOSE,
)

_PG_INTERVAL = re.compile(
    r"""^
    (?:(?P<years>[-+]?\d+)\ years?\ ?)?
    (?:(?P<months>[-+]?\d+)\ mons?\ ?)?
    (?:(?P<days>[-+]?\d+)\ days?\ ?)?
    (?:(?P<sign>[-+])?(?P<hours>\d+):(?P<minutes>\d\d):(?P<seconds>\d\d)(?:\.(?P<frac>\d{1,6}))?)?
    $""",
    re.VERBOSE,
)

_USEC_PER_SEC: Final = 1_000_000
_USEC_PER_MIN: Final = 60 * _USEC_PER_SEC
_USEC_PER_HOUR: Final = 60 * _USEC_PER_MIN


@dataclass(frozen=True, slots=True)
class PgInterval:
    """A PostgreSQL interval exactly as the server stores it: months, days, microseconds.

    psycopg loads intervals as ``timedelta``, turning a month into 30 days and a year
    into 365: ``'1 mon'`` and ``'30 days'`` become equal, and adding the value to a date
    gives a different answer than PostgreSQL does. The three fields are independent
    in PostgreSQL (a month is not a fixed number of days, a day not always 24 hours
    across DST), so this keeps them apart.
    """

    months: int = 0
    days: int = 0
    microseconds: int = 0

    @classmethod
    def from_postgres(cls, text: str) -> PgInterval:
        """Reads the ``IntervalStyle=postgres`` output, e.g. ``1 year 2 mons 3 days 04:05:06.789``.

        This is the only style pgherald asks the server for (see
        ``CANONICAL_SESSION_SETTINGS`` in ``pgherald.db.types``); reading it ourselves is
        the only way to keep the months, since psycopg's own loader folds them into days.
        """
        m = _PG_INTERVAL.match(text)
        if m is None or not text:
            raise ValueEncodingError(
                f"cannot read interval {text!r}: expected IntervalStyle=postgres output"
            )
        months = 12 * int(m["years"] or 0) + int(m["months"] or 0)
        micros = 0
        if m["hours"] is not None:
            frac = (m["frac"] or "").ljust(6, "0")
            micros = (
                int(m["hours"]) * _USEC_PER_HOUR
                + int(m["minutes"]) * _USEC_PER_MIN
                + int(m["seconds"]) * _USEC_PER_SEC
                + int(frac)
            )
            if m["sign"] == "-":
                micros = -micros
        return cls(months, int(m["days"] or 0), micros)

    @classmethod
    def fromisoformat(cls, text: str) -> PgInterval:
        """Reads an ISO 8601 duration as :meth:`isoformat` writes it (per-field signs allowed)."""
        m = _ISO_DURATION.match(text)
        if m is None:
            raise ValueEncodingError(f"cannot read ISO 8601 duration {text!r}")
        seconds = Decimal(m["seconds"] or 0)
        micros = (
            int(m["hours"] or 0) * _USEC_PER_HOUR
            + int(m["minutes"] or 0) * _USEC_PER_MIN
            + int(seconds * _USEC_PER_SEC)
        )
        return cls(
            12 * int(m["years"] or 0) + int(m["months"] or 0),
            7 * int(m["weeks"] or 0) + int(m["days"] or 0),
            micros,
        )

    def isoformat(self) -> str:
        """The exact ISO 8601 duration, fields signed as PostgreSQL's ``iso_8601`` style does."""
        if self.months == 0 and self.days == 0 and self.microseconds == 0:
            return "PT0S"
        out = ["P"]
        years, months = _split(self.months, 12)
        if years:
            out.append(f"{years}Y")
        if months:
            out.append(f"{months}M")
        if self.days:
            out.append(f"{self.days}D")
        if self.microseconds:
            out.append("T")
            hours, rest = _split(self.microseconds, _USEC_PER_HOUR)
            minutes, micros = _split(rest, _USEC_PER_MIN)
            if hours:
                out.append(f"{hours}H")
            if minutes:
                out.append(f"{minutes}M")
            if micros:
                secs, frac = _split(micros, _USEC_PER_SEC)
                sign = "-" if micros < 0 else ""
                text = f"{sign}{abs(secs)}"
                if frac:
                    text += f".{abs(frac):06d}".rstrip("0")
                out.append(f"{text}S")
        return "".join(out)

    def to_timedelta(self) -> timedelta:
        """The lossy reading psycopg gives (a month is 30 days), for code that needs one."""
        return timedelta(days=30 * self.months + self.days, microseconds=self.microseconds)

    def __str__(self) -> str:
        return self.isoformat()


def _split(value: int, unit: int) -> tuple[int, int]:
    """Splits towards zero, so both parts carry the sign of ``value`` (as PostgreSQL prints)."""
    q = abs(value) // unit
    r = abs(value) - q * unit
    return (-q, -r) if value < 0 else (q, r)


@dataclass(frozen=True, slots=True)
class PgText:
    """A value of a type pgherald has no Python type for: PostgreSQL's text, and the type.

    Used for composite and unknown types, and for the rare values psycopg cannot
    represent (a BC date, a time of ``24:00:00``). The JSON says what it is, so a
    reader never takes ``"(1,2)"`` for a plain string.
    """

    type_name: str
    text: str


# --- type names -----------------------------------------------------------------------

_ALIASES: Final[dict[str, str]] = {
    "integer": "int4",
    "int": "int4",
    "smallint": "int2",
    "bigint": "int8",
    "boolean": "bool",
    "real": "float4",
    "double precision": "float8",
    "float": "float8",
    "decimal": "numeric",
    "character varying": "varchar",
    "character": "bpchar",
    "char": "bpchar",
    '"char"': "char",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
    "time without time zone": "time",
    "time with time zone": "timetz",
    "bit varying": "varbit",
    "serial": "int4",
    "bigserial": "int8",
    "smallserial": "int2",
}

_RANGE_SUBTYPES: Final[dict[str, str]] = {
    "int4range": "int4",
    "int8range": "int8",
    "numrange": "numeric",
    "daterange": "date",
    "tsrange": "timestamp",
    "tstzrange": "timestamptz",
}
_MULTIRANGE_SUBTYPES: Final[dict[str, str]] = {
    "int4multirange": "int4",
    "int8multirange": "int8",
    "nummultirange": "numeric",
    "datemultirange": "date",
    "tsmultirange": "timestamp",
    "tstzmultirange": "timestamptz",
}
_JSON_TYPES: Final = frozenset({"json", "jsonb"})
_TYPMOD = re.compile(r"\([^)]*\)")


@dataclass(frozen=True, slots=True)
class TypeRef:
    """A parsed type name: the element type's canonical name and the array depth."""

    base: str
    is_array: bool = False

    @property
    def is_json(self) -> bool:
        return self.base in _JSON_TYPES


@functools.lru_cache(maxsize=4096)
def parse_type_name(type_name: str) -> TypeRef:
    """Normalises ``integer[]``, ``_int4``, ``pg_catalog.int4``, ``numeric(10,2)`` and kin.

    Cached: encoding an event asks this of every column's type name, a handful of
    distinct names asked again and again (about a third of encoding an event's JSON).
    """
    name = _TYPMOD.sub("", type_name.strip()).strip()
    is_array = False
    while name.endswith("[]"):
        name = name[:-2].rstrip()
        is_array = True
    if name.startswith("pg_catalog."):
        name = name[len("pg_catalog.") :]
    name = " ".join(name.split())
    lowered = name.lower()
    canonical = _ALIASES.get(lowered, lowered if lowered in _DECODERS else name)
    if not is_array and canonical.startswith("_") and canonical[1:] in _DECODERS:
        return TypeRef(canonical[1:], True)
    return TypeRef(canonical, is_array)


# --- encoding -------------------------------------------------------------------------


def _float_to_json(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _decimal_to_json(value: Decimal) -> str:
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "-Infinity" if value < 0 else "Infinity"
    # Plain notation, as PostgreSQL prints numerics: Decimal("1E-30") -> "0.000…1".
    return format(value, "f")


def to_json_value(value: Any, type_name: str | None = None) -> JSONValue:
    """Encodes one typed value (as ``RowImage[...]`` gives it) losslessly as JSON data.

    ``type_name`` matters only for json/jsonb columns (and arrays of them), whose content
    is passed through untouched; without it, a ``dict`` is taken for JSON content and a
    ``list`` for a PostgreSQL array.
    """
    if type_name is not None and parse_type_name(type_name).is_json:
        return value  # type: ignore[no-any-return]
    return _encode(value)


def _encode(value: Any) -> JSONValue:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if isinstance(value, float):
        return _float_to_json(value)
    if isinstance(value, Decimal):
        return _decimal_to_json(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, PgInfinity | PgInterval):
        return str(value)
    if isinstance(
        value,
        UUID
        | IPv4Address
        | IPv6Address
        | IPv4Interface
        | IPv6Interface
        | IPv4Network
        | IPv6Network,
    ):
        return str(value)
    if isinstance(value, Range):
        if value.isempty:
            return {"lower": None, "upper": None, "bounds": None, "empty": True}
        return {
            "lower": _encode(value.lower),
            "upper": _encode(value.upper),
            "bounds": value.bounds,
            "empty": False,
        }
    if isinstance(value, Multirange):
        return [_encode(r) for r in value]
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, PgText):
        return {"pg_type": value.type_name, "text": value.text}
    if isinstance(value, dict):
        return value  # json/jsonb content, passed through
    if isinstance(value, Unchanged):
        return dict(UNCHANGED_TOAST_JSON)
    raise ValueEncodingError(
        f"cannot encode a {type(value).__name__} as JSON: not a value pgherald's loaders make"
    )


def row_to_json(image: RowImage) -> dict[str, JSONValue]:
    """Encodes a row's typed values by column name.

    NULL is ``null``; an unchanged TOAST value (which the server did not resend) is
    ``{"unchanged_toast": true}``, never ``null``, because it is not NULL: its value is
    whatever it was before. Formats also list such columns, which is what a reader
    should trust if a json column could hold that very object.
    """
    out: dict[str, JSONValue] = {}
    for col in image.shape.columns:
        value = image[col.name]
        if isinstance(value, Unchanged):
            out[col.name] = dict(UNCHANGED_TOAST_JSON)
        else:
            out[col.name] = to_json_value(value, col.type_name)
    return out


# --- decoding -------------------------------------------------------------------------

Decoder: TypeAlias = Callable[[Any], Any]


def _fail(type_name: str, value: Any) -> ValueEncodingError:
    return ValueEncodingError(f"cannot decode {value!r} as {type_name}: not what it encodes to")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _fail("an integer", value)
    return int(value)


def _numeric(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _fail("numeric", value)
    return Decimal(str(value)) if isinstance(value, float) else Decimal(value)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _fail("a float", value)
    if isinstance(value, str) and value not in ("NaN", "Infinity", "-Infinity"):
        raise _fail("a float", value)
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail("boolean", value)
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _fail("a string type", value)
    return value


def _bytea(value: Any) -> bytes:
    return base64.b64decode(_str(value), validate=True)


def _infinite(value: Any) -> PgInfinity | None:
    if value == "infinity":
        return PG_INFINITY
    if value == "-infinity":
        return PG_NEG_INFINITY
    return None


def _timestamp(value: Any) -> datetime | PgInfinity:
    inf = _infinite(value)
    return inf if inf is not None else datetime.fromisoformat(_str(value))


def _date(value: Any) -> date | PgInfinity:
    inf = _infinite(value)
    return inf if inf is not None else date.fromisoformat(_str(value))


def _time(value: Any) -> time:
    return time.fromisoformat(_str(value))


def _interval(value: Any) -> PgInterval | PgInfinity:
    inf = _infinite(value)
    return inf if inf is not None else PgInterval.fromisoformat(_str(value))


def _inet(value: Any) -> IPv4Address | IPv6Address | IPv4Interface | IPv6Interface:
    text = _str(value)
    # As psycopg's inet loader: an address with a netmask is an interface.
    return ip_interface(text) if "/" in text else ip_address(text)


def _cidr(value: Any) -> IPv4Network | IPv6Network:
    return ip_network(_str(value))


def _json(value: Any) -> Any:
    return value


def _range_of(sub: Decoder) -> Decoder:
    def decode(value: Any) -> Range[Any]:
        if not isinstance(value, dict) or "empty" not in value:
            raise _fail("a range", value)
        if value["empty"]:
            return Range(empty=True)
        lower = None if value.get("lower") is None else sub(value["lower"])
        upper = None if value.get("upper") is None else sub(value["upper"])
        return Range(lower, upper, value.get("bounds") or "[)")

    return decode


_MULTIRANGE_DECODERS: set[Decoder] = set()


def _multirange_of(sub: Decoder) -> Decoder:
    rng = _range_of(sub)

    def decode(value: Any) -> Multirange[Any]:
        if not isinstance(value, list):
            raise _fail("a multirange", value)
        return Multirange([rng(v) for v in value])

    _MULTIRANGE_DECODERS.add(decode)
    return decode


_DECODERS: Final[dict[str, Decoder]] = {
    "bool": _bool,
    "int2": _int,
    "int4": _int,
    "int8": _int,
    "oid": _int,
    "numeric": _numeric,
    "float4": _float,
    "float8": _float,
    "bytea": _bytea,
    "text": _str,
    "varchar": _str,
    "bpchar": _str,
    "char": _str,
    "name": _str,
    "money": _str,
    "bit": _str,
    "varbit": _str,
    "timestamp": _timestamp,
    "timestamptz": _timestamp,
    "date": _date,
    "time": _time,
    "timetz": _time,
    "interval": _interval,
    "uuid": lambda v: UUID(_str(v)),
    "json": _json,
    "jsonb": _json,
    "inet": _inet,
    "cidr": _cidr,
}
for _name, _sub in _RANGE_SUBTYPES.items():
    _DECODERS[_name] = _range_of(_DECODERS[_sub])
for _name, _sub in _MULTIRANGE_SUBTYPES.items():
    _DECODERS[_name] = _multirange_of(_DECODERS[_sub])

_GENERIC_RANGE = re.compile(r"^(multi)?range<(.+)>$")


def _is_pg_text(value: Any) -> bool:
    return isinstance(value, dict) and value.keys() == {"pg_type", "text"}


def _decoder_for(base: str) -> Decoder | None:
    decoder = _DECODERS.get(base)
    if decoder is not None:
        return decoder
    m = _GENERIC_RANGE.match(base)
    if m is None:
        return None
    sub = parse_type_name(m[2])
    sub_decoder = _decoder_for(sub.base) if not sub.is_array else None
    inner = sub_decoder if sub_decoder is not None else _json
    return _multirange_of(inner) if m[1] else _range_of(inner)


def from_json_value(type_name: str, value: Any) -> Any:
    """Decodes what :func:`to_json_value` made of a value of type ``type_name``.

    For a type it does not know (an enum, a composite), a ``{"pg_type", "text"}``
    object becomes a :class:`PgText` and anything else comes back as is (an enum's
    label is its string).
    """
    ref = parse_type_name(type_name)
    if ref.is_json:
        return value
    decoder = _decoder_for(ref.base)
    if ref.is_array:
        return _decode_array(decoder, value, type_name)
    return _decode_one(decoder, value, type_name)


def _decode_one(decoder: Decoder | None, value: Any, type_name: str) -> Any:
    if value is None:
        return None
    if _is_pg_text(value):
        return PgText(value["pg_type"], value["text"])
    if decoder is None:
        return value
    try:
        return decoder(value)
    except ValueEncodingError as exc:
        if str(exc).startswith("cannot decode"):
            raise
        raise ValueEncodingError(f"cannot decode {value!r} as {type_name}: {exc}") from None
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise ValueEncodingError(f"cannot decode {value!r} as {type_name}: {exc}") from None


def _decode_array(decoder: Decoder | None, value: Any, type_name: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _fail(type_name, value)
    multirange = decoder in _MULTIRANGE_DECODERS
    out = []
    for v in value:
        # PostgreSQL arrays are rectangular, so a list of objects (or an empty list)
        # inside an array of multiranges can only be one multirange, not a dimension.
        if isinstance(v, list) and not (multirange and all(isinstance(x, dict) for x in v)):
            out.append(_decode_array(decoder, v, type_name))
        else:
            out.append(_decode_one(decoder, v, type_name))
    return out


def decode_row(types: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, Any]:
    """Decodes a :func:`row_to_json` object given ``{column: type_name}`` (text if unknown)."""
    return {name: from_json_value(types.get(name, "text"), v) for name, v in values.items()}
