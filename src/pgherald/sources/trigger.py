"""Trigger capture: moving the trigger queue into the change log, exactly once, in order.

Triggers on the watched tables (``trigger_admin``) append each change as jsonb to a queue
table in the store, in the writer's own transaction. This source drains the queue:

1. Claim-and-delete a batch of committed queue rows (``DELETE ... RETURNING``, oldest
   first) into a temporary table, and read each watch's rows back with their values as
   PostgreSQL's text output, typed through the table's row type (``jsonb_populate_record``),
   so trigger events hold the same text as logical ones. One pipeline: one round trip.
2. Turn them into change events (``TriggerAssembler``: no I/O, easy to test).
3. Hand them to the sink, which appends them to the change log and commits *in the same
   transaction* as the delete: a crash before the commit puts the rows back in the queue,
   one after it has them in the log; never both, never neither.

Claim-and-delete never skips a transaction that commits late (as "ids above the last one
seen" would): whatever is committed and still queued is taken. Events of one row keep
commit order because a second writer of a row waits for the first one's row lock before
its trigger takes a queue id. One drainer per queue (an advisory lock) keeps it so.

Waking up: while changes keep coming the source polls every ``busy_poll`` seconds and
writers send no NOTIFY at all (a NOTIFY serialises the commits of all transactions that
send one, which is what makes per-row ``pg_notify`` triggers so costly). After
``idle_after`` seconds without changes it *arms* the wake-up (``trigger_wake.armed``),
so the next writer's trigger sends one NOTIFY, and sleeps until that or a timer that
backs off to ``idle_poll_max``. A NOTIFY that is missed (pgherald was disconnected, or
a writer read the switch just before it was armed) costs latency, never a change: the
queue holds the data and is drained on start, after every reconnect and on the timer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from psycopg import sql

from pgherald.db.connect import connect
from pgherald.db.sqlfiles import ident, named_query
from pgherald.db.types import CANONICAL_SESSION_SETTINGS, TypeRegistry, output_text
from pgherald.errors import CaptureError, ConnectionFailed
from pgherald.events import ChangeEvent
from pgherald.events.model import ColumnSpec, RowImage, RowShape
from pgherald.sources.logical import CaptureSink, describe_shape_change
from pgherald.sources.trigger_admin import wake_channel

log = logging.getLogger("pgherald.trigger")

_FILE = "trigger_capture.sql"


def _q(name: str) -> sql.SQL:
    return sql.SQL(named_query(_FILE, name))


def checkpoint_name(store: str) -> str:
    """The checkpoint under which the trigger source notes the last queue id it moved."""
    return f"trigger:{store}"


@dataclass(frozen=True)
class TriggerWatch:
    """What the trigger source needs to know of one watch."""

    name: str
    schema: str
    table: str
    key_columns: tuple[str, ...]
    columns: tuple[str, ...] | None = None
    ignore_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class TriggerSettings:
    """Tuning and identity of the trigger source of one store."""

    dsn: str
    store: str = "pgherald"
    batch_size: int = 5000
    busy_poll: float = 0.01
    """While changes keep coming: seconds between drains (writers send no NOTIFY then)."""
    idle_after: float = 0.2
    """Seconds without changes after which the wake-up NOTIFY is armed."""
    idle_poll_max: float = 2.0
    """The slow timer: the longest wait between drains, NOTIFY or not."""
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0


class QueueSink(CaptureSink, Protocol):
    """A capture sink whose transaction the source may use to claim the queue rows."""

    def connection(self) -> psycopg.Connection[Any]:
        """The connection of the store transaction that ``commit`` will commit."""

    def commit_selected(
        self,
        rows: sql.Composable,
        params: Mapping[str, Any],
        shapes: Mapping[str, RowShape],
        position: str,
    ) -> int:
        """Stores the events that ``rows`` (a SELECT over what this transaction claimed)
        makes in the server, with ``position`` as the checkpoint, and commits; returns how
        many events it stored. The columns ``rows`` yields are ``store.selected``'s."""


