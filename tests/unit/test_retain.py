"""Retentions as people write them: parsing, what is refused and why, and the settings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from pgherald.config import load_settings
from pgherald.errors import ConfigError
from pgherald.retain import effective, parse_interval, parse_retain


@pytest.mark.parametrize(
    ("text", "stored", "period"),
    [
        ("400d", "400d", timedelta(days=400)),
        ("90D", "90d", timedelta(days=90)),
        (" 2 w ", "2w", timedelta(days=14)),
        ("36h", "36h", timedelta(hours=36)),
        ("1h", "1h", timedelta(hours=1)),
        ("1y", "1y", timedelta(days=365)),
        ("1y30d", "1y30d", timedelta(days=395)),
        ("1d12h", "1d12h", timedelta(hours=36)),
        ("forever", "forever", None),
        ("Forever", "forever", None),
    ],
)
def test_retentions_that_parse(text: str, stored: str, period: timedelta | None) -> None:
    retention = parse_retain(text)
    assert (retention.text, retention.period) == (stored, period)
    assert retention.forever == (period is None)
    assert parse_retain(retention.text) == retention  # what is stored parses the same


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not a retention"),
        ("90", "is not a retention"),
        ("d", "is not a retention"),
        ("90 days", "is not a retention"),
        ("-5d", "is not a retention"),
        ("1.5d", "is not a retention"),
        ("3m", "minutes and seconds are not accepted, and months are ambiguous"),
        ("3mo", "months are ambiguous"),
        ("600s", "minutes and seconds are not accepted"),
        ("0d", "too short: at least one hour"),
        ("0h", "too short"),
        ("1001y", 'too long: use "forever"'),
        ("never", "is not a retention"),
    ],
)
def test_retentions_refused_with_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_retain(text, "--retain")
    assert message in str(e.value)
    assert str(e.value).startswith(f"--retain {text!r}")
    assert "\n" not in str(e.value)


def test_a_non_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        parse_retain(400, "retain")  # type: ignore[arg-type]


def test_what_applies_to_a_watch() -> None:
    assert effective("30d", "400d").period == timedelta(days=30)
    assert effective(None, "400d").period == timedelta(days=400)
    assert effective("forever", "400d").forever
    assert effective(None, None).forever


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600), ("30m", 1800), ("1d", 86400), ("1h30m", 5400), ("10s", 10), ("OFF", None)],
)
def test_prune_intervals(text: str, seconds: int | None) -> None:
    interval = parse_interval(text)
    assert (interval.total_seconds() if interval else None) == seconds


@pytest.mark.parametrize("text", ["", "0s", "hourly", "1 hour", "-1h"])
def test_bad_prune_intervals(text: str) -> None:
    with pytest.raises(ConfigError, match="is not an interval"):
        parse_interval(text)


def test_settings_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pgherald.toml"
    path.write_text(
        'retain = "400D"\nprune_interval = "30m"\nprune_batch_size = 500\n'
        '[[watch]]\ntable = "public.orders"\nretain = "90d"\n'
        '[[watch]]\ntable = "public.audit"\nretain = "forever"\n'
        '[[watch]]\ntable = "public.other"\n'
    )
    settings = load_settings(path, env={})
    assert (settings.retain, settings.prune_interval, settings.prune_batch_size) == (
        "400d",
        "30m",
        500,
    )
    assert [w.retain for w in settings.watches] == ["90d", "forever", None]
    assert load_settings(path, env={"PGHERALD_RETAIN": "30d"}).retain == "30d"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('retain = "3m"\n', "retain '3m' is not a retention"),
        ("retain = 400\n", "retain must be a string"),
        ('prune_interval = "hourly"\n', "prune_interval 'hourly' is not an interval"),
        ("prune_batch_size = 0\n", "prune_batch_size must be at least 1"),
        ('[[watch]]\ntable = "t"\nretain = "90 days"\n', "[[watch]] #1.retain '90 days'"),
    ],
)
def test_bad_settings_in_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pgherald.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(path, env={})
    assert message in str(e.value)


def test_bad_retain_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="PGHERALD_RETAIN '1 month' is not a retention"):
        load_settings(env={"PGHERALD_RETAIN": "1 month"})
