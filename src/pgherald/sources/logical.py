"""Logical capture: pgoutput over the streaming replication protocol, exactly once into the log.

The flow of one session:

1. Check the slot. A slot that vanished or was invalidated while the change log holds a
   checkpoint means changes may have been lost: we stop and say so, and only an explicit
   resync recreates it. (Silently recreating it is the classic way CDC tools lose data.)
2. ``START_REPLICATION`` from the change log's checkpoint (psycopg 3 cannot speak the
   replication protocol, so this part uses psycopg2's replication connection).
3. Decode each message (``pgoutput.decode``) and turn row messages into ``ChangeEvent``s
   (``TransactionAssembler``, pure and tested on its own).
4. Hand events to the ``CaptureSink`` in batches; a large transaction is written in
   several batches inside one open store transaction, so memory stays bounded.
5. At a transaction boundary, when the batch is full, old enough, or the stream is idle,
   ``sink.commit(end_lsn)`` stores events and checkpoint atomically; only then is the LSN
   reported to PostgreSQL as flushed, so the server may recycle that WAL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgherald.db.connect import connect
from pgherald.db.types import TypeRegistry, apply_canonical_settings, canonical_options
from pgherald.errors import CaptureError, ConnectionFailed
from pgherald.events import ChangeEvent, RowImage, Unchanged
from pgherald.events.model import ColumnSpec, RowShape
from pgherald.sources import logical_admin
from pgherald.sources.logical_snapshot import (
    WATERMARK_PREFIX,
    TableSnapshot,
    progress_name,
    restart_progress,
)
from pgherald.sources.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    Truncate,
    TypeMsg,
    Update,
    decode,
    decode_insert,
    pg_timestamp,
)
from pgherald.sources.slot_safety import (
    RESYNC_DONE,
    Bound,
    Level,
    Reading,
    Resync,
    SlotHealth,
    SlotMonitor,
    SlotThresholds,
    gap_meta,
    heartbeat_name,
    later,
    read_health,
    resync_name,
)

log = logging.getLogger("pgherald.logical")

HEARTBEAT_PREFIX = "pgherald.heartbeat"

_MIN_BATCH_INTERVAL = 0.005
"""Seconds between two batches handed to the store, at least, unless one is full: under a
steady stream of small transactions, a batch every 5 ms costs the store (about a millisecond
of CPU per batch, whatever its size) a fraction of a batch per few transactions, for a few
milliseconds of latency."""

_COMMIT_SIZE = 26  # 'C', flags, commit LSN, end LSN, commit time: pgoutput's COMMIT
_COMMIT_END_LSN = struct.Struct("!Q")
_BEGIN_SIZE = 21  # 'B', final LSN, commit time, xid: pgoutput's BEGIN
_BEGIN_FIELDS = struct.Struct("!QqI")


def checkpoint_name(slot: str) -> str:
    """The change log checkpoint of the logical source reading ``slot``.

    Capture saves it, ``watch add`` checks it before creating a slot (a missing slot behind
    a checkpoint is a gap, never silently recreated), and ``status`` shows it.
    """
    return f"logical:{slot}"


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@dataclass(frozen=True)
class LogicalWatch:
    """What the logical source needs to know of one watch."""

    name: str
    schema: str
    table: str
    key_columns: tuple[str, ...]
    columns: tuple[str, ...] | None = None
    ignore_columns: tuple[str, ...] = ()
    snapshot: bool = False
    """Start with the table's current rows as ``read`` events (see ``logical_snapshot``)."""


class CaptureSink(Protocol):
    """Where captured events go: the composition root backs it with the change log."""

    def write(self, events: Sequence[ChangeEvent]) -> None:
        """Adds events to the open store transaction (opening one if needed)."""

    def commit(self, position: str, extra: Mapping[str, str] | None = None) -> None:
        """Commits the written events with the checkpoint ``position``; durable on return.

        ``extra`` holds more checkpoints (by name) to store in the same transaction, such as
        the progress of an initial snapshot.
        """

    def rollback(self) -> None:
        """Forgets everything written since the last commit."""

    def checkpoint(self, name: str | None = None) -> str | None:
        """The last committed position (or the ``extra`` checkpoint ``name``), None if none."""

    def last_shapes(self, watches: Sequence[str]) -> Mapping[str, RowShape]:
        """The row shape each watch had when last stored (watches never stored are left out).

        A session starts from these, so that a table changed while capture was stopped
        gets its ``schema`` event, and one already recorded does not get another.
        """


TypeNames = Callable[[Iterable[int]], Mapping[int, str]]


@dataclass
class _RelationState:
    watch: LogicalWatch
    relation: Relation
    shape: RowShape
    projection: tuple[int, ...] | None  # indexes of the watched columns, None = all
    key_index: tuple[int, ...]  # indexes into the projected row
    key_shape: RowShape
    compare_index: tuple[int, ...]  # projected columns whose change counts
    key_items: tuple[tuple[str, int], ...] = ()  # (name, index) of the key columns

    def __post_init__(self) -> None:
        self.key_items = tuple((self.shape.names[i], i) for i in self.key_index)


def _project(values: tuple[Any, ...], projection: tuple[int, ...] | None) -> tuple[Any, ...]:
    if projection is None:
        return values
    return tuple(values[i] for i in projection)


