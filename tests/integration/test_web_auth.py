"""The web console's doors: sessions, CSRF, roles, and what a viewer can reach by guessing."""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.testclient import TestClient

from pgherald.store.changelog import ChangeLog
from pgherald.web import accounts
from pgherald.web.security import SESSION_COOKIE
from tests.conftest import Database
from tests.integration.web_support import (
    PASSWORD,
    append,
    console,
    csrf_of,
    event,
    sign_in,
    store,
    user,
)

PAGES = [
    "/",
    "/?partial=1",
    "/changes",
    "/changes/stream",
    "/events/1",
    "/history?watch=orders&key=%5B%221%22%5D",
    "/watch?name=orders",
    "/watches/new",
    "/subscriptions",
    "/deliveries",
    "/users",
]
FORMS = [
    "/watches",
    "/subscriptions/add",
    "/subscriptions/remove",
    "/users/add",
    "/users/update",
]


def test_every_page_needs_a_session(db: Database) -> None:
    settings = store(db)
    with console(settings) as client:
        for url in PAGES:
            r = client.get(url, follow_redirects=False)
            assert r.status_code == 303, url
            assert r.headers["location"].startswith("/login?next=%2F"), url
        for url in FORMS:
            r = client.post(url, data={"csrf": "x"}, follow_redirects=False)
            assert r.status_code == 303, url
            assert r.headers["location"].startswith("/login"), url
        htmx = client.get("/?partial=1", headers={"HX-Request": "true"}, follow_redirects=False)
        assert htmx.status_code == 401
        assert htmx.headers["HX-Redirect"].startswith("/login?next=")
        login = client.get("/login")
        assert login.status_code == 200
        assert "Content-Security-Policy" in login.headers
        assert "script-src 'self'" in login.headers["Content-Security-Policy"]
        assert login.headers["X-Frame-Options"] == "DENY"
        assert login.headers["Cache-Control"] == "no-store"


def test_sign_in_and_out(db: Database) -> None:
    settings = store(db)
    user(settings, "ada", "admin")
    with console(settings) as client:
        page = client.get("/login")
        token = csrf_of(page.text)
        wrong = client.post("/login", data={"name": "ada", "password": "nope" * 3, "csrf": token})
        assert wrong.status_code == 401
        assert "Wrong name or password." in wrong.text
        unknown = client.post(
            "/login", data={"name": "nobody", "password": PASSWORD, "csrf": csrf_of(wrong.text)}
        )
        assert unknown.status_code == 401
        assert "Wrong name or password." in unknown.text
        assert client.get("/", follow_redirects=False).status_code == 303

        r = client.post(
            "/login",
            data={"name": "ada", "password": PASSWORD, "csrf": csrf_of(unknown.text)},
            follow_redirects=False,
        )
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert SESSION_COOKIE in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        home = client.get("/")
        assert home.status_code == 200 and "ada" in home.text and "Sign out" in home.text
        assert accounts.get_user(settings, "ada").last_login_at is not None  # type: ignore[union-attr]

        refused = client.post("/logout", data={"csrf": "forged"}, follow_redirects=False)
        assert refused.status_code == 403
        assert client.get("/", follow_redirects=False).status_code == 200
        out = client.post("/logout", data={"csrf": csrf_of(home.text)}, follow_redirects=False)
        assert out.status_code == 303
        assert client.get("/", follow_redirects=False).status_code == 303


def test_login_form_needs_its_own_token(db: Database) -> None:
    settings = store(db)
    user(settings, "ada", "admin")
    with console(settings) as client:
        no_cookie = TestClient(client.app)
        page = client.get("/login")
        token = csrf_of(page.text)
        # the token without the cookie that came with it (a cross-site form post)
        r = no_cookie.post("/login", data={"name": "ada", "password": PASSWORD, "csrf": token})
        assert r.status_code == 403
        r = client.post("/login", data={"name": "ada", "password": PASSWORD, "csrf": "x" + token})
        assert r.status_code == 403
        assert client.cookies.get(SESSION_COOKIE) is None


