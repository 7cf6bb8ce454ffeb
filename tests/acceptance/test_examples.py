"""The example configuration and systemd unit in ``docs/examples`` work as shipped.

- ``pgherald.toml`` is read by pgherald's own loader, every sink in it passes its kind's
  checks, every subscription's filter parses and names a declared watch; and against a
  real database with its tables, ``pgherald init`` applies it and ``pgherald run`` starts
  with it, tells systemd it is ready, and stops cleanly on SIGTERM.
- ``pgherald.service`` passes ``systemd-analyze verify`` without a single complaint, gives
  pgherald more time to stop than the example's ``shutdown_timeout``, reloads with SIGHUP,
  and starts ``pgherald run`` with options the command accepts.
"""

from __future__ import annotations

import configparser
import dataclasses
import shlex
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from pgherald import app, declared
from pgherald.config import load_settings
from pgherald.routing.subscriptions import Subscription
from pgherald.sinks.base import SinkConfig, check_format
from tests import capture_harness as h
from tests.acceptance._cli import assert_ok, cli
from tests.conftest import Database
from tests.daemon_support import Daemon, NotifySocket

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
CONFIG = EXAMPLES / "pgherald.toml"
UNIT = EXAMPLES / "pgherald.service"


def test_the_example_configuration_loads_and_checks() -> None:
    settings = load_settings(CONFIG, env={})
    assert settings.config_file == CONFIG
    assert settings.log_format == "json" and settings.shutdown_timeout == 30.0
    # [slot_safety] is there, with every key (each one checked by load_settings)
    raw = tomllib.loads(CONFIG.read_text(encoding="utf-8"))["slot_safety"]
    assert set(raw) == {f.name for f in dataclasses.fields(settings.slot_safety)}
    safety = settings.slot_safety
    assert (safety.warn_retained_wal, safety.critical_retained_wal) == (1 << 30, 4 << 30)
    assert (safety.policy_retained_wal, safety.policy) == (16 << 30, "alert")
    names = [declared.watch_name(w) for w in settings.watches]
    assert names == ["employees", "orders", "invoices"]
    assert [s.name for s in settings.sinks] == ["orders-bus", "billing-hook", "hr-digest"]
    for spec in settings.sinks:
        app.build_sink(
            SinkConfig(
                name=spec.name,
                kind=spec.kind,
                format=check_format(spec.format),
                options=spec.options,
                strictly_ordered=spec.strictly_ordered,
            )
        )
    for sub in settings.subscriptions:
        assert sub.sink in {s.name for s in settings.sinks}
        for watch in sub.watches:
            assert watch in names
            filter_: dict[str, object] = {"ops": list(sub.ops)} if sub.ops is not None else {}
            if sub.where:
                filter_["where"] = sub.where
            Subscription.from_filter(sub.sink, watch, filter_, sub.ignore_columns)


def test_the_example_configuration_runs(db: Database, tmp_path: Path) -> None:
    db.execute(
        "CREATE TABLE employees (id int PRIMARY KEY, name text, updated_at timestamptz,"
        " last_login timestamptz);"
        " CREATE TABLE orders (id int PRIMARY KEY, total numeric);"
        ' CREATE SCHEMA "Billing";'
        ' CREATE TABLE "Billing"."Invoices" (id int PRIMARY KEY, customer_id int,'
        " amount numeric, status text, note text)"
    )
    slot = h.settings_for(db.dsn).slot
    flags = ("--config", str(CONFIG), "--dsn", db.dsn, "--slot", slot)
    done = assert_ok(cli(*flags, "init"))
    for name in ("employees", "orders", "invoices"):
        assert f"added watch {name!r} from the configuration file" in done.stdout
    notify = NotifySocket()
    settings = load_settings(CONFIG, env={}, dsn=db.dsn, slot=slot)
    daemon = Daemon(settings, config=CONFIG, flags=flags[2:], env=notify.env()).start()
    try:
        notify.wait_for("READY=1")
        db.execute("INSERT INTO orders VALUES (1, 10)")
        deadline = time.monotonic() + 60
        while not h.stored_events(settings, "orders"):
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            time.sleep(0.1)
        status, _ = daemon.terminate_timed()
        assert status == 0, daemon.log()[-3000:]
        assert '"message": "stopped cleanly' in daemon.log()
    finally:
        daemon.close()
        notify.close()


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_the_unit_matches_the_example_and_the_command() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert service["User"] == "pgherald"
    stop = float(service["TimeoutStopSec"])
    assert stop > load_settings(CONFIG, env={}).shutdown_timeout + 5
    assert service["Environment"].startswith("PGPASSFILE=")  # the last Environment= line
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name == "pgherald" and command[1] == "run"
    # the command accepts the unit's options (and refuses an unknown one)
    assert_ok(cli(*command[1:], "--help"))
    assert cli(*command[1:], "--no-such-option", "--help").returncode == 2


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # verify checks that ExecStart's program exists: point it at this installation's
    installed = str(h.PGHERALD)
    text = UNIT.read_text().replace("/usr/local/bin/pgherald", installed)
    good = tmp_path / "pgherald.service"
    good.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(good)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr
    # the check can fail: a misspelt key and a bad value are reported
    bad = tmp_path / "bad.service"
    bad.write_text(text.replace("KillMode=mixed", "KillMod=mixed").replace("=notify", "=notif"))
    complaint = subprocess.run(
        [analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "KillMod" in complaint.stderr and "notif" in complaint.stderr
