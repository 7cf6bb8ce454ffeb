"""`pgherald check`'s judging, without a database: thresholds, states, the one line."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pgherald.errors import ConfigError
from pgherald.ops import check
from pgherald.ops.check import CRITICAL, OK, WARNING, Limit, Thresholds, evaluate
from pgherald.ops.measure import Measurements, SnapshotAge
from pgherald.ops.slot_stats import SlotStats, lag_seconds
from pgherald.schedule import Schedule
from tests.plugin_output import parse


def slot(**changes: object) -> SlotStats:
    base: dict[str, object] = {
        "slot": "pgherald",
        "active": True,
        "active_pid": 123,
        "wal_status": "reserved",
        "retained_bytes": 4096,
        "lag_bytes": 1024,
        "lag_seconds": 0.5,
        "safe_wal_size": None,
        "confirmed_flush_lsn": "0/10",
        "restart_lsn": "0/8",
    }
    base.update(changes)
    return SlotStats(**base)  # type: ignore[arg-type]


def measurements(**changes: object) -> Measurements:
    base: dict[str, object] = {
        "slot_name": "pgherald",
        "slot": slot(),
        "logical_watches": 1,
        "trigger_rows": 0,
        "trigger_oldest_seconds": None,
    }
    base.update(changes)
    return Measurements(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "n"),
    [("512", 512), ("64kB", 65536), ("256MB", 256 << 20), ("1GB", 1 << 30), ("2 gb", 2 << 30),
     ("1.5GB", 3 << 29), ("1TB", 1 << 40), ("0", 0)],
)  # fmt: skip
def test_sizes(text: str, n: int) -> None:
    assert check.parse_size(text, "--lag-warn") == n


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h30m", 5400), ("2d", 172800), ("0.5", 0.5),
     ("1.5h", 5400)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert check.parse_duration(text, "--lag-seconds-warn") == seconds


@pytest.mark.parametrize("text", ["", "x", "12XB", "-1", "1 2"])
def test_bad_sizes_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--retained-crit"):
        check.parse_size(text, "--retained-crit")


@pytest.mark.parametrize("text", ["", "soon", "1h30", "m5"])
def test_bad_durations_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--snapshot-age-warn"):
        check.parse_duration(text, "--snapshot-age-warn")


def test_a_warning_above_the_critical_threshold_is_refused() -> None:
    with pytest.raises(ConfigError, match="never warn"):
        Limit(10, 5)


def test_limits_alert_above_the_threshold() -> None:
    limit = Limit(10, 20)
    assert [limit.state(v) for v in (0, 10, 10.5, 20, 21)] == [OK, OK, WARNING, WARNING, CRITICAL]


def test_all_well_is_ok_with_every_figure_in_the_performance_data() -> None:
    result = evaluate(measurements(), Thresholds())
    out = parse(result.line())
    assert result.state == OK and out.state == "OK"
    assert "lag 1.0 kB / 0 s" in out.text and "retained WAL 4.0 kB" in out.text
    assert out.perf["lag_bytes"].value == 1024 and out.perf["lag_bytes"].uom == "B"
    assert out.perf["lag_bytes"].warn == 256 << 20 and out.perf["lag_bytes"].crit == 1 << 30
    assert out.perf["lag_seconds"].value == 0.5 and out.perf["lag_seconds"].uom == "s"
    assert out.perf["retained_wal_bytes"].value == 4096
    assert {"failed_deliveries", "dead_deliveries", "errors_last_hour"} <= out.perf.keys()


@pytest.mark.parametrize(
    ("changes", "thresholds", "state", "words"),
    [
        ({"slot": slot(lag_bytes=300 << 20)}, Thresholds(), WARNING, "capture lag"),
        ({"slot": slot(lag_bytes=2 << 30)}, Thresholds(), CRITICAL, "critical above 1.0 GB"),
        ({"slot": slot(lag_seconds=61.0)}, Thresholds(), WARNING, "warning above 60 s"),
        ({"slot": slot(retained_bytes=5 << 30)}, Thresholds(), CRITICAL, "retained WAL"),
        ({"slot": slot(wal_status="lost")}, Thresholds(), CRITICAL, "invalidated"),
        ({"slot": slot(wal_status="unreserved")}, Thresholds(), CRITICAL, "about to be"),
        ({"slot": None}, Thresholds(), CRITICAL, "does not exist"),
        ({"errors_recent": 3, "last_error": ("w", "boom | bang")}, Thresholds(), WARNING,
         "3 errors in the last hour (latest in w: boom / bang)"),
        ({"errors_recent": 11}, Thresholds(), CRITICAL, "11 errors"),
        ({"deliveries": {"hook": {"failed": 2}}}, Thresholds(), WARNING,
         "2 deliveries failing (to be retried) (hook 2)"),
        ({"dead_recent": {"a": 1, "b": 0}}, Thresholds(dead=Limit(0, 0)), CRITICAL,
         "1 dead letters in the last 24 h (a 1)"),
    ],
)  # fmt: skip
def test_each_condition_alerts(
    changes: dict[str, object], thresholds: Thresholds, state: int, words: str
) -> None:
    result = evaluate(measurements(**changes), thresholds)
    out = parse(result.line())
    assert result.state == state, result.line()
    assert out.state == check.STATE_NAMES[state]
    assert words in out.text, out.text


def test_no_slot_and_no_logical_watches_is_fine_and_leaves_the_slot_figures_out() -> None:
    result = evaluate(measurements(slot=None, logical_watches=0), Thresholds())
    out = parse(result.line())
    assert out.state == "OK"
    assert "lag_bytes" not in out.perf and "retained_wal_bytes" not in out.perf


def test_critical_findings_come_first() -> None:
    result = evaluate(
        measurements(slot=slot(lag_bytes=300 << 20, retained_bytes=5 << 30)), Thresholds()
    )
    out = parse(result.line())
    assert out.state == "CRITICAL"
    assert out.text.index("retained WAL") < out.text.index("capture lag")


def snapshot(
    age: float | None, every: float | None = 60, created: float = 1000, error: str | None = None
) -> SnapshotAge:
    schedule = Schedule(every=timedelta(seconds=every)) if every else None
    return SnapshotAge("nightly", schedule, age, created, error)


@pytest.mark.parametrize(
    ("age", "state"), [(60, OK), (120, OK), (121, WARNING), (240, WARNING), (241, CRITICAL)]
)
def test_snapshot_age_by_default_is_two_and_four_periods(age: float, state: int) -> None:
    result = evaluate(measurements(snapshots=(snapshot(age),)), Thresholds())
    assert result.state == state
    perf = parse(result.line()).perf["snapshot_age_nightly"]
    assert (perf.value, perf.warn, perf.crit) == (age, 120, 240)


def test_a_watch_that_never_succeeded_is_as_old_as_the_watch() -> None:
    result = evaluate(
        measurements(snapshots=(snapshot(None, created=500, error="relation x does not exist"),)),
        Thresholds(),
    )
    out = parse(result.line())
    assert out.state == "CRITICAL"
    assert "never succeeded (made 8 min ago)" in out.text
    assert "relation x does not exist" in out.text


def test_unscheduled_watches_are_judged_only_with_explicit_thresholds() -> None:
    old = measurements(snapshots=(snapshot(10_000, every=None),))
    assert evaluate(old, Thresholds()).state == OK
    assert evaluate(old, Thresholds(snapshot_age=Limit(60, 3600))).state == CRITICAL


def test_cron_schedules_have_a_period() -> None:
    daily = SnapshotAge("d", Schedule(cron="0 5 * * *"), 10, 10, None)
    assert daily.period() == 86400


def test_perf_labels_of_hostile_watch_names_stay_parsable() -> None:
    hostile = SnapshotAge("we'ird = na|me\n", Schedule(every=timedelta(seconds=60)), 1, 1, None)
    out = parse(evaluate(measurements(snapshots=(hostile,)), Thresholds()).line())
    assert "snapshot_age_we_ird___na_me_" in out.perf


def test_unknown_has_no_performance_data() -> None:
    result = check.unknown("cannot connect | really\nnot")
    assert result.state == check.UNKNOWN
    assert result.line() == "PGHERALD UNKNOWN - cannot connect / really not"


@pytest.mark.parametrize(
    ("active", "lag", "flush_lag", "idle", "expected"),
    [
        (True, 100, 0.7, 50.0, 0.7),  # streaming: the walsender's measure
        (True, 0, None, 50.0, 0.0),  # streaming, nothing waiting, not measured yet
        (False, 100, None, 50.0, 50.0),  # stopped, WAL waiting: since the last progress
        (False, 0, None, 50.0, 0.0),  # stopped, nothing waiting
        (False, 100, None, None, None),  # cannot tell
    ],
)
def test_lag_seconds(
    active: bool, lag: int, flush_lag: float | None, idle: float | None, expected: float | None
) -> None:
    assert lag_seconds(active, lag, flush_lag, idle) == expected


def test_retained_wal_defaults_follow_the_slot_safety_settings() -> None:
    from types import SimpleNamespace

    from pgherald.config import Settings

    safety = SimpleNamespace(warn_retained_wal=2 << 30, critical_retained_wal=8 << 30)
    configured = SimpleNamespace(slot_safety=safety)
    assert check.default_thresholds(configured).retained_bytes == Limit(2 << 30, 8 << 30)  # type: ignore[arg-type]
    assert check.default_thresholds(Settings()).retained_bytes.crit == 4 << 30
