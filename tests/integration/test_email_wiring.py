"""E-mail sinks as users set them up: ``pgherald sink add ... email``, ``pgherald digests
send`` for cron, and ``pgherald run``'s delivery (``app.Delivery``), which mails changes one
by one through the engine and hands digest sinks to the digest job, rendering with the
store's presentation settings."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import click
import pytest
from click.testing import CliRunner

from pgherald import app, cli, cli_delivery, cli_digests
from pgherald.config import Settings
from pgherald.db.connect import connect
from pgherald.delivery.router import Router
from pgherald.events import ChangeEvent
from pgherald.presentation import update_display
from pgherald.store.changelog import ChangeLog
from tests import capture_harness as h
from tests.conftest import Database
from tests.integration.sink_events import change
from tests.integration.smtp_server import PASSWORD, USER, Cert, MailServer, make_cert, parts


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


def setup(db: Database) -> Settings:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, name text, amount numeric)")
    settings = h.settings_for(db.dsn, method="trigger", timezone="Europe/Berlin", locale="de_DE")
    return h.install(db.dsn, ["orders"], settings=settings, slot=False)


def commands(settings: Settings) -> Callable[..., Any]:
    @click.group()
    @cli.connection_options
    def root() -> None:
        """The commands as ``cli`` registers them."""

    for command in (*cli_delivery.COMMANDS, *cli_digests.COMMANDS):
        root.add_command(command)
    runner = CliRunner()

    def run(*args: str) -> Any:
        env = {"PGHERALD_TIMEZONE": settings.timezone, "PGHERALD_LOCALE": settings.locale}
        return runner.invoke(root, ["--dsn", settings.dsn, *args], env=env)

    return run


def sink_options(server: MailServer, cert: Cert, to: str, **extra: str) -> list[str]:
    pairs = {
        "host": "127.0.0.1", "port": str(server.port), "starttls": "true",
        "ca_file": str(cert.cert), "username": USER, "password": PASSWORD,
        "from": "herald@example.org", "to": to, "helo": "pgherald.test", **extra,
    }  # fmt: skip
    return [arg for k, v in pairs.items() for arg in ("-o", f"{k}={v}")]


def log(settings: Settings, *times: datetime, first: int = 1) -> None:
    events: list[ChangeEvent] = [
        dataclasses.replace(change(first + i), commit_time=t) for i, t in enumerate(times)
    ]
    with connect(settings) as conn:
        ChangeLog(conn, settings.schema).append(events)
        conn.commit()


def route(settings: Settings) -> None:
    router = Router(settings)
    with connect(settings) as conn:
        while router.route_once(conn):
            pass


def test_digests_send_from_the_command_line(db: Database, server: MailServer, cert: Cert) -> None:
    settings = setup(db)
    update_display(settings, "orders", name="Orders", label="#{id}: {name}")
    run = commands(settings)
    options = sink_options(server, cert, "team@example.com", mode="digest", period="hour")
    added = run("sink", "add", "team", "email", *options)
    assert added.exit_code == 0, added.output
    assert run("subscribe", "team", "orders").exit_code == 0
    bad = run("sink", "add", "bad", "email", "-o", "host=x", "-o", "from=a@example.org")
    assert bad.exit_code == 1 and "option 'to' is required" in str(bad.exception)

    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    log(settings, hour + timedelta(minutes=5), hour + timedelta(minutes=6))
    route(settings)
    sent = run("digests", "send")
    assert sent.exit_code == 0, sent.output
    local = hour.astimezone(settings_zone(settings))
    assert sent.output == f"team: hour:{local:%Y-%m-%dT%H:%M%z}: 2 changes, sent\n"
    again = run("digests", "send", "--sink", "team")
    assert (again.exit_code, again.output) == (0, "no digest is due\n")
    missing = run("digests", "send", "--sink", "nope")
    assert missing.exit_code == 1 and "no sink named 'nope'" in str(missing.exception)

    (mail,) = server.messages()
    assert mail["Subject"].startswith("[pgherald] Orders: 2 changes (")
    text, _ = parts(mail)
    # The store's settings: the watch's display name and row label, German numbers and
    # dates, Berlin time.
    first = (hour + timedelta(minutes=5)).astimezone(settings_zone(settings))
    assert "Orders: #1: Zoë 1 added" in text
    assert f"{first:%d.%m.%Y, %H:%M:%S} {first:%Z} · logical replication" in text
    assert "  Amount: 1,50" in text


def settings_zone(settings: Settings) -> ZoneInfo:
    return ZoneInfo(settings.timezone)


def test_run_mails_changes_and_digests(db: Database, server: MailServer, cert: Cert) -> None:
    settings = setup(db)
    run = commands(settings)
    for name, extra in (("ops", {}), ("boss", {"mode": "digest", "period": "hour"})):
        added = run(
            "sink",
            "add",
            name,
            "email",
            *sink_options(server, cert, f"{name}@example.com", **extra),
        )
        assert added.exit_code == 0, added.output
        assert run("subscribe", name, "orders").exit_code == 0
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    log(
        settings,
        hour + timedelta(minutes=1),
        hour + timedelta(minutes=2),
        hour + timedelta(minutes=3),
    )
    delivery = app.Delivery(settings)
    assert delivery.digests is not None
    delivery.digests.poll = 0.1
    delivery.start()
    try:
        delivery.wait_ready()
        deadline = time.monotonic() + 30
        while len(server.received) < 4:
            assert time.monotonic() < deadline, [m["Subject"] for m in server.messages()]
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        delivery.close()
    to = sorted(m["To"] for m in server.messages())
    assert to == ["boss@example.com"] + ["ops@example.com"] * 3
    digest = next(m for m in server.messages() if m["To"] == "boss@example.com")
    assert digest["X-Pgherald-Changes"] == "3"
    with connect(settings) as conn:
        rows = conn.execute(
            "SELECT sink, status, count(*) FROM pgherald.deliveries GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    assert [tuple(r) for r in rows] == [("boss", "delivered", 3), ("ops", "delivered", 3)]
