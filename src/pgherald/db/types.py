"""Typed values from PostgreSQL's text output, with psycopg's own loaders.

Row values travel through pgherald as the server's text output (see
``pgherald.events.model``). :class:`TypeRegistry` is the ``TypedLoader`` that turns that
text into Python values. It reads the watched database's ``pg_type`` once, so it knows
custom types by OID (enums, domains, ranges, arrays of them), and then needs no
connection: a source can type values long after, on any thread.

The conversions are psycopg's text loaders, looked up in a private copy of the
connection's adapters, with a few deliberate departures where psycopg's result is
lossy or refuses a valid value:

- ``timestamp``, ``timestamptz``, ``date``: ``±infinity`` becomes ``PG_INFINITY`` /
  ``PG_NEG_INFINITY`` (psycopg raises); values Python cannot hold (BC, year > 9999)
  become ``PgText``;
- ``time``/``timetz``: ``24:00:00`` (valid in PostgreSQL, not in Python) becomes ``PgText``;
- ``interval``: a :class:`~pgherald.events.values.PgInterval` read from the
  ``IntervalStyle=postgres`` text, because psycopg's ``timedelta`` turns months into 30
  days and years into 365, which cannot be undone;
- ``money``, ``bit``, ``varbit``, enums: the text as ``str`` (money's text is locale
  dependent, so no number is made of it);
- domains: loaded as their base type (``pg_type.typbasetype``, recursively);
- composites and types psycopg has no loader for: ``PgText(type, text)``.

Loaders read text in the canonical session settings below; every connection whose text
output pgherald stores or types must run with them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import DataError, abc, sql
from psycopg.adapt import AdaptersMap, Buffer, Loader, Transformer
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg.types.array import register_array
from psycopg.types.multirange import MultirangeInfo, register_multirange
from psycopg.types.range import RangeInfo, register_range
from psycopg.types.string import TextLoader

from pgherald.errors import PgHeraldError
from pgherald.events.values import PG_INFINITY, PG_NEG_INFINITY, PgInfinity, PgInterval, PgText

CANONICAL_SESSION_SETTINGS: Final[dict[str, str]] = {
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}
"""Session settings under which PostgreSQL's text output is what the loaders here read.

