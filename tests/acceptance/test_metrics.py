"""`/metrics`, `/healthz` and `/readyz` of a real daemon (`pgherald run --http`).

The daemon runs as operators run it, in a subprocess: it captures a logical and a trigger
watch, runs a snapshot watch that works and one that fails, and delivers to a webhook that
answers and to one nobody listens to. The scrape is parsed with prometheus_client's own
parser, and every value is compared with what happened, counted independently (by the
webhook receiver, or in the store's tables).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgherald import routing_admin
from pgherald.config import Settings
from tests import capture_harness as h
from tests.acceptance._cli import assert_fails, assert_ok, cli
from tests.conftest import Database

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A webhook endpoint that answers 200 and counts what arrives."""

    def __init__(self) -> None:
        self.count = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    receiver.count += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def scrape(base: str) -> Samples:
    response = httpx.get(f"{base}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"sample {key} twice"
            out[key] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def one(db: Database, query: str, *params: object) -> int:
    [(n,)] = db.execute(query, params)
    return int(str(n))


def test_metrics_match_what_happened(db_primary: Database, receiver: Receiver) -> None:
    db = db_primary
    db.execute(
        "CREATE TABLE acct (id int PRIMARY KEY, balance numeric);"
        " CREATE TABLE audit (id int PRIMARY KEY, note text);"
        " CREATE TABLE stock (sku text PRIMARY KEY, n int); INSERT INTO stock VALUES ('a', 1);"
        " CREATE TABLE doomed (id int PRIMARY KEY)"
    )
    settings = h.install(db.dsn, ["acct"])
    assert_ok(cli("watch", "add", "audit", "--method", "trigger", "--slot", settings.slot,
                  dsn=db.dsn))  # fmt: skip
    for table in ("stock", "doomed"):
        assert_ok(cli("watch", "add", table, "--method", "snapshot", "--every", "2s", dsn=db.dsn))
    db.execute("DROP TABLE doomed")  # its runs fail from now on
    closed = free_port()
    routing_admin.add_sink(settings, "hook", "webhook", options={"url": receiver.url})
    routing_admin.add_sink(
        settings, "dead-end", "webhook", options={"url": f"http://127.0.0.1:{closed}/"},
        max_attempts=1,
    )  # fmt: skip
    routing_admin.subscribe(settings, "hook", ["acct"])
    routing_admin.subscribe(settings, "dead-end", ["audit"])

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon = h.CaptureProcess(settings, "--http", f"127.0.0.1:{port}").start()
    try:
        wait_until(lambda: _ready(base), "the daemon to be ready")
        assert httpx.get(f"{base}/healthz", timeout=10).text == "ok\n"

        first_commit = time.time()
        db.execute("INSERT INTO acct SELECT g, 100 FROM generate_series(1, 5) g")
        db.execute("UPDATE acct SET balance = balance + 1 WHERE id <= 2")
        db.execute("INSERT INTO audit VALUES (1, 'x'), (2, 'y'), (3, 'z')")
        db.execute("UPDATE stock SET n = 2")
        wait_until(lambda: receiver.count >= 7, "7 webhook deliveries")
        wait_until(
            lambda: one(db, "SELECT count(*) FROM pgherald.deliveries WHERE status = 'dead'") == 3,
            "3 dead letters",
        )
        wait_until(
            lambda: one(db, "SELECT count(*) FROM pgherald.events WHERE watch = 'stock'") == 1,
            "the snapshot run to see the update",
        )
        wait_until(
            lambda: one(db, "SELECT count(*) FROM pgherald.runs WHERE watch = 'doomed'"
                        " AND status = 'error'") >= 2,
            "two failed runs",
        )  # fmt: skip
        runs = "SELECT count(*) FROM pgherald.runs WHERE watch = %s AND status = %s"
        # The scheduler goes on running both watches: bracket the scrape with the store's
        # counts (the first run of each, a success, was `watch add`'s, in another process).
        before = {(w, s): one(db, runs, w, s) for w in ("stock", "doomed") for s in ("ok", "error")}
        samples = scrape(base)
        after = {(w, s): one(db, runs, w, s) for w in ("stock", "doomed") for s in ("ok", "error")}
        elapsed = time.time() - first_commit
    except BaseException:
        print(daemon.log()[-5000:])
        raise
    finally:
        stopped = daemon.stop(60)
        daemon.close()
    assert stopped == 0

    captured = "pgherald_events_captured_total"
    assert value(samples, captured, watch="acct", method="logical") == 7
    assert value(samples, captured, watch="audit", method="trigger") == 3
    assert value(samples, captured, watch="stock", method="snapshot") == 1
    assert (captured, frozenset({("watch", "doomed"), ("method", "snapshot")})) not in samples

    assert value(samples, "pgherald_deliveries_total", sink="hook", outcome="delivered") == 7
    assert value(samples, "pgherald_deliveries_total", sink="dead-end", outcome="dead") == 3
    assert ("pgherald_deliveries_total",
            frozenset({("sink", "hook"), ("outcome", "dead")})) not in samples  # fmt: skip
    latency = "pgherald_delivery_latency_seconds"
    assert value(samples, f"{latency}_count", sink="hook") == 7
    assert value(samples, f"{latency}_bucket", sink="hook", le="+Inf") == 7
    total = value(samples, f"{latency}_sum", sink="hook")
    assert 0 < total <= 7 * elapsed, (total, elapsed)

    for watch, status in [("stock", "ok"), ("doomed", "error")]:
        ran = value(samples, "pgherald_snapshot_runs_total", watch=watch, status=status)
        by_add = 1 if status == "ok" else 0  # the baseline, run by `watch add`
        assert before[(watch, status)] - by_add <= ran <= after[(watch, status)] - by_add, ran
        assert ran >= 1
        timed = value(
            samples, "pgherald_snapshot_run_duration_seconds_count", watch=watch, status=status
        )
        assert timed == ran
        assert (
            value(samples, "pgherald_snapshot_run_duration_seconds_sum", watch=watch, status=status)
            > 0
        )
    assert ("pgherald_snapshot_runs_total",
            frozenset({("watch", "stock"), ("status", "error")})) not in samples  # fmt: skip

    # The database's gauges, at scrape time.
    assert value(samples, "pgherald_database_up") == 1
    slot = settings.slot
    assert value(samples, "pgherald_slot_active", slot=slot) == 1
    lag = value(samples, "pgherald_capture_lag_bytes", slot=slot)
    assert 0 <= lag < 16 << 20
    assert value(samples, "pgherald_slot_retained_wal_bytes", slot=slot) >= lag
    assert 0 <= value(samples, "pgherald_capture_lag_seconds", slot=slot) < 30
    assert value(samples, "pgherald_trigger_queue_rows") == 0
    assert value(samples, "pgherald_deliveries_dead", sink="dead-end") == 3
    assert value(samples, "pgherald_deliveries_dead", sink="hook") == 0
    for status in ("pending", "delivering", "failed"):
        assert value(samples, "pgherald_deliveries_open", sink="hook", status=status) == 0
    assert value(samples, "pgherald_errors_last_hour") >= 2  # the failed runs
    assert value(samples, "pgherald_snapshot_last_success_age_seconds", watch="stock") < 30
    assert value(samples, "process_resident_memory_bytes") > 0


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def test_queue_depths_while_nothing_drains(db: Database) -> None:
    """The gauges of work waiting: trigger rows nobody drains, deliveries nobody sends."""
    from pgherald import app
    from pgherald.ops.collector import exposition

    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    settings = h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"),
                         slot=False)  # fmt: skip
    routing_admin.add_sink(settings, "later", "webhook", options={"url": "http://127.0.0.1:9/"})
    routing_admin.subscribe(settings, "later", ["t"])
    db.execute("INSERT INTO t SELECT generate_series(1, 4)")
    assert _gauges(settings)[("pgherald_trigger_queue_rows", frozenset())] == 4

    # Capture and route, but deliver to no sink: the deliveries stay pending.
    with h.capturing(settings):
        delivery = app.Delivery(settings, sinks=[]).start()
        try:
            wait_until(
                lambda: one(db, "SELECT count(*) FROM pgherald.deliveries") == 4, "4 deliveries"
            )
        finally:
            delivery.close()
    found = _gauges(settings)
    assert found[("pgherald_trigger_queue_rows", frozenset())] == 0
    pending = frozenset({("sink", "later"), ("status", "pending")})
    assert found[("pgherald_deliveries_open", pending)] == 4
    assert exposition(settings).count(b"pgherald_database_up 1.0") == 1


def _gauges(settings: Settings) -> Samples:
    from pgherald.ops.collector import exposition

    out: Samples = {}
    for family in text_string_to_metric_families(exposition(settings).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_a_database_that_does_not_answer_is_a_gauge_not_a_failed_scrape() -> None:
    from pgherald.ops.collector import exposition

    settings = Settings(dsn=f"host=127.0.0.1 port={free_port()} dbname=nowhere")
    started = time.monotonic()
    text = exposition(settings).decode()
    assert time.monotonic() - started < 10
    assert "pgherald_database_up 0.0" in text
    assert "pgherald_capture_lag_bytes" not in text


def test_an_address_in_use_is_one_clear_error(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    h.install(db.dsn, ["t"], settings=h.settings_for(db.dsn, method="trigger"), slot=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("run", "deliver"):
            result = cli(command, "--http", f"127.0.0.1:{port}", dsn=db.dsn)
            assert_fails(result, f"cannot serve health and metrics on 127.0.0.1:{port}", "in use")
    assert_fails(cli("run", "--http", "9187", dsn=db.dsn), "--http '9187' is not HOST:PORT")
