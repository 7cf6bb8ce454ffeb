"""The web console in a real browser: Debian's headless Chromium, driven by Playwright.

Signs in, adds a watch through the form, subscribes to it by feed on "My subscriptions"
and reads the feed's address off the page, changes a row in the database and sees the
change arrive live (no reload), opens the row's history, and fetches the feed (httpx) and
parses it (feedparser); and saves screenshots of the main pages at desktop and phone width
under tests/artifacts/web/ (ignored by git), or under $PGHERALD_TEST_ARTIFACTS/web. Without
Chromium this fails: CI installs it (.ci/services), and a browser test that skips proves
nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import feedparser
import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from pgherald import admin, app
from pgherald.config import Settings
from pgherald.presentation import update_display
from pgherald.web import accounts
from pgherald.web.server import Server
from tests.conftest import Database

CHROMIUM = Path(os.environ.get("PGHERALD_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = (
    Path(
        os.environ.get("PGHERALD_TEST_ARTIFACTS")
        or Path(__file__).resolve().parents[1] / "artifacts"
    )
    / "web"
)
PASSWORD = "a long enough password"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 860}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium package"
            " (.ci/services installs it; apt-get install chromium)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def console(db_primary: Database) -> Iterator[tuple[Settings, str, Database]]:
    db = db_primary
    db.execute(
        "CREATE TABLE public.staff (id int PRIMARY KEY, name text NOT NULL,"
        " department text, salary numeric(10, 2));"
        "INSERT INTO public.staff VALUES (1, 'Ada Lovelace', 'Research', 5000),"
        " (2, 'Grace Hopper', 'Navy', 6100), (3, 'שלום <script>x</script>', 'Ops', 10)"
    )
    settings = Settings(dsn=db.dsn, timezone="Europe/Berlin")
    admin.init(settings)
    accounts.add_user(settings, "ada", PASSWORD, "admin")
    server = Server(settings, port=0).start()
    try:
        yield settings, server.url.rstrip("/"), db
    finally:
        server.stop()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, base: str) -> None:
    page.goto(base + "/")
    expect(page).to_have_url(base + "/login?next=%2F")
    page.get_by_label("Name").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Watches")).to_be_visible()


def test_sign_in_add_a_watch_and_see_changes_live(
    browser: Browser, console: tuple[Settings, str, Database]
) -> None:
    settings, base, db = console
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[arg-type]
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(base + "/login")
    shot(page, "login")
    sign_in(page, base)
    shot(page, "dashboard-empty")

    page.get_by_role("link", name="Add a watch").first.click()
    page.get_by_label("Table or view").fill("public.staff")
    page.get_by_label("trigger").check()
    page.get_by_label("Ignore columns").fill("department")
    shot(page, "add-watch")
    page.get_by_role("button", name="Add the watch").click()
    expect(page.get_by_role("heading", name="Watch added")).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("staff")
    shot(page, "watch-added")
    update_display(settings, "staff", label="{name}")  # rows are shown by their label

    # subscribe to it by feed, and read the feed's address off the page
    page.get_by_role("link", name="My subscriptions").click()
    expect(page.get_by_role("heading", name="My subscriptions", exact=True)).to_be_visible()
    page.get_by_label("Watch", exact=True).select_option("staff")
    page.get_by_label("a feed (Atom and RSS)").check()
    page.get_by_role("button", name="Subscribe").click()
    expect(page.get_by_role("status")).to_contain_text("Subscribed.")
    feed_url = page.get_by_label("Atom feed address").input_value()
    assert feed_url.startswith(base + "/feeds/") and feed_url.endswith(".atom")
    expect(page.locator("main")).to_contain_text("a feed (Atom and RSS)")
    shot(page, "my-subscriptions")

    capture = app.Capture(settings).start()
    delivery = app.Delivery(settings).start()
    try:
        capture.wait_ready()
        delivery.wait_ready()
        page.get_by_role("link", name="Changes", exact=True).click()
        page.get_by_label("Watch", exact=True).select_option("staff")
        page.get_by_role("button", name="Show changes").click()
        expect(page.locator("#live-status")).to_contain_text("Live")
        page.evaluate("window.__notReloaded = true")

        db.execute("UPDATE public.staff SET salary = 5250.00 WHERE id = 1")
        row = page.locator("#change-rows tr", has_text="salary")
        expect(row).to_have_count(1, timeout=20_000)
        expect(row).to_contain_text("5,000.00")  # numbers as the locale writes them
        expect(row).to_contain_text("5,250.00")
        expect(row).to_contain_text("CE")  # times in the configured zone (CET or CEST)
        db.execute("INSERT INTO public.staff VALUES (4, 'Alan Turing', 'Bletchley', 4200)")
        expect(page.locator("#change-rows tr", has_text="Alan Turing")).to_have_count(
            1, timeout=20_000
        )
        expect(page.locator("#live-status")).to_contain_text("2 new changes")
        assert page.evaluate("window.__notReloaded") is True  # arrived without a reload
        shot(page, "changes-live")

        row.get_by_role("link", name="Ada Lovelace").click()
        expect(page.get_by_role("heading", name="History of Ada Lovelace in staff")).to_be_visible()
        expect(page.locator("main")).to_contain_text("5,250.00")
        shot(page, "row-history")

        # the feed: fetched as a feed reader would (no session), valid, with the change
        deadline = time.monotonic() + 30
        while True:
            fetched = httpx.get(feed_url, timeout=10)
            assert fetched.status_code == 200
            assert fetched.headers["content-type"].startswith("application/atom+xml")
            parsed = feedparser.parse(fetched.content)
            assert not parsed.bozo, parsed.bozo_exception
            if len(parsed.entries) == 2:
                break
            assert time.monotonic() < deadline, parsed.entries
            time.sleep(0.2)
        titles = [e.title for e in parsed.entries]
        assert titles == ["staff: Alan Turing added", "staff: Ada Lovelace changed"], titles
        assert "5,250.00" in parsed.entries[1].summary
        assert "5,000.00" in parsed.entries[1].summary

        page.goto(base + "/")
        expect(page.locator("#watch-rows")).to_contain_text("staff")
        expect(page.locator("#watch-rows")).to_contain_text("trigger")
        shot(page, "dashboard")

        phone = browser.new_context(viewport=PHONE, device_scale_factor=2)  # type: ignore[arg-type]
        small = phone.new_page()
        small.context.add_cookies(context.cookies())  # type: ignore[arg-type]
        for name, path in [
            ("dashboard", "/"),
            ("changes", "/changes"),
            ("add-watch", "/watches/new"),
            ("my-subscriptions", "/my"),
            ("my-deliveries", "/my/deliveries"),
        ]:
            small.goto(base + path)
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (path, width)  # nothing wider than the phone
            shot(small, f"phone-{name}")
        phone.close()
        page.goto(base + "/my/deliveries")
        expect(page.locator("main")).to_contain_text("delivered")
        shot(page, "my-deliveries")
    finally:
        delivery.close()
        capture.close()
        context.close()
    assert errors == [], errors  # no script error, no CSP violation


def test_keyboard_and_labels(browser: Browser, console: tuple[Settings, str, Database]) -> None:
    _, base, _ = console
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[arg-type]
    page = context.new_page()
    page.goto(base + "/login")
    # signing in by keyboard alone: the name field has the focus, Tab leads to the password
    assert page.evaluate("document.activeElement.id") == "name"
    page.keyboard.type("ada")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Watches")).to_be_visible()
    # the first Tab reaches the skip link, which takes the focus to the content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    for path in [
        "/",
        "/changes",
        "/watches/new",
        "/users",
        "/subscriptions",
        "/deliveries",
        "/my",
        "/my/deliveries",
    ]:
        page.goto(base + path)
        unlabeled = page.evaluate(
            """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
                .map(el => el.name)"""
        )
        assert unlabeled == [], (path, unlabeled)
        assert page.locator("h1").count() == 1, path
    context.close()
