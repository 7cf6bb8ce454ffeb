"""Slot safety without a server: the configuration, the grading, the words, the gap's range."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from pgherald.config import SlotSafety, load_settings, parse_size
from pgherald.errors import ConfigError
from pgherald.events.formats import (
    FormatError,
    from_pgherald_json,
    load_schema,
    to_cloudevent,
    to_format,
    to_pgherald_json,
)
from pgherald.events.model import describe_gap
from pgherald.sources.logical import LogicalWatch, gap_events
from pgherald.sources.slot_safety import (
    Bound,
    Reading,
    Resync,
    SlotHealth,
    SlotMonitor,
    SlotThresholds,
    assess,
    describe,
    format_size,
    gap_meta,
    later,
    limit_report,
)

KB, MB, GB = 1 << 10, 1 << 20, 1 << 30


def settings_from(tmp_path: Path, text: str) -> SlotSafety:
    path = tmp_path / "pgherald.toml"
    path.write_text(text)
    return load_settings(path, env={}).slot_safety


def test_slot_safety_from_the_file(tmp_path: Path) -> None:
    found = settings_from(
        tmp_path,
        '[slot_safety]\nwarn_retained_wal = "64kB"\ncritical_retained_wal = "512 MB"\n'
        'policy_retained_wal = "2GiB"\npolicy = "drop-and-resync"\ncheck_interval = 5\n'
        "heartbeat_interval = 0\n",
    )
    assert found == SlotSafety(64 * KB, 512 * MB, 2 * GB, "drop-and-resync", 5.0, 0.0)


def test_slot_safety_defaults(tmp_path: Path) -> None:
    assert settings_from(tmp_path, "") == SlotSafety(GB, 4 * GB, 16 * GB, "alert", 30.0, 10.0)
    assert settings_from(tmp_path, '[slot_safety]\npolicy = "pause-and-alert"\n').policy == (
        "pause-and-alert"
    )


@pytest.mark.parametrize(
    ("value", "size"),
    [("1GB", GB), ("1 gb", GB), ("1.5MB", 3 * MB // 2), ("16kB", 16 * KB), ("2TB", 2 << 40),
     ("4096", 4096), (4096, 4096), ("100B", 100), ("3MiB", 3 * MB)],
)  # fmt: skip
def test_sizes_with_units(value: object, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('warn_retained_wal = "1XB"', r'warn_retained_wal must be a size like "64kB"'),
        ('warn_retained_wal = "GB"', "must be a size like"),
        ("warn_retained_wal = true", "must be a size like"),
        ('warn_retained_wal = "0kB"', "must be more than 0 bytes"),
        ('warn_retained_wal = "8GB"', "the sizes must grow"),
        ('critical_retained_wal = "32GB"', "the sizes must grow"),
        ('policy = "panic"', "policy must be one of alert, pause-and-alert, drop-and-resync"),
        ("check_interval = 0", "check_interval must be between"),
        ('heartbeat_interval = "10s"', "heartbeat_interval must be a number of seconds"),
        ("warn_retained = 1", "unknown key 'warn_retained'"),
    ],
)
def test_bad_slot_safety_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        settings_from(tmp_path, f"[slot_safety]\n{text}\n")
    assert "[slot_safety]" in str(e.value) and "\n" not in str(e.value)


def test_slot_safety_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[slot_safety\] must be a table"):
        settings_from(tmp_path, 'slot_safety = "alert"\n')


def health(retained: int | None, wal_status: str = "reserved", **more: object) -> SlotHealth:
    values: dict[str, object] = {
        "slot": "pgherald",
        "plugin": "pgoutput",
        "database": "app",
        "active": False,
        "active_pid": None,
        "restart_lsn": "0/10",
        "confirmed_flush_lsn": "0/20",
        "wal_status": wal_status,
        "safe_wal_size": None,
        "conflicting": None,
        "invalidation_reason": None,
        "retained_bytes": retained,
        "lag_bytes": retained,
        "current_lsn": "1/0",
    }
    values.update(more)
    return SlotHealth(**values)  # type: ignore[arg-type]


THRESHOLDS = SlotThresholds(64 * KB, 256 * KB, MB, "alert")


@pytest.mark.parametrize(
    ("slot", "level"),
    [
        (None, "missing"),
        (health(0), "ok"),
        (health(64 * KB - 1), "ok"),
        (health(64 * KB), "warning"),
        (health(256 * KB), "critical"),
        (health(MB), "policy"),
        (health(10, wal_status="unreserved"), "critical"),
        (health(10 * MB, wal_status="lost"), "lost"),
        (health(10, invalidation_reason="rows_removed"), "lost"),
        (health(10, conflicting=True), "lost"),
    ],
)
def test_levels(slot: SlotHealth | None, level: str) -> None:
    assert assess(slot, THRESHOLDS) == level


def test_the_words_say_what_is_held_back_against_what() -> None:
    line = describe(health(300 * KB, safe_wal_size=700 * KB), "critical", THRESHOLDS)
    assert line.startswith("replication slot 'pgherald' holds back 300 kB of WAL")
    assert "over the critical threshold of 256 kB" in line
    assert "700 kB more and PostgreSQL invalidates it" in line
    policy = describe(health(2 * MB), "policy", THRESHOLDS)
    assert "over the policy threshold of 1 MB" in policy and "policy alert" in policy
    lost = describe(health(None, wal_status="lost"), "lost", THRESHOLDS)
    assert "was invalidated by PostgreSQL" in lost and "max_slot_wal_keep_size" in lost
    unreserved = describe(health(1, wal_status="unreserved"), "critical", THRESHOLDS)
    assert "wal_status = unreserved" in unreserved and "threshold" not in unreserved


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "unknown"), (12, "12 bytes"), (1536, "1.5 kB"), (MB, "1 MB"), (300 * MB, "300 MB"),
     (16 * GB, "16 GB")],
)  # fmt: skip
def test_sizes_for_people(size: int | None, text: str) -> None:
    assert format_size(size) == text


def test_the_servers_limit_against_the_thresholds() -> None:
    level, line = limit_report(None, THRESHOLDS)
    assert level == logging.INFO and "unlimited" in line
    level, line = limit_report(10 * MB, THRESHOLDS)
    assert level == logging.INFO and "max_slot_wal_keep_size is 10 MB" in line
    level, line = limit_report(512 * KB, THRESHOLDS)
    assert level == logging.WARNING
    assert "critical_retained_wal (256 kB)" not in line
    assert "policy_retained_wal (1 MB)" in line and "that threshold" in line
    level, line = limit_report(KB, THRESHOLDS)
    assert "warn_retained_wal (64 kB)" in line and "those thresholds" in line


def test_the_gap_starts_at_the_latest_safe_point() -> None:
    t = datetime(2025, 1, 1, tzinfo=UTC)
    found = later(Bound(0x100, None), None, Bound(0x80, t), Bound(0, t + timedelta(seconds=5)))
    assert found == Bound(0x100, t + timedelta(seconds=5))
    assert later(None) is None
    meta = gap_meta("s", "why", Bound(0x1_0000_0010, t), Bound(0x1_0000_0100, t))
    assert meta["from_lsn"] == "1/10" and meta["to_lsn"] == "1/100"
    assert meta["from_time"] == t.isoformat() and meta["resnapshot"] is True
    assert "may be missing" in meta["uncertain"] and "1/10" in meta["uncertain"]
    pending = Resync("why", Bound(0x1_0000_0010, t))
    assert Resync.from_text(pending.to_text()) == pending
    assert Resync.from_text("done") is None


def test_a_gap_event_in_each_format() -> None:
    """Its own format carries it whole (and validates against the published schema); the
    Debezium and simple shapes have no gap, so they refuse it with a clear error, which
    delivery records as a permanent failure (as for ``schema`` events), never silently."""
    t = datetime(2025, 1, 1, tzinfo=UTC)
    meta = gap_meta("s", "why", Bound(0x10, t), Bound(0x100, t + timedelta(minutes=5)))
    watch = LogicalWatch("orders", "public", "orders", ("id",))
    (event,) = gap_events([watch], meta, Bound(0x100, t + timedelta(minutes=5)))
    assert event.op == "gap" and event.event_id == f"G/{0x100:016X}/1"
    data = to_pgherald_json(event)
    jsonschema.Draft202012Validator(load_schema()).validate(data)
    assert data["op"] == "gap" and data["meta"]["uncertain"] == meta["uncertain"]
    back = from_pgherald_json(json.loads(json.dumps(data)))
    assert back.op == "gap" and back.meta == meta
    assert to_cloudevent(event, "pgherald")["type"] == "io.pgherald.change.gap"
    for fmt in ("debezium", "simple"):
        with pytest.raises(FormatError, match="'gap' event has no"):
            to_format(event, fmt)
    assert describe_gap(meta) == meta["uncertain"]


def test_the_monitor_tells_rises_once_and_records_critical_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pgherald.slot")
    recorded: list[tuple[str, dict[str, object]]] = []
    monitor = SlotMonitor(
        "", "pgherald", THRESHOLDS, 1.0, lambda r: None, lambda m, d: recorded.append((m, dict(d)))
    )

    def see(retained: int, at: float) -> None:
        level = assess(health(retained), THRESHOLDS)
        monitor._tell(
            Reading(health(retained), level, describe(health(retained), level, THRESHOLDS), at)
        )

    see(100 * KB, 0.0)  # warning: logged, not recorded
    see(300 * KB, 1.0)  # critical: logged and recorded
    see(200 * KB, 2.0)  # wavering below and back: nothing new
    see(300 * KB, 3.0)
    see(2 * MB, 4.0)  # policy: logged and recorded
    see(2 * MB, 400.0)  # still there after `repeat`: logged again, not recorded
    see(0, 401.0)  # back to ok: said once
    see(300 * KB, 402.0)  # a new rise is told again
    lines = [(r.levelname, r.getMessage()[:40]) for r in caplog.records]
    assert [level for level, _ in lines] == [
        "WARNING", "ERROR", "ERROR", "ERROR", "INFO", "ERROR",
    ]  # fmt: skip
    assert lines[1][1].startswith("CRITICAL: replication slot")
    assert [d["level"] for _, d in recorded] == ["critical", "policy", "critical"]
    assert recorded[1][1]["policy_bytes"] == MB and recorded[1][1]["retained_bytes"] == 2 * MB
