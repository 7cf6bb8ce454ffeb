"""`/readyz` of a real daemon follows its database: 503 while the change log's server is
down, with a reason, and 200 again once it is back and capture has reconnected."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg

from pgherald.db.embedded import EmbeddedCluster
from tests import capture_harness as h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(get: Callable[[], Any], until: Callable[[Any], bool], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = get()
        if until(found):
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}: last {found!r}"
        time.sleep(0.3)


def readyz(base: str) -> tuple[int, dict[str, Any]] | None:
    try:
        r = httpx.get(f"{base}/readyz", timeout=20)
    except httpx.TransportError:
        return None
    return r.status_code, r.json()


def test_readyz_follows_the_database(private_cluster: EmbeddedCluster) -> None:
    with psycopg.connect(private_cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    dsn = private_cluster.dsn("app")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = h.install(dsn, ["t"])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = h.CaptureProcess(settings, "--http", f"127.0.0.1:{port}").start()
    try:
        _, body = poll(lambda: readyz(base), lambda r: r is not None and r[0] == 200, "ready", 60)
        assert body["status"] == "ready" and body["problems"] == []
        assert set(body["parts"]) >= {"capture", "delivery"}

        private_cluster.kill()
        down_at = time.monotonic()
        _, body = poll(lambda: readyz(base), lambda r: r is not None and r[0] == 503,
                       "503 while the database is down", 30)  # fmt: skip
        assert body["status"] == "not ready"
        reasons = " ".join(body["problems"])
        assert "the change log's database does not answer" in reasons, body
        assert time.monotonic() - down_at < 30
        # Alive all the same, and the metrics say the database is down without failing.
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        scraped_at = time.monotonic()
        metrics = httpx.get(f"{base}/metrics", timeout=30)
        assert metrics.status_code == 200 and "pgherald_database_up 0.0" in metrics.text
        assert time.monotonic() - scraped_at < 10
        private_cluster.start_again()
        _, body = poll(lambda: readyz(base), lambda r: r is not None and r[0] == 200,
                       "ready again", 120)  # fmt: skip
        assert body["problems"] == []
        assert daemon.alive(), daemon.log()[-3000:]

        # And it captures again.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        h.catch_up(
            settings,
            timeout=120,
            alive=lambda: None if daemon.alive() else daemon.log(),
            log=daemon.log,
        )
    except BaseException:
        print(daemon.log()[-5000:])
        raise
    finally:
        daemon.close()
