"""The lossless JSON encoding of typed values: rules, inverse, and properties."""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any
from uuid import UUID

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from pgherald.events.model import UNCHANGED_TOAST, RowImage
from pgherald.events.values import (
    MAX_SAFE_INTEGER,
    PG_INFINITY,
    PG_NEG_INFINITY,
    PgInterval,
    PgText,
    TypeRef,
    ValueEncodingError,
    decode_row,
    from_json_value,
    parse_type_name,
    row_to_json,
    to_json_value,
)


def wire(value: Any) -> Any:
    """What a reader gets after the JSON went over the wire (strict JSON, no NaN)."""
    return json.loads(json.dumps(value, allow_nan=False))


def round_trip(type_name: str, value: Any) -> Any:
    return from_json_value(type_name, wire(to_json_value(value, type_name)))


# --- properties -----------------------------------------------------------------------


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int8_round_trip_and_safe_numbers(value: int) -> None:
    encoded = to_json_value(value, "int8")
    if abs(value) <= MAX_SAFE_INTEGER:
        assert encoded == value and isinstance(encoded, int)
    else:
        assert encoded == str(value)
    assert round_trip("bigint", value) == value


@given(st.decimals(allow_nan=True, allow_infinity=True))
def test_numeric_round_trip_keeps_value_and_scale(value: Decimal) -> None:
    assume(not value.is_snan())
    encoded = to_json_value(value)
    assert isinstance(encoded, str)
    back = round_trip("numeric", value)
    if value.is_nan():
        assert back.is_nan()
    else:
        assert back == value
        if value.is_finite():
            # The scale (digits after the point) is part of a numeric's value in PostgreSQL.
            assert _scale(back) == _scale(value)
            assert "E" not in encoded and "e" not in encoded