@dataclass
class TransactionAssembler:
    """Turns decoded pgoutput messages into change events; no I/O, so it is easy to test.

    ``type_names`` resolves type OIDs to printable names (one catalog query per new
    relation, not per row).
    """

    watches: Sequence[LogicalWatch]
    type_names: TypeNames
    relations: dict[int, _RelationState] = field(default_factory=dict)
    _by_table: dict[tuple[str, str], LogicalWatch] = field(default_factory=dict)
    _known_shapes: dict[tuple[str, str], RowShape] = field(default_factory=dict)
    xid: int | None = None
    commit_lsn: int = 0
    commit_time: datetime | None = None
    seq: int = 0
    captured_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _position: str = "0/0"
    _id_prefix: str = "L/0000000000000000/"
    _captured_mono: float = 0.0

    def __post_init__(self) -> None:
        self._by_table = {(w.schema, w.table): w for w in self.watches}

    def seed_shape(self, schema: str, table: str, shape: RowShape) -> None:
        """Tells the assembler the last shape stored, so a change while we were down is seen:
        the first RELATION of a session is compared with it as later ones are with their
        predecessor."""
        self._known_shapes[(schema, table)] = shape

    def begin(self, msg: Begin) -> None:
        """Starts a transaction (see ``start``)."""
        self.start(msg.final_lsn, msg.commit_time, msg.xid)

    def start(self, final_lsn: int, commit_time: datetime, xid: int) -> None:
        """Starts a transaction: what its events share is formatted here, once.

        The capture time is read again only when a millisecond has passed or the
        transaction committed after the last reading (so it is never before the commit):
        draining a backlog of one-row transactions, that spares a clock reading and a
        timestamp to format for each, and every event of a batch shares one object.
        """
        self.xid = xid
        self.commit_lsn = final_lsn
        self.commit_time = commit_time
        self.seq = 0
        self._position = f"{final_lsn >> 32:X}/{final_lsn & 0xFFFFFFFF:X}"  # format_lsn
        self._id_prefix = f"L/{final_lsn:016X}/"
        now = time.monotonic()
        if now - self._captured_mono >= 0.001 or commit_time >= self.captured_at:
            self.captured_at = datetime.now(UTC)
            self._captured_mono = now

    def _event_id(self) -> str:
        self.seq += 1
        return f"{self._id_prefix}{self.seq}"

    def _event(
        self,
        watch: LogicalWatch,
        op: Any,
        key: Mapping[str, Any],
        old: RowImage | None,
        new: RowImage | None,
        changed: tuple[str, ...] = (),
        old_values: Any = "none",
        meta: Mapping[str, Any] | None = None,
    ) -> ChangeEvent:
        event_id = self._event_id()
        return ChangeEvent(
            event_id=event_id,
            watch=watch.name,
            op=op,
            schema=watch.schema,
            table=watch.table,
            key=key,
            old=old,
            new=new,
            changed=changed,
            xid=self.xid,
            position=self._position,
            commit_time=self.commit_time,
            captured_at=self.captured_at,
            method="logical",
            seq=self.seq,
            old_values=old_values,
            meta=meta or {},
        )

    def relation(self, msg: Relation) -> Iterator[ChangeEvent]:
        watch = self._by_table.get((msg.namespace, msg.name))
        if watch is None:
            self.relations.pop(msg.oid, None)
            return
        names = [c.name for c in msg.columns]
        wanted = set(watch.columns) | set(watch.key_columns) if watch.columns else None
        projection = (
            tuple(i for i, n in enumerate(names) if n in wanted) if wanted is not None else None
        )
        cols = _project(msg.columns, projection)
        types = self.type_names(c.type_oid for c in cols)
        shape = RowShape(
            tuple(
                ColumnSpec(c.name, c.type_oid, types.get(c.type_oid, str(c.type_oid))) for c in cols
            )
        )
        missing = [k for k in watch.key_columns if k not in shape]
        if missing:
            raise CaptureError(
                f"watch {watch.name!r}: key column(s) {', '.join(missing)} no longer exist in"
                f" {msg.namespace}.{msg.name}; re-create the watch with a valid --key"
            )
        key_index = tuple(shape.index(k) for k in watch.key_columns)
        key_shape = RowShape(tuple(shape.columns[i] for i in key_index))
        ignored = set(watch.ignore_columns)
        compare = tuple(i for i, n in enumerate(shape.names) if n not in ignored)
        previous = self.relations.get(msg.oid)
        before = (
            previous.shape
            if previous is not None
            else self._known_shapes.get((watch.schema, watch.table))
        )
        state = _RelationState(watch, msg, shape, projection, key_index, key_shape, compare)
        self.relations[msg.oid] = state
        self._known_shapes[(watch.schema, watch.table)] = shape
        if before is not None and before != shape and self.xid is not None:
            yield self._event(
                state.watch, "schema", {}, None, None, meta=describe_shape_change(before, shape)
            )

    def read(self, watch: LogicalWatch, key: Mapping[str, Any], image: RowImage) -> ChangeEvent:
        """A row of an initial snapshot, placed in the stream at its chunk's high watermark."""
        return self._event(watch, "read", key, None, image, meta={"snapshot": True})

    def _key(self, state: _RelationState, values: tuple[Any, ...]) -> dict[str, Any]:
        items = state.key_items
        if len(items) == 1:  # the usual one-column key, without a comprehension's frame
            name, i = items[0]
            return {name: values[i]}
        return {name: values[i] for name, i in items}

    def insert(self, msg: Insert) -> ChangeEvent | None:
        return self.insert_row(msg.relation_oid, msg.new)

    def insert_row(self, relation_oid: int, new: tuple[Any, ...]) -> ChangeEvent | None:
        """The hot path of capture: one event per inserted row, built without detours
        (positional arguments, no helper call), which is measurably cheaper per row."""
        state = self.relations.get(relation_oid)
        if state is None:
            return None
        values: tuple[Any, ...] = (
            new if state.projection is None else _project(new, state.projection)
        )
        watch = state.watch
        self.seq += 1
        return ChangeEvent(
            f"{self._id_prefix}{self.seq}",
            watch.name,
            "insert",
            watch.schema,
            watch.table,
            self._key(state, values),
            None,
            RowImage(state.shape, values),
            (),
            self.xid,
            self._position,
            self.commit_time,
            self.captured_at,
            "logical",
            self.seq,
            "none",
            {},
        )

    def update(self, msg: Update) -> ChangeEvent | None:
        state = self.relations.get(msg.relation_oid)
        if state is None:
            return None
        new_values = _project(msg.new, state.projection)
        key = self._key(state, new_values)
        meta: dict[str, Any] = {}
        if msg.old_kind == "O" and msg.old is not None:
            old_values = _project(msg.old, state.projection)
            if any(isinstance(v, Unchanged) for v in new_values):
                # REPLICA IDENTITY FULL: the old row is complete, so it fills unchanged TOAST.
                new_values = tuple(
                    o if isinstance(n, Unchanged) else n
                    for n, o in zip(new_values, old_values, strict=True)
                )
            changed = tuple(
                state.shape.names[i] for i in state.compare_index if old_values[i] != new_values[i]
            )
            if not changed:
                return None  # only ignored columns changed (or nothing at all)
            old_key = self._key(state, old_values)
            if old_key != key:
                meta["old_key"] = old_key
            return self._event(
                state.watch,
                "update",
                key,
                RowImage(state.shape, old_values),
                RowImage(state.shape, new_values),
                changed,
                "replica_identity",
                meta,
            )
        if msg.old_kind == "K" and msg.old is not None:
            old_values = _project(msg.old, state.projection)
            meta["old_key"] = self._key(state, old_values)
        return self._event(
            state.watch, "update", key, None, RowImage(state.shape, new_values), meta=meta
        )

    def delete(self, msg: Delete) -> ChangeEvent | None:
        state = self.relations.get(msg.relation_oid)
        if state is None:
            return None
        values = _project(msg.old, state.projection)
        key = self._key(state, values)
        if msg.old_kind == "O":
            return self._event(
                state.watch,
                "delete",
                key,
                RowImage(state.shape, values),
                None,
                old_values="replica_identity",
            )
        key_image = RowImage(state.key_shape, tuple(values[i] for i in state.key_index))
        return self._event(state.watch, "delete", key, key_image, None)

    def truncate(self, msg: Truncate) -> Iterator[ChangeEvent]:
        for oid in msg.relation_oids:
            state = self.relations.get(oid)
            if state is not None:
                yield self._event(
                    state.watch,
                    "truncate",
                    {},
                    None,
                    None,
                    meta={"cascade": msg.cascade, "restart_identity": msg.restart_identity},
                )


