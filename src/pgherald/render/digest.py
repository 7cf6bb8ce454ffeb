"""Grouping changes into digests: one per capture run (or transaction), hour or day.

Groups are made from events read newest first, so a feed or an e-mail reads only as much
of the log as the groups it shows need. Each group keeps at most ``keep`` events to show
and counts the rest: a snapshot run that changed a million rows is one entry that says so,
not a million-row page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Final, Literal

from pgherald.events.model import ChangeEvent

DigestMode = Literal["change", "run", "day", "hour"]
DIGEST_MODES: Final[tuple[DigestMode, ...]] = ("change", "run", "day", "hour")
DEFAULT_KEEP: Final = 50


def event_time(event: ChangeEvent) -> datetime:
    return event.commit_time or event.captured_at


def group_key(event: ChangeEvent, mode: DigestMode, zone: tzinfo) -> str:
    """What a digest entry's stable id is made of. Per run: a snapshot run (its position is
    the run's id), else the transaction (its id and commit time, since transaction ids
    wrap), else the event alone. Per period: the hour or day in the reader's zone."""
    if mode == "change":
        return f"event:{event.event_id}"
    if mode == "run":
        if event.method == "snapshot":
            return f"run:{event.watch}:{event.position}"
        if event.xid is not None:
            return f"xact:{event.xid}:{event_time(event).isoformat()}"
        return f"event:{event.event_id}"
    local = event_time(event).astimezone(zone)
    if mode == "day":
        return f"day:{local.date().isoformat()}"
    return f"hour:{local.strftime('%Y-%m-%dT%H')}"


@dataclass
class Group:
    """One digest: its key, the newest ``keep`` events (newest first), and counts of all."""

    key: str
    mode: DigestMode
    events: list[tuple[int, ChangeEvent]] = field(default_factory=list)
    total: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    watches: list[str] = field(default_factory=list)
    first: datetime | None = None
    last: datetime | None = None
    newest_log_id: int = 0

    @property
    def more(self) -> int:
        return self.total - len(self.events)

    def add(self, log_id: int, event: ChangeEvent, keep: int) -> None:
        when = event_time(event)
        self.total += 1
        self.counts[event.op] += 1
        if event.watch not in self.watches:
            self.watches.append(event.watch)
        self.first = when if self.first is None else min(self.first, when)
        self.last = when if self.last is None else max(self.last, when)
        self.newest_log_id = max(self.newest_log_id, log_id)
        if len(self.events) < keep:
            self.events.append((log_id, event))

    def period(self, zone: tzinfo) -> tuple[datetime, datetime] | None:
        """The hour or day a period digest covers, in the reader's zone."""
        if self.mode not in ("day", "hour") or self.last is None:
            return None
        local = self.last.astimezone(zone)
        if self.mode == "hour":
            start = local.replace(minute=0, second=0, microsecond=0)
            return start, start + timedelta(hours=1)
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)


def group(
    events: Iterable[tuple[int, ChangeEvent]],
    mode: DigestMode,
    zone: tzinfo,
    *,
    limit: int,
    keep: int = DEFAULT_KEEP,
) -> list[Group]:
    """The newest ``limit`` groups of events given newest first (log id, event).

    Reading stops at the first event of a group beyond the ``limit``-th: a run's or a
    period's events are contiguous in the log (commit order), so the groups kept are
    complete. In ``change`` mode each event is its own group.
    """
    groups: dict[str, Group] = {}
    for log_id, event in events:
        key = group_key(event, mode, zone)
        found = groups.get(key)
        if found is None:
            if len(groups) >= limit:
                break
            found = groups[key] = Group(key, mode)
        found.add(log_id, event, keep)
    return sorted(groups.values(), key=lambda g: g.newest_log_id, reverse=True)
