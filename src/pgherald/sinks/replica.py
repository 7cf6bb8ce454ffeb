"""The replica sink: keeps tables of another PostgreSQL database in step with the watched ones.

Built this way because:

- **One target transaction per source transaction.** Consecutive events of one ``xid``
  (or, for sources without one, of one ``position``) are applied together, so the target
  never shows half of a source transaction that the batch holds whole. A transaction cut
  in two by the batch boundary is applied as two target transactions; that is sound
  because applying is idempotent (below), and a retried batch re-applies from its start.
- **Idempotent, so "at least once" is enough.** Inserts, updates and snapshot reads are
  upserts on the event's key (``INSERT ... ON CONFLICT (key) DO UPDATE``), deletes are
  deletes by key (deleting an absent row is fine), truncates are ``TRUNCATE``. Replaying
  any batch, or every batch again from the start, converges to the same tables: each
  row's last event sets it whole. An update that moved its row to another key
  (``meta["old_key"]``, or an old row whose key differs) deletes the old key's row.
- **Values travel as PostgreSQL's own text.** The change event keeps each value as the
  source server printed it; that text is sent as a parameter with an explicit cast to the
  *target* column's type (``%s::numeric``), so every type, including ones Python has no
  faithful type for, arrives exactly, and the target's own column type decides. Type
  names come from the target's catalog (``format_type``, without typmod, so the column's
  own length and precision checks still apply on assignment); nothing from an event is
  spliced into SQL. Names are ``sql.Identifier``s. Every statement is executed with a
  parameter list (possibly empty) so that the rule for ``%`` in names is always the same:
  doubled.
- **An unchanged TOAST value never overwrites anything.** Such a column is left out of
  the ``INSERT`` and of the ``DO UPDATE SET`` list. When the update also moved the row to
  another key, the value is carried over from the old key's row at the target before
  that row is deleted.
- **The target's shape follows the source's, when asked.** ``create_tables`` creates a
  missing table from the event's row shape (types resolved in the target's catalog, the
  event's key as primary key); ``add_columns`` adds a column that an event has and the
  target lacks (on a ``schema`` event already, or on the first row that has it). The
  target's columns are read once per table and cached; the cache of the tables a failed
  transaction touched is dropped, so a rolled-back ``ALTER`` is never believed.
- **One round trip per transaction.** The statements of a transaction are planned first
  (the few catalog reads a new table needs happen then), and then sent as one pipeline,
  ``BEGIN`` to ``COMMIT``; runs of the same statement use ``executemany``.
- **Failures say what to do.** A connection problem, a timeout, or a transient server
  state (deadlock, serialization failure, shutdown, lack of resources) makes the whole
  batch retryable, and a broken connection is reopened on the next ``send``; replaying
  converges. Anything else (a value the target type refuses, a missing table or column
  that the options do not allow creating, a key without a unique index) is permanent for
  the events of that one source transaction, which is rolled back alone: the batch's
  other transactions are applied.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgherald.errors import ConfigError, PermanentSinkError, RetryableSinkError
from pgherald.events import UNCHANGED_TOAST, ChangeEvent, RowImage, Unchanged
from pgherald.events.model import ColumnSpec
from pgherald.sinks.base import Message, Options, Outcome, SinkConfig

T = TypeVar("T")
QualifiedName = tuple[str, str]
Params = Sequence[str | None]
Conn = psycopg.AsyncConnection[Any]

_SESSION_SETUP: Final = (
    "SELECT pg_catalog.set_config('DateStyle', 'ISO, MDY', false),"
    " pg_catalog.set_config('IntervalStyle', 'postgres', false)"
)
"""The input styles that read the canonical text output the sources capture under."""

_TABLE_QUERY: Final = """
SELECT n.oid IS NOT NULL, c.oid IS NOT NULL, a.attname::text,
       pg_catalog.format_type(a.atttypid, NULL), a.attgenerated <> ''
