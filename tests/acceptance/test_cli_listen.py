"""``pgherald listen CHANNEL...``: JSON lines on stdout, status on stderr, a clean stop on
SIGTERM and Ctrl-C, a reconnection reported, and one clear line for bad input.

The command is driven as a real subprocess (``python -c`` registering it on the real
``pgherald`` group, as ``cli.py`` does) and in-process with click's ``CliRunner``.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import click
import psycopg
import pytest
from click.testing import CliRunner

from pgherald.cli import HeraldGroup, connection_options
from pgherald.cli_listen import listen
from pgherald.db.embedded import free_port
from tests.acceptance._cli import WORKDIR, clean_env
from tests.conftest import Database

ENTRY = (
    "import sys; from pgherald.cli import main; from pgherald.cli_listen import listen;"
    " main.add_command(listen); sys.exit(main())"
)
"""The ``pgherald`` command with ``listen`` registered, as cli.py registers it."""


class Running:
    """A ``pgherald listen`` subprocess whose stdout and stderr lines are read as they come."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", ENTRY, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=clean_env({"PYTHONUNBUFFERED": "0"}),
            cwd=WORKDIR,
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._stderr_changed = threading.Condition()
        assert self.process.stdout is not None and self.process.stderr is not None
        threading.Thread(target=self._read, args=(self.process.stdout, None), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, 1), daemon=True).start()

    def _read(self, stream: IO[str], which: int | None) -> None:
        for line in stream:
            if which is None:
                self.stdout.put(line)
            else:
                with self._stderr_changed:
                    self.stderr.append(line)
                    self._stderr_changed.notify_all()

    def wait_stderr(self, fragment: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        with self._stderr_changed:
            while True:
                for line in self.stderr:
                    if fragment in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"no {fragment!r} on stderr: {''.join(self.stderr)}")
                self._stderr_changed.wait(left)

    def json_lines(self, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            line = self.stdout.get(timeout=timeout)
            assert line.endswith("\n") and "\n" not in line[:-1]
            out.append(json.loads(line))
        return out

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=20)


@pytest.fixture
def running(db: Database) -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        if r.process.poll() is None:
            r.process.kill()
            r.process.wait()


def notify(db: Database, *pairs: tuple[str, str]) -> int:
    """Sends the notifications in one transaction; returns the sender's pid."""
    with psycopg.connect(db.dsn) as conn:
        for channel, payload in pairs:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        return conn.info.backend_pid


def test_prints_json_lines_and_stops_on_sigterm(db: Database, running: list[Running]) -> None:
    r = Running("listen", "orders", "Prices EU", "--dsn", db.dsn)
    running.append(r)
    r.wait_stderr('listening on "orders", "Prices EU"')
    before = datetime.now(UTC) - timedelta(seconds=1)
    payload = 'multi\nline "quoted" ☕ {"json": true}'
    pid = notify(db, ("orders", "42"), ("Prices EU", payload), ("prices eu", "other channel"))
    notify(db, ("orders", ""))
    lines = r.json_lines(3)
    assert [(x["channel"], x["payload"], x["pid"]) for x in lines] == [
        ("orders", "42", pid),
        ("Prices EU", payload, pid),
        ("orders", "", lines[2]["pid"]),
    ]
    for x in lines:
        assert set(x) == {"channel", "payload", "pid", "received_at"}
        received = datetime.fromisoformat(x["received_at"])
        assert received.tzinfo is not None
        assert before <= received <= datetime.now(UTC) + timedelta(seconds=1)
    assert r.stop(signal.SIGTERM) == 0
    assert r.stdout.empty()
    r.wait_stderr("stopped")
    assert "Traceback" not in "".join(r.stderr)


def test_ctrl_c_stops_cleanly_too(db: Database, running: list[Running]) -> None:
    r = Running("--dsn", db.dsn, "listen", "c")  # connection options before the command
    running.append(r)
    r.wait_stderr("listening on")
    notify(db, ("c", "x"))
    assert r.json_lines(1)[0]["payload"] == "x"
    assert r.stop(signal.SIGINT) == 0
    assert "Traceback" not in "".join(r.stderr)


def test_reports_a_reconnection_and_listens_again(db: Database, running: list[Running]) -> None:
    r = Running("listen", "again", "--dsn", db.dsn)
    running.append(r)
    r.wait_stderr("listening on")
    killed = db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'pgherald listen' AND datname = current_database()"
    )
    assert killed == [(True,)]
    r.wait_stderr("lost the connection")
    r.wait_stderr("listening again on 1 channel(s); notifications sent while disconnected")
    notify(db, ("again", "after the reconnection"))
    assert r.json_lines(1)[0]["payload"] == "after the reconnection"
    assert r.stop() == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("ok", "--dsn", "host=127.0.0.1 port={port} password=hunter22"), "connection refused"),
        (("ok", "--dsn", "host=x password=hunter22 = ="), "not a valid libpq connection string"),
        (("x" * 64, "--dsn", "dbname=x"), "at most 63 bytes"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_1(args: tuple[str, ...], fragment: str) -> None:
    args = tuple(a.format(port=free_port()) for a in args)
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, "listen", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=WORKDIR,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pgherald: ") and fragment in lines[0], lines[0]
    assert "hunter22" not in done.stderr and done.stdout == ""


# -- in-process, with click's CliRunner ---------------------------------------------------------


@click.group(cls=HeraldGroup)
@connection_options
def group() -> None:
    """A stand-in for the ``pgherald`` group."""


group.add_command(listen)


def test_help_shows_the_connection_options() -> None:
    result = CliRunner().invoke(listen, ["--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "CHANNEL..." in text and "JSON lines" in text
    positions = [text.index(o) for o in ("--config", "--dsn", "--schema", "--log-level")]
    assert positions == sorted(positions)  # in the same order as every other command


@pytest.mark.parametrize("command", [listen, group])
def test_bad_input_in_process(command: click.Command) -> None:
    prefix = ["listen"] if command is group else []
    runner = CliRunner()
    result = runner.invoke(command, [*prefix, "", "--dsn", "dbname=x"])
    assert result.exit_code == 1
    assert result.output.strip() == "pgherald: a channel name cannot be empty"
    result = runner.invoke(command, [*prefix, "ch", "--dsn", f"host=127.0.0.1 port={free_port()}"])
    assert result.exit_code == 1
    assert result.output.startswith("pgherald: cannot connect to PostgreSQL at 127.0.0.1:")
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(command, prefix)
    assert result.exit_code == 2 and "Missing argument 'CHANNEL...'" in result.output


def test_importing_the_command_first_works() -> None:
    """No import cycle, whichever of cli.py and cli_listen.py is imported first."""
    for code in (
        "import pgherald.cli_listen, pgherald.cli",
        "import pgherald.cli, pgherald.cli_listen",
    ):
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
