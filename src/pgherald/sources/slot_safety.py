"""Slot safety: how much WAL pgherald's replication slot holds back, and what to do about it.

An unconsumed slot keeps WAL until the disk fills. This module reads the slot's state from
``pg_replication_slots`` (one cheap query), grades it against three configured sizes of
retained WAL (warning, critical, policy) and tells the logical source when the configured
policy applies. It also reads the server's own limit, ``max_slot_wal_keep_size``, beyond
which PostgreSQL invalidates the slot by itself (``wal_status = 'lost'``), and says so.

What the policies do is the logical source's business (``logical.LogicalSource``); this
module only measures, grades, words and reports:

- ``alert``: tell (a log line and a row in the change log's errors table), nothing more;
- ``pause-and-alert``: stop capturing, keep the slot (nothing is lost), report until an
  operator acts;
- ``drop-and-resync``: drop the slot, record a ``gap`` event per watch naming the uncertain
  range, recreate the slot and read the watched tables again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import psycopg

from pgherald.db.connect import connect
from pgherald.db.sqlfiles import named_query
from pgherald.ops.slot_stats import SlotStats, slot_stats
from pgherald.sources.logical_admin import SlotInfo

log = logging.getLogger("pgherald.slot")

Policy = Literal["alert", "pause-and-alert", "drop-and-resync"]
POLICIES: Final[tuple[Policy, ...]] = ("alert", "pause-and-alert", "drop-and-resync")

Level = Literal["missing", "ok", "warning", "critical", "policy", "lost"]
"""How the slot is: ``missing`` (no such slot), ``ok``, over the ``warning``, ``critical`` or
``policy`` size of retained WAL, or ``lost`` (invalidated by the server)."""

_RANK: Final[dict[Level, int]] = {
    "missing": 0,
    "ok": 0,
    "warning": 1,
    "critical": 2,
    "policy": 3,
    "lost": 4,
}

_FILE: Final = "logical.sql"

_UNITS: Final = (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10))


def format_size(size: int | None) -> str:
    """A byte count as people read it, in PostgreSQL's units (1 kB = 1024 bytes)."""
    if size is None:
        return "unknown"
    for unit, factor in _UNITS:
        if abs(size) >= factor:
            value = size / factor
            return (
                f"{value:.0f} {unit}"
                if value >= 100 or value == int(value)
                else f"{value:.1f} {unit}"
            )
    return f"{size} bytes"


@dataclass(frozen=True)
class SlotThresholds:
    """The three sizes of retained WAL and the policy, as configured (``[slot_safety]``)."""

    warn_bytes: int = 1 << 30
    critical_bytes: int = 4 << 30
    policy_bytes: int = 16 << 30
    policy: Policy = "alert"

    def describe(self) -> str:
        return (
            f"warning at {format_size(self.warn_bytes)}, critical at"
            f" {format_size(self.critical_bytes)}, policy {self.policy!r} at"
            f" {format_size(self.policy_bytes)}"
        )


@dataclass(frozen=True)
class SlotHealth:
    """One reading of the slot, as the server reports it."""

    slot: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    restart_lsn: str | None
    confirmed_flush_lsn: str | None
    wal_status: str | None
    safe_wal_size: int | None
    """Bytes of WAL that may still be written before the slot is in danger of being
    invalidated (NULL when ``max_slot_wal_keep_size`` is unlimited)."""
    conflicting: bool | None
    """PostgreSQL 16+: invalidated by a conflict with recovery (slots on standbys)."""
    invalidation_reason: str | None
    """PostgreSQL 17+: why the slot was invalidated (``wal_removed``, ``rows_removed``...)."""
    retained_bytes: int | None
    lag_bytes: int | None
    current_lsn: str | None

    @property
    def invalidated(self) -> bool:
        return (
            self.wal_status == "lost"
            or self.invalidation_reason is not None
            or self.conflicting is True
        )

    def invalidation(self) -> str:
        """Why the server says the slot cannot be used any more, in words."""
        reason = self.invalidation_reason or (
            "conflict with recovery" if self.conflicting else "wal_removed"
        )
        words = {
            "wal_removed": "the WAL it needed was removed (it held back more than"
            " max_slot_wal_keep_size allowed)",
            "rows_removed": "rows it needed were vacuumed away (conflict with recovery)",
            "wal_level_insufficient": "wal_level was lowered below logical",
            "idle_timeout": "it was idle longer than idle_replication_slot_timeout",
        }.get(reason, reason)
        return f"wal_status = {self.wal_status or 'unknown'}, reason: {words}"

    @classmethod
    def from_stats(cls, stats: SlotStats) -> SlotHealth:
        """The figures ``ops.slot_stats`` measures (what the monitor checks on its timer);
        the slot's plugin and the newer servers' invalidation details are read only where
        they matter (``read_health``)."""
        return cls(
            slot=stats.slot,
            plugin=None,
            database=None,
            active=stats.active,
            active_pid=stats.active_pid,
            restart_lsn=stats.restart_lsn,
            confirmed_flush_lsn=stats.confirmed_flush_lsn,
            wal_status=stats.wal_status,
            safe_wal_size=stats.safe_wal_size,
            conflicting=None,
            invalidation_reason=None,
            retained_bytes=stats.retained_bytes,
            lag_bytes=stats.lag_bytes,
            current_lsn=None,
        )

    def as_slot_info(self) -> SlotInfo:
        """The same reading as ``logical_admin.slot_info`` gives, for older callers."""
        return SlotInfo(
            self.slot,
            self.plugin,
            self.database,
            self.active,
            self.active_pid,
            self.restart_lsn,
            self.confirmed_flush_lsn,
            self.wal_status,
            self.retained_bytes,
            self.lag_bytes,
        )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def measure(conn: psycopg.Connection[Any], slot: str) -> SlotHealth | None:
    """The slot's figures now (``ops.slot_stats``, shared with metrics and ``pgherald
    check``), with the server's words for an invalidation; None when there is no such slot."""
    stats = slot_stats(conn, slot)
    if stats is None:
        return None
    health = SlotHealth.from_stats(stats)
    if health.invalidated:
        return read_health(conn, slot) or health
    return health


