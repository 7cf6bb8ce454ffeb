"""The console shows changes as the feeds, pages and e-mails do (the shared renderer): the
configured locale and time zone, display names, row labels and column titles, long values
cut with the whole value one click away; and it serves the readable pages that feed
entries link to, to those who may read them."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime

from pgherald.presentation import update_display
from pgherald.store import runs
from tests.conftest import Database
from tests.integration.web_support import append, console, event, sign_in, store, user


def test_changes_in_the_configured_locale_and_zone_with_labels(db: Database) -> None:
    settings = dataclasses.replace(
        store(db, ["orders", "secret"]), locale="de_DE", timezone="Europe/Berlin"
    )
    update_display(settings, "orders", name="Bestellungen", label="{name} (#{id})",
                   columns={"name": "Kunde"})  # fmt: skip
    summer = datetime(2024, 7, 1, 10, 0, 5, tzinfo=UTC)
    medium = "m" * 500 + "MEDIUM-END"
    huge = "h" * 5000 + "HUGE-END"
    append(
        db,
        settings,
        [
            event(1, "orders", row=12345, name="Ada", when=summer),
            event(2, "orders", row=7, op="update", name="Grace", old_name="Ada", when=summer),
            event(3, "orders", row=8, name="Long", note=medium, when=summer),
            event(4, "orders", row=9, name="Huge", note=huge, when=summer),
        ],
    )
    user(settings, "vi", "viewer", ["orders"])
    with console(settings) as client:
        b = sign_in(client, "vi")
        page = b.get("/changes")
        assert "01.07.2024, 12:00:05 CEST" in page  # German dates, Berlin summer time
        assert "Bestellungen" in page and "Kunde" in page
        assert "Ada (#12345)" in page  # the label template; ids are not grouped
        assert "Grace (#7)" in page
        # a cut value opens in place when it is short enough ...
        assert '<details class="long">' in page and "MEDIUM-END" in page
        # ... else links to its change's page, which shows it at length
        assert "HUGE-END" not in page and 'class="more" href="/events/4"' in page
        assert 'name="since"' in page and "in Europe/Berlin" in page
        detail = b.get("/events/4")
        assert "h" * 4000 in detail and "(the first 10,000" not in detail
        history = b.get("/history?watch=orders&key=%5B%227%22%5D")
        assert "History of <bdi>Grace (#7)</bdi> in" in history and "01.07.2024" in history
        # the change browser reads its times in the configured zone: 12:00 in Berlin
        window = b.get("/changes?since=2024-07-01T12:00&until=2024-07-01T12:00")
        assert len(re.findall(r'<tr id="change-', window)) == 4
        assert len(re.findall(r'<tr id="change-', b.get("/changes?since=2024-07-01T12:01"))) == 0


def test_the_readable_pages_feeds_link_to(db: Database) -> None:
    settings = store(db, ["orders", "secret"])
    with db.connect() as conn:
        run_orders = runs.start_run(conn, settings.schema, "orders", "snapshot")
        run_secret = runs.start_run(conn, settings.schema, "secret", "snapshot")
    append(
        db, settings, [event(1, "orders", name="visible"), event(2, "secret", name="confidential")]
    )
    user(settings, "vi", "viewer", ["orders"])
    user(settings, "ed", "editor")
    with console(settings) as client:
        vi = sign_in(client, "vi")
        watch = vi.get("/watches/orders")
        assert "visible" in watch and "<h1><bdi>orders</bdi></h1>" in watch
        row = vi.get("/watches/orders/rows/%5B%221%22%5D")
        assert "visible" in row
        assert "Run" in vi.get(f"/runs/{run_orders}")
        for url in [
            "/watches/secret",
            "/watches/secret/rows/%5B%221%22%5D",
            f"/runs/{run_secret}",
            "/runs/999999",
            "/watches/nonexistent",
            "/watches/orders/rows/%5B%22404%22%5D",
        ]:
            r = client.get(url)
            assert r.status_code == 404 and "confidential" not in r.text, url
    with console(settings) as client:
        ed = sign_in(client, "ed")
        assert "confidential" in ed.get("/watches/secret")
        anonymous = client.__class__(client.app)
        assert anonymous.get("/watches/orders", follow_redirects=False).status_code == 303
