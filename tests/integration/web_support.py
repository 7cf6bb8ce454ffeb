"""Helpers for the web console's tests: a store with watches, users and events, and a
signed-in ``TestClient``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.testclient import TestClient

from pgherald.config import Settings
from pgherald.events import ChangeEvent, Operation, RowImage
from pgherald.store import migrations
from pgherald.store import watches as registry
from pgherald.store.changelog import ChangeLog
from pgherald.web import accounts
from pgherald.web.app import create_app
from tests.conftest import Database

SECRET = "test-secret-" + "x" * 40
PASSWORD = "correct horse battery"
COLUMNS = {"id": (20, "int8"), "name": (25, "text"), "note": (25, "text")}
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def store(db: Database, watches: Sequence[str] = ("orders", "secret")) -> Settings:
    """A store with a watch per name (trigger watches on ``public.<name>``, never run)."""
    settings = Settings(dsn=db.dsn)
    with db.connect() as conn:
        migrations.install(conn, settings.schema)
        for name in watches:
            registry.add_watch(
                conn,
                settings.schema,
                registry.Watch(name, "public", name, "trigger", ("id",)),
            )
    return settings


def user(settings: Settings, name: str, role: str, watches: Sequence[str] = ()) -> str:
    accounts.add_user(settings, name, PASSWORD, role, watches)
    return PASSWORD


def event(
    seq: int,
    watch: str,
    *,
    row: int = 1,
    op: Operation = "insert",
    name: str = "Ada",
    note: str = "",
    old_name: str = "Old",
    when: datetime | None = None,
) -> ChangeEvent:
    new = RowImage.from_texts(COLUMNS, {"id": str(row), "name": name, "note": note})
    old = RowImage.from_texts(COLUMNS, {"id": str(row), "name": old_name, "note": note})
    moment = when or datetime(2024, 5, 1, 12, 0, seq % 60, tzinfo=UTC)
    return ChangeEvent(
        event_id=f"T/{watch}/{seq}",
        watch=watch,
        op=op,
        schema="public",
        table=watch,
        key={"id": str(row)},
        old=old if op in ("update", "delete") else None,
        new=None if op == "delete" else new,
        changed=("name",) if op == "update" else (),
        xid=1000 + seq,
        position=str(seq),
        commit_time=moment,
        captured_at=moment,
        method="trigger",
        seq=0,
        old_values="trigger" if op in ("update", "delete") else "none",
    )


def append(db: Database, settings: Settings, events: Sequence[ChangeEvent]) -> None:
    with db.connect() as conn:
        ChangeLog(conn, settings.schema).append(list(events))


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


@dataclass
class Browser:
    """A TestClient that remembers the CSRF token of the last page it read."""

    client: TestClient
    csrf: str = ""

    def get(self, url: str) -> str:
        r = self.client.get(url)
        r.raise_for_status()
        text: str = r.text
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return text

    def post(self, url: str, data: dict[str, Any], csrf: bool = True) -> httpx.Response:
        body = dict(data)
        if csrf:
            body.setdefault("csrf", self.csrf)
        response: httpx.Response = self.client.post(url, data=body, follow_redirects=False)
        return response


def sign_in(client: TestClient, name: str, password: str = PASSWORD) -> Browser:
    page = client.get("/login")
    assert page.status_code == 200
    r = client.post(
        "/login",
        data={"name": name, "password": password, "csrf": csrf_of(page.text), "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    browser = Browser(client)
    browser.get("/")
    return browser


@contextmanager
def console(settings: Settings, **kw: object) -> Iterator[TestClient]:
    app = create_app(settings, secret=SECRET, **kw)  # type: ignore[arg-type]
    with TestClient(app, base_url="http://testserver") as client:
        yield client