def read_health(conn: psycopg.Connection[Any], slot: str) -> SlotHealth | None:
    """The slot's state now, whole; None when there is no such slot.

    The slot's row is read whole as JSON, so the columns newer servers add
    (``conflicting``, ``invalidation_reason``) are read where they exist without a query
    per version.
    """
    row = conn.execute(named_query(_FILE, "slot_health"), {"slot": slot}).fetchone()
    if row is None:
        return None
    data: Mapping[str, Any] = row[0]
    return SlotHealth(
        slot=slot,
        plugin=data.get("plugin"),
        database=data.get("database"),
        active=bool(data.get("active")),
        active_pid=_int(data.get("active_pid")),
        restart_lsn=data.get("restart_lsn"),
        confirmed_flush_lsn=data.get("confirmed_flush_lsn"),
        wal_status=data.get("wal_status"),
        safe_wal_size=_int(data.get("safe_wal_size")),
        conflicting=data.get("conflicting"),
        invalidation_reason=data.get("invalidation_reason"),
        retained_bytes=_int(row[1]),
        lag_bytes=_int(row[2]),
        current_lsn=row[3],
    )


def wal_keep_limit(conn: psycopg.Connection[Any]) -> int | None:
    """``max_slot_wal_keep_size`` in bytes; None when unlimited (-1) or unknown."""
    row = conn.execute(named_query(_FILE, "wal_keep_limit")).fetchone()
    if row is None or row[0] is None or int(row[0]) < 0:
        return None
    return int(row[0])


def assess(health: SlotHealth | None, thresholds: SlotThresholds) -> Level:
    """The slot's level: ``lost`` if invalidated, else by its retained WAL.

    ``wal_status = 'unreserved'`` (the server will remove WAL the slot needs at its next
    checkpoint) is at least critical, whatever the sizes say.
    """
    if health is None:
        return "missing"
    if health.invalidated:
        return "lost"
    retained = health.retained_bytes or 0
    if retained >= thresholds.policy_bytes:
        return "policy"
    if retained >= thresholds.critical_bytes or health.wal_status == "unreserved":
        return "critical"
    if retained >= thresholds.warn_bytes:
        return "warning"
    return "ok"


def rank(level: Level) -> int:
    return _RANK[level]


def describe(health: SlotHealth, level: Level, thresholds: SlotThresholds) -> str:
    """One line for the operator: what the slot holds back, against which threshold."""
    held = format_size(health.retained_bytes)
    if level == "lost":
        return (
            f"replication slot {health.slot!r} was invalidated by PostgreSQL"
            f" ({health.invalidation()}): the changes it still had to deliver are gone"
        )
    limit = {
        "warning": ("warning", thresholds.warn_bytes),
        "critical": ("critical", thresholds.critical_bytes),
        "policy": ("policy", thresholds.policy_bytes),
    }.get(level)
    over = (
        f", over the {limit[0]} threshold of {format_size(limit[1])}"
        if limit and (health.retained_bytes or 0) >= limit[1]
        else ""
    )
    line = f"replication slot {health.slot!r} holds back {held} of WAL{over}"
    if health.wal_status == "unreserved":
        line += (
            "; wal_status = unreserved: PostgreSQL will invalidate it at its next checkpoint"
            " (max_slot_wal_keep_size)"
        )
    elif health.safe_wal_size is not None and level != "ok":
        line += f"; {format_size(health.safe_wal_size)} more and PostgreSQL invalidates it"
    if level in ("warning", "critical", "policy"):
        line += (
            " (PostgreSQL keeps this WAL until pgherald has stored the changes: capture is"
            " behind, blocked or stopped)"
        )
    if level == "policy" and thresholds.policy == "alert":
        line += (
            "; policy alert: pgherald only reports this. Find why capture is behind (the log,"
            " `pgherald status`), and watch the disk of the WAL"
        )
    return line


