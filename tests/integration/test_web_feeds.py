"""Feeds served by the web console: captured, routed to a feed sink, fetched by token."""

from __future__ import annotations

import time

import feedparser
from starlette.testclient import TestClient

from pgherald import app, feeds, routing_admin
from pgherald.web.app import create_app
from tests import capture_harness as h
from tests.conftest import Database


def test_a_feed_is_served_by_token_and_nothing_else(db: Database) -> None:
    db.execute("CREATE TABLE emp (id int PRIMARY KEY, name text, salary numeric(10,2))")
    settings = h.install(db.dsn, ["emp"], settings=h.settings_for(db.dsn, method="trigger"),
                         slot=False)  # fmt: skip
    routing_admin.add_sink(settings, "hr-feed", "feed", options={"title": "HR changes"})
    routing_admin.subscribe(settings, "hr-feed", ["emp"])
    token = feeds.feed_token(settings, "hr-feed")
    with h.capturing(settings) as capture:
        delivery = app.Delivery(settings).start()
        try:
            delivery.wait_ready()
            db.execute("INSERT INTO emp VALUES (1, 'Ada', 100); UPDATE emp SET salary = 120")
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            deadline = time.monotonic() + 30
            while delivery.engine.stats["hr-feed"].delivered < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            delivery.close()
    with TestClient(create_app(settings, secret="s" * 40)) as client:
        atom = client.get(f"/feeds/{token}.atom")
        assert atom.status_code == 200
        assert atom.headers["content-type"].startswith("application/atom+xml")
        parsed = feedparser.parse(atom.content)
        assert not parsed.bozo
        assert parsed.feed.title == "HR changes"
        assert len(parsed.entries) == 2
        assert "120" in parsed.entries[0].title + parsed.entries[0].summary
        rss = client.get(f"/feeds/{token}.rss")
        assert rss.status_code == 200 and not feedparser.parse(rss.content).bozo
        for bad in (f"/feeds/{token}x.atom", f"/feeds/{token}.xml", "/feeds/.atom"):
            assert client.get(bad).status_code == 404
        new = feeds.rotate_token(settings, "hr-feed")
        assert client.get(f"/feeds/{token}.atom").status_code == 404
        assert client.get(f"/feeds/{new}.atom").status_code == 200