def describe_shape_change(before: RowShape, after: RowShape) -> dict[str, Any]:
    """Says which columns were added, dropped, renamed or retyped, for people to read."""
    b = {c.name: c for c in before.columns}
    a = {c.name: c for c in after.columns}
    added = [n for n in a if n not in b]
    dropped = [n for n in b if n not in a]
    renamed: list[list[str]] = []
    # A rename shows as one column dropped and one added at the same position with the same type.
    for old_name in list(dropped):
        pos = before.names.index(old_name)
        if pos < len(after.columns):
            cand = after.columns[pos]
            if cand.name in added and cand.type_oid == b[old_name].type_oid:
                renamed.append([old_name, cand.name])
                added.remove(cand.name)
                dropped.remove(old_name)
    retyped = [
        [n, b[n].type_name, a[n].type_name] for n in a if n in b and a[n].type_oid != b[n].type_oid
    ]
    return {
        "columns_before": [[c.name, c.type_name] for c in before.columns],
        "columns_after": [[c.name, c.type_name] for c in after.columns],
        # With columns_after, the shape as the change log stores it: a restarted capture
        # compares the table's next RELATION with it (ChangeLog.last_shape).
        "type_oids_after": [c.type_oid for c in after.columns],
        "added": added,
        "dropped": dropped,
        "renamed": renamed,
        "retyped": retyped,
    }


@dataclass(frozen=True)
class LogicalSettings:
    """Tuning and identity of one logical source."""

    dsn: str
    slot: str = "pgherald"
    publication: str = "pgherald"
    batch_size: int = 5000
    max_batch_delay: float = 0.05
    status_interval: int = 1
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    resync: bool = False
    heartbeat_interval: float = 10.0
    """Seconds between heartbeat messages written to the watched database (0: none)."""
    slot_check_interval: float = 30.0
    """Seconds between two checks of the slot's retained WAL (see ``slot_safety``)."""
    thresholds: SlotThresholds = field(default_factory=SlotThresholds)
    """When to warn, to go critical, and to apply which policy."""
    snapshot_chunk_size: int = 5000


