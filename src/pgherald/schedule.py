"""When snapshot watches run: a cron expression or a fixed interval, and what is due now.

A schedule is stored with its watch (``options.schedule`` or ``options.every``, in
seconds). What is due is computed from the last run, so nothing is kept in memory that a
restart would lose: a run that was missed while the daemon was down is due at once when
it starts, and runs once however many were missed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from croniter import croniter

from pgherald.errors import ConfigError

_PART: Final = re.compile(r"(\d+)\s*([smhdw])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_every(text: str) -> timedelta:
    """``"15m"``, ``"1h30m"``, ``"90s"``, ``"2d"`` (or a number of seconds) as a duration."""
    cleaned = text.strip().lower()
    if cleaned.isdigit():
        seconds = int(cleaned)
    else:
        pos, seconds = 0, 0
        compact = cleaned.replace(" ", "")
        for match in _PART.finditer(compact):
            if match.start() != pos:
                break
            seconds += int(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(compact) or not compact:
            raise ConfigError(
                f"--every {text!r} is not a duration; write it like 30s, 15m, 1h30m or 2d"
            )
    if seconds < 1:
        raise ConfigError(f"--every {text!r} is too short: at least one second")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Schedule:
    """Exactly one of a cron expression (evaluated in UTC) or an interval."""

    cron: str | None = None
    every: timedelta | None = None

    @classmethod
    def parse(cls, cron: str | None = None, every: str | None = None) -> Schedule:
        if (cron is None) == (every is None):
            raise ConfigError("give a snapshot watch one of --schedule (cron) or --every")
        if cron is not None:
            if not croniter.is_valid(cron):
                raise ConfigError(
                    f"--schedule {cron!r} is not a cron expression"
                    " (five fields: minute hour day-of-month month day-of-week, e.g. '0 5 * * *')"
                )
            return cls(cron=cron.strip())
        assert every is not None
        return cls(every=parse_every(every))

    def to_options(self) -> dict[str, Any]:
        if self.cron is not None:
            return {"schedule": self.cron}
        assert self.every is not None
        return {"every": int(self.every.total_seconds())}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Schedule | None:
        if options.get("schedule"):
            return cls(cron=str(options["schedule"]))
        if options.get("every"):
            return cls(every=timedelta(seconds=int(options["every"])))
        return None

    def describe(self) -> str:
        if self.cron is not None:
            return f"cron '{self.cron}' (UTC)"
        assert self.every is not None
        return f"every {_short(self.every)}"

    def next_run(self, last_run: datetime | None, created: datetime) -> datetime:
        """When the next run is due: after the last run (or after creation, for cron; at
        once, for an interval watch that never ran)."""
        if self.every is not None:
            return (last_run + self.every) if last_run is not None else created
        assert self.cron is not None
        start = (last_run or created).astimezone(UTC)
        nxt: datetime = croniter(self.cron, start).get_next(datetime)
        return nxt

    def is_due(self, last_run: datetime | None, created: datetime, now: datetime) -> bool:
        return self.next_run(last_run, created) <= now


def _short(d: timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