FROM (VALUES (1)) AS one (x)
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = %(schema)s
LEFT JOIN pg_catalog.pg_class c
       ON c.relnamespace = n.oid AND c.relname = %(table)s AND c.relkind IN ('r', 'p')
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_TYPES_QUERY: Final = """
SELECT pg_catalog.format_type(COALESCE(b.oid, CASE WHEN s.arr THEN t.typarray ELSE t.oid END),
                              NULL)
FROM unnest(%(oids)s::int8[], %(schemas)s::text[], %(names)s::text[], %(arrays)s::bool[])
     WITH ORDINALITY AS s (type_oid, nsp, name, arr, i)
LEFT JOIN pg_catalog.pg_type b
       ON b.oid = CASE WHEN s.type_oid BETWEEN 1 AND 16383 THEN s.type_oid::oid END
LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = s.nsp
LEFT JOIN pg_catalog.pg_type t ON t.typnamespace = n.oid AND t.typname = s.name
ORDER BY s.i
"""
"""Type names as the target spells them: built-in types by their OID (the same on every
server), others by the ``schema.name`` the source's type registry gives them."""

_FIRST_USER_OID: Final = 16384

# SQLSTATE classes and codes worth retrying: connection exceptions, transaction rollbacks
# (deadlock, serialization), insufficient resources, operator intervention (shutdown,
# cancel), system errors; lock timeouts, objects in use, a read-only (standby) target.
_RETRYABLE_CLASSES: Final = frozenset({"08", "40", "53", "57", "58"})
_RETRYABLE_STATES: Final = frozenset({"55P03", "55006", "25006", "25P03"})


class _Refused(Exception):
    """A transaction that cannot be applied as the options stand (permanent)."""


@dataclass(frozen=True)
class ReplicaSettings:
    """A replica sink's validated options."""

    dsn: str
    schema: str | None = None
    table_map: Mapping[QualifiedName, QualifiedName] = field(default_factory=dict)
    create_tables: bool = False
    add_columns: bool = True
    timeout: float = 60.0
    """Seconds for connecting and for applying one source transaction; 0: no limit."""


@dataclass(eq=False)
class _Table:
    """A target table as the catalog described it, plus what this session planned for it."""

    schema: str
    name: str
    schema_exists: bool
    exists: bool
    columns: dict[str, str]
    """Column name -> its type as the cast target (``format_type`` without typmod)."""
    generated: frozenset[str] = frozenset()
    writes: dict[Any, tuple[bytes, tuple[int, ...] | None]] = field(default_factory=dict)
    deletes: dict[tuple[str, ...], bytes] = field(default_factory=dict)
    other: dict[Any, bytes] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


class _Plan:
    """The statements of one transaction, in order, with runs of the same one merged."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: list[tuple[bytes, list[Params]]] = []

    def add(self, statement: bytes, params: Params) -> None:
        runs = self.runs
        if runs and runs[-1][0] is statement:
            runs[-1][1].append(params)
        else:
            runs.append((statement, [params]))


def _ident(*names: str) -> sql.Identifier:
    """A name for a statement executed with parameters: ``%`` doubled, or psycopg would
    read it as a placeholder."""
    return sql.Identifier(*(n.replace("%", "%%") for n in names))


def _type(type_sql: str) -> sql.SQL:
    """A type name as ``format_type`` printed it on the target (so quoted where needed)."""
    return sql.SQL(type_sql.replace("%", "%%"))


_COMMA: Final = sql.SQL(", ")
_AND: Final = sql.SQL(" AND ")


def _text(value: Any) -> str | None:
    """A key value as text: the sources give text already; hand-made keys may be typed."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Unchanged):
        raise _Refused("a key value is an unchanged TOAST marker")
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return str(value)


def _type_parts(type_name: str) -> tuple[str, str, bool]:
    """``schema.name[]`` (the source registry's spelling) -> (schema, name, is_array)."""
    is_array = type_name.endswith("[]")
    base = type_name
    while base.endswith("[]"):
        base = base[:-2]
    schema, dot, name = base.partition(".")
    if not dot:
        schema, name = "pg_catalog", base
    return schema, name, is_array