@pytest.mark.parametrize(
    ("wanted", "went"),
    [
        ("/changes?watch=orders", "/changes?watch=orders"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
    ],
)
def test_after_sign_in_only_pages_of_this_console(db: Database, wanted: str, went: str) -> None:
    settings = store(db, ["orders"])
    user(settings, "ada", "admin")
    with console(settings) as client:
        page = client.get("/login", params={"next": wanted})
        r = client.post(
            "/login",
            data={"name": "ada", "password": PASSWORD, "csrf": csrf_of(page.text), "next": wanted},
            follow_redirects=False,
        )
        assert r.headers["location"] == went


def test_forged_and_foreign_cookies_are_refused(db: Database) -> None:
    settings = store(db)
    user(settings, "ada", "admin")
    with console(settings) as client:
        sign_in(client, "ada")
        good = client.cookies[SESSION_COOKIE]
        payload = good.rpartition(".")[0]
        flipped = good[:5] + ("A" if good[5] != "A" else "B") + good[6:]
        for bad in (good[:-2] + "AA", payload + ".", "garbage", flipped):
            client.cookies.set(SESSION_COOKIE, bad)
            assert client.get("/", follow_redirects=False).status_code == 303, bad
    # signed by another console's secret
    with console(settings) as client:
        from pgherald.web.app import create_app

        other = TestClient(create_app(settings, secret="another-secret-" + "y" * 40))
        sign_in(other, "ada")
        client.cookies.set(SESSION_COOKIE, other.cookies[SESSION_COOKIE])
        assert client.get("/", follow_redirects=False).status_code == 303


def test_sessions_expire(db: Database) -> None:
    settings = store(db)
    user(settings, "ada", "admin")
    with console(settings, session_hours=-1 / 3600) as client:  # expired when made
        page = client.get("/login")
        client.post(
            "/login", data={"name": "ada", "password": PASSWORD, "csrf": csrf_of(page.text)}
        )
        assert client.get("/", follow_redirects=False).status_code == 303


def test_a_new_password_or_removal_ends_sessions(db: Database) -> None:
    settings = store(db)
    user(settings, "ada", "admin")
    user(settings, "bob", "editor")
    with console(settings) as a, console(settings) as b:
        sign_in(a, "ada")
        sign_in(b, "bob")
        accounts.set_password(settings, "ada", "a brand new password")
        assert a.get("/", follow_redirects=False).status_code == 303
        sign_in(a, "ada", "a brand new password")
        assert a.get("/").status_code == 200
        accounts.remove_user(settings, "bob")
        assert b.get("/", follow_redirects=False).status_code == 303


def test_every_form_needs_the_session_csrf_token(db: Database) -> None:
    settings = store(db, ["orders"])
    user(settings, "ada", "admin")
    db.execute("CREATE TABLE public.orders (id int PRIMARY KEY, name text)")
    db.execute("CREATE TABLE public.other (id int PRIMARY KEY)")
    with console(settings) as client:
        browser = sign_in(client, "ada")
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("/watches", {"table": "public.other", "method": "trigger"}),
            ("/users/add", {"name": "eve", "password": PASSWORD, "role": "admin"}),
            ("/users/update", {"name": "ada", "action": "remove"}),
            ("/subscriptions/remove", {"sink": "s", "watch": "orders"}),
            ("/subscriptions/add", {"sink": "s", "watch": "orders"}),
        ]
        for url, data in attempts:
            for token in (None, "", "forged", browser.csrf[:-1]):
                body = dict(data) | ({} if token is None else {"csrf": token})
                r = client.post(url, data=body, follow_redirects=False)
                assert r.status_code == 403, (url, token)
                assert "Form expired" in r.text
        assert [u.name for u in accounts.list_users(settings)] == ["ada"]
        assert [w[0] for w in db.execute("SELECT name FROM pgherald.watches")] == ["orders"]
        # the token in a header does as well as in the form (htmx requests)
        r = client.post(
            "/watches",
            data={"table": "public.other", "method": "trigger"},
            headers={"X-CSRF-Token": browser.csrf},
        )
        assert r.status_code == 200 and "Watch added" in r.text


def test_roles_decide_what_a_user_may_do(db: Database) -> None:
    settings = store(db, ["orders"])
    user(settings, "ada", "admin")
    user(settings, "ed", "editor")
    user(settings, "vi", "viewer", ["orders"])
    editor_pages = ["/watches/new", "/subscriptions", "/deliveries"]
    with console(settings) as client:
        vi = sign_in(client, "vi")
        home = vi.get("/")
        assert "Add a watch" not in home and "Users" not in home
        for url in [*editor_pages, "/users"]:
            r = client.get(url)
            assert r.status_code == 403, url
            assert "Your role (viewer) cannot do this." in r.text
        for url in FORMS:
            r = client.post(url, data={"csrf": vi.csrf, "name": "vi", "action": "remove"})
            assert r.status_code == 403, url
        assert accounts.get_user(settings, "vi") is not None
    with console(settings) as client:
        ed = sign_in(client, "ed")
        for url in editor_pages:
            assert client.get(url).status_code == 200, url
        assert client.get("/users").status_code == 403
        r = ed.post("/users/add", {"name": "eve", "password": PASSWORD, "role": "admin"})
        assert r.status_code == 403
        assert accounts.get_user(settings, "eve") is None
    with console(settings) as client:
        sign_in(client, "ada")
        for url in [*editor_pages, "/users"]:
            assert client.get(url).status_code == 200, url