def _scale(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_round_trip_with_specials(value: float) -> None:
    encoded = to_json_value(value, "float8")
    back = round_trip("double precision", value)
    if math.isnan(value):
        assert encoded == "NaN" and math.isnan(back)
    elif math.isinf(value):
        assert encoded == ("Infinity" if value > 0 else "-Infinity") and back == value
    else:
        assert encoded == value
        assert back == value and math.copysign(1, back) == math.copysign(1, value)


@given(st.binary())
def test_bytea_round_trip_as_base64(value: bytes) -> None:
    encoded = to_json_value(value, "bytea")
    assert encoded == base64.b64encode(value).decode("ascii")
    assert round_trip("bytea", value) == value


@given(st.text())
def test_text_round_trip(value: str) -> None:
    assert to_json_value(value, "text") == value
    assert round_trip("character varying(10)", value) == value


@given(
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_interval_iso_round_trip(months: int, days: int, micros: int) -> None:
    value = PgInterval(months, days, micros)
    assert PgInterval.fromisoformat(value.isoformat()) == value
    assert round_trip("interval", value) == value


_OFFSETS = st.integers(min_value=-15 * 3600, max_value=15 * 3600).map(
    lambda s: timezone(timedelta(seconds=s))
)


@given(st.datetimes(timezones=_OFFSETS | st.just(UTC)))
def test_timestamptz_round_trip_keeps_offset(value: datetime) -> None:
    back = round_trip("timestamptz", value)
    assert back == value and back.utcoffset() == value.utcoffset()


@given(st.datetimes())
def test_timestamp_round_trip_stays_naive(value: datetime) -> None:
    back = round_trip("timestamp", value)
    assert back == value and back.tzinfo is None


# --- rules, by example ------------------------------------------------------------------


def test_infinities_and_specials() -> None:
    assert to_json_value(PG_INFINITY) == "infinity"
    assert to_json_value(PG_NEG_INFINITY) == "-infinity"
    assert from_json_value("timestamp with time zone", "infinity") is PG_INFINITY
    assert from_json_value("date", "-infinity") == PG_NEG_INFINITY
    assert to_json_value(Decimal("NaN")) == "NaN"
    assert to_json_value(Decimal("-Infinity")) == "-Infinity"
    assert to_json_value(Decimal("1E-30")) == "0.000000000000000000000000000001"
    assert from_json_value("numeric", "Infinity") == Decimal("Infinity")


def test_dates_and_times() -> None:
    tz = timezone(timedelta(hours=5, minutes=30))
    assert to_json_value(datetime(2024, 2, 29, 1, 2, 3, 4, tzinfo=UTC)) == (
        "2024-02-29T01:02:03.000004+00:00"
    )
    assert to_json_value(datetime(2024, 2, 29, 1, 2, 3)) == "2024-02-29T01:02:03"
    assert to_json_value(date(1, 1, 1)) == "0001-01-01"
    assert to_json_value(time(4, 5, 6, tzinfo=tz)) == "04:05:06+05:30"
    assert from_json_value("timetz", "04:05:06+05:30") == time(4, 5, 6, tzinfo=tz)
    assert from_json_value("time without time zone", "23:59:59.999999") == time(23, 59, 59, 999999)


@pytest.mark.parametrize(
    ("text", "expected", "iso"),
    [
        (
            "1 year 2 mons 3 days 04:05:06.789",
            PgInterval(14, 3, 14_706_789_000),
            "P1Y2M3DT4H5M6.789S",
        ),
        ("-1 years -2 mons +3 days -04:05:06", PgInterval(-14, 3, -14_706_000_000), None),
        ("00:00:00", PgInterval(), "PT0S"),
        ("1 mon", PgInterval(1, 0, 0), "P1M"),
        ("30 days", PgInterval(0, 30, 0), "P30D"),
        ("-00:00:00.000001", PgInterval(0, 0, -1), "PT-0.000001S"),
        ("2562047788:00:54.775807", PgInterval(0, 0, 2**63 - 1), "PT2562047788H54.775807S"),
        ("1 day -01:00:00", PgInterval(0, 1, -3_600_000_000), "P1DT-1H"),
    ],
)
def test_interval_reads_postgres_style_exactly(
    text: str, expected: PgInterval, iso: str | None
) -> None:
    value = PgInterval.from_postgres(text)
    assert value == expected
    if iso is not None:
        assert value.isoformat() == iso
    # Months and days stay apart: psycopg's timedelta would make '1 mon' == '30 days'.
    assert PgInterval.from_postgres("1 mon") != PgInterval.from_postgres("30 days")


@pytest.mark.parametrize("text", ["", "1 fortnight", "P1D", "@ 1 day", "1:2:3"])
def test_interval_rejects_other_styles(text: str) -> None:
    with pytest.raises(ValueEncodingError, match="IntervalStyle=postgres"):
        PgInterval.from_postgres(text)


def test_interval_timedelta_is_the_lossy_psycopg_reading() -> None:
    assert PgInterval(1, 2, 3).to_timedelta() == timedelta(days=32, microseconds=3)


def test_uuid_inet_cidr_money_bits() -> None:
    u = UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    assert to_json_value(u) == str(u) and from_json_value("uuid", str(u)) == u
    for name, value in (
        ("inet", ip_interface("192.168.1.5/24")),
        ("inet", ip_address("::1")),
        ("cidr", ip_network("10.0.0.0/8")),
    ):
        assert to_json_value(value) == str(value)
        assert from_json_value(name, str(value)) == value
    assert round_trip("money", "$1,234.56") == "$1,234.56"
    assert round_trip("bit(4)", "0101") == "0101"
    assert round_trip("bit varying", "") == ""


def test_arrays_nest_with_nulls() -> None:
    value = [[1, None], [2**60, 4]]
    assert to_json_value(value, "int8[]") == [[1, None], [str(2**60), 4]]
    assert round_trip("bigint[]", value) == value
    assert round_trip("_numeric", [Decimal("1.50"), None]) == [Decimal("1.50"), None]
    assert round_trip("text[]", []) == []
    assert round_trip("date[]", [PG_INFINITY, date(2024, 1, 1)]) == [PG_INFINITY, date(2024, 1, 1)]


def test_ranges_and_multiranges() -> None:
    r = Range(Decimal("1.5"), None, "[)")
    assert to_json_value(r) == {"lower": "1.5", "upper": None, "bounds": "[)", "empty": False}
    assert round_trip("numrange", r) == r
    empty = Range(empty=True)  # type: ignore[var-annotated]
    assert to_json_value(empty) == {"lower": None, "upper": None, "bounds": None, "empty": True}
    assert round_trip("int4range", empty) == empty
    ts = Range(PG_NEG_INFINITY, datetime(2024, 1, 1, tzinfo=UTC), "[)")
    assert round_trip("tstzrange", ts) == ts
    mr = Multirange([Range(1, 3, "[)"), Range(5, 7, "[)")])
    assert round_trip("int4multirange", mr) == mr
    custom = Range(1.5, math.inf, "[]")
    assert round_trip("range<float8>", custom) == custom
    assert round_trip("multirange<float8>", Multirange([custom])) == Multirange([custom])
    arr = [Multirange([Range(1, 2, "[)")]), Multirange()]
    assert round_trip("int4multirange[]", arr) == arr
    assert round_trip("int4range[]", [[Range(1, 2, "[)")], [empty]]) == [
        [Range(1, 2, "[)")],
        [empty],
    ]


def test_json_content_passes_through_untouched() -> None:
    doc = {"big": 2**70, "arr": [1, None, 2.5], "s": "😀"}
    assert to_json_value(doc, "jsonb") == doc
    assert to_json_value([2**70], "jsonb") == [2**70]  # not an array: content kept
    assert to_json_value([2**70]) == [str(2**70)]  # an int8[] would be encoded
    assert round_trip("json", doc) == doc
    assert from_json_value("jsonb[]", [[1, 2], {"a": 1}]) == [[1, 2], {"a": 1}]


def test_unknown_types_say_what_they_are() -> None:
    value = PgText("point", "(1,2)")
    assert to_json_value(value) == {"pg_type": "point", "text": "(1,2)"}
    assert round_trip("point", value) == value
    assert round_trip("public.pair[]", [value, None]) == [value, None]
    # An enum label is a string under a type name the decoder does not know.
    assert round_trip("public.mood", "happy") == "happy"
    # A PgText can stand in for a known type when Python cannot hold the value.
    bc = PgText("date", "0044-03-15 BC")
    assert round_trip("date", bc) == bc


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("integer[]", TypeRef("int4", True)),
        ("_int4", TypeRef("int4", True)),
        ("pg_catalog.int8", TypeRef("int8", False)),
        ("timestamp(3) with time zone", TypeRef("timestamptz", False)),
        ("TIMESTAMP WITHOUT TIME ZONE", TypeRef("timestamp", False)),
        ("character varying(20)[]", TypeRef("varchar", True)),
        ("numeric(10,2)", TypeRef("numeric", False)),
        ("double precision", TypeRef("float8", False)),
        ("bit varying(8)", TypeRef("varbit", False)),
        ("public.mood", TypeRef("public.mood", False)),
        ("_my_own", TypeRef("_my_own", False)),
        ("range<float8>", TypeRef("range<float8>", False)),
    ],
)
def test_type_names_in_every_spelling(name: str, ref: TypeRef) -> None:
    assert parse_type_name(name) == ref


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("int4", "twelve"),
        ("int4", 1.5),
        ("int4", True),
        ("bool", "t"),
        ("float8", "nan"),
        ("float8", "1.5"),
        ("numeric", [1]),
        ("bytea", "not base64!"),
        ("uuid", "nope"),
        ("timestamptz", 12),
        ("interval", "1 day"),
        ("int4range", [1, 2]),
        ("int4[]", 5),
    ],
)
def test_bad_json_is_refused_clearly(name: str, value: Any) -> None:
    with pytest.raises(ValueEncodingError, match="cannot decode"):
        from_json_value(name, value)


def test_unsupported_python_values_are_refused() -> None:
    with pytest.raises(ValueEncodingError, match="cannot encode a object"):
        to_json_value(object())


def test_row_to_json_marks_unchanged_toast_and_nulls() -> None:
    image = RowImage.from_texts(
        {"id": (20, "int8"), "body": (25, "text"), "note": (25, "text")},
        {"id": "9007199254740993", "body": UNCHANGED_TOAST, "note": None},
        loader=lambda oid, text: int(text) if oid == 20 else text,
    )
    row = row_to_json(image)
    assert row == {"id": "9007199254740993", "body": {"unchanged_toast": True}, "note": None}
    assert decode_row({"id": "int8", "note": "text"}, {"id": row["id"], "note": None}) == {
        "id": 9007199254740993,
        "note": None,
    }
