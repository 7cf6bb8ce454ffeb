"""`pgherald run --web HOST:PORT` serves the console beside capture and delivery."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

from tests import capture_harness as h
from tests.acceptance._cli import assert_fails, cli
from tests.conftest import Database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_serves_the_console(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"), slot=False)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgherald", "--dsn", db.dsn, "run", "--web", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=h.cli_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/login", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the console did not answer"
                time.sleep(0.2)
        assert page.status_code == 200 and "<form" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/feeds/nope.atom", timeout=5).status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert_fails(cli("run", "--web", "nonsense", dsn=db.dsn), "is not HOST:PORT")
