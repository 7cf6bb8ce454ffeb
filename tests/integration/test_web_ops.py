"""The web console serves /healthz, /readyz and /metrics without login (and nothing else
without it): `pgherald web` and `pgherald run --web` can be probed and scraped."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from pgherald.ops import status
from pgherald.web.app import create_app
from tests.conftest import Database
from tests.integration.web_support import SECRET, store


def test_health_and_metrics_need_no_login(db: Database) -> None:
    settings = store(db)
    with TestClient(create_app(settings, secret=SECRET)) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.text == "ok\n"
        assert health.headers["cache-control"] == "no-store"

        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready"

        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        assert families["pgherald_database_up"].samples[0].value == 1
        assert "pgherald_trigger_queue_rows" in families

        # The console's pages still send strangers to the login page.
        page = client.get("/changes", follow_redirects=False)
        assert page.status_code in (302, 303) and "/login" in page.headers["location"]


def test_readyz_reports_a_part_that_says_it_is_not_ready(db: Database) -> None:
    settings = store(db)
    owner = object()
    status.register(owner, "capture", lambda conn: ["logical capture is not connected"])
    try:
        with TestClient(create_app(settings, secret=SECRET)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["status"] == "not ready"
            assert "logical capture is not connected" in body["problems"]
            assert "capture" in body["parts"]
    finally:
        status.unregister(owner)