def parse_qualified(text: str) -> QualifiedName | None:
    """``schema.table`` with exact (case-kept) names; a part with a dot or a double quote
    is written in double quotes (``"my.schema"."t"``, ``"a""b"``). None if malformed."""
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, pieces = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    return None
                pieces.append(text[j:k])
                if text.startswith('"', k + 1):
                    pieces.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            part = "".join(pieces)
        else:
            k = text.find(".", i)
            end = n if k < 0 else k
            part = text[i:end]
            if '"' in part:
                return None
            i = end
        if not part:
            return None
        parts.append(part)
        if i == n:
            break
        if text[i] != ".":
            return None
        i += 1
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _transactions(batch: Sequence[Message]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive events of one source transaction."""
    spans: list[tuple[int, int]] = []
    start = 0
    previous: Any = None
    for i, message in enumerate(batch):
        e = message.event
        key = (e.xid, None) if e.xid is not None else (None, e.position)
        if i and key != previous:
            spans.append((start, i))
            start = i
        previous = key
    if batch:
        spans.append((start, len(batch)))
    return spans


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        text = exc.diag.message_primary
    else:
        text = str(exc) or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _retryable(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is None:  # raised by the client: a lost connection, or a value it cannot send
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state[:2] in _RETRYABLE_CLASSES or state in _RETRYABLE_STATES


class ReplicaSink:
    """Applies change events to tables of a target database (see the module docstring)."""

    def __init__(self, name: str, settings: ReplicaSettings) -> None:
        self.name = name
        self.settings = settings
        self.strictly_ordered = True
        """Transactions must reach the target in commit order: always one lane."""
        self._conn: Conn | None = None
        self._tables: dict[QualifiedName, _Table] = {}
        self._timeout = settings.timeout or None

    # -- the Sink protocol ------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._connection()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise RetryableSinkError(self._unreachable(exc)) from None

    async def send(self, batch: Sequence[Message]) -> list[Outcome]:
        outcomes: list[Outcome] = [None] * len(batch)
        try:
            conn = await self._connection()
            for start, end in _transactions(batch):
                error = await self._apply(conn, [m.event for m in batch[start:end]])
                if error is not None:
                    outcomes[start:end] = [error] * (end - start)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await self._drop_if_broken(exc)
            return [RetryableSinkError(self._unreachable(exc))] * len(batch)
        return outcomes

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._tables.clear()
        if conn is not None:
            await conn.close()

    # -- connection -------------------------------------------------------------------------

    async def _connection(self) -> Conn:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        await self.close()
        self._conn = await self._bounded(self._connect())
        return self._conn

    async def _connect(self) -> Conn:
        conn = await psycopg.AsyncConnection.connect(self.settings.dsn, autocommit=True)
        try:
            await conn.execute(_SESSION_SETUP)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _bounded(self, work: Coroutine[Any, Any, T]) -> T:
        """``work`` within the timeout, else ``TimeoutError`` -- promptly.

        Cancelling psycopg during a query makes it ask the server to cancel and wait for
        that (up to 5 s, twice) over a connection that may be the very thing that hangs; a
        second cancellation makes it close the connection at once instead, which is what a
        timed-out sink wants (it reconnects on the next send).
        """
        if self._timeout is None:
            return await work
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        for _ in range(20):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                break
        if task.done() and not task.cancelled() and task.exception() is None:
            await self._discard(task.result())
        raise TimeoutError

    @staticmethod
    async def _discard(value: object) -> None:
        if isinstance(value, psycopg.AsyncConnection):  # a connection made just too late
            await value.close()

    async def _drop_if_broken(self, exc: BaseException) -> None:
        conn = self._conn
        if conn is None:
            return
        if isinstance(exc, TimeoutError | OSError) or conn.closed or conn.broken:
            self._conn = None
            self._tables.clear()
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    def _unreachable(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"replica {self.name!r}: the target did not answer within {self._timeout:g} s"
        if isinstance(exc, psycopg.Error) and exc.sqlstate is not None:
            return f"replica {self.name!r}: [{exc.sqlstate}] {_one_line(exc)}"
        return f"replica {self.name!r}: target unreachable: {_one_line(exc)}"

    # -- one source transaction -------------------------------------------------------------

    async def _apply(self, conn: Conn, events: Sequence[ChangeEvent]) -> PermanentSinkError | None:
        """Applies one source transaction; None, a permanent error, or raises (retryable)."""
        for attempt in (1, 2):
            touched: set[QualifiedName] = set()
            try:
                await self._bounded(self._plan_and_execute(conn, events, touched))
                return None
            except _Refused as exc:
                self._forget(touched)
                return PermanentSinkError(f"replica {self.name!r}: {exc}")
            except psycopg.Error as exc:
                self._forget(touched)
                if _retryable(exc) or conn.closed or conn.broken:
                    raise
                if attempt == 1 and isinstance(
                    exc, pg_errors.UndefinedTable | pg_errors.UndefinedColumn
                ):
                    continue  # the cached shape was stale (changed behind our back): re-read
                return PermanentSinkError(self._refusal(exc, events))
            except BaseException:
                self._forget(touched)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _plan_and_execute(
        self, conn: Conn, events: Sequence[ChangeEvent], touched: set[QualifiedName]
    ) -> None:
        plan = await self._plan(conn, events, touched)
        if plan.runs:
            await self._execute(conn, plan)

    def _refusal(self, exc: psycopg.Error, events: Sequence[ChangeEvent]) -> str:
        diag = exc.diag
        where = f"{diag.schema_name}.{diag.table_name}: " if diag.table_name else ""
        xid = events[0].xid if events else None
        txn = f"transaction {xid}" if xid is not None else "transaction"
        text = _one_line(exc)
        if isinstance(exc, pg_errors.InvalidColumnReference) and "ON CONFLICT" in text:
            tables = sorted({".".join(self._target(e)) for e in events})
            text = (
                f"{', '.join(tables)}: no primary key or unique index on the event's key"
                " columns, which the replica upserts on"
            )
        state = f"[{exc.sqlstate}] " if exc.sqlstate else ""
        return f"replica {self.name!r}: {txn} not applied: {state}{where}{text}"

    async def _execute(self, conn: Conn, plan: _Plan) -> None:
        async with conn.pipeline(), conn.transaction():
            cur = conn.cursor()
            for statement, rows in plan.runs:
                if len(rows) == 1:
                    await cur.execute(statement, rows[0])
                else:
                    await cur.executemany(statement, rows)

    def _forget(self, names: set[QualifiedName]) -> None:
        for name in names:
            self._tables.pop(name, None)

    # -- planning ---------------------------------------------------------------------------

    def _target(self, e: ChangeEvent) -> QualifiedName:
        mapped = self.settings.table_map.get((e.schema, e.table))
        if mapped is not None:
            return mapped
        return (self.settings.schema or e.schema or "public", e.table)

    async def _table(self, conn: Conn, name: QualifiedName) -> _Table:
        table = self._tables.get(name)
        if table is None:
            cur = await conn.execute(_TABLE_QUERY, {"schema": name[0], "table": name[1]})
            rows = await cur.fetchall()
            columns = {str(r[2]): str(r[3]) for r in rows if r[2] is not None}
            generated = frozenset(str(r[2]) for r in rows if r[2] is not None and r[4])
            table = _Table(name[0], name[1], bool(rows[0][0]), bool(rows[0][1]), columns, generated)
            self._tables[name] = table
        return table

    async def _plan(
        self, conn: Conn, events: Sequence[ChangeEvent], touched: set[QualifiedName]
    ) -> _Plan:
        plan = _Plan()
        create = self.settings.create_tables
        for e in events:
            op = e.op
            if op == "message":
                continue
            target = self._target(e)
            touched.add(target)
            table = await self._table(conn, target)
            if op == "schema":
                if self.settings.add_columns and table.exists:
                    await self._add_columns(conn, table, _columns_after(e.meta), plan)
                continue
            if not table.exists and (op in ("truncate", "delete", "gap") or not create):
                if create:
                    continue  # nothing there to empty or delete from
                raise _Refused(
                    f"target table {table.qualified} does not exist; create it or set"
                    " create_tables = true"
                )
            if op in ("truncate", "gap"):
                # A gap: changes in some range were lost, so rows deleted then would stay
                # here for ever; the table is emptied, and the 'read' events that follow
                # (the source table read again) fill it with what exists now.
                statement = table.other.get("truncate")
                if statement is None:
                    statement = self._sql(conn, sql.SQL("TRUNCATE {}").format(_ident(*target)))
                    table.other["truncate"] = statement
                plan.add(statement, ())
                continue
            keys = tuple(e.key)
            if not keys:
                raise _Refused(
                    f"{e.qualified_table}: event {e.event_id} has no key; a replica needs"
                    " key columns to apply it"
                )
            if op == "delete":
                plan.add(self._delete(conn, table, keys), self._delete_key(e, keys))
                continue
            image = e.new
            if image is None:
                raise _Refused(f"{e.qualified_table}: {op} event {e.event_id} has no new row")
            texts = image.texts
            unchanged = image.unchanged_columns() if UNCHANGED_TOAST in texts else ()
            signature = (image.shape.names, keys, unchanged)
            write = table.writes.get(signature)
            if write is None:
                write = await self._prepare_write(conn, table, e, image, keys, unchanged, plan)
            old_key = self._moved_from(e, image, keys) if op == "update" else None
            statement, indexes = write
            values = texts if indexes is None else tuple(texts[i] for i in indexes)
            if old_key is not None and unchanged:
                carry = self._carry(conn, table, image, keys, unchanged)
                if carry is not None:
                    plan.add(carry, (*cast(Params, values), *old_key))
            plan.add(statement, cast(Params, values))
            if old_key is not None:
                plan.add(self._delete(conn, table, keys), old_key)
        return plan

    @staticmethod
    def _sql(conn: Conn, composed: sql.Composable) -> bytes:
        return composed.as_bytes(conn)

    async def _prepare_write(
        self,
        conn: Conn,
        table: _Table,
        e: ChangeEvent,
        image: RowImage,
        keys: tuple[str, ...],
        unchanged: tuple[str, ...],
        plan: _Plan,
    ) -> tuple[bytes, tuple[int, ...] | None]:
        """The upsert of rows of this shape, after planning what the table lacks for it."""
        names = image.shape.names
        missing_keys = [k for k in keys if k not in image.shape]
        if missing_keys:
            raise _Refused(
                f"{e.qualified_table}: event {e.event_id} lacks key column(s)"
                f" {', '.join(missing_keys)} in its row"
            )
        if not table.exists:
            await self._create_table(conn, table, image.shape.columns, keys, plan)
        missing = [c for c in image.shape.columns if c.name not in table.columns]
        if missing:
            if not self.settings.add_columns:
                raise _Refused(
                    f"target table {table.qualified} lacks column(s)"
                    f" {', '.join(c.name for c in missing)}; add them or set add_columns = true"
                )
            await self._add_columns(conn, table, missing, plan)
        indexes = tuple(
            i for i, n in enumerate(names) if n not in unchanged and n not in table.generated
        )
        columns = [names[i] for i in indexes]
        statement = self._sql(conn, self._upsert_sql(table, columns, keys))
        write = (statement, None if len(indexes) == len(names) else indexes)
        table.writes[(names, keys, unchanged)] = write
        return write

    def _upsert_sql(
        self, table: _Table, columns: Sequence[str], keys: Sequence[str]
    ) -> sql.Composed:
        updates = [c for c in columns if c not in keys]
        action: sql.Composable
        if updates:
            action = sql.SQL("DO UPDATE SET {}").format(
                _COMMA.join(sql.SQL("{0} = EXCLUDED.{0}").format(_ident(c)) for c in updates)
            )
        else:
            action = sql.SQL("DO NOTHING")
        return sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {}").format(
            _ident(table.schema, table.name),
            _COMMA.join(_ident(c) for c in columns),
            _COMMA.join(sql.SQL("%s::{}").format(_type(table.columns[c])) for c in columns),
            _COMMA.join(_ident(k) for k in keys),
            action,
        )

    def _key_match(
        self, table: _Table, keys: Sequence[str], alias: str | None = None
    ) -> sql.Composed:
        missing = [k for k in keys if k not in table.columns]
        if missing:
            raise _Refused(
                f"target table {table.qualified} lacks key column(s) {', '.join(missing)}"
            )
        return _AND.join(
            sql.SQL("{} = %s::{}").format(
                _ident(alias, k) if alias else _ident(k), _type(table.columns[k])
            )
            for k in keys
        )

    def _delete(self, conn: Conn, table: _Table, keys: tuple[str, ...]) -> bytes:
        statement = table.deletes.get(keys)
        if statement is None:
            statement = self._sql(
                conn,
                sql.SQL("DELETE FROM {} WHERE {}").format(
                    _ident(table.schema, table.name), self._key_match(table, keys)
                ),
            )
            table.deletes[keys] = statement
        return statement

    def _carry(
        self,
        conn: Conn,
        table: _Table,
        image: RowImage,
        keys: tuple[str, ...],
        unchanged: tuple[str, ...],
    ) -> bytes | None:
        """For an update that moved its row and left TOAST values unchanged: the new key's
        row gets the written values plus the unchanged ones from the old key's row at the
        target (when that row is there; the plain upsert that follows covers the rest)."""
        signature = ("carry", image.shape.names, keys, unchanged)
        if signature in table.other:
            return table.other[signature] or None
        names = image.shape.names
        written = [n for n in names if n not in unchanged and n not in table.generated]
        carried = [n for n in unchanged if n in table.columns and n not in table.generated]
        if not carried:
            table.other[signature] = b""
            return None
        updates = [c for c in written if c not in keys] + carried
        statement = self._sql(
            conn,
            sql.SQL(
                "INSERT INTO {t} ({cols}) SELECT {vals} FROM {t} AS {o} WHERE {match}"
                " ON CONFLICT ({keys}) DO UPDATE SET {set}"
            ).format(
                t=_ident(table.schema, table.name),
                cols=_COMMA.join(_ident(c) for c in [*written, *carried]),
                vals=_COMMA.join(
                    [
                        *(sql.SQL("%s::{}").format(_type(table.columns[c])) for c in written),
                        *(_ident("o", c) for c in carried),
                    ]
                ),
                o=_ident("o"),
                match=self._key_match(table, keys, alias="o"),
                keys=_COMMA.join(_ident(k) for k in keys),
                set=_COMMA.join(sql.SQL("{0} = EXCLUDED.{0}").format(_ident(c)) for c in updates),
            ),
        )
        table.other[signature] = statement
        return statement

    def _delete_key(self, e: ChangeEvent, keys: tuple[str, ...]) -> tuple[str | None, ...]:
        old = e.old
        out = []
        for k in keys:
            text = old.text(k) if old is not None and k in old.shape else None
            out.append(_text(e.key[k]) if text is None or isinstance(text, Unchanged) else text)
        return tuple(out)

    @staticmethod
    def _moved_from(
        e: ChangeEvent, image: RowImage, keys: tuple[str, ...]
    ) -> tuple[str | None, ...] | None:
        """The old key's texts when the update moved the row to another key, else None."""
        old_key = e.meta.get("old_key") if e.meta else None
        if isinstance(old_key, Mapping) and all(k in old_key for k in keys):
            old = tuple(_text(old_key[k]) for k in keys)
        elif e.old is not None and all(k in e.old.shape for k in keys):
            texts = [e.old.text(k) for k in keys]
            if any(isinstance(t, Unchanged) for t in texts):
                return None
            old = cast(tuple[str | None, ...], tuple(texts))
        else:
            return None
        new = tuple(_text(image.text(k)) for k in keys)
        return old if old != new else None

    # -- the target's shape -----------------------------------------------------------------

    async def _resolve_types(
        self, conn: Conn, table: _Table, specs: Sequence[ColumnSpec]
    ) -> list[str]:
        parts = [_type_parts(s.type_name) for s in specs]
        cur = await conn.execute(
            _TYPES_QUERY,
            {
                "oids": [s.type_oid if 0 < s.type_oid < _FIRST_USER_OID else 0 for s in specs],
                "schemas": [p[0] for p in parts],
                "names": [p[1] for p in parts],
                "arrays": [p[2] for p in parts],
            },
        )
        types = [r[0] for r in await cur.fetchall()]
        unknown = [
            f"{s.name} ({s.type_name})" for s, t in zip(specs, types, strict=True) if t is None
        ]
        if unknown:
            raise _Refused(
                f"cannot add column(s) {', '.join(unknown)} to {table.qualified}: no such type at"
                " the target"
            )
        return [str(t) for t in types]

    async def _create_table(
        self,
        conn: Conn,
        table: _Table,
        specs: Sequence[ColumnSpec],
        keys: tuple[str, ...],
        plan: _Plan,
    ) -> None:
        types = await self._resolve_types(conn, table, specs)
        if not table.schema_exists:
            plan.add(
                self._sql(
                    conn, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(_ident(table.schema))
                ),
                (),
            )
        columns = [
            sql.SQL("{} {}").format(_ident(s.name), _type(t))
            for s, t in zip(specs, types, strict=True)
        ]
        columns.append(sql.SQL("PRIMARY KEY ({})").format(_COMMA.join(_ident(k) for k in keys)))
        plan.add(
            self._sql(
                conn,
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                    _ident(table.schema, table.name), _COMMA.join(columns)
                ),
            ),
            (),
        )
        table.schema_exists = table.exists = True
        table.columns = {s.name: t for s, t in zip(specs, types, strict=True)}

    async def _add_columns(
        self, conn: Conn, table: _Table, specs: Sequence[ColumnSpec], plan: _Plan
    ) -> None:
        specs = [s for s in specs if s.name not in table.columns]
        if not specs:
            return
        types = await self._resolve_types(conn, table, specs)
        plan.add(
            self._sql(
                conn,
                sql.SQL("ALTER TABLE {} {}").format(
                    _ident(table.schema, table.name),
                    _COMMA.join(
                        sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(_ident(s.name), _type(t))
                        for s, t in zip(specs, types, strict=True)
                    ),
                ),
            ),
            (),
        )
        for s, t in zip(specs, types, strict=True):
            table.columns[s.name] = t