def test_a_viewer_reads_only_the_allowed_watches_whatever_the_url(db: Database) -> None:
    settings = store(db, ["orders", "secret"])
    append(
        db,
        settings,
        [
            event(1, "orders", name="visible-order"),
            event(2, "secret", name="hidden-salary", row=7),
            event(3, "orders", op="update", name="visible-2"),
        ],
    )
    with db.connect() as conn:
        secret_id = ChangeLog(conn, settings.schema).find_id("T/secret/2")
        order_id = ChangeLog(conn, settings.schema).find_id("T/orders/1")
    user(settings, "vi", "viewer", ["orders"])
    with console(settings) as client:
        vi = sign_in(client, "vi")
        home = vi.get("/")
        assert "orders" in home and "secret" not in home
        partial = vi.get("/?partial=1")
        assert "secret" not in partial
        changes = vi.get("/changes")
        assert "visible-order" in changes and "hidden-salary" not in changes
        assert ">secret<" not in changes  # not even offered in the watch filter
        assert "hidden-salary" not in vi.get("/changes?q=hidden")
        assert "hidden-salary" not in vi.get("/changes?op=insert")
        assert vi.get(f"/events/{order_id}")

        nothing = client.get("/events/999999")
        assert nothing.status_code == 404
        guessed = [
            f"/events/{secret_id}",
            "/changes?watch=secret",
            "/changes?watch=nonexistent",
            "/history?watch=secret&key=%5B%227%22%5D",
            "/watch?name=secret",
            "/changes/stream?watch=secret",
        ]
        for url in guessed:
            r = client.get(url)
            assert r.status_code == 404, url
            assert "hidden-salary" not in r.text and "secret" not in r.text.replace(
                "/static/", ""
            ), url
        # what does not exist and what is not theirs look the same
        a, b = client.get(f"/events/{secret_id}"), client.get("/events/999999")
        assert a.text == b.text

        # the live stream sends only the allowed watch's changes
        with client.stream("GET", "/changes/stream?after=3") as stream:
            append(db, settings, [event(4, "secret", name="hidden-new"), event(5, "orders")])
            seen = _read_sse(stream, until="T/orders/5", ids={5})
        assert "hidden-new" not in seen and "id: 5" in seen


def _read_sse(stream: Any, until: str, ids: set[int]) -> str:
    text = ""
    for line in stream.iter_lines():
        text += line + "\n"
        if any(line == f"id: {i}" for i in ids):
            break
    return text


def test_hostile_values_are_shown_as_text(db: Database) -> None:
    hostile_watch = '<img src=x onerror="alert(1)">'
    settings = store(db, ["orders", hostile_watch])
    long_value = "x" * 50_000 + "END"
    rtl = "\u202eevil\u202c שלום עליכם مرحبا"
    append(
        db,
        settings,
        [
            event(1, "orders", name="<script>alert('name')</script>", note=long_value),
            event(2, "orders", row=2, name=rtl, note="tab\there\x1b[31mred"),
            event(3, hostile_watch, row=3, name="</td></tr><tr><td>injected"),
            event(4, "orders", op="update", name="\"quoted\" & 'single'", old_name="<b>old</b>"),
        ],
    )
    user(settings, "ada", "admin")
    with console(settings) as client:
        browser = sign_in(client, "ada")
        for url in ["/", "/changes", "/events/1", "/events/2", "/events/3", "/events/4"]:
            html = browser.get(url)
            assert "<script>alert" not in html, url
            assert "<img src=x" not in html, url
            assert "</td></tr><tr><td>injected" not in html, url
            assert "<b>old</b>" not in html, url
            assert "\x1b" not in html, url
            assert re.search(r"<script(?! src=\"/static/)", html) is None, url
        changes = browser.get("/changes")
        assert "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt;" in changes
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in changes
        assert "END" not in changes  # cut in the list ...
        assert len(changes) < 60_000
        detail = browser.get("/events/1")
        assert "x" * 9_000 in detail  # ... shown at length on its own page, still bounded
        assert "END" not in detail and len(detail) < 40_000
        rtl_page = browser.get("/events/2")
        # a bidi override is shown as an escape, and right-to-left text is isolated, so
        # neither can reorder the page around it
        assert "\u202e" not in rtl_page and "<bdi>\\u202eevil\\u202c שלום" in rtl_page
        assert "\\x1b[31mred" in rtl_page  # control characters shown, not sent
        history = browser.get("/history?watch=orders&key=%5B%221%22%5D")
        assert "&lt;script&gt;" in history and "<script>alert" not in history
        watch = browser.get("/watch?name=" + hostile_watch)
        assert "&lt;img src=x" in watch
