"""The change log: appending batches of change events, and reading them back in order.

Appending is the capture hot path, so a batch costs a fixed handful of round trips
whatever its size: the events are COPYed into a temporary staging table, and a few
set-based statements (sent as one pipeline) store the batch's row shapes, complete
updates that lack their old row from the log itself, and insert events and field rows
with one ``INSERT ... SELECT ... ON CONFLICT (event_id) DO NOTHING``. The last makes a
replayed batch harmless, which is what exactly-once into the log rests on.

Batches that need none of that set-based work (nothing to complete from the log:
inserts, deletes, truncates, schema events, snapshot reads, and updates that carry both
rows whole, as snapshot runs, trigger capture and REPLICA IDENTITY FULL send them) are
COPYed straight into ``events`` instead, inside a savepoint, with their updates' field
rows made in Python; a duplicate ``event_id`` rolls back to it and the batch takes the
idempotent path. See ``ChangeLog.append`` for why that is sound and what it saves.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, LiteralString, NamedTuple, cast

import psycopg
from psycopg import pq, sql
from psycopg.rows import TupleRow, tuple_row
from psycopg.types.json import Jsonb

from pgherald.events.model import (
    UNCHANGED_TOAST,
    CaptureMethod,
    ChangeEvent,
    ColumnSpec,
    OldValuesSource,
    Operation,
    RowImage,
    RowShape,
    Text,
    TypedLoader,
    Unchanged,
)
from pgherald.store import copytext as ct
from pgherald.store.queries import query
from pgherald.store.session import (
    DEFAULT_SCHEMA,
    check_schema_name,
    enter_sql,
    in_schema,
    store_errors,
    transaction_for,
)


class StoredEvent(NamedTuple):
    """An event as the log holds it: its log id (the log's order) and the event."""

    id: int
    event: ChangeEvent


@dataclass(frozen=True, slots=True)
class _ShapeInfo:
    shape: RowShape  # held so that the id() it is cached under is never reused
    digest: str
    columns: list[list[Any]]


def shape_columns(shape: RowShape) -> list[list[Any]]:
    """The shape as stored: an ordered ``[name, type_oid, type_name]`` list."""
    return [[c.name, c.type_oid, c.type_name] for c in shape.columns]


def shape_digest(columns: list[list[Any]]) -> str:
    """A digest that names a shape: same columns, types and order, same digest."""
    canonical = _COMPACT.encode(columns)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def shape_from_columns(columns: Sequence[Sequence[Any]]) -> RowShape:
    return RowShape(tuple(ColumnSpec(str(n), int(oid), str(tn)) for n, oid, tn in columns))


_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_META: Final = json.JSONEncoder(ensure_ascii=False, default=str)
_COPY_CHUNK: Final = 1000


# What the JSON encoder escapes in a string (with ensure_ascii=False): nothing else.
_JSON_SPECIAL: Final = re.compile(r'["\\\x00-\x1f]')


def row_key_of(key: Mapping[str, Any]) -> str | None:
    """The key columns' texts as a compact JSON array, in key order; ``None`` without a key.

    Byte for byte what ``json`` with compact separators writes (rows are matched by it),
    without the encoder's set-up for the usual texts that need no escaping.
    """
    if not key:
        return None
    parts = []
    for v in key.values():
        if v is None:
            parts.append("null")
            continue
        text = v if isinstance(v, str) else str(v)
        parts.append(_COMPACT.encode(text) if _JSON_SPECIAL.search(text) else f'"{text}"')
    return "[" + ",".join(parts) + "]"


def _json_dumps(value: Any) -> str:
    return _META.encode(value)


def _texts(image: RowImage) -> tuple[list[str | None], list[str] | None]:
    """The image's texts with NULL for unchanged TOAST, and the names of those columns."""
    texts = image.texts
    if UNCHANGED_TOAST not in texts:
        return cast(list[str | None], list(texts)), None
    names = image.shape.names
    out: list[str | None] = []
    unchanged: list[str] = []
    for i, t in enumerate(texts):
        if isinstance(t, Unchanged):
            out.append(None)
            unchanged.append(names[i])
        else:
            out.append(t)
    return out, unchanged


def _old_row_key(event: ChangeEvent) -> str | None:
    """The row key an update moved its row from, if it moved it (``None`` otherwise).

    pgoutput's old key tuple (``meta["old_key"]``) says it under REPLICA IDENTITY DEFAULT and
    INDEX; a whole old row (FULL, triggers) says it with its key columns.
    """
    key = event.key
    if not key:
        return None
    old_key = event.meta.get("old_key") if event.meta else None
    if isinstance(old_key, Mapping) and all(name in old_key for name in key):
        moved = {name: old_key[name] for name in key}
    elif event.old is not None and all(name in event.old.shape for name in key):
        moved = {name: event.old.text(name) for name in key}
        if any(isinstance(v, Unchanged) for v in moved.values()):
            return None
    else:
        return None
    if moved == dict(key):
        return None
    return row_key_of(moved)


def _key_changed(event: ChangeEvent) -> bool:
    """Whether an update moved the row to another key (its previous version is elsewhere)."""
    old_key = event.meta.get("old_key") if event.meta else None
    if isinstance(old_key, Mapping) and dict(old_key) != dict(event.key):
        return True
    old = event.old
    if old is None or not event.key:
        return False
    for name, value in event.key.items():
        if name in old.shape:
            text = old.text(name)
            if text is not None and not isinstance(text, Unchanged) and text != value:
                return True
    return False


class _DirectLines:
    """Writes events as COPY text lines of ``events`` (``copy_events``), for the direct path.

    The parts that repeat are formatted once: events of one watch share watch, table and
    key column names; events of one transaction share xid, position and commit time; the
    capture time is shared even more widely. The logical source hands over the very same
    objects, so an identity test finds them; anything else is only slower, never wrong.
    """

    __slots__ = ("_ca", "_ca_text", "_commit", "_ct", "_heads", "_pos", "_shape_ids", "_xid")

    def __init__(self, shape_ids: dict[int, str]) -> None:
        self._shape_ids = shape_ids  # id(RowShape) -> shape id as text
        self._heads: dict[tuple[str, str, str, str, tuple[str, ...]], tuple[str, str]] = {}
        self._xid: int | None = None
        self._pos: str | None = None
        self._ct: datetime | None = None
        self._commit = ""
        self._ca: datetime | None = None
        self._ca_text = ""

    def line(self, e: ChangeEvent) -> str:
        key = e.key
        head_key = (e.watch, e.op, e.schema, e.table, tuple(key))
        found = self._heads.get(head_key)
        if found is None:
            head = "\t".join((ct.text(e.watch), ct.text(e.op), ct.text(e.schema), ct.text(e.table)))
            found = self._heads[head_key] = (head, ct.text_array(list(key)))
        if not (e.commit_time is self._ct and e.position == self._pos and e.xid == self._xid):
            self._ct, self._pos, self._xid = e.commit_time, e.position, e.xid
            self._commit = (
                f"{ct.integer(e.xid)}\t{ct.text(e.position)}\t{ct.timestamptz(e.commit_time)}"
            )
        if e.captured_at is not self._ca:
            self._ca = e.captured_at
            self._ca_text = ct.timestamptz(e.captured_at)
        shape_id = old_shape_id = new_values = unchanged = old_values = old_unchanged = ct.NULL
        new, old = e.new, e.old
        if new is not None:
            shape_id = self._shape_ids[id(new.shape)]
            new_values, unchanged = _array_fields(new)
        if old is not None:
            old_id = self._shape_ids[id(old.shape)]
            if new is None:
                shape_id = old_id
            elif old_id != shape_id:
                old_shape_id = old_id
            old_values, old_unchanged = _array_fields(old)
        if len(key) == 1:
            (value,) = key.values()
            # A JSON string without escapes holds no character that COPY escapes either.
            if type(value) is str and not _JSON_SPECIAL.search(value):
                row_key = f'["{value}"]'
            else:
                row_key = ct.text(row_key_of(key))
        else:
            row_key = ct.text(row_key_of(key))
        return (
            f"{ct.text(e.event_id)}\t{found[0]}\t{row_key}\t{found[1]}\t"
            f"{shape_id}\t{old_shape_id}\t{old_values}\t{new_values}\t{unchanged}\t"
            f"{old_unchanged}\t"
            f"{ct.text_array(list(dict.fromkeys(e.changed))) if e.changed else '{}'}\t"
            f"{self._commit}\t{self._ca_text}\t{ct.text(e.method)}\t{e.seq:d}\t"
            f"{ct.text(e.old_values)}\t{ct.text(_json_dumps(dict(e.meta))) if e.meta else '{}'}"
        )


def _array_fields(image: RowImage) -> tuple[str, str]:
    """An image's values and its unchanged-TOAST column names as COPY ``text[]`` fields."""
    texts = image.texts
    if UNCHANGED_TOAST in texts:
        values, unchanged = _texts(image)
        return ct.text_array(values), ct.text_array(unchanged)
    return ct.text_array(texts), ct.NULL  # type: ignore[arg-type]  # no UNCHANGED_TOAST


def _whole_update(e: ChangeEvent) -> bool:
    """An update that carries both rows whole (no unchanged TOAST value on either side):
    nothing to complete from the log, so it can take the direct path, as snapshot
    updates, trigger capture's and REPLICA IDENTITY FULL's always can."""
    old, new = e.old, e.new
    return (
        old is not None
        and new is not None
        and UNCHANGED_TOAST not in new.texts
        and UNCHANGED_TOAST not in old.texts
    )


class _Fields:
    """The field rows of a direct batch's updates, as ``insert_events`` makes them from the
    stored rows: one per changed column (first mention), with the column's text in the old
    row and in the new one (first column of that name; NULL where the row lacks it)."""

    __slots__ = ("ids", "names", "news", "olds", "positions")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.names: list[str] = []
        self.olds: list[str | None] = []
        self.news: list[str | None] = []
        self.positions: dict[int, tuple[RowShape, dict[str, int]]] = {}

    def _positions(self, shape: RowShape) -> dict[str, int]:
        found = self.positions.get(id(shape))
        if found is not None and found[0] is shape:
            return found[1]
        names = shape.names
        first = {n: i for i, n in reversed(list(enumerate(names)))}  # array_position
        self.positions[id(shape)] = (shape, first)
        return first

    def add(self, log_id: int, e: ChangeEvent) -> None:
        old, new = e.old, e.new
        assert old is not None and new is not None
        old_at, new_at = self._positions(old.shape), self._positions(new.shape)
        old_texts, new_texts = old.texts, new.texts
        event = str(log_id)
        for name in dict.fromkeys(e.changed) if len(e.changed) > 1 else e.changed:
            i, j = old_at.get(name), new_at.get(name)
            self.ids.append(event)
            self.names.append(name)
            self.olds.append(None if i is None else cast(str | None, old_texts[i]))
            self.news.append(None if j is None else cast(str | None, new_texts[j]))

    def params(self) -> dict[str, str]:
        return {
            "ids": "{" + ",".join(self.ids) + "}",
            "names": ct.array_literal(self.names),
            "olds": ct.array_literal(self.olds),
            "news": ct.array_literal(self.news),
        }


def enter_statements(
    conn: psycopg.Connection[Any], schema: str
) -> list[tuple[LiteralString, dict[str, Any]]]:
    """``enter_sql`` as single statements with parameters, to send in a pipeline.

    ``query("restore_search_path")`` puts the caller's path back, as after ``enter_sql``.
    """
    check_schema_name(schema)
    path = sql.Identifier(schema).as_string(conn)
    return [(query("save_search_path"), {}), (query("set_search_path"), {"path": path})]


Statement = tuple[LiteralString, Mapping[str, Any]]
"""A store query and its parameters, for ``ChangeLog.append(then=...)``."""


_NOTIFY_MAX_BYTES: Final = 63  # PostgreSQL's limit for a channel name (NAMEDATALEN - 1)


def changes_channel(schema: str) -> str:
    """The NOTIFY channel on which the change log of store ``schema`` announces appends.

    ``LISTEN`` on it (quoted as an identifier) to tail the log without polling: each
    transaction that appended sends one notification when it commits, whose payload is
    the highest log id it appended (as text). It only wakes readers up; they read
    ``id > last_seen`` as always, which the append lock keeps gap-free. The channel is
    ``<schema>_changes``, or a digest of the schema's name where that would be too long.
    """
    check_schema_name(schema)
    channel = f"{schema}_changes"
    if len(channel.encode("utf-8")) <= _NOTIFY_MAX_BYTES:
        return channel
    return "pgherald_changes_" + hashlib.sha256(schema.encode("utf-8")).hexdigest()[:16]


_LOCK_AND_STAGE: Final = query("append_lock") + ";\n" + query("create_stage")
_LOCK_AND_SAVEPOINT: Final = query("append_lock") + ";\n" + query("direct_begin")


def _finish(
    conn: psycopg.Connection[Any],
    then: Sequence[Statement],
    commit: bool,
    notify: str | None = None,
    restore: LiteralString = query("restore_search_path"),
) -> None:
    """The end of an append's last pipeline: the caller's statements (with the store's
    search path), the wake-up NOTIFY on channel ``notify`` if any, then the path put back,
    or the transaction committed, which puts back everything set locally anyway."""
    for statement in then:
        conn.execute(*statement)
    if notify is not None:
        conn.execute(query("notify_appended"), {"channel": notify})
    if commit:
        conn.commit()
    else:
        conn.execute(restore)


class ChangeLog:
    """The change log of one store schema, used through one connection.

    Row shapes are remembered per instance (so per connection), keyed by the shape
    object: a batch's thousands of events share a few shapes, whose digests are computed
    once. Shapes are matched to their ids inside PostgreSQL by digest, in the same
    transaction as the events, so a rolled-back batch can never leave the instance
    holding the id of a shape row that no longer exists.
    """

    def __init__(self, conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> None:
        check_schema_name(schema)
        self.conn = conn
        self.schema = schema
        self._shapes_by_obj: dict[int, _ShapeInfo] = {}
        self._committed_shape_ids: dict[str, str] = {}  # digest -> id, seen committed
        self._shapes_by_id: dict[int, RowShape] = {}
        self.channel = changes_channel(schema)
        self._unannounced = False  # appended with notify=False since the last NOTIFY

    # -- appending ---------------------------------------------------------------------

    def _shape(self, shape: RowShape) -> _ShapeInfo:
        info = self._shapes_by_obj.get(id(shape))
        if info is not None and info.shape is shape:
            return info
        columns = shape_columns(shape)
        info = _ShapeInfo(shape, shape_digest(columns), columns)
        self._shapes_by_obj[id(shape)] = info
        return info

    def _stage_line(
        self, ord_: int, e: ChangeEvent, batch_shapes: dict[str, Any]
    ) -> tuple[str, bool, str | None, bool]:
        """The event as one line of COPY text for the staging table; whether it needs
        filling from the log (``fill_from_log``); the key it moved its row from, if it is
        an update that did; and whether it needs filling from there (``fill_key_changes``)."""
        old, new = e.old, e.new
        shape_digest_: str | None = None
        old_shape_digest: str | None = None
        old_values = new_values = unchanged = old_unchanged = None
        if new is not None:
            info = self._shape(new.shape)
            shape_digest_ = info.digest
            batch_shapes[info.digest] = info.columns
            new_values, unchanged = _texts(new)
        if old is not None:
            info = self._shape(old.shape)
            batch_shapes[info.digest] = info.columns
            if shape_digest_ is None:
                shape_digest_ = info.digest
            elif info.digest != shape_digest_:
                old_shape_digest = info.digest
            old_values, old_unchanged = _texts(old)
        key_changed = False
        moved_from: str | None = None
        if e.op == "update":
            key_changed = _key_changed(e)
            if key_changed:
                moved_from = _old_row_key(e)
            if unchanged and old is not None and new is not None and old_values is not None:
                # The old row (REPLICA IDENTITY FULL, triggers) fills unchanged TOAST itself.
                old_unch = set(old_unchanged or ())
                still: list[str] = []
                for name in unchanged:
                    if name in old.shape and name not in old_unch:
                        assert new_values is not None
                        new_values[new.shape.index(name)] = old_values[old.shape.index(name)]
                    else:
                        still.append(name)
                unchanged = still or None
        row_key = row_key_of(e.key)
        fill = (
            e.op == "update"
            and row_key is not None
            and new is not None
            and not key_changed
            and (old is None or bool(unchanged))
        )
        meta = _json_dumps(dict(e.meta)) if e.meta else "{}"
        line = "\t".join(
            (
                str(ord_),
                ct.text(e.event_id),
                ct.text(e.watch),
                ct.text(e.op),
                ct.text(e.schema),
                ct.text(e.table),
                ct.text(row_key),
                ct.text_array(list(e.key)),
                ct.text(shape_digest_),
                ct.text(old_shape_digest),
                ct.text_array(old_values),
                ct.text_array(new_values),
                ct.text_array(unchanged),
                ct.text_array(old_unchanged),
                ct.text_array(list(dict.fromkeys(e.changed))),
                ct.integer(e.xid),
                ct.text(e.position),
                ct.timestamptz(e.commit_time),
                ct.timestamptz(e.captured_at),
                ct.text(e.method),
                ct.integer(e.seq),
                ct.text(e.old_values),
                ct.text(meta),
                ct.boolean(fill),
                ct.text(moved_from),
            )
        )
        return line, fill, moved_from, moved_from is not None and bool(unchanged)

    def append(
        self,
        events: Sequence[ChangeEvent],
        then: Sequence[Statement] = (),
        commit: bool = False,
        notify: bool = True,
    ) -> int:
        """Stores a batch in the caller's transaction (never commits); returns how many were new.

        Idempotent by ``event_id``: an id already in the log (or earlier in the batch) is
        skipped, and so are its field rows. Updates without their old row (REPLICA IDENTITY
        DEFAULT) or with unchanged TOAST values are completed inside PostgreSQL from the
        previous version of the row (the previous event of the same watch and key in the
        batch, else the latest stored one), and marked ``old_values='change_log'``; where
        no previous version exists the old row stays unknown and unfilled columns are
        kept as ``UNCHANGED_TOAST``. On an autocommit connection the batch is a transaction
        of its own.

        Two ways to store, one result. A batch whose updates (if any) carry both rows
        whole needs nothing from the staging table (nothing to complete from the log; the
        field rows are each changed column's two texts, which Python has), so it is COPYed
        straight into ``events`` inside a savepoint: no staging rows, no join, no ON
        CONFLICT probe, which is most of the server's work per event. That is sound
        because the unique index on ``event_id`` still guards the log: if any event of the
        batch is already there (a replay), the COPY fails with a unique violation, we roll
        back to the savepoint, and the batch takes the idempotent staged path, so a
        duplicate costs time, never correctness. Logical capture only hands over
        transactions newer than its checkpoint, which commits with their events, so for it
        the direct path is the rule and the fallback the exception.

        ``then`` are store queries of the caller's (``(query, params)``, run with the
        store's search path) to send in the pipeline that carries the batch's last
        statements, and ``commit`` ends the caller's transaction there too: logical
        capture stores a batch, its checkpoint and its COMMIT without a round trip of
        their own. ``commit`` needs a connection that is not in autocommit mode.

        Ids become visible in order: an append holds the store's append lock (a
        transaction-level advisory lock) from before it assigns ids until its transaction
        ends, so appenders in concurrent transactions take turns, and a reader that tails
        with ``id > last_seen`` misses nothing. Keep appending transactions short.

        ``notify`` sends the wake-up NOTIFY (``changes_channel``), delivered at commit, for
        what this transaction appended. A transaction that appends several times should
        pass ``notify=False`` to all but its last append (one with ``commit=True`` does
        for all), so that it sends one notification, not one per batch.
        """
        announce = self.channel if notify and (events or self._unannounced) else None
        if not events:
            if then or commit or announce:
                with self.conn.pipeline():
                    for statement in enter_statements(self.conn, self.schema):
                        self.conn.execute(*statement)
                    _finish(self.conn, then, commit, announce)
                self._unannounced = False
            return 0
        seen: set[str] = set()
        batch: list[ChangeEvent] = []
        for e in events:
            if e.event_id not in seen:
                seen.add(e.event_id)
                batch.append(e)
        with store_errors(self.schema), transaction_for(self.conn):
            stored: int | None = None
            if all(e.op != "update" or _whole_update(e) for e in batch):
                stored = self._append_direct(batch, then, commit, announce)
            if stored is None:
                stored = self._append_staged(batch, then, commit, announce)
        self._unannounced = announce is None
        return stored

    def _append_staged(
        self,
        batch: list[ChangeEvent],
        then: Sequence[Statement],
        commit: bool,
        notify: str | None,
    ) -> int:
        """The general path: staging table, filling, ``INSERT ... ON CONFLICT DO NOTHING``."""
        conn = self.conn
        batch_shapes: dict[str, Any] = {}
        needs_fill = False
        # Updates that moved a row are completed from its history under the key it had,
        # which may be another such update of this batch: one pass per link of the chain.
        moves: dict[tuple[str, str], int] = {}  # (watch, row key) -> links of moves into it
        move_passes = 0
        conn.execute(enter_sql(self.schema, _LOCK_AND_STAGE))
        with conn.cursor() as cur, cur.copy(query("copy_stage")) as copy:
            chunk: list[str] = []
            for ord_, e in enumerate(batch):
                line, fill, moved_from, fill_moved = self._stage_line(ord_, e, batch_shapes)
                needs_fill = needs_fill or fill
                if moved_from is not None:
                    row_key = row_key_of(e.key)
                    assert row_key is not None
                    links = moves.get((e.watch, moved_from), 0) + 1 if fill_moved else 0
                    moves[(e.watch, row_key)] = links
                    move_passes = max(move_passes, links)
                chunk.append(line)
                if len(chunk) >= _COPY_CHUNK:
                    copy.write("\n".join(chunk) + "\n")
                    chunk.clear()
            if chunk:
                copy.write("\n".join(chunk) + "\n")
        with conn.pipeline():
            conn.execute(
                query("upsert_shapes"),
                {
                    "digests": list(batch_shapes),
                    "columns": [Jsonb(c) for c in batch_shapes.values()],
                },
            )
            for _ in range(move_passes):
                conn.execute(query("fill_key_changes"))
            if needs_fill:
                conn.execute(query("fill_from_log"))
            counted = conn.cursor(row_factory=tuple_row)
            counted.execute(query("insert_events"))
            _finish(conn, then, commit, notify, restore=query("finish_append"))
        result = counted.fetchone()
        return int(result[0]) if result else 0

    def _append_direct(
        self,
        batch: list[ChangeEvent],
        then: Sequence[Statement],
        commit: bool,
        notify: str | None,
    ) -> int | None:
        """COPYs a batch that needs nothing completed straight into ``events``; ``None`` if
        one of its events was there already.

        Three round trips whatever the batch's size: one pipeline (enter the schema, take
        the append lock, set a savepoint, store the batch's shapes and learn their ids,
        reserve the log ids if updates need field rows), COPY, and one pipeline to release
        the savepoint (with the field rows, ``then``, the NOTIFY and the COMMIT, which
        releases it anyway). Round trips count: a busy server answers each after its run
        queue.

        Updates (whole rows on both sides, see ``_whole_update``) name their field rows
        by log id, so a batch with field rows takes its ids from the log's sequence first
        (``reserve_event_ids``, under the append lock) and COPYs them with the events.
        A replay fails the COPY on ``event_id`` as before, so no field row is ever written
        for an event that was not: the staged path then skips the stored ones and their
        fields alike.

        Shape ids that this connection saw committed (``commit=True``) are remembered, so
        that the usual batch, whose shapes are all known, skips storing and looking them
        up (a third of the server's fixed cost of a small batch). Shapes are never
        deleted, so a committed id stays good (the events table has no foreign key to
        check it again per row: migration 10).
        """
        conn = self.conn
        shapes: dict[int, RowShape] = {}
        with_fields = False
        for e in batch:
            if e.new is not None:
                shapes[id(e.new.shape)] = e.new.shape
            if e.old is not None:
                shapes[id(e.old.shape)] = e.old.shape
            if e.changed and e.op == "update":
                with_fields = True
        infos = {key: self._shape(shape) for key, shape in shapes.items()}
        by_digest = {info.digest: info.columns for info in infos.values()}
        known = self._committed_shape_ids
        reserved: psycopg.Cursor[TupleRow] | None = None
        if all(digest in known for digest in by_digest) and not with_fields:
            if conn.info.transaction_status == pq.TransactionStatus.IDLE:
                # psycopg would send BEGIN in a round trip of its own before a simple
                # query; in a pipeline it goes with the statements: one round trip.
                with conn.pipeline():
                    for statement in enter_statements(conn, self.schema):
                        conn.execute(*statement)
                    conn.execute(query("append_lock"))
                    conn.execute(query("direct_begin"))
            else:
                # One simple query, no pipeline: psycopg's pipeline machinery costs more
                # client CPU than the statements cost the server.
                conn.execute(enter_sql(self.schema, _LOCK_AND_SAVEPOINT))
            ids_by_digest = {digest: known[digest] for digest in by_digest}
        else:
            found: psycopg.Cursor[TupleRow] | None = None
            with conn.pipeline():
                for statement in enter_statements(conn, self.schema):
                    conn.execute(*statement)
                conn.execute(query("append_lock"))
                conn.execute(query("direct_begin"))
                if not all(digest in known for digest in by_digest):
                    conn.execute(
                        query("upsert_shapes"),
                        {
                            "digests": list(by_digest),
                            "columns": [Jsonb(c) for c in by_digest.values()],
                        },
                    )
                    found = conn.cursor(row_factory=tuple_row)
                    found.execute(query("shape_ids"), {"digests": list(by_digest)})
                if with_fields:
                    reserved = conn.cursor(row_factory=tuple_row)
                    reserved.execute(query("reserve_event_ids"), {"n": len(batch)})
            if found is None:
                ids_by_digest = {digest: known[digest] for digest in by_digest}
            else:
                rows = found.fetchall()
                ids_by_digest = {str(digest): str(shape_id) for digest, shape_id in rows}
        shape_ids = {key: ids_by_digest[info.digest] for key, info in infos.items()}
        fields: _Fields | None = None
        try:
            with conn.cursor() as cur:
                line = _DirectLines(shape_ids).line
                if reserved is None:
                    with cur.copy(query("copy_events")) as copy:
                        for start in range(0, len(batch), _COPY_CHUNK):
                            chunk = [line(e) for e in batch[start : start + _COPY_CHUNK]]
                            copy.write("\n".join(chunk) + "\n")
                else:
                    log_ids = sorted(int(r[0]) for r in reserved.fetchall())
                    fields = _Fields()
                    with cur.copy(query("copy_events_with_ids")) as copy:
                        for start in range(0, len(batch), _COPY_CHUNK):
                            chunk = []
                            for log_id, e in zip(
                                log_ids[start : start + _COPY_CHUNK],
                                batch[start : start + _COPY_CHUNK],
                                strict=True,
                            ):
                                chunk.append(f"{log_id}\t{line(e)}")
                                if e.changed and e.op == "update":
                                    fields.add(log_id, e)
                            copy.write("\n".join(chunk) + "\n")
        except psycopg.errors.UniqueViolation:
            conn.execute(query("direct_undo"))
            known.clear()
            return None
        with conn.pipeline():
            if fields is not None and fields.ids:
                conn.execute(query("insert_event_fields"), fields.params())
            if not commit:
                conn.execute(query("direct_end"))
            _finish(conn, then, commit, notify)
        if commit:
            known.update(ids_by_digest)
        return len(batch)

    # -- reading -----------------------------------------------------------------------

    def _cursor(self) -> psycopg.Cursor[TupleRow]:
        return self.conn.cursor(row_factory=tuple_row)

    def _load_shapes(self, ids: set[int]) -> None:
        missing = [i for i in ids if i not in self._shapes_by_id]
        if not missing:
            return
        for shape_id, columns in self._cursor().execute(query("get_shapes"), {"ids": missing}):
            self._shapes_by_id[int(shape_id)] = shape_from_columns(columns)

    def read(
        self,
        watch: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
        op: str | None = None,
        loader: TypedLoader | None = None,
    ) -> list[StoredEvent]:
        """Events after log id ``after_id``, in log order.

        Row images hold the stored texts; ``loader`` (e.g. from ``db.types``) makes their
        typed values, and without one the typed values are the texts themselves."""
        params = {"watch": watch, "after_id": after_id, "limit": limit, "op": op}
        name = "read_events" if watch is None else "read_watch_events"
        with in_schema(self.conn, self.schema):
            rows = self._cursor().execute(query(name), params).fetchall()
            return self.stored_events(rows, loader)

    def stored_events(
        self, rows: Sequence[tuple[Any, ...]], loader: TypedLoader | None = None
    ) -> list[StoredEvent]:
        """Events from rows of ``events`` selected as ``read_events`` does (same columns, same
        order), for queries of other parts that join the log (delivery claims)."""
        ids = {r[8] for r in rows if r[8] is not None} | {r[9] for r in rows if r[9] is not None}
        if not ids.issubset(self._shapes_by_id):  # no round trip when all are known
            with in_schema(self.conn, self.schema):
                self._load_shapes(ids)
        return [StoredEvent(int(r[0]), self._event(r, loader)) for r in rows]

    def _image(
        self,
        shape_id: int | None,
        values: list[str | None] | None,
        unchanged: list[str] | None,
        loader: TypedLoader | None,
    ) -> RowImage | None:
        if values is None or shape_id is None:
            return None
        shape = self._shapes_by_id[shape_id]
        texts: list[Text] = list(values)
        for name in unchanged or ():
            texts[shape.index(name)] = UNCHANGED_TOAST
        return RowImage(shape, tuple(texts), loader)

    def _event(self, r: tuple[Any, ...], loader: TypedLoader | None) -> ChangeEvent:
        (
            _id,
            event_id,
            watch,
            op,
            schema_name,
            table_name,
            row_key,
            key_columns,
            shape_id,
            old_shape_id,
            old_values,
            new_values,
            unchanged,
            old_unchanged,
            changed,
            xid,
            position,
            commit_time,
            captured_at,
            method,
            seq,
            old_values_source,
            meta,
        ) = r
        key: dict[str, Any] = {}
        if row_key is not None:
            key = dict(zip(key_columns, json.loads(row_key), strict=True))
        return ChangeEvent(
            event_id=event_id,
            watch=watch,
            op=cast(Operation, op),
            schema=schema_name,
            table=table_name,
            key=key,
            old=self._image(old_shape_id or shape_id, old_values, old_unchanged, loader),
            new=self._image(shape_id, new_values, unchanged, loader),
            changed=tuple(changed or ()),
            xid=xid,
            position=position,
            commit_time=cast(datetime | None, commit_time),
            captured_at=captured_at,
            method=cast(CaptureMethod, method),
            seq=seq,
            old_values=cast(OldValuesSource, old_values_source),
            meta=meta if meta is not None else {},
        )

    def last_id(self) -> int:
        """The log id of the newest event (0 for an empty log): where a reader starts to tail."""
        with in_schema(self.conn, self.schema):
            row = self._cursor().execute(query("last_event_id")).fetchone()
        return int(row[0]) if row else 0

    def find_id(self, event_id: str) -> int | None:
        """The log id of the event with this ``event_id``, if the log has it."""
        with in_schema(self.conn, self.schema):
            row = self._cursor().execute(query("find_event_id"), {"event_id": event_id}).fetchone()
        return int(row[0]) if row else None

    def last_shape(self, watch: str) -> RowShape | None:
        """The row shape of a watch's latest stored full row, so that capture can notice a
        schema change that happened while it was down (``TransactionAssembler.seed_shape``)."""
        with in_schema(self.conn, self.schema):
            row = self._cursor().execute(query("last_watch_shape"), {"watch": watch}).fetchone()
        return shape_from_columns(row[0]) if row else None


__all__ = [
    "ChangeLog",
    "Statement",
    "StoredEvent",
    "changes_channel",
    "enter_statements",
    "row_key_of",
    "shape_digest",
]