def limit_report(limit: int | None, thresholds: SlotThresholds) -> tuple[int, str]:
    """What to say at start about ``max_slot_wal_keep_size``: (logging level, line)."""
    if limit is None:
        return logging.INFO, (
            "max_slot_wal_keep_size is unlimited: PostgreSQL keeps WAL for the slot until the"
            f" disk is full; pgherald's slot safety applies ({thresholds.describe()})"
        )
    above = [
        (name, size)
        for name, size in (
            ("warn_retained_wal", thresholds.warn_bytes),
            ("critical_retained_wal", thresholds.critical_bytes),
            ("policy_retained_wal", thresholds.policy_bytes),
        )
        if size >= limit
    ]
    if above:
        names = ", ".join(f"{n} ({format_size(s)})" for n, s in above)
        return logging.WARNING, (
            f"max_slot_wal_keep_size is {format_size(limit)}: PostgreSQL invalidates the slot"
            f" before it holds back {names}, so pgherald never acts on"
            f" {'that threshold' if len(above) == 1 else 'those thresholds'}; set"
            f" {'it' if len(above) == 1 else 'them'} below {format_size(limit)} in"
            " [slot_safety], or raise max_slot_wal_keep_size"
        )
    return logging.INFO, (
        f"max_slot_wal_keep_size is {format_size(limit)}: PostgreSQL invalidates the slot"
        f" beyond that; pgherald's slot safety acts before ({thresholds.describe()})"
    )


@dataclass(frozen=True)
class Reading:
    """One check: the slot's state (None: no such slot), its level and the operator's line."""

    health: SlotHealth | None
    level: Level
    message: str
    at: float
    """When the check began (``time.monotonic``): a reading is about the slot as it was then."""


Report = Callable[[str, Mapping[str, Any]], None]
"""Records an error for people to see later (the change log's errors table)."""


