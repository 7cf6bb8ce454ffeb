"""The web console in a real browser: Debian's headless Chromium, driven by Playwright.

Signs in, adds a watch through the form, changes a row in the database and sees the change
arrive live (no reload), opens the row's history; and saves screenshots of the main pages
at desktop and phone width under tests/artifacts/web/. Without Chromium this fails: CI
installs it (.ci/services), and a browser test that skips proves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from pgherald import admin, app
from pgherald.config import Settings
from pgherald.web import accounts
from pgherald.web.server import Server
from tests.conftest import Database

CHROMIUM = Path(os.environ.get("PGHERALD_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"
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
    settings = Settings(dsn=db.dsn)
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

    capture = app.Capture(settings).start()
    try:
        capture.wait_ready()
        page.get_by_role("link", name="See its changes").click()
        expect(page.locator("#live-status")).to_contain_text("Live")
        page.evaluate("window.__notReloaded = true")

        db.execute("UPDATE public.staff SET salary = 5250.00 WHERE id = 1")
        row = page.locator("#change-rows tr", has_text="salary")
        expect(row).to_have_count(1, timeout=20_000)
        expect(row).to_contain_text("5000.00")
        expect(row).to_contain_text("5250.00")
        db.execute("INSERT INTO public.staff VALUES (4, 'Alan Turing', 'Bletchley', 4200)")
        expect(page.locator("#change-rows tr", has_text="Alan Turing")).to_have_count(
            1, timeout=20_000
        )
        expect(page.locator("#live-status")).to_contain_text("2 new changes")
        assert page.evaluate("window.__notReloaded") is True  # arrived without a reload
        shot(page, "changes-live")

        row.get_by_role("link", name="id=1").click()
        expect(page.get_by_role("heading", name="History of id=1 in staff")).to_be_visible()
        expect(page.locator("main")).to_contain_text("5250.00")
        shot(page, "row-history")

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
        ]:
            small.goto(base + path)
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (path, width)  # nothing wider than the phone
            shot(small, f"phone-{name}")
        phone.close()
    finally:
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
    for path in ["/", "/changes", "/watches/new", "/users", "/subscriptions", "/deliveries"]:
        page.goto(base + path)
        unlabeled = page.evaluate(
            """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
                .map(el => el.name)"""
        )
        assert unlabeled == [], (path, unlabeled)
        assert page.locator("h1").count() == 1, path
    context.close()
