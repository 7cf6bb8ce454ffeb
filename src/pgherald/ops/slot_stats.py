"""How far behind pgherald's replication slot is, and how much WAL it keeps.

One query (``sql/slot_stats.sql``), shared by the metrics collector, ``pgherald check``
and the readiness probe, and importable by anyone else who needs the figures (it imports
nothing of pgherald but ``db``).

**Lag in bytes** is the WAL written since the position pgherald last confirmed
(``confirmed_flush_lsn``); **retained WAL** is what the server keeps for the slot
(from ``restart_lsn``), which is what fills the disk.

**Lag in seconds** has no exact source in PostgreSQL, so it is estimated:

- while capture streams, it is the walsender's ``flush_lag``: how long ago the WAL that
  pgherald last confirmed was written (about the feedback interval when caught up);
- while nothing streams and WAL is waiting, it is the time since the moment the caller
  says capture last made progress (``idle_since``, e.g. the checkpoint's ``updated_at``):
  the oldest waiting change is at most that old;
- nothing waiting: 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from pgherald.db.sqlfiles import named_query


@dataclass(frozen=True)
class SlotStats:
    """A replication slot as the server sees it now."""

    slot: str
    active: bool
    active_pid: int | None
    wal_status: str | None
    """``reserved``, ``extended``, ``unreserved`` (about to lose WAL) or ``lost``."""
    retained_bytes: int | None
    lag_bytes: int | None
    lag_seconds: float | None
    """None when it cannot be told (nothing streams and no ``idle_since`` was given)."""
    safe_wal_size: int | None
    """Bytes of WAL that may still be written before the slot is invalidated by
    ``max_slot_wal_keep_size`` (None: no such limit)."""
    confirmed_flush_lsn: str | None
    restart_lsn: str | None

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


def slot_stats(
    conn: psycopg.Connection[Any], slot: str, idle_since: datetime | None = None
) -> SlotStats | None:
    """The slot's figures, or None when there is no such slot.

    ``idle_since``: when capture last made progress, for the lag in seconds while nothing
    streams (module docstring).
    """
    row = conn.execute(
        named_query("slot_stats.sql", "slot_stats"), {"slot": slot, "idle_since": idle_since}
    ).fetchone()
    if row is None:
        return None
    active, pid, wal_status, retained, lag, flush_lag, safe, confirmed, restart, idle = row
    return SlotStats(
        slot=slot,
        active=bool(active),
        active_pid=pid,
        wal_status=wal_status,
        retained_bytes=None if retained is None else int(retained),
        lag_bytes=None if lag is None else int(lag),
        lag_seconds=lag_seconds(bool(active), lag, flush_lag, idle),
        safe_wal_size=None if safe is None else int(safe),
        confirmed_flush_lsn=confirmed,
        restart_lsn=restart,
    )


def lag_seconds(
    active: bool, lag_bytes: int | None, flush_lag: float | None, idle_seconds: float | None
) -> float | None:
    """The estimate of the module docstring, from the query's columns."""
    if active and flush_lag is not None:
        return max(float(flush_lag), 0.0)
    if lag_bytes is not None and lag_bytes <= 0:
        return 0.0
    if idle_seconds is not None:
        return max(float(idle_seconds), 0.0)
    return None


__all__ = ["SlotStats", "lag_seconds", "slot_stats"]