def _columns_after(meta: Mapping[str, Any]) -> list[ColumnSpec]:
    """The columns a ``schema`` event says the table has now (none if it does not say)."""
    columns = meta.get("columns_after") if meta else None
    oids = meta.get("type_oids_after") if meta else None
    if not isinstance(columns, list):
        return []
    if not isinstance(oids, list) or len(oids) != len(columns):
        oids = [0] * len(columns)
    out = []
    for column, oid in zip(columns, oids, strict=True):
        if (
            isinstance(column, list | tuple)
            and len(column) == 2
            and all(isinstance(p, str) for p in column)
        ):
            out.append(ColumnSpec(column[0], oid if isinstance(oid, int) else 0, column[1]))
    return out


def from_config(config: SinkConfig) -> ReplicaSink:
    options = Options(config.name, config.kind, config.options)
    dsn = options.text("dsn", required=True)
    assert dsn is not None
    schema = options.text("schema")
    table_map = options.mapping("table_map")
    create_tables = options.boolean("create_tables", False)
    add_columns = options.boolean("add_columns", True)
    timeout = options.number("timeout", 60.0)
    options.check_unknown()

    def fail(message: str) -> ConfigError:
        return ConfigError(f"sink {config.name!r} (replica): {message}")

    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise fail("option 'dsn' is not a valid connection string or URI") from None
    if schema is not None and not schema:
        raise fail("option 'schema' must not be empty")
    mapping: dict[QualifiedName, QualifiedName] = {}
    for source, target in table_map.items():
        parsed_source, parsed_target = parse_qualified(source), parse_qualified(target)
        if parsed_source is None or parsed_target is None:
            bad = source if parsed_source is None else target
            raise fail(
                f"table_map entry {bad!r} must be schema.table (double-quote a name that"
                " holds a dot or a quote)"
            )
        mapping[parsed_source] = parsed_target
    return ReplicaSink(
        config.name,
        ReplicaSettings(
            dsn=dsn,
            schema=schema,
            table_map=mapping,
            create_tables=create_tables,
            add_columns=add_columns,
            timeout=timeout,
        ),
    )


__all__ = ["ReplicaSettings", "ReplicaSink", "from_config", "parse_qualified"]
