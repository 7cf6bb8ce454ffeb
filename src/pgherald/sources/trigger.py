"""Trigger capture: moving the trigger queue into the change log, exactly once, in order.

Triggers on the watched tables (``trigger_admin``) append each change as jsonb to a queue
table in the store, in the writer's own transaction. This source drains the queue, in one
store transaction per batch:

1. Claim-and-delete a batch of committed queue rows (``DELETE ... RETURNING``, oldest
   first) into a temporary table; the same statement says, per watch, how many rows it
   took and whether each holds all of the watch's columns. One round trip, with the
   catalog's current columns of the watched tables.
2. Usually the server then makes the events itself: one ``INSERT ... SELECT`` reads the
   claimed rows back through the table's row type (``jsonb_populate_record``) as
   PostgreSQL's text output (so trigger events hold the same text as logical ones) and
   writes events, field rows, the checkpoint and the COMMIT in one more round trip
   (``_selected`` and the sink's ``commit_selected``). Python builds no event: that cost
   more CPU than the rows' own writing.
3. A batch that needs what only Python knows (a row queued before a column was added
   keeps the shape it had; a changed shape gets a ``schema`` event first) is read back
   and assembled in Python (``TriggerAssembler``) and appended through the sink as before.
   Both ways give the same events, byte for byte (``tests/integration/test_trigger_in_sql.py``).

Either way the events commit *in the same transaction* as the delete: a crash before the
commit puts the rows back in the queue, one after it has them in the log; never both,
never neither. Event ids (``T/<xid>/<queue id>``) do not depend on the way.

Claim-and-delete never skips a transaction that commits late (as "ids above the last one
seen" would): whatever is committed and still queued is taken. Events of one row keep
commit order because a second writer of a row waits for the first one's row lock before
its trigger takes a queue id. One drainer per queue (an advisory lock) keeps it so.

Waking up: while changes keep coming the source starts a drain every ``busy_poll``
seconds (a latency budget) and writers send no NOTIFY at all (a NOTIFY serialises the
commits of all transactions that send one, which is what makes per-row ``pg_notify``
triggers so costly). After ``idle_after`` seconds without changes it *arms* the wake-up
(an advisory lock it holds while it sleeps, see ``_arm``), so the next writer's
transaction sends one NOTIFY, and sleeps until that or a timer that backs off to
``idle_poll_max``. A NOTIFY that is missed (pgherald was disconnected) costs latency,
never a change: the queue holds the data and is drained on start, after every reconnect
and on the timer.
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


def _code(name: str) -> sql.SQL:
    """A block without its comment lines, for the statements of every drain: psycopg parses
    a statement of over 4 kB again at each execution, and comments only make it longer."""
    return sql.SQL(
        "\n".join(
            line
            for line in named_query(_FILE, name).splitlines()
            if not line.lstrip().startswith("--")
        )
    )


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
    busy_poll: float = 0.03
    """While changes keep coming: seconds from the start of one drain to the start of the
    next (writers send no NOTIFY then). A change waits at most about this long before it
    is claimed, so it is a latency budget; each drain costs the server a fixed part (about
    half a millisecond) however few rows it moves, so a longer one costs writers less."""
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


def _literal(conn: psycopg.Connection[Any], value: Any) -> sql.SQL:
    """``value`` as a SQL literal, for a statement rendered once and run with parameters
    (a ``%`` doubled, as ``ident`` does for names): constants cost no dumping per drain."""
    return sql.SQL(sql.Literal(value).as_string(conn).replace("%", "%%"))


def _local_settings_list() -> sql.Composed:
    """The canonical text output settings as ``set_config`` calls, for a SELECT list."""
    return sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, true)").format(sql.Literal(name), sql.Literal(value))
        for name, value in CANONICAL_SESSION_SETTINGS.items()
    )


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
        # Drain statements rendered once: by the watches (claim), and by the watches with
        # rows (the SELECT of events, its fixed parameters and its shapes). Forgotten when
        # the watches or their columns change.
        self._claim_sql_cache: tuple[tuple[Any, ...], sql.SQL] | None = None
        self._relations: dict[str, int] = {}  # watch -> its table's oid
        self._catalog: dict[str, tuple[list[str], list[int]]] = {}  # all columns and types
        self._leader: tuple[int, datetime] | None = None  # the lock holder's pid and start
        self._selected_cache: dict[tuple[str, ...], tuple[sql.SQL, dict[str, RowShape]]] = {}
        self._registry: TypeRegistry | None = None
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
            self._selected_cache.clear()  # it names commit times, or not
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
                backend = wake.execute(named_query(_FILE, "leader_backend")).fetchone()
                assert backend is not None
                self._leader = (int(backend[0]), backend[1])
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
        idle_wait = max(s.busy_poll, 0.05)
        while not stop.is_set():
            self._maybe_reload(sink)
            started = time.monotonic()
            moved = self.drain(sink)
            now = time.monotonic()
            # While busy, drains start busy_poll apart (at once after a longer drain): a
            # change waits at most about that long to be claimed, and a slow drain does
            # not add its own time to the wait of the next.
            next_drain = started + s.busy_poll - now
            if moved:
                last_change = now
                idle_wait = max(s.busy_poll, 0.05)
                if armed:
                    self._disarm(sink, wake)
                    armed = False
                if moved >= s.batch_size:
                    continue  # a backlog: drain on at once
                if next_drain > 0:
                    stop.wait(next_drain)
                continue
            if now - last_change < s.idle_after:
                if next_drain > 0:
                    stop.wait(next_drain)
                continue
            if not armed:
                if self._arm(sink, wake):
                    armed = True
                    idle_wait = max(s.busy_poll, 0.05)
                    continue  # drain once more: what writers queued before it is committed
                # A writer's transaction is between its first captured row and its end:
                # poll (backing off) until the switch can be armed.
                stop.wait(idle_wait)
                idle_wait = min(idle_wait * 2, s.idle_poll_max)
                continue
            if self._wait_for_notify(wake, stop, idle_wait):
                self.notifies += 1
                idle_wait = max(s.busy_poll, 0.05)
            else:
                idle_wait = min(idle_wait * 2, s.idle_poll_max)
        if armed:
            # Nobody listens once we are gone: spare the writers a NOTIFY per transaction
            # (each one serialises their commits) until a drainer runs again. A drainer
            # that is killed loses its lock with its connection (the table's flag, which
            # the trigger of migration 2 read, stays set until the next one starts).
            self._disarm(sink, wake)

    def _arm(self, sink: QueueSink, wake: psycopg.Connection[Any]) -> bool:
        """Arms the wake-up, if no writer's transaction is in the middle of capturing.

        The switch writers look at (``capture_change``, migration 9) is an advisory lock
        that this drainer holds on its LISTEN connection while it sleeps: a writer's first
        captured row tries it shared, fails, and sends the NOTIFY; while it is not held the
        try succeeds (and holds it shared to the transaction's end) and nothing is sent.
        So the lock is got only when no writer is between its first captured row and its
        end, and the one more drain after this finds everything queued before. The
        table's ``armed`` flag follows it, for whoever looks (and the trigger function of
        stores not migrated yet, which reads it at each row).
        """
        row = wake.execute(named_query(_FILE, "arm"), {"store": self.settings.store}).fetchone()
        if not (row and row[0]):
            return False
        self._set_wake(sink, True)
        return True

    def _disarm(self, sink: QueueSink, wake: psycopg.Connection[Any]) -> None:
        wake.execute(named_query(_FILE, "disarm"), {"store": self.settings.store})
        self._set_wake(sink, False)

    def _maybe_reload(self, sink: QueueSink) -> None:
        """Picks up watches added or removed while running (``watch add`` in another shell),
        and looks at the watched tables' columns, every ``reload_interval`` seconds.

        A drain notices a changed table by itself (the claim returns the columns of the
        tables it took rows of); this also says so for a table that was dropped and has
        nothing queued, as every drain did before it made its events in SQL.
        """
        if time.monotonic() - self._reloaded < self.reload_interval:
            return
        self._reloaded = time.monotonic()
        found = list(self.reload()) if self.reload is not None else self.watches
        if found != self.watches:
            log.info(
                "trigger capture: now %d watch(es): %s",
                len(found),
                ", ".join(w.name for w in found),
            )
            self.watches = found
            self.assembler.watches = found
            self._selected_cache.clear()
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
            except psycopg.errors.UniqueViolation:
                # An event id the log has already (a queue row replayed, say from a backup):
                # the server's INSERT has no ON CONFLICT; the Python path's append skips it.
                sink.rollback()
                self.assembler.restore(saved)
                return self._drain(sink, in_sql=False)
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

    def _drain(self, sink: QueueSink, in_sql: bool = True) -> int:
        conn = sink.connection()
        with conn.pipeline():
            claim = conn.execute(self._claim_sql(conn), self._claim_params())
        self.drains += 1
        taken = claim.fetchall()
        if not taken:
            conn.rollback()
            return 0
        if not taken[0][6]:
            # The LISTEN connection holds the leader lock. While busy nothing else reads
            # it, so one killed meanwhile (pg_terminate_backend, idle_session_timeout)
            # would leave this drainer draining without the lock, and a second pgherald
            # could take it and drain alongside, storing a row's events out of order.
            raise psycopg.OperationalError("the connection that holds the drainer's lock is gone")
        claimed = sum(int(t[1]) for t in taken)
        last_id = max(int(t[2]) for t in taken)
        watches = {w.name: w for w in self.watches}
        with_rows = [watches[str(t[0])] for t in taken]
        stale = [t for t in taken if self._catalog.get(str(t[0])) != (t[4], t[5])]
        if stale:  # a table changed (or its oid is new): the Python path, with its columns
            self._refresh(conn)
        captured_at = datetime.now(UTC)
        if (
            in_sql
            and self.in_sql
            and not stale
            and all(bool(t[3]) for t in taken)
            and all(self._same_shape(w) for w in with_rows)
        ):
            rows, shapes = self._selected(conn, with_rows)
            sink.commit_selected(rows, {"captured_at": captured_at}, shapes, str(last_id))
            for w in with_rows:
                self.assembler.shapes[w.name] = shapes[w.name]
            self.moved_in_sql += claimed
        else:
            self._assemble(sink, with_rows, captured_at, str(last_id))
        self.moved += claimed
        if self.on_batch is not None:
            self.on_batch(claimed)
        return claimed

    def _refresh(self, conn: psycopg.Connection[Any]) -> list[str]:
        """Reads the watched tables' columns again (one changed, or its oid is not known
        yet); returns the watches whose columns changed."""
        return self._note_columns(self._columns_query(conn).fetchall())

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

    def _claim_sql(self, conn: psycopg.Connection[Any]) -> sql.SQL:
        """The claim, with the watches, their tables' oids and their columns written in:
        rendered once until one of them changes."""
        columns = [[c.name for c in self._columns.get(w.name, ())] for w in self.watches]
        relations = [self._relations.get(w.name, 0) for w in self.watches]
        key = (tuple(w.name for w in self.watches), tuple(relations), repr(columns))
        if self._claim_sql_cache is None or self._claim_sql_cache[0] != key:
            complete = [
                _code("complete_row").format(
                    watch=_literal(conn, w.name), columns=_literal(conn, names)
                )
                for w, names in zip(self.watches, columns, strict=True)
            ]
            statement = _code("claim").format(
                queue=self._table("trigger_queue"),
                complete=sql.SQL(" OR ").join(complete) if complete else sql.SQL("false"),
                settings=_local_settings_list(),
                watches=_literal(conn, [w.name for w in self.watches]),
                relations=_literal(conn, [str(r) for r in relations]),
            )
            self._claim_sql_cache = (key, sql.SQL(statement.as_string(conn)))
        return self._claim_sql_cache[1]

    def _claim_params(self) -> dict[str, Any]:
        assert self._leader is not None
        return {
            "limit": self.settings.batch_size,
            "leader_pid": self._leader[0],
            "leader_start": self._leader[1],
        }

    def _selected(
        self, conn: psycopg.Connection[Any], watches: Sequence[TriggerWatch]
    ) -> tuple[sql.SQL, dict[str, RowShape]]:
        """The SELECT that makes the claimed rows' events in the server (for
        ``QueueSink.commit_selected``; its one parameter is ``captured_at``), and the shapes
        it names; rendered once per set of watches (and their columns)."""
        key = tuple(w.name for w in watches)
        found = self._selected_cache.get(key)
        if found is not None:
            return found
        parts = [self._select_watch(conn, w) for w in watches]
        rows = sql.SQL(sql.SQL("\nUNION ALL\n").join(parts).as_string(conn))
        shapes = {w.name: self._shape(w) for w in watches}
        self._selected_cache[key] = (rows, shapes)
        return rows, shapes

    def _select_watch(self, conn: psycopg.Connection[Any], watch: TriggerWatch) -> sql.Composed:
        specs = self._columns[watch.name]
        names = [c.name for c in specs]
        keys = [k for k in watch.key_columns if k in names]
        positions = [sql.Literal(names.index(k) + 1) for k in keys]
        key_list = _literal(conn, keys)
        ignored = set(watch.ignore_columns)

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
        return _code("select_claimed_events").format(
            watch=_literal(conn, watch.name),
            schema_name=_literal(conn, watch.schema),
            table_name=_literal(conn, watch.table),
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
            names=sql.SQL("{}::text[]").format(_literal(conn, names)),
            compared=sql.SQL("{}::boolean[]").format(
                _literal(conn, [n not in ignored for n in names])
            ),
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
        relations: dict[tuple[str, str], int] = {}
        for schema, table, name, type_oid, relation in rows:
            by_table.setdefault((schema, table), []).append((name, int(type_oid)))
            relations[(schema, table)] = int(relation)
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
            self._relations[w.name] = relations[(w.schema, w.table)]
            self._catalog[w.name] = ([n for n, _ in found], [oid for _, oid in found])
            oids = {oid for _, oid in kept}
            if self._registry.missing(oids):
                self._registry.refresh(self._registry.missing(oids))
            specs = [ColumnSpec(n, oid, self._registry.type_name(oid)) for n, oid in kept]
            if self._columns.get(w.name) != specs:
                if w.name in self._columns:
                    changed.append(w.name)
                self._columns[w.name] = specs
                self._selected_cache.clear()
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