class LogicalSource:
    """Runs replication sessions until stopped, reconnecting with backoff when one drops."""

    def __init__(self, settings: LogicalSettings, watches: Sequence[LogicalWatch]) -> None:
        self.settings = settings
        self.watches = list(watches)
        self.stored_lsn = 0
        self.connected = threading.Event()
        self.slot_status: logical_admin.SlotInfo | None = None
        self.slot_health: SlotHealth | None = None
        """The slot as last checked (``slot_safety``), for health reports."""
        self.slot_level: Level = "ok"
        self.paused: str | None = None
        """Why capture is paused (policy ``pause-and-alert``); None while it is not."""
        self.monitor: SlotMonitor | None = None
        self._last_heartbeat = 0.0
        self._ever_connected = False
        self._snapshots: list[TableSnapshot] = []
        self._action: _Action | None = None
        self._settled = 0.0
        """When the last action ended: readings begun before are about the slot as it was."""
        self._resync_requested = settings.resync
        self._safe: Bound | None = None
        """The last point of the stream known stored (a durable commit or a heartbeat)."""

    # -- catalog helpers (psycopg 3, a normal connection) ------------------------------

    def _type_names(self, conn: psycopg.Connection[Any]) -> TypeNames:
        """Type names as the JSON encoding understands them (domains resolved to their base)."""
        registry = TypeRegistry.load(conn)

        def lookup(oids: Iterable[int]) -> Mapping[int, str]:
            wanted = set(oids)
            missing = registry.missing(wanted)
            if missing:
                registry.refresh(missing, conn)  # a type created while we were streaming
            return {oid: registry.type_name(oid) for oid in wanted}

        return lookup

    def _replication_dsn(self) -> str:
        """The DSN with the canonical session settings added to any ``options`` it has.

        pgoutput prints values with the walsender's DateStyle, TimeZone, IntervalStyle and
        float settings; the change log must hold one canonical text form whatever the
        server's or the role's defaults are.
        """
        params = conninfo_to_dict(self.settings.dsn)
        params["options"] = f"{params.get('options') or ''} {canonical_options()}".strip()
        params.setdefault("application_name", "pgherald-capture")
        return make_conninfo("", **params)

    def prepare_slot(self, conn: psycopg.Connection[Any], checkpoint: str | None) -> None:
        """Makes sure the slot exists, refusing to recreate one that held unstored changes.

        A slot that is missing or was invalidated while the change log holds a checkpoint
        means changes may be lost: that is a gap. It is recorded and repaired (``gap``
        events, a new slot, the tables read again) when the policy is ``drop-and-resync``
        or ``run --resync`` asked for it; otherwise capture stops with one line that says
        what happened and which command repairs it. Never silently recreated.
        """
        # Checked here because the walsender's own refusal arrives as a failed connection,
        # which the reconnect loop would otherwise retry for ever.
        row = conn.execute(
            "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        if row is not None and not row[0]:
            raise CaptureError(
                f"role {conn.info.user!r} may not stream changes: logical capture needs the"
                " REPLICATION attribute (ALTER ROLE ... REPLICATION), or use --method trigger"
            )
        slot = self.settings.slot
        info = read_health(conn, slot)
        lost = info is not None and info.invalidated
        if info is None or lost:
            if checkpoint is not None:
                what = (
                    f"was invalidated by PostgreSQL ({info.invalidation()})"
                    if info is not None and lost
                    else "no longer exists"
                )
                reason = (
                    f"replication slot {slot!r} {what}, but the change log was at {checkpoint}:"
                    " changes made since then may be lost"
                )
                if self._resync_requested:
                    raise _ResyncNeeded(f"{reason}; `run --resync` asked")
                if self.settings.thresholds.policy == "drop-and-resync":
                    raise _ResyncNeeded(f"{reason}; policy drop-and-resync")
                raise CaptureError(
                    f"{reason}. Run `pgherald run --resync` to record the gap, recreate the"
                    " slot and read the watched tables again (or set policy ="
                    ' "drop-and-resync" in [slot_safety] to do that by itself)'
                )
            if lost:
                logical_admin.drop_slot(conn, slot)
            logical_admin.create_slot(conn, slot)
        elif info.plugin != "pgoutput":
            raise CaptureError(
                f"replication slot {slot!r} uses plugin {info.plugin!r},"
                " not pgoutput; choose another --slot name"
            )
        tables = [(w.schema, w.table) for w in self.watches]
        logical_admin.ensure_publication(conn, self.settings.publication, tables)

    # -- slot safety ---------------------------------------------------------------------

    def _on_reading(self, reading: Reading) -> None:
        """Called by the slot monitor (its own thread) after each check: decides whether the
        policy applies, and if so makes the session end so that ``run`` can apply it."""
        health = reading.health
        self.slot_health = health
        self.slot_status = health.as_slot_info() if health is not None else None
        self.slot_level = reading.level
        if self._action is not None or reading.at < self._settled:
            return
        policy = self.settings.thresholds.policy
        if reading.level == "policy":
            if self._resync_requested:
                self._action = _Action("resync", f"{reading.message}; `run --resync` asked")
            elif policy == "drop-and-resync":
                self._action = _Action("resync", f"{reading.message}; policy drop-and-resync")
            elif policy == "pause-and-alert":
                self._action = _Action("pause", reading.message)
        elif reading.level == "lost" and self.connected.is_set():
            # The server ends our walsender when it invalidates the slot; if we got here
            # first, end the session: the next one finds the slot lost and says what to do.
            self._action = _Action("recheck", reading.message)

    def _act(self, action: _Action, sink: CaptureSink, stop: threading.Event) -> None:
        """Applies what the monitor asked; meanwhile and for the readings begun before it
        ends, the monitor asks nothing more (they may be about the slot that was dropped)."""
        try:
            sink.rollback()  # a large transaction's stored part, if the session ended in one
            if action.kind == "pause":
                self._pause(action.reason, stop)
            elif action.kind == "resync":
                self._resync(sink, action.reason)
        finally:
            self._settled = time.monotonic()
            self._action = None

    def _pause(self, reason: str, stop: threading.Event) -> None:
        """Policy ``pause-and-alert``: no capture, the slot kept, a report until someone acts.

        Capture resumes by itself only if the slot falls back under the policy threshold
        (someone made it consume or advance) or disappears or is invalidated (the next
        session says what that means); otherwise an operator restarts pgherald with
        other thresholds, or with ``--resync``.
        """
        slot = self.settings.slot
        message = (
            f"{reason}; policy pause-and-alert: capture from slot {slot!r} is paused and the"
            " slot is kept, so nothing is lost, but it keeps holding WAL. To go on, either let"
            ' capture catch up (raise policy_retained_wal or set policy = "alert" in'
            " [slot_safety], then restart pgherald), or give up the backlog with `pgherald"
            " run --resync` (drops the slot, records a gap event and reads the watched tables"
            " again)"
        )
        self.paused = message
        self.connected.clear()
        log.error("%s", message)
        if self.monitor is not None:
            self.monitor.record(message, {"slot": slot, "action": "paused"})
        repeat = self.monitor.repeat if self.monitor is not None else 300.0
        told = time.monotonic()
        try:
            while not stop.wait(min(self.settings.slot_check_interval, 1.0)):
                reading = self.monitor.reading if self.monitor is not None else None
                if reading is not None and reading.level != "policy":
                    log.warning(
                        "replication slot %r is no longer over the policy threshold (%s):"
                        " capture resumes",
                        slot,
                        reading.level,
                    )
                    return
                if time.monotonic() - told >= repeat:
                    told = time.monotonic()
                    log.error("%s", message)
        finally:
            self.paused = None

    def _gap_start(self, sink: CaptureSink, checkpoint: str | None) -> Bound:
        """Where the uncertain range begins: the latest point known stored.

        Each candidate is safe on its own (everything before it is in the change log, or
        was of no watched table): the checkpoint, the old slot's confirmed position, the
        last acknowledged heartbeat or durable commit, and the commit time of the last
        stored event.
        """
        slot = self.settings.slot
        candidates: list[Bound | None] = [self._safe]
        if checkpoint:
            candidates.append(Bound(parse_lsn(checkpoint), None))
        if self.slot_health is not None and self.slot_health.confirmed_flush_lsn:
            candidates.append(Bound(parse_lsn(self.slot_health.confirmed_flush_lsn), None))
        beat = sink.checkpoint(heartbeat_name(slot))
        if beat:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                candidates.append(Bound.from_json(json.loads(beat)))
        last_commit = getattr(sink, "last_commit_time", None)
        if last_commit is not None:
            when = last_commit([w.name for w in self.watches])
            if when is not None:
                candidates.append(Bound(0, when))
        return later(*candidates) or Bound(0, None)

    def _resync(self, sink: CaptureSink, reason: str) -> None:
        """Drops the slot, records the gap, recreates the slot, and has every watched table
        read again; safe to repeat after a crash at any step.

        1. The resync and the point it starts from are saved in the change log (checkpoint
           ``resync:<slot>``) before anything is dropped.
        2. The slot is dropped and created again; its consistent point ends the gap.
        3. One store transaction holds a ``gap`` event per watch, the new slot's position
           as the checkpoint, each watch's snapshot progress reset to its first row, and
           the resync marked done. A crash before it commits repeats steps 2 and 3 at the
           next start (``_finish_resync``), so no reader is left with a silent hole.
        """
        sink.rollback()
        slot = self.settings.slot
        checkpoint = sink.checkpoint()
        start = self._gap_start(sink, checkpoint)
        pending = Resync(reason, start)
        position = max(start.lsn, parse_lsn(checkpoint) if checkpoint else 0)
        sink.commit(format_lsn(position), {resync_name(slot): pending.to_text()})
        log.error(
            "%s: dropping replication slot %r, recording a gap from %s and reading the"
            " watched tables again",
            reason,
            slot,
            format_lsn(start.lsn),
        )
        self._finish_resync(sink, pending)

    def _finish_resync(self, sink: CaptureSink, pending: Resync) -> None:
        slot = self.settings.slot
        with connect(
            self.settings.dsn, autocommit=True, application_name="pgherald-catalog"
        ) as conn:
            logical_admin.drop_slot(conn, slot)
            lsn, created = logical_admin.create_slot_at(conn, slot)
        end = Bound(parse_lsn(lsn), created)
        meta = gap_meta(slot, pending.reason, pending.start, end)
        sink.write(gap_events(self.watches, meta, end))
        extra = {progress_name(w.name): restart_progress("resync") for w in self.watches}
        extra[resync_name(slot)] = RESYNC_DONE
        sink.commit(format_lsn(end.lsn), extra)
        self.stored_lsn = end.lsn
        self._safe = end
        self._resync_requested = False
        message = (
            f"replication slot {slot!r} recreated at {lsn}: a gap event was recorded for"
            f" {len(self.watches)} watch(es) ({meta['uncertain']})"
        )
        log.error("%s", message)
        if self.monitor is not None:
            self.monitor.record(message, {**meta, "action": "resynced"})

    def _recover(self, sink: CaptureSink) -> None:
        """Finishes a resync that a crash interrupted (see ``_resync``)."""
        marker = sink.checkpoint(resync_name(self.settings.slot))
        if marker and marker != RESYNC_DONE:
            pending = Resync.from_text(marker)
            if pending is not None:
                log.warning(
                    "finishing the resync of slot %r that was interrupted: %s",
                    self.settings.slot,
                    pending.reason,
                )
                self._finish_resync(sink, pending)

    # -- the replication session -----------------------------------------------------

    def run(self, sink: CaptureSink, stop: threading.Event) -> None:
        """Captures until ``stop`` is set; transient connection failures are retried.

        The slot monitor runs beside it all along (``slot_safety``); the first check is
        made before the first session, so a slot already over a threshold is dealt with
        before capture streams from it.
        """
        self._start_monitor(sink)
        try:
            self._run(sink, stop)
        finally:
            if self.monitor is not None:
                self.monitor.close()
                self.monitor = None

    def _start_monitor(self, sink: CaptureSink) -> None:
        s = self.settings
        report = getattr(sink, "record_error", None)
        monitor = SlotMonitor(
            s.dsn, s.slot, s.thresholds, s.slot_check_interval, self._on_reading, report
        )
        try:
            monitor.report_limit()
            monitor.check()
        except (psycopg.OperationalError, ConnectionFailed) as e:
            if isinstance(e, ConnectionFailed) and not self._ever_connected:
                raise  # a configuration problem: say so at once (see ``_run``)
            log.warning("cannot check replication slot %r yet: %s", s.slot, e)
        self.monitor = monitor.start()

    def _run(self, sink: CaptureSink, stop: threading.Event) -> None:
        delay = self.settings.reconnect_min
        while not stop.is_set():
            try:
                self._recover(sink)
                try:
                    if self._action is None:
                        self._session(sink, stop)
                except _ResyncNeeded as e:
                    self._action = _Action("resync", str(e))
                action = self._action
                if action is not None and not stop.is_set():
                    self._act(action, sink, stop)
                delay = self.settings.reconnect_min
            except (
                psycopg2.DatabaseError,  # OperationalError, and the bare kind below
                psycopg2.InterfaceError,
                psycopg.OperationalError,
                ConnectionFailed,
            ) as e:
                if _not_a_lost_connection(e):
                    raise
                if (
                    isinstance(e, ConnectionFailed | psycopg2.OperationalError)
                    and not self._ever_connected
                ):
                    # The first connection failing is a configuration problem (wrong host,
                    # password, privileges): say so at once instead of retrying forever.
                    if isinstance(e, ConnectionFailed):
                        raise
                    raise CaptureError(_replication_error(e)) from None
                self.connected.clear()
                sink.rollback()
                if stop.is_set():
                    return
                log.warning(
                    "replication connection lost (%s); reconnecting in %.1fs",
                    str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                    delay,
                )
                stop.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max)

    def _session(self, sink: CaptureSink, stop: threading.Event) -> None:
        """One replication session, until ``stop`` or until the slot monitor asks for an
        action (``_action``): everything read by then is stored and acknowledged."""
        checkpoint = sink.checkpoint()
        with connect(
            self.settings.dsn, autocommit=True, application_name="pgherald-catalog"
        ) as catalog:
            self.prepare_slot(catalog, checkpoint)
            if self._resync_requested:
                log.info(
                    "--resync: replication slot %r is there and under the policy threshold;"
                    " nothing to resync",
                    self.settings.slot,
                )
                self._resync_requested = False
            apply_canonical_settings(catalog)  # snapshot chunks are read as text, like pgoutput's
            assembler = TransactionAssembler(self.watches, self._type_names(catalog))
            shapes = sink.last_shapes([w.name for w in self.watches])
            for w in self.watches:
                if w.name in shapes:
                    assembler.seed_shape(w.schema, w.table, shapes[w.name])
            # A watch reads its table when it asked for an initial snapshot, or when the slot
            # was recreated (a resync stored a restart as its progress).
            progress = {w.name: sink.checkpoint(progress_name(w.name)) for w in self.watches}
            self._snapshots = [
                snap
                for w in self.watches
                if w.snapshot or progress[w.name] is not None
                for snap in [
                    TableSnapshot.resume(
                        w.name, w.schema, w.table, w.key_columns, w.columns, progress[w.name]
                    )
                ]
                if not snap.done
            ]
            self.stored_lsn = parse_lsn(checkpoint) if checkpoint else 0
            repl = psycopg2.connect(
                self._replication_dsn(),
                connection_factory=psycopg2.extras.LogicalReplicationConnection,
            )
            try:
                cur = repl.cursor()
                try:
                    cur.start_replication(
                        slot_name=self.settings.slot,
                        decode=False,
                        start_lsn=self.stored_lsn,
                        options={
                            "proto_version": "1",
                            "publication_names": self.settings.publication,
                            "messages": "true",  # our heartbeats and snapshot watermarks
                        },
                        status_interval=self.settings.status_interval,
                    )
                except psycopg2.errors.ObjectInUse as e:
                    raise CaptureError(
                        f"replication slot {self.settings.slot!r} is in use by another process;"
                        " is another pgherald capturing?"
                    ) from e
                self.connected.set()
                self._ever_connected = True
                log.info(
                    "capturing from slot %s at %s", self.settings.slot, checkpoint or "its start"
                )
                self._stream(cur, assembler, sink, stop, catalog)
                self._acknowledge(cur, force=True)
            finally:
                self.connected.clear()
                repl.close()

    def _acknowledge(self, cur: Any, force: bool = False) -> None:
        if self.stored_lsn:
            cur.send_feedback(flush_lsn=self.stored_lsn, force=force)

    def _housekeeping(self, catalog: psycopg.Connection[Any], now: float) -> None:
        """Heartbeats, written while the stream is idle (the slot monitor has its own
        thread: it must report even when this one is stuck)."""
        s = self.settings
        if s.heartbeat_interval and now - self._last_heartbeat >= s.heartbeat_interval:
            emit_heartbeat(catalog)
            self._last_heartbeat = now

    def _stream(
        self,
        cur: Any,
        asm: TransactionAssembler,
        sink: CaptureSink,
        stop: threading.Event,
        catalog: psycopg.Connection[Any],
    ) -> None:
        """Reads, decodes and assembles; a ``_StoreWriter`` stores meanwhile.

        Batches are handed over when full, when old, or as soon as the writer is idle (so
        a trickle is stored at once, and under load batches grow by themselves while the
        writer is busy: group commit). Only what the writer reports as committed is
        acknowledged; before a heartbeat moves the slot past everything, the writer is
        drained.
        """
        writer = _StoreWriter(sink)
        try:
            self._read(cur, asm, writer, stop, catalog)
        finally:
            writer.close()

    def _read(
        self,
        cur: Any,
        asm: TransactionAssembler,
        writer: _StoreWriter,
        stop: threading.Event,
        catalog: psycopg.Connection[Any],
    ) -> None:
        s = self.settings
        buffer: list[ChangeEvent] = []
        in_txn = False
        skip_txn = False
        pending_end = 0  # end LSN of the last complete transaction not yet handed to the writer
        pending_time: datetime | None = None  # and its commit time
        pending_since = 0.0
        pending_events = 0
        pending_extra: dict[str, str] = {}
        fd = cur.connection.fileno()
        snaps = self._snapshots
        by_name = {w.name: w for w in self.watches}

        def acknowledge() -> None:
            if writer.durable > self.stored_lsn:
                self.stored_lsn = writer.durable
                self._safe = Bound(writer.durable, writer.durable_time)
                self._acknowledge(cur)

        last_flush = 0.0

        def ready(now: float) -> bool:
            """Whether a batch may go now: the writer is idle and the last one is not too
            recent (each batch costs the store about a millisecond of its own)."""
            return not writer.busy and now - last_flush >= _MIN_BATCH_INTERVAL

        def flush(wait: bool = False) -> None:
            nonlocal buffer, pending_end, pending_events, last_flush
            last_flush = time.monotonic()
            writer.submit(buffer, pending_end, dict(pending_extra), pending_time)
            buffer = []  # the writer owns the old list now
            pending_extra.clear()
            pending_end = 0
            pending_events = 0
            if wait:
                writer.drain()
            acknowledge()

        while not stop.is_set() and self._action is None:
            msg = cur.read_message()
            if msg is None:
                if pending_end and not in_txn and ready(time.monotonic()):
                    flush()
                else:
                    writer.check()
                    acknowledge()
                if not in_txn:
                    self._housekeeping(catalog, time.monotonic())
                    if snaps and not snaps[0].awaiting:
                        snaps[0].read_chunk(catalog, s.snapshot_chunk_size, asm.type_names)
                        continue
                # Until the server sends more, or the writer finishes a job (then what is
                # pending goes to the store at once).
                timeout = 0.2
                if pending_end and not in_txn and not writer.busy:  # until it may go
                    timeout = max(0.0, last_flush + _MIN_BATCH_INTERVAL - time.monotonic())
                readable, _, _ = select.select([fd, writer.wakeup], [], [], timeout)
                if writer.wakeup in readable:
                    writer.woken()
                continue
            payload = msg.payload
            first = payload[0]
            if first == 0x49:  # INSERT, the usual message: read in place, no Insert object
                if not skip_txn:
                    ev = asm.insert_row(*decode_insert(payload))
                    if ev is not None:
                        buffer.append(ev)
                        if snaps and snaps[0].window_open and ev.watch == snaps[0].watch:
                            snaps[0].observe(ev.key)
                        if len(buffer) >= s.batch_size:
                            pending_events += len(buffer)
                            writer.submit(buffer, 0, None)
                            buffer = []
                continue
            if first == 0x43 and len(payload) == _COMMIT_SIZE:
                # COMMIT, one per transaction: only its end LSN matters here, so it is read
                # in place (pgoutput.decode would build a dataclass and a datetime for it).
                kind: type = Commit
                (end_lsn,) = _COMMIT_END_LSN.unpack_from(payload, 10)
            elif first == 0x42 and len(payload) == _BEGIN_SIZE:  # BEGIN, read in place too
                kind = Begin
                final_lsn, commit_us, xid = _BEGIN_FIELDS.unpack_from(payload, 1)
                try:
                    commit_time = pg_timestamp(commit_us)
                except OverflowError:
                    decode(payload)  # raises the decoder's error for it
                    raise
            else:
                m = decode(payload)
                kind = type(m)
                if kind is Commit:
                    assert isinstance(m, Commit)
                    end_lsn = m.end_lsn
                elif kind is Begin:
                    assert isinstance(m, Begin)
                    final_lsn, commit_time, xid = m.final_lsn, m.commit_time, m.xid
            if kind is Begin:
                in_txn = True
                # A transaction already stored (a replay after a crash) is skipped whole.
                skip_txn = final_lsn < self.stored_lsn
                asm.start(final_lsn, commit_time, xid)
            elif kind is Commit:
                in_txn = False
                if skip_txn:
                    continue
                now = time.monotonic()
                if not pending_end:
                    pending_since = now
                pending_end = end_lsn
                pending_time = asm.commit_time
                if snaps and not snaps[0].awaiting:
                    # Under a steady stream there is no idle moment: read chunks as we go.
                    snaps[0].read_chunk(catalog, s.snapshot_chunk_size, asm.type_names)
                if (
                    ready(now)
                    or pending_events + len(buffer) >= s.batch_size
                    or now - pending_since >= s.max_batch_delay
                ):
                    flush()
            elif skip_txn:
                continue
            elif kind is Insert or kind is Update or kind is Delete:
                ev = (
                    asm.insert(m)
                    if isinstance(m, Insert)
                    else asm.update(m)
                    if isinstance(m, Update)
                    else asm.delete(m)
                    if isinstance(m, Delete)
                    else None
                )
                if ev is not None:
                    buffer.append(ev)
                    if snaps and snaps[0].window_open and ev.watch == snaps[0].watch:
                        snaps[0].observe(ev.key)
                        if "old_key" in ev.meta:
                            snaps[0].observe(ev.meta["old_key"])
            elif isinstance(m, Relation):
                buffer.extend(asm.relation(m))
            elif isinstance(m, Truncate):
                truncated = list(asm.truncate(m))
                buffer.extend(truncated)
                if snaps and any(e.watch == snaps[0].watch for e in truncated):
                    snaps[0].invalidate()
            elif isinstance(m, LogicalMessage) and m.prefix == WATERMARK_PREFIX:
                if snaps and snaps[0].on_watermark(m.content) == "high":
                    snap = snaps[0]
                    rows, progress = snap.release()
                    watch = by_name[snap.watch]
                    buffer.extend(asm.read(watch, key, image) for key, image in rows)
                    pending_extra[progress_name(snap.watch)] = progress
                    if snap.done:
                        log.info("initial snapshot of %s complete", snap.watch)
                        snaps.pop(0)
            elif isinstance(m, LogicalMessage):
                if not in_txn and not m.transactional and m.prefix == HEARTBEAT_PREFIX:
                    # Everything before the heartbeat has been sent, and is stored once the
                    # pending batch is: the slot may move past it even if nothing we watch
                    # changed (an idle database in a busy cluster).
                    if pending_end:
                        flush(wait=True)
                    else:
                        writer.drain()
                        acknowledge()
                    if m.lsn > self.stored_lsn:
                        # Saved as the checkpoint too (with the time the heartbeat was
                        # written), so the change log follows the slot, and a gap that
                        # must be recorded later starts from here at the earliest.
                        beat = Bound(m.lsn, heartbeat_time(m.content))
                        self.stored_lsn = m.lsn
                        self._safe = beat
                        writer.submit(
                            [],
                            m.lsn,
                            {heartbeat_name(self.settings.slot): json.dumps(beat.to_json())},
                            beat.time,
                        )
                        self._acknowledge(cur)
            elif isinstance(m, TypeMsg | Origin):
                pass
            else:
                raise CaptureError(f"unexpected replication message {type(m).__name__}")
            if len(buffer) >= s.batch_size:
                # Large transactions go to the store in pieces, inside one store transaction.
                pending_events += len(buffer)
                writer.submit(buffer, 0, None)
                buffer = []
        if pending_end and not in_txn:
            flush(wait=True)
        else:
            writer.drain()
            acknowledge()


