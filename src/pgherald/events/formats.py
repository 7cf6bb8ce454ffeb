"""The wire formats of a ``ChangeEvent``: pgherald's own JSON, Debezium, CloudEvents, simple.

Every format writes row values with the lossless encoding of
:mod:`pgherald.events.values`, so a consumer gets big integers, numerics, NaN,
infinities and interval months exactly, whatever format it asked for.

pgherald's own format (validated by ``changeevent.schema.json``, shipped beside this
module) is the only one that can be read back: :func:`from_pgherald_json` rebuilds an
event equal to the one encoded. For that it carries, next to the typed ``old``/``new``
values, each column's type OID and, unless ``with_text=False``, PostgreSQL's own text of
each value (``text``): the JSON value alone cannot give back the exact text (a ``json``
column's whitespace, a float's digits), and the text is what ``RowImage`` equality and
the change log go by.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, Literal

import orjson

from pgherald.errors import PgHeraldError
from pgherald.events.model import (
    UNCHANGED_TOAST,
    ChangeEvent,
    ColumnSpec,
    RowImage,
    RowShape,
    Text,
    Unchanged,
)
from pgherald.events.values import (
    UNCHANGED_TOAST_JSON,
    JSONValue,
    ValueEncodingError,
    from_json_value,
    parse_type_name,
    row_to_json,
    to_json_value,
)

Format = Literal["pgherald", "debezium", "cloudevents", "simple"]
FORMATS: Final[tuple[Format, ...]] = ("pgherald", "debezium", "cloudevents", "simple")
FORMAT_VERSION: Final = 1
"""Bumped when the own format changes incompatibly; readers check it."""

SCHEMA_RESOURCE: Final = "changeevent.schema.json"

_DEBEZIUM_OPS: Final[Mapping[str, str]] = {
    "insert": "c",
    "update": "u",
    "delete": "d",
    "read": "r",
    "truncate": "t",
}
_SIMPLE_OPS: Final[Mapping[str, str]] = {
    "insert": "INSERT",
    "update": "UPDATE",
    "delete": "DELETE",
    "truncate": "TRUNCATE",
    # A snapshot's row is a row that exists: what a trigger setup would have sent as an
    # INSERT when it was written.
    "read": "INSERT",
}


class FormatError(PgHeraldError, ValueError):
    """An event cannot be written in, or read from, the format asked for."""


@functools.cache
def pgherald_version() -> str:
    """The installed pgherald's version, as feeds and envelopes name their generator."""
    try:
        return version("pgherald")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of pgherald's own format."""
    text = resources.files("pgherald.events").joinpath(SCHEMA_RESOURCE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


# --- pgherald's own format ------------------------------------------------------------


def _columns(event: ChangeEvent) -> dict[str, ColumnSpec]:
    cols: dict[str, ColumnSpec] = {}
    for image in (event.new, event.old):
        if image is not None:
            for c in image.shape.columns:
                cols.setdefault(c.name, c)
    return cols


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _plain(value: Any) -> JSONValue:
    """Encodes free-form data (``meta``): containers walked, leaves as typed values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return to_json_value(value)


def _text_json(image: RowImage) -> dict[str, Any]:
    return {
        name: dict(UNCHANGED_TOAST_JSON) if isinstance(text, Unchanged) else text
        for name, text in zip(image.shape.names, image.texts, strict=True)
    }


def to_pgherald_json(event: ChangeEvent, *, with_text: bool = True) -> dict[str, Any]:
    """pgherald's own format, as JSON data (see ``changeevent.schema.json``).

    ``with_text=False`` leaves out PostgreSQL's text of the values, which halves the
    size; the event can then still be read back, with typed values equal, but its
    row texts are no longer the server's.
    """
    cols = _columns(event)
    types = {name: c.type_name for name, c in cols.items()}
    unchanged: list[str] = []
    for image in (event.new, event.old):
        if image is not None:
            unchanged.extend(n for n in image.unchanged_columns() if n not in unchanged)
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "event_id": event.event_id,
        "watch": event.watch,
        "op": event.op,
        "schema": event.schema,
        "table": event.table,
        "key": {k: to_json_value(v, types.get(k)) for k, v in event.key.items()},
        "old": None if event.old is None else row_to_json(event.old),
        "new": None if event.new is None else row_to_json(event.new),
        "changed": [
            {
                "name": f.name,
                "old": to_json_value(f.old, types.get(f.name)),
                "new": to_json_value(f.new, types.get(f.name)),
            }
            for f in event.changed_fields
        ],
        "xid": event.xid,
        "position": event.position,
        "commit_time": _iso(event.commit_time),
        "captured_at": event.captured_at.isoformat(),
        "method": event.method,
        "seq": event.seq,
        "old_values": event.old_values,
        "types": types,
        "type_oids": {name: c.type_oid for name, c in cols.items()},
        "unchanged_toast": unchanged,
        "meta": _plain(event.meta),
    }
    if with_text:
        out["text"] = {
            "old": None if event.old is None else _text_json(event.old),
            "new": None if event.new is None else _text_json(event.new),
        }
    return out


class _KnownValues:
    """The ``TypedLoader`` of a decoded event: the values the JSON gave, by (OID, text).

    A decoded event has no database to type text with, but it does not need one: the
    JSON holds every typed value already. A text it was not given (an image changed
    with ``replace_texts``) comes back as text.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[tuple[int, str], Any] = {}

    def add(self, type_oid: int, text: str, value: Any) -> None:
        self._values[(type_oid, text)] = value

    def __call__(self, type_oid: int, text: str) -> Any:
        return self._values.get((type_oid, text), text)


def _synthetic_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _read_image(
    values: Any,
    texts: Any,
    types: Mapping[str, str],
    oids: Mapping[str, int],
    unchanged: frozenset[str],
    known: _KnownValues,
) -> RowImage | None:
    if values is None:
        return None
    if not isinstance(values, dict) or (texts is not None and not isinstance(texts, dict)):
        raise FormatError("a row image must be a JSON object of column values")
    columns = tuple(ColumnSpec(n, int(oids.get(n, 0)), types.get(n, "text")) for n in values)
    row: list[Text] = []
    for col in columns:
        raw = values[col.name]
        if col.name in unchanged and raw == UNCHANGED_TOAST_JSON:
            row.append(UNCHANGED_TOAST)
            continue
        if raw is None and (texts is None or texts.get(col.name) is None):
            row.append(None)  # SQL NULL (a json 'null' has a text, where the text is kept)
            continue
        text = texts.get(col.name) if texts is not None else _synthetic_text(raw)
        if not isinstance(text, str):
            raise FormatError(f"column {col.name!r} has a value but no text")
        known.add(col.type_oid, text, from_json_value(col.type_name, raw))
        row.append(text)
    return RowImage(RowShape(columns), tuple(row), known)


def _parse_time(value: Any, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise FormatError(f"{field} must be an ISO 8601 string")
    return datetime.fromisoformat(value)


def from_pgherald_json(data: Mapping[str, Any]) -> ChangeEvent:
    """Reads an event written by :func:`to_pgherald_json` back into a ``ChangeEvent``."""
    got = data.get("format_version", FORMAT_VERSION)
    if got != FORMAT_VERSION:
        raise FormatError(
            f"event is in pgherald format version {got}, this pgherald reads {FORMAT_VERSION};"
            " upgrade pgherald"
        )
    try:
        types: Mapping[str, str] = data.get("types") or {}
        oids: Mapping[str, int] = data.get("type_oids") or {}
        unchanged = frozenset(data.get("unchanged_toast") or ())
        text = data.get("text") or {}
        known = _KnownValues()
        old = _read_image(data.get("old"), text.get("old"), types, oids, unchanged, known)
        new = _read_image(data.get("new"), text.get("new"), types, oids, unchanged, known)
        key = {
            k: from_json_value(types[k], v) if k in types else v
            for k, v in (data.get("key") or {}).items()
        }
        captured_at = _parse_time(data["captured_at"], "captured_at")
        if captured_at is None:
            raise FormatError("not a pgherald event: captured_at is null")
        return ChangeEvent(
            event_id=data["event_id"],
            watch=data["watch"],
            op=data["op"],
            schema=data["schema"],
            table=data["table"],
            key=key,
            old=old,
            new=new,
            changed=tuple(c["name"] for c in data.get("changed") or ()),
            xid=data.get("xid"),
            position=data["position"],
            commit_time=_parse_time(data.get("commit_time"), "commit_time"),
            captured_at=captured_at,
            method=data["method"],
            seq=int(data.get("seq", 0)),
            old_values=data.get("old_values", "none"),
            meta=data.get("meta") or {},
        )
    except KeyError as exc:
        raise FormatError(f"not a pgherald event: field {exc.args[0]!r} is missing") from None
    except ValueEncodingError as exc:
        raise FormatError(f"event {data.get('event_id')!r}: {exc}") from None


# --- other formats --------------------------------------------------------------------


def _ms(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def _lsn(position: str) -> int | None:
    """``16/B374D848`` as the 64-bit number Debezium's ``lsn`` holds; None if not an LSN."""
    hi, sep, lo = position.partition("/")
    if not sep:
        return None
    try:
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        return None


def to_debezium(event: ChangeEvent) -> dict[str, Any]:
    """The Debezium change-event envelope (the ``payload`` part, without a Kafka schema).

    ``source.db`` is ``meta["database"]`` when the source recorded it.
    """
    op = _DEBEZIUM_OPS.get(event.op)
    if op is None:
        raise FormatError(
            f"event {event.event_id}: a {event.op!r} event has no Debezium form;"
            " route it to a pgherald-format sink instead"
        )
    commit_ms = _ms(event.commit_time)
    return {
        "before": None if event.old is None else row_to_json(event.old),
        "after": None if event.new is None else row_to_json(event.new),
        "source": {
            "version": pgherald_version(),
            "connector": "pgherald",
            "name": event.watch,
            "ts_ms": commit_ms if commit_ms is not None else _ms(event.captured_at),
            "snapshot": "true" if event.op == "read" else "false",
            "db": str(event.meta.get("database", "")),
            "schema": event.schema,
            "table": event.table,
            "txId": event.xid,
            "lsn": _lsn(event.position),
        },
        "op": op,
        "ts_ms": _ms(event.captured_at),
    }


def to_cloudevent(event: ChangeEvent, source_uri: str) -> dict[str, Any]:
    """A CloudEvents 1.0 event (structured JSON mode) whose data is the own format."""
    when = event.commit_time or event.captured_at
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return {
        "specversion": "1.0",
        "id": event.event_id,
        "source": source_uri,
        "type": f"io.pgherald.change.{event.op}",
        "subject": event.qualified_table,
        "time": when.isoformat(),
        "datacontenttype": "application/json",
        "data": to_pgherald_json(event),
    }


def to_simple(event: ChangeEvent) -> dict[str, Any]:
    """``{table, schema, operation, new_record, old_record}`` as trigger/NOTIFY setups send.

    A snapshot's ``read`` is written as ``INSERT``.
    """
    operation = _SIMPLE_OPS.get(event.op)
    if operation is None:
        raise FormatError(
            f"event {event.event_id}: a {event.op!r} event has no simple form;"
            " route it to a pgherald-format sink instead"
        )
    return {
        "table": event.table,
        "schema": event.schema,
        "operation": operation,
        "new_record": None if event.new is None else row_to_json(event.new),
        "old_record": None if event.old is None else row_to_json(event.old),
    }


def to_format(event: ChangeEvent, fmt: Format, *, source_uri: str = "pgherald") -> Any:
    """The event as JSON data in the format named ``fmt``."""
    if fmt == "pgherald":
        return to_pgherald_json(event)
    if fmt == "debezium":
        return to_debezium(event)
    if fmt == "cloudevents":
        return to_cloudevent(event, source_uri)
    if fmt == "simple":
        return to_simple(event)
    raise FormatError(f"unknown event format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _holds_json_content(event: ChangeEvent) -> bool:
    """Whether a row of the event has a json/jsonb column (or an array of them): content
    that only the standard library writes as pgherald promises (integers of any size, and
    an error instead of ``null`` for a number no double holds)."""
    for image in (event.new, event.old):
        if image is not None and any(
            parse_type_name(c.type_name).is_json for c in image.shape.columns
        ):
            return True
    return False


def encode(event: ChangeEvent, fmt: Format, *, source_uri: str = "pgherald") -> bytes:
    """The event as compact UTF-8 JSON in the format named ``fmt``.

    ``source_uri`` is the CloudEvents ``source`` (ignored by the other formats).

    orjson writes it as ``json.dumps`` would (compact, UTF-8 unescaped; only a float with
    an exponent is spelt shorter, ``1e16`` for ``1e+16``), at a fraction of the cost:
    encoding was the largest single part of a delivery's CPU.
    Every value was already made JSON-safe by :mod:`pgherald.events.values`, except the
    content of json columns, which the standard library writes instead.
    """
    data = to_format(event, fmt, source_uri=source_uri)
    if not _holds_json_content(event):
        try:
            return orjson.dumps(data)
        except TypeError:
            pass  # something orjson does not write (an integer beyond 64 bits): below
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except ValueError as exc:
        # Only json content can still hold a float NaN/infinity (a jsonb number beyond
        # the range of a double); no JSON reader could take it.
        raise FormatError(f"event {event.event_id} cannot be written as JSON: {exc}") from None