class SlotMonitor:
    """Checks the slot on a timer, on a connection of its own, in a thread of its own.

    It runs beside the replication stream, not inside it, so that it still reports while
    capture is stopped by a failing store, catching up, or paused. Each check hands the
    ``Reading`` to ``on_reading`` (the source decides on pauses and resyncs); the monitor
    itself logs when the level rises (and again every ``repeat`` seconds while it stays
    above ``ok``), and records a row in the errors table when it rises to critical, to the
    policy threshold, or to lost.
    """

    def __init__(
        self,
        dsn: str,
        slot: str,
        thresholds: SlotThresholds,
        interval: float,
        on_reading: Callable[[Reading], None],
        report: Report | None = None,
        repeat: float = 300.0,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.thresholds = thresholds
        self.interval = interval
        self.on_reading = on_reading
        self.report = report
        self.repeat = repeat
        self.reading: Reading | None = None
        self.limit: int | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._logged_at = 0.0
        self._reported: Level = "ok"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._failing = False

    # -- one check -----------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, autocommit=True, application_name="pgherald-slot")
            self.limit = wal_keep_limit(self._conn)
        return self._conn

    def report_limit(self) -> None:
        """Logs ``max_slot_wal_keep_size`` against the thresholds (once, at start)."""
        with self._lock:
            self._connection()
        level, line = limit_report(self.limit, self.thresholds)
        log.log(level, "%s", line)

    def check(self) -> Reading:
        """Reads the slot now, logs and reports as needed, and hands the reading on."""
        started = time.monotonic()
        with self._lock:
            conn = self._connection()
            try:
                health = measure(conn, self.slot)
            except psycopg.OperationalError:
                conn.close()
                raise
        level = assess(health, self.thresholds)
        message = describe(health, level, self.thresholds) if health is not None else ""
        reading = Reading(health, level, message, started)
        self.reading = reading
        self._tell(reading)
        self.on_reading(reading)
        return reading

    def _tell(self, reading: Reading) -> None:
        """Logs a rise at once and a lasting state every ``repeat`` seconds; records a rise
        to critical or worse once. The worst level since the slot was last ok counts, so a
        slot wavering around a threshold does not repeat itself at every check."""
        level = reading.level
        if level in ("ok", "missing"):
            if level == "ok" and rank(self._reported) > 0:
                log.info("replication slot %r is back under the warning threshold", self.slot)
            self._reported = level
            return
        now = reading.at
        rose = rank(level) > rank(self._reported)
        if rose or now - self._logged_at >= self.repeat:
            self._logged_at = now
            severity = logging.WARNING if level == "warning" else logging.ERROR
            prefix = {"critical": "CRITICAL: ", "policy": "CRITICAL: ", "lost": ""}.get(level, "")
            log.log(severity, "%s%s", prefix, reading.message)
        if rose:
            if rank(level) >= rank("critical"):
                self.record(reading.message, self.detail(reading))
            self._reported = level

    def detail(self, reading: Reading) -> dict[str, Any]:
        """What the errors table keeps with a report: the reading in numbers."""
        h = reading.health
        out: dict[str, Any] = {"slot": self.slot, "level": reading.level}
        if h is not None:
            out.update(
                retained_bytes=h.retained_bytes,
                wal_status=h.wal_status,
                safe_wal_size=h.safe_wal_size,
                restart_lsn=h.restart_lsn,
                confirmed_flush_lsn=h.confirmed_flush_lsn,
            )
        out.update(
            warn_bytes=self.thresholds.warn_bytes,
            critical_bytes=self.thresholds.critical_bytes,
            policy_bytes=self.thresholds.policy_bytes,
            policy=self.thresholds.policy,
            max_slot_wal_keep_size=self.limit,
        )
        return out

    def record(self, message: str, detail: Mapping[str, Any]) -> None:
        """Keeps an error row; a failure to keep it is logged, never raised."""
        if self.report is None:
            return
        try:
            self.report(message, detail)
        except Exception as e:  # the store may be what is failing
            log.warning("could not record the slot report in the change log: %s", e)

    # -- on a timer ----------------------------------------------------------------------

    def start(self) -> SlotMonitor:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pgherald-slot", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
                self._failing = False
            except Exception as e:  # the database may be away: try again next time
                if not self._failing:
                    log.warning("cannot check replication slot %r: %s", self.slot, _one_line(e))
                self._failing = True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- the range a gap covers -----------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """A point of the change stream: its LSN, and the time it corresponds to (if known)."""

    lsn: int
    time: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"lsn": _lsn(self.lsn), "time": None if self.time is None else self.time.isoformat()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Bound:
        hi, lo = str(data["lsn"]).split("/")
        when = data.get("time")
        return cls(
            (int(hi, 16) << 32) | int(lo, 16), datetime.fromisoformat(when) if when else None
        )


def later(*bounds: Bound | None) -> Bound | None:
    """The latest of some bounds: by LSN, and by time for the time (each is a safe start)."""
    found = [b for b in bounds if b is not None]
    if not found:
        return None
    times = [b.time for b in found if b.time is not None]
    return Bound(max(b.lsn for b in found), max(times) if times else None)


def _lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class Resync:
    """A resync under way: why, and from where the change log may miss changes.

    Stored in the change log (checkpoint ``resync:<slot>``) before the slot is dropped, so
    that a crash between dropping the slot and recording the gap is finished at the next
    start instead of leaving a silent hole.
    """

    reason: str
    start: Bound

    def to_text(self) -> str:
        return json.dumps({"reason": self.reason, "from": self.start.to_json()})

    @classmethod
    def from_text(cls, text: str) -> Resync | None:
        try:
            data = json.loads(text)
            return cls(str(data["reason"]), Bound.from_json(data["from"]))
        except (ValueError, KeyError, TypeError):
            return None


def resync_name(slot: str) -> str:
    """The checkpoint that marks a resync under way (``RESYNC_DONE`` once recorded)."""
    return f"resync:{slot}"


def heartbeat_name(slot: str) -> str:
    """The checkpoint holding the last acknowledged heartbeat's ``Bound`` (JSON)."""
    return f"heartbeat:{slot}"


RESYNC_DONE: Final = "done"


def gap_meta(slot: str, reason: str, start: Bound, end: Bound) -> dict[str, Any]:
    """What a ``gap`` event says: which range of the stream is uncertain, and why."""
    start_when = start.time.isoformat() if start.time is not None else "the slot's creation"
    end_when = end.time.isoformat() if end.time is not None else "now"
    return {
        "slot": slot,
        "reason": reason,
        "from_lsn": _lsn(start.lsn),
        "from_time": None if start.time is None else start.time.isoformat(),
        "to_lsn": _lsn(end.lsn),
        "to_time": None if end.time is None else end.time.isoformat(),
        "uncertain": (
            f"changes committed after {start_when} (LSN {_lsn(start.lsn)}) and before"
            f" {end_when} (LSN {_lsn(end.lsn)}) may be missing from the change log; the"
            " table is read again, and its rows follow as 'read' events"
        ),
        "resnapshot": True,
    }


def now() -> datetime:
    return datetime.now(UTC)