class _StoreWriter:
    """Calls the sink from a thread of its own, so that storing overlaps reading and decoding.

    The sink's calls wait for the server most of the time, and psycopg waits without
    holding the GIL, so while one batch is stored the next is read and assembled. Jobs
    run in order, and at most ``depth`` are queued or running: that bounds memory, and
    makes the reader (and so the server's sending) wait when storing is the bottleneck.
    ``durable`` is the end LSN of the last commit that returned, and only that may be
    acknowledged. After a failure the jobs behind it are dropped (their store transaction
    is gone) and the failure is raised in the reader at its next call; the session then
    ends as it would have, and the caller rolls the sink back.
    """

    def __init__(self, sink: CaptureSink, depth: int = 2) -> None:
        self._sink = sink
        self._depth = depth
        self._jobs: deque[tuple[list[ChangeEvent], int, dict[str, str] | None, datetime | None]] = (
            deque()
        )
        self._cond = threading.Condition()
        self._failure: BaseException | None = None
        self._closing = False
        self.busy = 0
        """Jobs queued or running."""
        self.durable = 0
        self.durable_time: datetime | None = None
        """The commit time of what ``durable`` ends (None if unknown)."""
        self.wakeup, self._wake = os.pipe()
        """Readable after a job finished, so the reader can wait on it with its socket."""
        os.set_blocking(self.wakeup, False)
        os.set_blocking(self._wake, False)
        self._thread = threading.Thread(target=self._run, name="pgherald-store", daemon=True)
        self._thread.start()

    def woken(self) -> None:
        """Empties the wake-up pipe."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wakeup, 512):
                pass

    def submit(
        self,
        events: list[ChangeEvent],
        position: int,
        extra: dict[str, str] | None,
        when: datetime | None = None,
    ) -> None:
        """Queues writing ``events`` and then, unless ``position`` is 0, committing up to it
        (``when``: the commit time of the transaction that ends at ``position``)."""
        with self._cond:
            while self.busy >= self._depth and self._failure is None:
                self._cond.wait()
            self.check()
            self._jobs.append((events, position, extra, when))
            self.busy += 1
            self._cond.notify_all()

    def check(self) -> None:
        """Raises what made the writer fail, if anything did."""
        if self._failure is not None:
            raise self._failure

    def drain(self) -> None:
        """Waits until everything submitted is stored (committed, if it was to be)."""
        with self._cond:
            while self.busy:
                self._cond.wait()
        self.check()

    def close(self) -> None:
        """Lets the submitted jobs finish and stops the thread; raises nothing."""
        with self._cond:
            while self.busy:
                self._cond.wait()
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        os.close(self.wakeup)
        os.close(self._wake)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                events, position, extra, when = self._jobs[0]
            try:
                if self._failure is None:
                    if events:
                        self._sink.write(events)
                    if position:
                        self._sink.commit(format_lsn(position), extra)
                        self.durable_time = when
                        self.durable = position
            except BaseException as e:  # handed to the reader
                self._failure = e
            with self._cond:
                self._jobs.popleft()
                self.busy -= 1
                self._cond.notify_all()
            with contextlib.suppress(BlockingIOError):  # full: the reader wakes anyway
                os.write(self._wake, b".")


def _not_a_lost_connection(e: Exception) -> bool:
    """A psycopg2 error that is about something else than the connection going away.

    A server that stops in the middle of the stream can surface as a bare
    ``DatabaseError`` ("error with status PGRES_COPY_BOTH and no message from the libpq",
    no SQLSTATE): that is a lost connection like any other, to reconnect from. Its
    subclasses (a statement the server refused, a misuse) are not.
    """
    return (
        isinstance(e, psycopg2.DatabaseError)
        and not isinstance(e, psycopg2.OperationalError)
        and (type(e) is not psycopg2.DatabaseError or e.pgcode is not None)
    )


def _replication_error(e: Exception) -> str:
    """One line for a replication connection that could not be opened, without secrets."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "replication" in text and ("permission" in text or "must be" in text):
        return (
            f"cannot open a replication connection: {text} (the role needs the REPLICATION"
            " attribute: ALTER ROLE ... REPLICATION; or use --method trigger)"
        )
    if "pg_hba.conf" in text:
        return (
            f"cannot open a replication connection: {text} (pg_hba.conf needs a"
            " 'replication' line for this role and host)"
        )
    return f"cannot open a replication connection: {text}"


