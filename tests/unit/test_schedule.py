"""Schedules of snapshot watches: parsing, next run, due-ness after missed runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgherald.errors import ConfigError
from pgherald.schedule import Schedule, parse_every

T = datetime(2026, 11, 21, 10, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("30s", 30), ("15m", 900), ("1h30m", 5400), ("2d", 172800), ("1w", 604800),
     (" 1h 5m ", 3900)],
)  # fmt: skip
def test_every(text: str, seconds: int) -> None:
    assert parse_every(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "15x", "m15", "1h30", "0s", "-5m", "1.5h"])
def test_bad_every_is_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--every"):
        parse_every(text)


def test_exactly_one_of_cron_or_every() -> None:
    with pytest.raises(ConfigError, match="one of --schedule"):
        Schedule.parse()
    with pytest.raises(ConfigError, match="one of --schedule"):
        Schedule.parse(cron="* * * * *", every="1m")
    with pytest.raises(ConfigError, match="not a cron expression"):
        Schedule.parse(cron="every day")


def test_cron_next_run_and_a_missed_run_is_due_once() -> None:
    daily = Schedule.parse(cron="0 5 * * *")
    assert daily.next_run(None, T) == datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
    assert not daily.is_due(T, T, T + timedelta(hours=12))
    # Down for three days: due now, and after that one run, not due again until tomorrow.
    later = T + timedelta(days=3)
    assert daily.is_due(T, T, later)
    assert not daily.is_due(later, T, later + timedelta(minutes=1))
    assert daily.describe() == "cron '0 5 * * *' (UTC)"
    assert Schedule.from_options(daily.to_options()) == daily


def test_interval_next_run() -> None:
    every = Schedule.parse(every="15m")
    assert every.is_due(None, T, T)  # never ran: at once
    assert every.next_run(T, T) == T + timedelta(minutes=15)
    assert not every.is_due(T, T, T + timedelta(minutes=14))
    assert every.to_options() == {"every": 900}
    assert Schedule.from_options({"every": 900}) == every
    assert Schedule.from_options({}) is None
    assert every.describe() == "every 15m"