@dataclass(frozen=True)
class ClaimedRow:
    """One queue row as read back: values are text, ``None`` for NULL."""

    id: int
    op: str
    xid: int
    xact_time: datetime
    commit_time: datetime | None
    old_keys: tuple[str, ...] | None  # keys of a row queued before columns were added
    new_keys: tuple[str, ...] | None
    old: tuple[str | None, ...]
    new: tuple[str | None, ...]


@dataclass
class TriggerAssembler:
    """Turns claimed queue rows into change events, and notes shape changes as events.

    ``shapes`` holds, per watch, the shape of the last event made (seeded with the last
    stored one), so a column added or dropped gets a ``schema`` event of its own, as in
    logical capture. ``snapshot``/``restore`` let the source undo a batch that did not
    commit.
    """

    watches: Sequence[TriggerWatch]
    shapes: dict[str, RowShape] = field(default_factory=dict)
    captured_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def snapshot(self) -> dict[str, RowShape]:
        return dict(self.shapes)

    def restore(self, saved: Mapping[str, RowShape]) -> None:
        self.shapes = dict(saved)

    def events(
        self, watch: TriggerWatch, shape: RowShape, rows: Iterable[ClaimedRow]
    ) -> list[tuple[int, ChangeEvent]]:
        """The events of one watch's claimed rows, each with its queue id (for ordering)."""
        out: list[tuple[int, ChangeEvent]] = []
        ignored = set(watch.ignore_columns)
        compare = [n for n in shape.names if n not in ignored]
        for row in rows:
            old = (
                self._image(shape, row.old, row.old_keys)
                if row.op in ("update", "delete")
                else None
            )
            new = (
                self._image(shape, row.new, row.new_keys)
                if row.op in ("insert", "update")
                else None
            )
            image = new if new is not None else old
            if image is not None:
                before = self.shapes.get(watch.name)
                if before is not None and before != image.shape:
                    out.append(
                        (row.id, self._event(watch, row, "schema", {}, None, None, (), "/schema",
                                             describe_shape_change(before, image.shape)))
                    )  # fmt: skip
                self.shapes[watch.name] = image.shape
            meta: dict[str, Any] = {}
            if row.commit_time is None:
                meta["commit_time"] = "transaction start"
            if row.op == "truncate":
                out.append(
                    (row.id, self._event(watch, row, "truncate", {}, None, None, (), "", meta))
                )
                continue
            assert image is not None
            key = _key(watch, image)
            changed: tuple[str, ...] = ()
            if row.op == "update":
                assert old is not None and new is not None
                changed = tuple(
                    n
                    for n in compare
                    if n in old.shape and n in new.shape and old.text(n) != new.text(n)
                )
                if not changed:
                    continue  # only ignored or unwatched columns changed
                old_key = _key(watch, old)
                if old_key != key:
                    meta["old_key"] = old_key
            op: Any = row.op
            out.append((row.id, self._event(watch, row, op, key, old, new, changed, "", meta)))
        return out

    @staticmethod
    def _image(
        shape: RowShape, texts: tuple[str | None, ...], keys: tuple[str, ...] | None
    ) -> RowImage:
        if keys is None:
            return RowImage(shape, texts)
        present = set(keys)
        kept = [i for i, n in enumerate(shape.names) if n in present]
        return RowImage(
            RowShape(tuple(shape.columns[i] for i in kept)), tuple(texts[i] for i in kept)
        )

    def _event(
        self,
        watch: TriggerWatch,
        row: ClaimedRow,
        op: Any,
        key: Mapping[str, Any],
        old: RowImage | None,
        new: RowImage | None,
        changed: tuple[str, ...],
        suffix: str,
        meta: Mapping[str, Any],
    ) -> ChangeEvent:
        return ChangeEvent(
            event_id=f"T/{row.xid}/{row.id}{suffix}",
            watch=watch.name,
            op=op,
            schema=watch.schema,
            table=watch.table,
            key=key,
            old=old,
            new=new,
            changed=changed,
            xid=row.xid,
            position=str(row.id),
            commit_time=row.commit_time or row.xact_time,
            captured_at=self.captured_at,
            method="trigger",
            seq=0,
            old_values="trigger" if old is not None else "none",
            meta=meta,
        )