def emit_heartbeat(conn: psycopg.Connection[Any]) -> None:
    """Writes a tiny non-transactional WAL message, so an idle database's slot can advance.

    It carries the time it was written (seconds since the epoch), which dates the
    position it lets capture acknowledge.
    """
    conn.execute(
        "SELECT pg_logical_emit_message(false, %s, extract(epoch FROM clock_timestamp())::text)",
        (HEARTBEAT_PREFIX,),
    )


def heartbeat_time(content: bytes) -> datetime | None:
    """The time a heartbeat was written, from its content (None for an empty one)."""
    try:
        return datetime.fromtimestamp(float(content.decode()), UTC)
    except (ValueError, UnicodeDecodeError, OverflowError):
        return None


def gap_events(
    watches: Sequence[LogicalWatch], meta: Mapping[str, Any], end: Bound
) -> list[ChangeEvent]:
    """One ``gap`` event per watch: the change log may miss changes in the range ``meta``
    names. Its position is the new slot's consistent point, where capture starts again."""
    captured = datetime.now(UTC)
    return [
        ChangeEvent(
            event_id=f"G/{end.lsn:016X}/{i}",
            watch=w.name,
            op="gap",
            schema=w.schema,
            table=w.table,
            key={},
            old=None,
            new=None,
            changed=(),
            xid=None,
            position=format_lsn(end.lsn),
            commit_time=end.time,
            captured_at=captured,
            method="logical",
            seq=i,
            meta=dict(meta),
        )
        for i, w in enumerate(watches, 1)
    ]


@dataclass(frozen=True)
class _Action:
    """What the slot monitor asked of the source: ``pause``, ``resync`` or ``recheck``."""

    kind: str
    reason: str


class _ResyncNeeded(Exception):
    """The slot is gone or invalidated behind a checkpoint, and a resync is allowed."""
