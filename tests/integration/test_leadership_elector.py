"""An elector that fails for an unexpected reason stops the capture loudly.

Lost connections are the elector's daily business and are retried (tests/faults/
test_failover.py). Anything else is a bug, and without this a process would stay up
with every role waiting for a lock that nobody tries any more: alive, ready to its
supervisor, and capturing nothing.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from pgherald import app
from pgherald.leadership import Leadership
from tests import capture_harness as h
from tests.conftest import Database


def test_an_elector_that_fails_stops_the_capture_and_says_why(
    db_primary: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_primary.execute("CREATE TABLE el_t (id int PRIMARY KEY)")
    settings = h.install(
        db_primary.dsn,
        ["public.el_t"],
        settings=h.settings_for(db_primary.dsn, method="trigger"),
        slot=False,
    )
    capture = app.Capture(settings).start()
    try:
        capture.wait_ready(timeout=20)
        db_primary.execute("INSERT INTO el_t VALUES (1)")
        h.catch_up(settings, alive=lambda: h.capture_problem(capture))
        assert capture.trigger is not None and capture.trigger.leader.is_set()

        def broken(self: Leadership, conn: psycopg.Connection[object]) -> None:
            raise RuntimeError("an elector bug")

        monkeypatch.setattr(Leadership, "_tick", broken)
        deadline = time.monotonic() + 10
        while not capture.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert capture.stop.is_set(), "the capture kept running without an elector"
        assert [str(e) for e in capture.errors] == ["an elector bug"]
        assert capture.leadership.roles["trigger:pgherald"].term.is_set()
    finally:
        with pytest.raises(RuntimeError, match="an elector bug"):
            capture.close()