def _key(watch: TriggerWatch, image: RowImage) -> dict[str, Any]:
    return {k: image.text(k) for k in watch.key_columns if k in image.shape}


_TABLE_CHANGED = (
    psycopg.errors.UndefinedColumn,
    psycopg.errors.UndefinedTable,
    psycopg.errors.DatatypeMismatch,
    psycopg.errors.InvalidTextRepresentation,
)


def _set_local_settings() -> tuple[sql.Composed, dict[str, str]]:
    """One statement that gives the drain transaction the canonical text output settings."""
    parts = []
    params: dict[str, str] = {}
    for i, (name, value) in enumerate(CANONICAL_SESSION_SETTINGS.items()):
        parts.append(sql.SQL("set_config({}, {}, true)").format(
            sql.Placeholder(f"n{i}"), sql.Placeholder(f"v{i}")
        ))  # fmt: skip
        params[f"n{i}"] = name
        params[f"v{i}"] = value
    return sql.SQL("SELECT ") + sql.SQL(", ").join(parts), params


class TriggerSource:
    """Drains the trigger queue of one store into a sink until stopped, reconnecting."""

    def __init__(
        self,
        settings: TriggerSettings,
        watches: Sequence[TriggerWatch],
        known_shapes: Mapping[str, RowShape] | None = None,
        reload: Callable[[], Sequence[TriggerWatch]] | None = None,
        reload_interval: float = 5.0,
    ) -> None:
        self.reload = reload
        self.reload_interval = reload_interval
        self._reloaded = time.monotonic()
        self.settings = settings
        self.watches = list(watches)
        self.assembler = TriggerAssembler(self.watches, dict(known_shapes or {}))
        self.connected = threading.Event()
        self.leader = threading.Event()
        self.moved = 0
        self.moved_in_sql = 0
        self.drains = 0
        self.in_sql = True
        """Whether claimed rows may become events in the server (``_selected``); tests turn
        it off to compare with the Python path, which is always right."""
        self.notifies = 0
        self._columns: dict[str, list[ColumnSpec]] = {}
        self._registry: TypeRegistry | None = None
        self._settings_sql = _set_local_settings()
        self.channel = wake_channel(settings.store)
        self._ident = sql.Identifier(settings.store)
        self.on_batch: Callable[[int], None] | None = None

    # -- the session loop ----------------------------------------------------------------

    def run(self, sink: QueueSink, stop: threading.Event) -> None:
        """Drains until ``stop`` is set; a lost connection is retried with backoff.

        ``connect`` turns a refused connection (the server restarting or down) into
        ``ConnectionFailed``, which is retried too: the configuration was proved when the
        composition root connected first. The backoff starts again from ``reconnect_min``
        after a session that got going, so one restart a day never waits 30 s.
        """
        delay = self.settings.reconnect_min
        while not stop.is_set():
            try:
                self._session(sink, stop)
                return
            except (psycopg.OperationalError, ConnectionFailed) as e:
                if self.connected.is_set():
                    delay = self.settings.reconnect_min
                self.connected.clear()
                self.leader.clear()
                sink.rollback()
                wait = delay * (0.5 + random.random())
                log.warning(
                    "trigger capture lost its connection (%s); retrying in %.1f s",
                    str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                    wait,
                )
                stop.wait(wait)
                delay = min(delay * 2, self.settings.reconnect_max)

    def _session(self, sink: QueueSink, stop: threading.Event) -> None:
        with connect(
            self.settings.dsn, autocommit=True, application_name="pgherald-trigger"
        ) as wake:
            self._lead(wake, stop)
            if stop.is_set():
                return
            wake.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            conn = sink.connection()
            tracked = conn.execute("SELECT current_setting('track_commit_timestamp')").fetchone()
            self._track_commit_timestamp = bool(tracked and tracked[0] == "on")
            conn.execute(
                _q("create_claim_stage").format(
                    queue=sql.Identifier(self.settings.store, "trigger_queue")
                )
            )
            self._registry = TypeRegistry.load(conn)
            self._refresh_columns(conn)
            conn.commit()
            self.connected.set()
            log.info("trigger capture: draining the queue of %d watch(es)", len(self.watches))
            self._loop(sink, wake, stop)

    def _lead(self, wake: psycopg.Connection[Any], stop: threading.Event) -> None:
        """Waits to be this queue's only drainer (a second could reorder a row's events)."""
        said = False
        while not stop.is_set():
            row = wake.execute(
                named_query(_FILE, "leader_lock"), {"store": self.settings.store}
            ).fetchone()
            if row and row[0]:
                self.leader.set()
                return
            if not said:
                log.info("another pgherald drains this trigger queue; standing by")
                said = True
            stop.wait(1.0)

    def _loop(self, sink: QueueSink, wake: psycopg.Connection[Any], stop: threading.Event) -> None:
        s = self.settings
        self._set_wake(sink, False)
        last_change = time.monotonic()
        armed = False
        idle_wait = s.busy_poll
        while not stop.is_set():
            if not armed:
                self._check_leader(wake)
            self._maybe_reload(sink)
            moved = self.drain(sink)
            now = time.monotonic()
            if moved:
                last_change = now
                if armed:
                    self._set_wake(sink, False)
                    armed = False
                if moved >= s.batch_size:
                    continue  # a backlog: drain on at once
                stop.wait(s.busy_poll)
                continue
            if now - last_change < s.idle_after:
                stop.wait(s.busy_poll)
                continue
            if not armed:
                self._set_wake(sink, True)
                armed = True
                idle_wait = max(s.busy_poll, 0.05)
                continue  # drain once more: a writer may have read the switch just before
            if self._wait_for_notify(wake, stop, idle_wait):
                self.notifies += 1
                idle_wait = max(s.busy_poll, 0.05)
            else:
                idle_wait = min(idle_wait * 2, s.idle_poll_max)
        if armed:
            # Nobody listens once we are gone: spare the writers a NOTIFY per transaction
            # (each one serialises their commits) until a drainer runs again. A drainer
            # that is killed cannot do this; the next one disarms at its start.
            self._set_wake(sink, False)

    @staticmethod
    def _check_leader(wake: psycopg.Connection[Any]) -> None:
        """Raises ``OperationalError`` if the LISTEN connection is gone before draining on.

        It holds the leader lock. While busy nothing else reads it, so a connection killed
        meanwhile (``pg_terminate_backend``, ``idle_session_timeout``) would leave this
        drainer draining without the lock, and a second pgherald could take it and drain
        alongside, storing a row's events out of order. When armed, waiting on it notices.
        """
        wake.execute("SELECT 1")

    def _maybe_reload(self, sink: QueueSink) -> None:
        """Picks up watches added or removed while running (``watch add`` in another shell)."""
        if self.reload is None or time.monotonic() - self._reloaded < self.reload_interval:
            return
        self._reloaded = time.monotonic()
        found = list(self.reload())
        if found == self.watches:
            return
        log.info(
            "trigger capture: now %d watch(es): %s", len(found), ", ".join(w.name for w in found)
        )
        self.watches = found
        self.assembler.watches = found
        names = {w.name for w in found}
        self._columns = {n: c for n, c in self._columns.items() if n in names}
        conn = sink.connection()
        self._refresh_columns(conn)
        conn.commit()

    def _wait_for_notify(
        self, wake: psycopg.Connection[Any], stop: threading.Event, timeout: float
    ) -> bool:
        """Waits for a wake-up (in short slices, to notice ``stop``); True if one came."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            got = False
            for _ in wake.notifies(timeout=min(left, 0.2), stop_after=1):
                got = True
            if got:
                # Take every notification that is already here, so each wakes us once.
                for _ in wake.notifies(timeout=0.0):
                    pass
                return True
        return False

    def _set_wake(self, sink: QueueSink, armed: bool) -> None:
        conn = sink.connection()
        conn.execute(_q("set_wake").format(wake=self._table("trigger_wake")), {"armed": armed})
        conn.commit()

    def _table(self, name: str) -> sql.Identifier:
        """A store table's name, for statements with parameters (see ``ident``)."""
        return ident(self.settings.store, name)

    # -- one drain ------------------------------------------------------------------------

    def drain(self, sink: QueueSink) -> int:
        """Moves one batch from the queue into the sink; returns how many queue rows moved."""
        saved = self.assembler.snapshot()
        try:
            try:
                return self._drain(sink)
            except _TABLE_CHANGED:
                # A table changed under us (a column dropped or retyped): learn its columns
                # again and retry once; a second failure is an error worth reporting.
                sink.rollback()
                self.assembler.restore(saved)
                conn = sink.connection()
                self._refresh_columns(conn)
                conn.commit()
                return self._drain(sink)
        except BaseException:
            sink.rollback()
            self.assembler.restore(saved)
            raise

    def _drain(self, sink: QueueSink) -> int:
        conn = sink.connection()
        statement, params = self._settings_sql
        with conn.pipeline():
            conn.execute(statement, params)
            claim = conn.execute(self._claim_sql(), self._claim_params())
            columns_now = self._columns_query(conn)
        self.drains += 1
        taken = {str(w): (int(n), int(last), bool(complete)) for w, n, last, complete in claim}
        claimed = sum(n for n, _, _ in taken.values())
        if claimed <= 0:
            conn.rollback()
            return 0
        last_id = max(last for _, last, _ in taken.values())
        known = set(self._columns)  # the columns the claim checked the rows against
        changed = set(self._note_columns(columns_now.fetchall())) | (set(taken) - known)
        captured_at = datetime.now(UTC)
        with_rows = [w for w in self.watches if w.name in taken]
        if self.in_sql and all(
            taken[w.name][2] and w.name not in changed and self._same_shape(w) for w in with_rows
        ):
            rows, values, shapes = self._selected(with_rows, captured_at)
            sink.commit_selected(rows, values, shapes, str(last_id))
            for w in with_rows:
                self.assembler.shapes[w.name] = shapes[w.name]
            self.moved_in_sql += claimed
        else:
            self._assemble(sink, with_rows, captured_at, str(last_id))
        self.moved += claimed
        if self.on_batch is not None:
            self.on_batch(claimed)
        return claimed

    def _assemble(
        self,
        sink: QueueSink,
        watches: Sequence[TriggerWatch],
        captured_at: datetime,
        position: str,
    ) -> None:
        """The claimed rows as change events made in Python (``TriggerAssembler``), for what
        the server cannot make alone: a row queued before a column was added, which keeps
        the shape it had, and a shape change, which gets a ``schema`` event."""
        conn = sink.connection()
        with conn.pipeline():
            reads = {w.name: self._read(conn, w) for w in watches}
        self.assembler.captured_at = captured_at
        merged: list[tuple[int, ChangeEvent]] = []
        for w in watches:
            n = len(self._columns[w.name])
            rows = [self._claimed_row(r, n) for r in reads[w.name].fetchall()]
            merged.extend(self.assembler.events(w, self._shape(w), rows))
        merged.sort(key=lambda pair: pair[0])
        sink.write([e for _, e in merged])
        sink.commit(position)

    def _same_shape(self, watch: TriggerWatch) -> bool:
        """Whether the watch's events keep the shape of its last one (no ``schema`` event due)."""
        before = self.assembler.shapes.get(watch.name)
        return before is None or before == self._shape(watch)

    def _claim_sql(self) -> sql.Composed:
        complete = [
            _q("complete_row").format(
                watch=sql.Placeholder(f"w{i}"), columns=sql.Placeholder(f"w{i}_columns")
            )
            for i in range(len(self.watches))
        ]
        return _q("claim").format(
            queue=self._table("trigger_queue"),
            complete=sql.SQL(" OR ").join(complete) if complete else sql.SQL("false"),
        )

    def _claim_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "limit": self.settings.batch_size,
            "watches": [w.name for w in self.watches],
        }
        for i, w in enumerate(self.watches):
            params[f"w{i}"] = w.name
            params[f"w{i}_columns"] = [c.name for c in self._columns.get(w.name, ())]
        return params

    def _selected(
        self, watches: Sequence[TriggerWatch], captured_at: datetime
    ) -> tuple[sql.Composable, dict[str, Any], dict[str, RowShape]]:
        """The SELECT that makes the claimed rows' events in the server (for
        ``QueueSink.commit_selected``), its parameters, and the shapes it names."""
        parts: list[sql.Composable] = []
        params: dict[str, Any] = {"captured_at": captured_at}
        shapes: dict[str, RowShape] = {}
        for i, w in enumerate(watches):
            parts.append(self._select_watch(f"s{i}", w))
            specs = self._columns[w.name]
            ignored = set(w.ignore_columns)
            params[f"s{i}"] = w.name
            params[f"s{i}_schema"] = w.schema
            params[f"s{i}_table"] = w.table
            params[f"s{i}_keys"] = [k for k in w.key_columns if k in {c.name for c in specs}]
            params[f"s{i}_names"] = [c.name for c in specs]
            params[f"s{i}_compared"] = [c.name not in ignored for c in specs]
            shapes[w.name] = self._shape(w)
        return sql.SQL("\nUNION ALL\n").join(parts), params, shapes

    def _select_watch(self, prefix: str, watch: TriggerWatch) -> sql.Composed:
        specs = self._columns[watch.name]
        names = [c.name for c in specs]
        keys = [k for k in watch.key_columns if k in names]
        positions = [sql.Literal(names.index(k) + 1) for k in keys]
        key_list = sql.Placeholder(f"{prefix}_keys")

        def values(alias: str) -> sql.Composable:
            return sql.SQL(", ").join(
                output_text(
                    sql.SQL("{}.{}").format(sql.Identifier(alias), ident(c.name)), c.type_oid
                )
                for c in specs
            )

        def key_array(values: str) -> sql.Composable:
            return sql.SQL("ARRAY[{}]::text[]").format(
                sql.SQL(", ").join(
                    sql.SQL("v.{}[{}]").format(sql.Identifier(values), p) for p in positions
                )
            )

        if keys:
            row_key: sql.Composable = sql.SQL("'[' || {} || ']'").format(
                sql.SQL(" || ',' || ").join(
                    sql.SQL(
                        "coalesce(to_json((coalesce(v.new_values, v.old_values))[{}])::text,"
                        " 'null')"
                    ).format(p)
                    for p in positions
                )
            )
            old_key_object: sql.Composable = sql.SQL("jsonb_build_object({})").format(
                sql.SQL(", ").join(
                    sql.SQL("({}::text[])[{}], v.old_values[{}]").format(
                        key_list, sql.Literal(i + 1), p
                    )
                    for i, p in enumerate(positions)
                )
            )
            old_key, new_key = key_array("old_values"), key_array("new_values")
        else:
            row_key = sql.SQL("NULL::text")
            old_key_object = sql.SQL("'{}'::jsonb")
            old_key = new_key = sql.SQL("NULL::text[]")
        return _q("select_claimed_events").format(
            watch=sql.Placeholder(prefix),
            schema_name=sql.Placeholder(f"{prefix}_schema"),
            table_name=sql.Placeholder(f"{prefix}_table"),
            row_key=row_key,
            key_columns=sql.SQL("{}::text[]").format(key_list),
            captured_at=sql.SQL("%(captured_at)s::timestamptz"),
            old_key=old_key,
            new_key=new_key,
            old_key_object=old_key_object,
            commit_time=self._commit_time_sql(),
            table=ident(watch.schema, watch.table),
            old_values=values("o"),
            new_values=values("n"),
            names=sql.SQL("{}::text[]").format(sql.Placeholder(f"{prefix}_names")),
            compared=sql.SQL("{}::boolean[]").format(sql.Placeholder(f"{prefix}_compared")),
        )

    def _commit_time_sql(self) -> sql.Composable:
        if self._track_commit_timestamp:
            return sql.SQL(
                "pg_xact_commit_timestamp(mod(c.xid::text::bigint, 4294967296)::text::xid)"
            )
        return sql.SQL("NULL::timestamptz")

    def _columns_query(self, conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
        return conn.execute(
            named_query(_FILE, "table_columns"),
            {
                "schemas": [w.schema for w in self.watches],
                "tables": [w.table for w in self.watches],
            },
        )

    def _refresh_columns(self, conn: psycopg.Connection[Any]) -> None:
        self._note_columns(self._columns_query(conn).fetchall())

    def _note_columns(self, rows: Sequence[tuple[Any, ...]]) -> list[str]:
        """Takes the catalog's current columns; returns the watches whose columns changed."""
        by_table: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for schema, table, name, type_oid in rows:
            by_table.setdefault((schema, table), []).append((name, int(type_oid)))
        assert self._registry is not None
        changed = []
        for w in self.watches:
            found = by_table.get((w.schema, w.table))
            if found is None:
                raise CaptureError(
                    f"watch {w.name!r}: table {w.schema}.{w.table} no longer exists;"
                    " remove the watch or re-create the table"
                )
            wanted = set(w.columns) | set(w.key_columns) if w.columns else None
            kept = [(n, oid) for n, oid in found if wanted is None or n in wanted]
            missing = [k for k in w.key_columns if k not in {n for n, _ in kept}]
            if missing:
                raise CaptureError(
                    f"watch {w.name!r}: key column(s) {', '.join(missing)} no longer exist in"
                    f" {w.schema}.{w.table}; re-create the watch with a valid --key"
                )
            oids = {oid for _, oid in kept}
            if self._registry.missing(oids):
                self._registry.refresh(self._registry.missing(oids))
            specs = [ColumnSpec(n, oid, self._registry.type_name(oid)) for n, oid in kept]
            if self._columns.get(w.name) != specs:
                if w.name in self._columns:
                    changed.append(w.name)
                self._columns[w.name] = specs
        return changed

    def _shape(self, watch: TriggerWatch) -> RowShape:
        return RowShape(tuple(self._columns[watch.name]))

    def _read(self, conn: psycopg.Connection[Any], watch: TriggerWatch) -> psycopg.Cursor[Any]:
        specs = self._columns[watch.name]
        names = [c.name for c in specs]

        def values(alias: str) -> sql.Composable:
            return sql.SQL(", ").join(
                output_text(
                    sql.SQL("{}.{}").format(sql.Identifier(alias), ident(c.name)), c.type_oid
                )
                for c in specs
            )

        statement = _q("read_claimed").format(
            commit_time=self._commit_time_sql(),
            old_values=values("o"),
            new_values=values("n"),
            table=ident(watch.schema, watch.table),
        )
        return conn.execute(statement, {"columns": names, "watch": watch.name})

    _track_commit_timestamp = False

    @staticmethod
    def _claimed_row(r: Sequence[Any], n: int) -> ClaimedRow:
        return ClaimedRow(
            id=int(r[0]),
            op=r[1],
            xid=int(r[2]),
            xact_time=r[3],
            commit_time=r[4],
            old_keys=tuple(r[5]) if r[5] is not None else None,
            new_keys=tuple(r[6]) if r[6] is not None else None,
            old=tuple(r[7 : 7 + n]),
            new=tuple(r[7 + n : 7 + 2 * n]),
        )
