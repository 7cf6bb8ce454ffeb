"""Self-service in the console: any signed-in user subscribes themselves to a watch they may
read, by feed or by e-mail, reads their feed, sees their own deliveries, and never reaches
another user's sinks, subscriptions, deliveries or feed tokens, whatever they guess."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator

import feedparser
import pytest

from pgherald import app, routing_admin
from pgherald.config import Settings
from pgherald.store import own
from pgherald.web import accounts
from tests.conftest import Database
from tests.integration.smtp_server import PASSWORD, USER, Cert, MailServer, make_cert, parts
from tests.integration.web_support import (
    Browser,
    append,
    console,
    event,
    sign_in,
    store,
    user,
)

FEED_URL = re.compile(r'id="feed-atom" type="text" readonly value="([^"]+)"')


def _token(page: str) -> str:
    found = FEED_URL.search(page)
    assert found, "no feed address on the page"
    url = found.group(1)
    assert url.startswith("http://testserver/feeds/") and url.endswith(".atom")
    return url.removeprefix("http://testserver/feeds/").removesuffix(".atom")


def _deliver(settings: Settings, sink: str, count: int) -> None:
    """Routes and delivers until ``sink`` has ``count`` deliveries delivered."""
    delivery = app.Delivery(settings).start()
    try:
        delivery.wait_ready()
        deadline = time.monotonic() + 30
        while delivery.engine.stats[sink].delivered < count:
            assert time.monotonic() < deadline, delivery.engine.stats[sink]
            assert not delivery.errors, delivery.errors
            time.sleep(0.05)
    finally:
        delivery.close()


def _subscriptions(db: Database) -> list[tuple[str, str]]:
    rows = db.execute("SELECT sink, watch FROM pgherald.subscriptions ORDER BY 1, 2")
    return [(str(s), str(w)) for s, w in rows]


def test_a_viewer_subscribes_to_a_feed_and_reads_it(db: Database) -> None:
    settings = store(db, ["orders", "secret"])
    user(settings, "vi", "viewer", ["orders"])
    with console(settings) as client:
        vi = sign_in(client, "vi")
        page = vi.get("/my")
        assert "My subscriptions" in page and "You have no subscriptions yet." in page
        assert '<option value="orders">' in page and "secret" not in page
        assert "no mail server configured" in page  # e-mail needs [smtp]: said, not hidden
        r = vi.post("/my/subscribe", {"watch": "orders", "how": "feed"})
        assert r.status_code == 303 and r.headers["location"].startswith("/my?done=subscribed")
        page = vi.get("/my")
        assert "Subscribed." not in page  # the notice comes with the redirect only
        assert "a feed (Atom and RSS)" in page
        token = _token(page)
        assert f"http://testserver/feeds/{token}.rss" in page
        assert _subscriptions(db) == [("user:vi:feed", "orders")]
        # subscribing again changes nothing
        assert vi.post("/my/subscribe", {"watch": "orders", "how": "feed"}).status_code == 303
        assert _subscriptions(db) == [("user:vi:feed", "orders")]

        append(db, settings, [event(1, "orders", name="Ada <b>"), event(2, "secret")])
        append(db, settings, [event(3, "orders", op="update", name="Grace", old_name="Ada")])
        _deliver(settings, "user:vi:feed", 2)

        atom = client.get(f"/feeds/{token}.atom")
        assert atom.status_code == 200
        parsed = feedparser.parse(atom.content)
        assert not parsed.bozo, parsed.bozo_exception
        assert parsed.feed.title == "pgherald: vi"
        assert len(parsed.entries) == 2
        assert "Grace" in parsed.entries[0].summary and "Ada" in parsed.entries[0].summary
        # entries link to the console's own pages, which serve them (signed in)
        link = parsed.entries[0].link.removeprefix("http://testserver")
        assert link.startswith("/watches/orders/rows/")
        row = vi.get(link)
        assert "Grace" in row and "Ada" in row
        rss = client.get(f"/feeds/{token}.rss")
        assert rss.status_code == 200 and not feedparser.parse(rss.content).bozo

        mine = vi.get("/my/deliveries")
        assert mine.count('<span class="badge status-delivered">delivered</span>') == 2 + 1
        assert "secret" not in mine

        r = vi.post("/my/feed/rotate", {})
        assert r.status_code == 303
        new = _token(vi.get("/my"))
        assert new != token
        assert client.get(f"/feeds/{token}.atom").status_code == 404
        assert client.get(f"/feeds/{new}.atom").status_code == 200

        r = vi.post("/my/unsubscribe", {"sink": "user:vi:feed", "watch": "orders"})
        assert r.status_code == 303
        assert _subscriptions(db) == []
        assert "You have no subscriptions yet." in vi.get("/my")


def test_nobody_reaches_another_users_subscriptions(db: Database) -> None:
    settings = store(db, ["orders", "secret"])
    user(settings, "vi", "viewer", ["orders"])
    user(settings, "wu", "viewer", ["orders", "secret"])
    user(settings, "ed", "editor")
    with console(settings) as c_wu, console(settings) as c_vi, console(settings) as c_ed:
        wu = sign_in(c_wu, "wu")
        for watch in ("orders", "secret"):
            assert wu.post("/my/subscribe", {"watch": watch, "how": "feed"}).status_code == 303
        wu_token = _token(wu.get("/my"))
        append(db, settings, [event(1, "secret", name="hidden-salary"), event(2, "orders")])
        _deliver(settings, "user:wu:feed", 2)
        before = _subscriptions(db)
        assert before == [("user:wu:feed", "orders"), ("user:wu:feed", "secret")]

        vi = sign_in(c_vi, "vi")
        # a watch the viewer may not read, or that does not exist: the same answer
        for watch in ("secret", "nonexistent"):
            r = vi.post("/my/subscribe", {"watch": watch, "how": "feed"})
            assert r.status_code == 404 and "There is no such watch." in r.text, watch
        # another user's subscription, by its guessed name
        for sink, watch in [
            ("user:wu:feed", "orders"),
            ("user:wu:feed", "secret"),
            ("user:vi:feed", "orders"),
        ]:
            r = vi.post("/my/unsubscribe", {"sink": sink, "watch": watch})
            assert r.status_code == 404 and "There is no such subscription." in r.text
        # rotating: only one's own feed (vi has none)
        assert vi.post("/my/feed/rotate", {}).status_code == 404
        assert _subscriptions(db) == before
        assert _token(wu.get("/my")) == wu_token
        # nothing of wu's on vi's pages
        for url in ["/my", "/my/deliveries", "/my/deliveries?status=delivered&before=999"]:
            page = vi.get(url)
            assert wu_token not in page and "user:wu" not in page and "hidden-salary" not in page
            assert "secret" not in page.replace("/static/", ""), url
        assert "No deliveries to you yet." in vi.get("/my/deliveries")
        # viewers have no way to the editors' pages of everyone's subscriptions
        assert c_vi.get("/subscriptions").status_code == 403
        assert c_vi.get("/deliveries?sink=user:wu:feed").status_code == 403

        # forms without the session's CSRF token change nothing
        vi.post("/my/subscribe", {"watch": "orders", "how": "feed"})
        vi_token = _token(vi.get("/my"))
        for url, data in [
            ("/my/subscribe", {"watch": "orders", "how": "feed"}),
            ("/my/unsubscribe", {"sink": "user:vi:feed", "watch": "orders"}),
            ("/my/feed/rotate", {}),
            ("/my/email", {"email": "evil@example.com"}),
        ]:
            for token in (None, "", "forged", vi.csrf[:-1]):
                body = dict(data) | ({} if token is None else {"csrf": token})
                r = c_vi.post(url, data=body, follow_redirects=False)
                assert r.status_code == 403 and "Form expired" in r.text, (url, token)
        assert _token(vi.get("/my")) == vi_token
        assert accounts.get_user(settings, "vi").email is None  # type: ignore[union-attr]
        # signed out, nothing at all
        anonymous = c_vi.__class__(c_vi.app)
        for url in ["/my", "/my/deliveries"]:
            assert anonymous.get(url, follow_redirects=False).status_code == 303
        for url in ["/my/subscribe", "/my/unsubscribe", "/my/email", "/my/feed/rotate"]:
            assert (
                anonymous.post(url, data={"csrf": "x"}, follow_redirects=False).status_code == 303
            )

        # an editor cannot feed a viewer's own sink a watch the viewer may not read
        ed = sign_in(c_ed, "ed")
        r = ed.post("/subscriptions/add", {"sink": "user:vi:feed", "watch": "secret"})
        assert r.status_code == 400 and "who may not read watch" in r.text
        assert ("user:vi:feed", "secret") not in _subscriptions(db)

    # an admin takes a watch off wu's list: wu's subscription to it goes, and what it
    # delivered (the feed would still show it)
    accounts.deny(settings, "wu", ["secret"])
    assert _subscriptions(db) == [("user:vi:feed", "orders"), ("user:wu:feed", "orders")]
    with console(settings) as client:
        feed = feedparser.parse(client.get(f"/feeds/{wu_token}.atom").content)
        assert len(feed.entries) == 1 and "hidden-salary" not in str(feed)
    # removing a user removes their sinks, subscriptions and deliveries
    accounts.remove_user(settings, "wu")
    assert [s.name for s in routing_admin.list_sinks(settings)] == ["user:vi:feed"]
    with db.connect() as conn:
        assert own.sinks(conn, settings.schema, "wu") == []
    with console(settings) as client:
        assert client.get(f"/feeds/{wu_token}.atom").status_code == 404


def test_email_needs_a_mail_server_and_an_address(db: Database) -> None:
    settings = store(db, ["orders"])
    user(settings, "vi", "viewer", ["orders"])
    with console(settings) as client:
        vi = sign_in(client, "vi")
        r = vi.post("/my/subscribe", {"watch": "orders", "how": "email-day"})
        assert r.status_code == 400 and "no mail server configured" in r.text
        assert 'value="email-day" disabled' in vi.get("/my")
    configured = dataclasses.replace(
        settings, smtp={"host": "127.0.0.1", "port": 2525, "from": "herald@example.org"}
    )
    with console(configured) as client:
        vi = sign_in(client, "vi")
        r = vi.post("/my/subscribe", {"watch": "orders", "how": "email-day"})
        assert r.status_code == 400 and "Set your e-mail address first" in r.text
        for bad in ("not an address", "a@b@c", "x" * 250 + "@example.com", "evil@x.com\nBcc: y"):
            r = vi.post("/my/email", {"email": bad})
            assert r.status_code == 400 and 'role="alert"' in r.text, bad
        assert accounts.get_user(settings, "vi").email is None  # type: ignore[union-attr]
        assert vi.post("/my/email", {"email": "vi@example.com"}).status_code == 303
        assert 'value="vi@example.com"' in vi.get("/my")
        assert vi.post("/my/subscribe", {"watch": "orders", "how": "email-day"}).status_code == 303
        sinks = {s.name: s for s in routing_admin.list_sinks(settings)}
        assert sinks["user:vi:email-day"].options == {
            "smtp": "settings",
            "to": ["vi@example.com"],
            "mode": "digest",
            "period": "day",
        }  # fmt: skip  (no server, no password: those stay in the configuration)
        assert "e-mail, a daily digest" in vi.get("/my")
        # a new address: the e-mail sinks follow; no address while e-mail subscriptions exist
        assert vi.post("/my/email", {"email": "vi.new@example.com"}).status_code == 303
        sinks = {s.name: s for s in routing_admin.list_sinks(settings)}
        assert sinks["user:vi:email-day"].options["to"] == ["vi.new@example.com"]
        r = vi.post("/my/email", {"email": ""})
        assert r.status_code == 400 and "need an address" in r.text
    with console(dataclasses.replace(settings, smtp={"host": "127.0.0.1"})) as client:
        vi = sign_in(client, "vi")
        page = vi.get("/my")
        assert "mail server settings of this pgherald are incomplete" in page
        assert "127.0.0.1" not in page


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("smtp-cert"))


@pytest.fixture
def server(cert: Cert) -> Iterator[MailServer]:
    s = MailServer(cert, "starttls").start()
    try:
        yield s
    finally:
        s.stop()


def test_email_subscriptions_are_mailed_through_the_configured_server(
    db: Database, server: MailServer, cert: Cert
) -> None:
    smtp = {
        "host": "127.0.0.1", "port": server.port, "starttls": True, "ca_file": str(cert.cert),
        "username": USER, "password": PASSWORD, "from": "Herald <herald@example.org>",
    }  # fmt: skip
    settings = dataclasses.replace(store(db, ["orders"]), smtp=smtp)
    user(settings, "vi", "viewer", ["orders"])
    with console(settings) as client:
        vi: Browser = sign_in(client, "vi")
        assert vi.post("/my/email", {"email": "vi@example.com"}).status_code == 303
        r = vi.post("/my/subscribe", {"watch": "orders", "how": "email-change"})
        assert r.status_code == 303
    append(db, settings, [event(1, "orders", name="Ada Lovelace")])
    _deliver(settings, "user:vi:email-change", 1)
    assert server.logins == [(USER, PASSWORD)]
    assert PASSWORD not in str(db.execute("SELECT config FROM pgherald.sinks"))
    (mail,) = server.messages()
    assert mail["To"] == "vi@example.com" and "herald@example.org" in mail["From"]
    text, html = parts(mail)
    assert "Ada Lovelace" in text and "Ada Lovelace" in html
    with console(settings) as client:
        mine = sign_in(client, "vi").get("/my/deliveries")
        assert "e-mail, one per change" in mine and "status-delivered" in mine