``DateStyle=ISO`` and ``TimeZone=UTC`` fix the shape of dates and of timestamptz
(``2024-01-02 03:04:05.123456+00``); ``IntervalStyle=postgres`` is the style
``PgInterval.from_postgres`` reads; ``extra_float_digits=3`` makes floats print with as
many digits as round-trip exactly; ``bytea_output=hex`` is the default, pinned so a
server configured otherwise cannot change stored text.
"""


def canonical_options() -> str:
    """The settings as a libpq ``options`` value (``-c DateStyle=ISO,\\ MDY ...``).

    For connections that cannot run ``SET`` first, such as the replication connection.
    """
    parts = []
    for name, value in CANONICAL_SESSION_SETTINGS.items():
        escaped = value.replace("\\", "\\\\").replace(" ", "\\ ")
        parts.append(f"-c {name}={escaped}")
    return " ".join(parts)


def apply_canonical_settings(conn: psycopg.Connection[Any]) -> None:
    """Sets the canonical settings on an open connection for the rest of its session."""
    for name, value in CANONICAL_SESSION_SETTINGS.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))


_log = logging.getLogger(__name__)


class TypeLoadError(PgHeraldError):
    """The type catalogue of the watched database could not be read."""


# OIDs of the built-in types handled differently from psycopg's defaults. They are
# fixed in every PostgreSQL release (see pg_type.dat).
_DATE: Final = 1082
_TIME: Final = 1083
_TIMESTAMP: Final = 1114
_TIMESTAMPTZ: Final = 1184
_INTERVAL: Final = 1186
_TIMETZ: Final = 1266
_MONEY: Final = 790
_BIT: Final = 1560
_VARBIT: Final = 1562
_FIRST_USER_OID: Final = 16384  # FirstNormalObjectId: every OID below is built in

_TYPES_QUERY: Final = """
SELECT t.oid::int8, t.typname, n.nspname, format_type(t.oid, NULL), t.typtype,
       t.typcategory, t.typelem::int8, t.typbasetype::int8, t.typdelim, t.typarray::int8,
       r.rngsubtype::int8, mr.rngtypid::int8,
       EXISTS (SELECT 1 FROM pg_catalog.pg_type e WHERE e.oid = t.typelem AND e.typarray = t.oid)
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_catalog.pg_range r ON r.rngtypid = t.oid
LEFT JOIN pg_catalog.pg_range mr ON mr.rngmultitypid = t.oid
"""
_TYPES_BY_OID_QUERY: Final = _TYPES_QUERY + "WHERE t.oid = ANY(%s::oid[])"


@dataclass(frozen=True, slots=True)
class PgType:
    """One row of ``pg_type``, as much as typing values needs."""

    oid: int
    name: str
    schema: str
    display: str
    kind: str  # typtype: b base, c composite, d domain, e enum, p pseudo, r range, m multirange
    category: str
    elem: int
    base: int
    delimiter: str
    array: int
    range_subtype: int | None
    multirange_of: int | None
    is_array: bool  # a true array (int2vector and oidvector have an element but are not)

    @property
    def qualified(self) -> str:
        """``schema.name`` for user types, the bare name for ``pg_catalog`` ones."""
        return self.name if self.schema == "pg_catalog" else f"{self.schema}.{self.name}"


def _guarded(base: type[abc.Loader], type_name: str, infinities: bool) -> type[Loader]:
    """Wraps a psycopg date/time loader so that valid PostgreSQL values never raise.

    ``infinity`` maps to ``PgInfinity``; what Python cannot represent (BC dates, years
    after 9999, ``24:00:00``) stays text, in a ``PgText`` that names its type.
    """

    class GuardedLoader(Loader):
        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            self._base = base(oid, context)

        def load(self, data: Buffer) -> Any:
            raw = bytes(data)
            if infinities:
                if raw == b"infinity":
                    return PG_INFINITY
                if raw == b"-infinity":
                    return PG_NEG_INFINITY
            try:
                return self._base.load(data)
            except DataError:
                return PgText(type_name, raw.decode())

    GuardedLoader.__name__ = f"Guarded{base.__name__}"
    GuardedLoader.__qualname__ = GuardedLoader.__name__
    return GuardedLoader


class IntervalLoader(Loader):
    """Loads intervals exactly, as ``PgInterval`` (see the module's docstring for why)."""

    def load(self, data: Buffer) -> PgInterval | PgInfinity:
        text = bytes(data).decode()
        if text == "infinity":
            return PG_INFINITY
        if text == "-infinity":
            return PG_NEG_INFINITY
        return PgInterval.from_postgres(text)


def _pg_text_loader(type_name: str) -> type[Loader]:
    class PgTextLoader(Loader):
        def load(self, data: Buffer) -> PgText:
            return PgText(type_name, bytes(data).decode())

    return PgTextLoader


class TypeRegistry:
    """A ``TypedLoader`` for one database: ``registry(type_oid, text) -> value``.

    Build it with :meth:`load` from a psycopg connection to the watched database. A
    type OID it has not seen (a type created after ``load``) gives ``PgText`` until
    :meth:`refresh` is called with that OID.
    """

    def __init__(
        self,
        types: Iterable[PgType],
        adapters: AdaptersMap,
        conn: psycopg.Connection[Any] | None = None,
    ) -> None:
        self._types: dict[int, PgType] = {t.oid: t for t in types}
        self._template = adapters
        self._conn = conn
        self._lock = threading.RLock()
        self._warned: set[int] = set()
        self._reset()

    def _reset(self) -> None:
        """Starts from psycopg's adapters again; loaders are then made on first use."""
        self._adapters = AdaptersMap(self._template)
        self._resolved: set[int] = set()
        self._loads: dict[int, Callable[[Buffer], Any]] = {}
        self._install_overrides()
        self._tx = Transformer(self._adapters)

    # -- construction -------------------------------------------------------------

    @classmethod
    def load(cls, conn: psycopg.Connection[Any]) -> TypeRegistry:
        """Reads every type of the database the connection is on.

        The connection is kept only as the default for :meth:`refresh`; typing values
        never uses it.
        """
        return cls(_fetch_types(conn, None), conn.adapters, conn)

    def refresh(self, oids: Iterable[int], conn: psycopg.Connection[Any] | None = None) -> None:
        """Learns (or re-learns) the given type OIDs and the types they are built on.

        A source calls this when the stream names a type OID that :meth:`missing` lists
        (a type created mid-stream), with ``conn`` or else the connection given to
        :meth:`load`. OIDs are never reused for another type while the old one exists.
        """
        conn = conn if conn is not None else self._conn
        if conn is None or conn.closed:
            raise TypeLoadError(
                "cannot refresh types: no open connection; pass one to TypeRegistry.refresh"
            )
        wanted = {int(o) for o in oids}
        seen: set[int] = set()
        fetched: list[PgType] = []
        while wanted - seen:
            batch = wanted - seen
            seen |= batch
            for t in _fetch_types(conn, batch):
                fetched.append(t)
                wanted.update(d for d in _dependencies(t) if d not in self._types)
        with self._lock:
            for t in fetched:
                self._types[t.oid] = t
            # An OID that was unknown when something built on it was first loaded got
            # a text loader; start afresh so that containers pick up the real one.
            if {t.oid for t in fetched} & self._resolved:
                self._reset()

    def knows(self, oid: int) -> bool:
        return oid in self._types

    def missing(self, oids: Iterable[int]) -> set[int]:
        """The OIDs among ``oids`` that :meth:`refresh` should be asked about."""
        return {o for o in oids if o not in self._types}

    # -- names ----------------------------------------------------------------------

    def type_name(self, oid: int) -> str:
        """The name to put in ``ColumnSpec.type_name``: one the JSON decoding understands.

        Built-in types by their ``pg_type`` name (``int4``, ``timestamptz``), arrays as
        ``elem[]``, domains as their base type (so a domain over numeric decodes as a
        numeric), custom ranges as ``range<subtype>``, other user types qualified by
        schema (``public.mood``).
        """
        t = self._types.get(oid)
        if t is None:
            return f"oid:{oid}"
        if t.kind == "d":
            return self.type_name(t.base)
        if t.is_array:
            return self.type_name(t.elem) + "[]"
        if t.oid >= _FIRST_USER_OID:
            if t.range_subtype is not None:
                return f"range<{self.type_name(t.range_subtype)}>"
            if t.multirange_of is not None:
                rng = self._types.get(t.multirange_of)
                if rng is not None and rng.range_subtype is not None:
                    return f"multirange<{self.type_name(rng.range_subtype)}>"
        return t.qualified

    def display_name(self, oid: int) -> str:
        """The type as a person reads it (``format_type``), e.g. ``mood`` or ``integer[]``."""
        t = self._types.get(oid)
        return t.display if t is not None else f"oid:{oid}"

    # -- loading --------------------------------------------------------------------

    def __call__(self, type_oid: int, text: str) -> Any:
        load = self._loads.get(type_oid)
        if load is None:
            if type_oid not in self._types:
                return PgText(f"oid:{type_oid}", text)
            with self._lock:
                load = self._loader(type_oid)
        try:
            return load(text.encode())
        except (psycopg.Error, ValueError) as exc:
            # Typing happens lazily, often while an event is being delivered: a value
            # psycopg cannot read must not stop that. Its text is kept, and said to be.
            if type_oid not in self._warned:
                self._warned.add(type_oid)
                _log.warning(
                    "values of type %s are passed on as text: %s", self.display_name(type_oid), exc
                )
            return PgText(self.display_name(type_oid), text)

    def _loader(self, oid: int) -> Callable[[Buffer], Any]:
        load = self._loads.get(oid)
        if load is None:
            self._resolve(oid)
            load = self._tx.get_loader(oid, Format.TEXT).load
            self._loads[oid] = load
        return load

    def _install_overrides(self) -> None:
        a = self._adapters
        for oid, name, inf in (
            (_TIMESTAMP, "timestamp without time zone", True),
            (_TIMESTAMPTZ, "timestamp with time zone", True),
            (_DATE, "date", True),
            (_TIME, "time without time zone", False),
            (_TIMETZ, "time with time zone", False),
        ):
            base = a.get_loader(oid, Format.TEXT)
            if base is not None:
                a.register_loader(oid, _guarded(base, name, inf))
        a.register_loader(_INTERVAL, IntervalLoader)
        for oid in (_MONEY, _BIT, _VARBIT):
            a.register_loader(oid, TextLoader)

    def _resolve(self, oid: int, depth: int = 0) -> None:
        """Registers what loading ``oid`` needs, element and base types first.

        psycopg's array and range loaders pick their element loader when they are
        created, so the element must be registered before the container is looked up.
        """
        if oid in self._resolved:
            return
        if depth > 32:
            raise TypeLoadError(f"type {oid} is nested more than 32 levels deep; cannot load it")
        self._resolved.add(oid)
        t = self._types.get(oid)
        a = self._adapters
        if t is None:
            a.register_loader(oid, _pg_text_loader(f"oid:{oid}"))
            return
        for dep in _dependencies(t):
            self._resolve(dep, depth + 1)
        builtin = a.get_loader(oid, Format.TEXT)
        if t.kind == "d":
            base = a.get_loader(t.base, Format.TEXT)
            a.register_loader(oid, base or _pg_text_loader(t.display))
        elif t.kind == "e":
            a.register_loader(oid, TextLoader)
        elif builtin is not None and oid < _FIRST_USER_OID:
            return
        elif t.is_array:
            info = TypeInfo(t.display, t.elem, oid, delimiter=self._types[t.elem].delimiter)
            register_array(info, a)
        elif t.kind == "r" and t.range_subtype is not None:
            register_range(RangeInfo(t.name, oid, t.array, subtype_oid=t.range_subtype), a)
        elif t.kind == "m" and t.multirange_of is not None:
            rng = self._types.get(t.multirange_of)
            if rng is None or rng.range_subtype is None:
                a.register_loader(oid, _pg_text_loader(t.display))
                return
            register_multirange(
                MultirangeInfo(
                    t.name, oid, t.array, range_oid=rng.oid, subtype_oid=rng.range_subtype
                ),
                a,
            )
        else:
            a.register_loader(oid, _pg_text_loader(t.display))


def _dependencies(t: PgType) -> list[int]:
    deps = []
    if t.kind == "d" and t.base:
        deps.append(t.base)
    if t.is_array:
        deps.append(t.elem)
    if t.range_subtype is not None:
        deps.append(t.range_subtype)
    if t.multirange_of is not None:
        deps.append(t.multirange_of)
    return deps


def _fetch_types(conn: psycopg.Connection[Any], oids: Iterable[int] | None) -> list[PgType]:
    try:
        with conn.cursor() as cur:
            if oids is None:
                cur.execute(_TYPES_QUERY)
            else:
                cur.execute(_TYPES_BY_OID_QUERY, (sorted(oids),))
            rows = cur.fetchall()
    except psycopg.OperationalError:
        raise  # the connection went away, not the catalogue: the caller reconnects
    except psycopg.Error as exc:
        raise TypeLoadError(
            f"cannot read pg_type from the watched database: {exc.diag.message_primary or exc}"
        ) from exc
    return [
        PgType(
            oid=int(r[0]),
            name=r[1],
            schema=r[2],
            display=r[3],
            kind=r[4],
            category=r[5],
            elem=int(r[6]),
            base=int(r[7]),
            delimiter=r[8],
            array=int(r[9]),
            range_subtype=None if r[10] is None else int(r[10]),
            multirange_of=None if r[11] is None else int(r[11]),
            is_array=bool(r[12]),
        )
        for r in rows
    ]


# Types whose cast to text is not their output function: the cast says ``true`` for ``t``,
# drops char(n)'s padding, adds ``/32`` to an inet address. SQL that reads values as text
# for the change log uses the output function, so every source stores the same text as
# pgoutput sends.
OUTPUT_FUNCTIONS: Final[dict[int, str]] = {
    16: "boolout",
    18: "charout",
    650: "cidr_out",
    869: "inet_out",
    1042: "bpcharout",
}


def output_text(expr: sql.Composable, type_oid: int) -> sql.Composable:
    """SQL for ``expr``'s text output, as pgoutput would send it (NULL stays NULL)."""
    function = OUTPUT_FUNCTIONS.get(type_oid)
    if function is not None:
        return sql.SQL("{}({})::text").format(sql.Identifier("pg_catalog", function), expr)
    return sql.SQL("{}::text").format(expr)
