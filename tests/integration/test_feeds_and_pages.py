"""Feeds and pages from real capture: trigger capture → routing → the feed sink → Atom and
RSS read back by feedparser; HTML pages and the static export; the CLI commands."""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import click
import feedparser
import psycopg
import pytest
from click.testing import CliRunner
from markupsafe import escape
from psycopg.types.json import Jsonb

from pgherald import admin, app, cli, cli_render, feeds, pages, routing_admin, snapshots
from pgherald.config import Settings
from pgherald.errors import ConfigError
from pgherald.presentation import Presentation, update_display
from pgherald.render import StaticLinks, WebLinks
from pgherald.sinks import feed as feed_sink
from pgherald.sinks.base import SinkConfig
from pgherald.store import deliveries
from pgherald.store.deliveries import StoredSink
from tests import capture_harness as h
from tests.conftest import Database

BASE = "https://herald.example"
HOSTILE = "<script>alert('pwned')</script> שלום \u202eevil"
LONG = "Quarterly review notes. " * 400
RFC822 = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep"
                    r"|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d [+-]\d{4}$")  # fmt: skip


@dataclass
class Setup:
    settings: Settings
    token: str
    shown: Presentation


def add_feed(settings: Settings, name: str, **options: Any) -> str:
    """A feed sink stored as `sink add` would (its options checked by the sink's module)."""
    options = feed_sink.with_token(options)
    feed_sink.from_config(SinkConfig(name, "feed", options=options))
    with psycopg.connect(settings.dsn) as conn:
        stored = StoredSink(name, "feed", "pgherald", options, False, 10, True)
        assert deliveries.add_sink(conn, settings.schema, stored)
        conn.commit()
    return str(options["token"])


def set_options(db: Database, sink: str, **options: Any) -> None:
    db.execute("UPDATE pgherald.sinks SET config = config || %s WHERE name = %s",
               (Jsonb(options), sink))  # fmt: skip


def delivered(db: Database, sink: str) -> int:
    rows = db.execute(
        "SELECT count(*) FROM pgherald.deliveries WHERE sink = %s AND status = 'delivered'",
        (sink,),
    )
    return int(str(rows[0][0]))


WORKLOAD = [
    "INSERT INTO employees VALUES (1, 'Ada', 'Lovelace', 5000.00, NULL, '2024-03-01'),"
    " (2, 'Grace', 'Hopper', 6000.00, 'first', '2024-03-02')",
    "UPDATE employees SET salary = 5250.00 WHERE id = 1",
    "UPDATE employees SET notes = %(hostile)s WHERE id = 2",
    "UPDATE employees SET notes = %(long)s, salary = 6100.50 WHERE id = 2",
    "DELETE FROM employees WHERE id = 1",
]


@pytest.fixture
def setup(db: Database) -> Setup:
    db.execute(
        "CREATE TABLE employees (id int PRIMARY KEY, first_name text, last_name text,"
        " salary numeric(10, 2), notes text, hired_on date)"
    )
    settings = h.install(db.dsn, ["employees"], settings=h.settings_for(db.dsn, method="trigger"),
                         slot=False)  # fmt: skip
    token = add_feed(settings, "news", title="Staff changes")
    routing_admin.subscribe(settings, "news", ["employees"])
    update_display(settings, "employees", name="Employees", label="{last_name}, {first_name}",
                   columns={"salary": "Salary"})  # fmt: skip
    sink = feed_sink.from_config(SinkConfig("news", "feed", options={"token": token}))
    with h.capturing(settings) as capture:
        delivery = app.Delivery(settings, overrides={"news": sink}).start()
        try:
            delivery.wait_ready()
            with psycopg.connect(db.dsn, autocommit=True) as conn:
                for statement in WORKLOAD:
                    conn.execute(statement.encode(), {"hostile": HOSTILE, "long": LONG})
            h.catch_up(settings, alive=lambda: h.capture_problem(capture))
            deadline = time.monotonic() + 30
            while delivered(db, "news") < 6:
                assert time.monotonic() < deadline, "the feed's deliveries did not arrive"
                time.sleep(0.05)
        finally:
            delivery.close()
    shown = Presentation(locale="de_DE", timezone="Europe/Berlin", public_url=BASE)
    return Setup(settings, token, shown)


def commit_times(db: Database) -> dict[str, datetime]:
    rows = db.execute("SELECT event_id, commit_time FROM pgherald.events WHERE watch = 'employees'")
    return {str(e): t for e, t in rows if isinstance(t, datetime)}


def parse(data: bytes | None) -> Any:
    assert data is not None
    parsed = feedparser.parse(data)
    assert not parsed.bozo, parsed.get("bozo_exception")
    return parsed


def test_a_feed_of_captured_changes(db: Database, setup: Setup) -> None:
    settings, token, shown = setup.settings, setup.token, setup.shown
    atom = parse(feeds.feed_for_token(settings, token, "atom", presentation=shown))
    assert atom.version == "atom10"
    f = atom.feed
    assert f.title == "Staff changes" and f.subtitle == "Changes in Employees"
    assert f.id.startswith("urn:uuid:") and f.author == "pgherald"
    assert {(x.rel, x.href) for x in f.links} == {
        ("self", f"{BASE}/feeds/{token}.atom"), ("alternate", f"{BASE}/"),
    }  # fmt: skip
    titles = [e.title for e in atom.entries]
    assert titles == [
        "Employees: Lovelace, Ada deleted",
        "Employees: Hopper, Grace changed",
        "Employees: Hopper, Grace changed",
        "Employees: Lovelace, Ada changed",
        "Employees: Hopper, Grace added",
        "Employees: Lovelace, Ada added",
    ]
    # Each entry's updated time is its change's commit time, and the feed's the newest.
    times = commit_times(db)
    newest_first = sorted(times.values(), reverse=True)
    for entry, when in zip(atom.entries, newest_first, strict=True):
        assert entry.updated_parsed[:6] == when.utctimetuple()[:6]
        assert entry.published_parsed == entry.updated_parsed
    assert f.updated_parsed[:6] == newest_first[0].utctimetuple()[:6]
    # Readable content in German, Berlin time; hostile text escaped and kept whole.
    raise_ = atom.entries[3]
    assert "5.000,00" in raise_.content[0].value and "5.250,00" in raise_.content[0].value
    assert raise_.link.startswith(f"{BASE}/watches/employees/rows/")
    hostile = atom.entries[2].content[0].value
    assert "<script>" not in hostile and html.escape(HOSTILE, quote=False) in hostile
    long = atom.entries[1].content[0].value
    assert "<details" in long and LONG.strip() in html.unescape(long)
    # Stable ids: the same entries have the same ids on the next fetch.
    again = parse(feeds.feed_for_token(settings, token, "atom", presentation=shown))
    assert [e.id for e in again.entries] == [e.id for e in atom.entries]
    assert len({e.id for e in atom.entries}) == 6

    rss = parse(feeds.feed_for_token(settings, token, "rss", presentation=shown))
    assert rss.version == "rss20"
    assert rss.feed.title == "Staff changes" and rss.feed.link == f"{BASE}/"
    assert rss.feed.description == "Changes in Employees"
    assert [e.title for e in rss.entries] == titles
    assert [e.id for e in rss.entries] == [e.id for e in atom.entries]
    assert all(e.guidislink is False for e in rss.entries)
    raw = feeds.feed_for_token(settings, token, "rss", presentation=shown)
    assert raw is not None
    dates = re.findall(rb"<pubDate>(.*?)</pubDate>", raw)
    assert len(dates) == 6 and all(RFC822.match(d.decode()) for d in dates)

    assert feeds.feed_for_token(settings, token + "x", "atom", presentation=shown) is None
    assert feeds.feed_for_token(settings, "", "atom", presentation=shown) is None


def test_digest_modes_and_the_entry_limit(db: Database, setup: Setup) -> None:
    settings, token, shown = setup.settings, setup.token, setup.shown
    set_options(db, "news", mode="run")
    runs = parse(feeds.feed_for_token(settings, token, "atom", presentation=shown))
    # One entry per transaction: the two inserts went in one.
    assert [e.title.split(": ", 1)[1].split(",")[0] for e in runs.entries] == [
        "1 change in one transaction", "1 change in one transaction",
        "1 change in one transaction", "1 change in one transaction",
        "2 changes in one transaction",
    ]  # fmt: skip
    assert "2 changes: 2 added" in runs.entries[-1].content[0].value
    set_options(db, "news", mode="day")
    day = parse(feeds.feed_for_token(settings, token, "atom", presentation=shown))
    (entry,) = day.entries
    assert "6 changes" in entry.title
    assert "6 changes: 2 added, 3 changed, 1 deleted" in entry.content[0].value
    times = sorted(commit_times(db).values())
    assert entry.updated_parsed[:6] == times[-1].utctimetuple()[:6]
    assert entry.published_parsed[:6] == times[0].utctimetuple()[:6]
    day_again = parse(feeds.feed_for_token(settings, token, "rss", presentation=shown))
    assert day_again.entries[0].id == entry.id
    set_options(db, "news", mode="change", entries=2)
    limited = parse(feeds.feed_for_token(settings, token, "atom", presentation=shown))
    assert [e.title for e in limited.entries] == [
        "Employees: Lovelace, Ada deleted", "Employees: Hopper, Grace changed",
    ]  # fmt: skip


def test_rotating_a_token_retires_the_old_url(db: Database, setup: Setup) -> None:
    settings, old, shown = setup.settings, setup.token, setup.shown
    new = feeds.rotate_token(settings, "news")
    assert new != old and len(new) >= 40
    assert feeds.feed_for_token(settings, old, "atom", presentation=shown) is None
    assert len(parse(feeds.feed_for_token(settings, new, "atom", presentation=shown)).entries) == 6
    assert feeds.feed_token(settings, "news") == new
    db.execute("UPDATE pgherald.sinks SET enabled = false WHERE name = 'news'")
    assert feeds.feed_for_token(settings, new, "atom", presentation=shown) is None
    routing_admin.add_sink(settings, "out", "stdout")
    with pytest.raises(ConfigError, match="sink 'out' is a stdout sink, not a feed"):
        feeds.rotate_token(settings, "out")
    with pytest.raises(ConfigError, match="no sink named 'nope'"):
        feeds.rotate_token(settings, "nope")


def test_a_feed_without_a_token_gets_one(db: Database, setup: Setup) -> None:
    settings = setup.settings
    add_feed(settings, "bare")
    db.execute("UPDATE pgherald.sinks SET config = config - 'token' WHERE name = 'bare'")
    token = feeds.feed_token(settings, "bare")
    assert feeds.feed_token(settings, "bare") == token
    feed = parse(feeds.feed_for_token(settings, token, "atom", presentation=setup.shown))
    assert feed.entries == []  # subscribed to nothing: an empty, valid feed
    assert feed.feed.updated_parsed is not None


def links_of(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r'href="([^"]*)"', page)]


def test_static_export_of_feeds_and_pages(db: Database, setup: Setup, tmp_path: Path) -> None:
    settings, token, shown = setup.settings, setup.token, setup.shown
    exported = feeds.export_feeds(settings, tmp_path / "feeds", shown)
    assert [(e.sink, sorted(p.name for p in e.files)) for e in exported] == [
        ("news", [f"{token}.atom", f"{token}.rss"])
    ]
    assert len(parse((tmp_path / "feeds" / f"{token}.atom").read_bytes()).entries) == 6

    site = pages.export_html(settings, tmp_path / "site", shown)
    assert (site.watches, site.rows) == (2, 3)  # employees and the sentinel; rows 1, 2 + 1
    files = sorted(p.relative_to(site.folder).as_posix() for p in site.folder.rglob("*.html"))
    assert "index.html" in files and not list(site.folder.rglob("*.partial"))
    # Every relative link of every page leads to a page of the export.
    for name in files:
        page = (site.folder / name).read_text(encoding="utf-8")
        for href in links_of(page):
            assert not urlsplit(href).scheme, href
            target = (site.folder / name).parent / unquote(href)
            assert target.resolve().is_file(), f"{name}: {href}"
    row = (site.folder / StaticLinks.row_file("employees", '["2"]')).read_text(encoding="utf-8")
    assert "<script>" not in row and str(escape(HOSTILE)) in row
    assert row.count('<article class="pgh-change') == 3  # added, changed twice
    assert "Hopper, Grace" in row and "Times are in Europe/Berlin" in row
    watch = (site.folder / StaticLinks.watch_file("employees")).read_text(encoding="utf-8")
    assert "<h1><bdi>Employees</bdi></h1>" in watch and "trigger" in watch


def test_pages_for_the_web_app_and_a_snapshot_run(db: Database, setup: Setup) -> None:
    settings, shown = setup.settings, setup.shown
    db.execute("CREATE TABLE grants (id int PRIMARY KEY, funder text, amount numeric(12, 2))")
    db.execute("INSERT INTO grants VALUES (1, 'NSF', 1000.00), (2, 'ERC', 2000.00)")
    admin.add_watch(settings, "grants", method="snapshot")
    first = snapshots.run_watch(settings, "grants")
    db.execute("UPDATE grants SET amount = 2500.00 WHERE id = 2; DELETE FROM grants WHERE id = 1;"
               " INSERT INTO grants VALUES (3, 'DFG', 300.00)")  # fmt: skip
    second = snapshots.run_watch(settings, "grants")
    assert second.run_id is not None and first.run_id is not None
    links = WebLinks("")
    with psycopg.connect(settings.dsn, autocommit=True) as conn:
        run = pages.run(conn, settings.schema, shown, links, second.run_id)
        assert run is not None and run.title == f"Run {second.run_id}"
        body = str(run.body)
        assert body.count('<article class="pgh-change') == 3
        assert "2.000,00" in body and "2.500,00" in body and "snapshot comparison" in body
        assert "1 added, 1 changed, 1 deleted" in body
        assert pages.run(conn, settings.schema, shown, links, 10**9) is None
        limited = pages.run(conn, settings.schema, shown, links, second.run_id, limit=1)
        assert limited is not None and "… and 2 more not shown here." in str(limited.body)

        watch = pages.watch(conn, settings.schema, shown, links, "employees", limit=2)
        assert watch is not None
        older = re.search(r'href="(/watches/employees\?before=\d+)"', str(watch.body))
        assert older is not None
        before = int(older.group(1).rsplit("=", 1)[1])
        rest = pages.watch(conn, settings.schema, shown, links, "employees", before=before)
        assert rest is not None and str(rest.body).count('<article class="pgh-change') == 4
        assert pages.watch(conn, settings.schema, shown, links, "nope") is None

        row = pages.row(conn, settings.schema, shown, links, "employees", '["1"]')
        assert row is not None and row.title == "Employees: Lovelace, Ada"
        assert [c.url for c in row.crumbs] == ["/watches/employees"]
        assert pages.row(conn, settings.schema, shown, links, "employees", '["9"]') is None

        index = pages.index(conn, settings.schema, shown, links)
        assert 'href="/watches/grants"' in str(index.body)
        assert f'href="/runs/{second.run_id}"' in str(index.body)


def test_the_cli_commands(db: Database, setup: Setup, tmp_path: Path) -> None:
    settings = setup.settings

    @click.group(cls=cli.HeraldGroup)
    @cli.connection_options
    def root() -> None:
        """The commands as `cli` registers them."""

    watch = click.Group("watch", commands={"display": cli_render.watch_display})
    sink = click.Group("sink", commands={c.name or "": c for c in cli_render.COMMANDS_ON_SINK})
    for command in (watch, sink, *cli_render.COMMANDS):
        root.add_command(command)
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(root, ["--dsn", settings.dsn, *args])

    done = run("watch", "display", "employees", "--title", "Staff", "--column", "notes=Remarks",
               "--column", "salary=")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        "watch employees is shown as Staff",
        "  rows are labelled {last_name}, {first_name}",
        "  column notes: Remarks",
    ]
    bad = run("watch", "display", "employees", "--label", "{x.__class__}")
    assert bad.exit_code == 1 and "plain column names" in bad.output
    bad = run("watch", "display", "employees", "--templates", "emp")
    assert bad.exit_code == 1 and "set templates_dir" in bad.output
    (tmp_path / "tpl" / "emp").mkdir(parents=True)
    ok = run("watch", "display", "employees", "--templates", "emp", "--templates-dir",
             str(tmp_path / "tpl"))  # fmt: skip
    assert ok.exit_code == 0 and "templates from emp" in ok.output
    missing = run("watch", "display", "nope", "--title", "x")
    assert missing.exit_code == 1 and "no watch named 'nope'" in missing.output

    shown = run("sink", "token", "news", "--base-url", BASE)
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines() == [
        setup.token,
        f"  Atom: {BASE}/feeds/{setup.token}.atom",
        f"  RSS:  {BASE}/feeds/{setup.token}.rss",
    ]
    rotated = run("sink", "rotate-token", "news")
    assert rotated.exit_code == 0
    new = rotated.output.strip()
    assert new != setup.token and feeds.feed_token(settings, "news") == new

    nothing = run("export")
    assert nothing.exit_code == 2 and "--feeds DIR and/or --html DIR" in nothing.output
    no_url = run("export", "--feeds", str(tmp_path / "f"))
    assert no_url.exit_code == 1 and "public URL" in no_url.output
    out = run("export", "--feeds", str(tmp_path / "f"), "--html", str(tmp_path / "h"),
              "--base-url", BASE, "--locale", "fr_FR", "--timezone", "Asia/Tokyo")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert f"feed news: {tmp_path / 'f' / (new + '.atom')}" in out.output
    assert "wrote " in out.output and (tmp_path / "h" / "index.html").is_file()
    index = (tmp_path / "h" / "index.html").read_text(encoding="utf-8")
    assert "Times are in Asia/Tokyo" in index and "Staff" in index
    bad_locale = run("export", "--html", str(tmp_path / "h"), "--locale", "xx_YY")
    assert bad_locale.exit_code == 1 and "unknown locale 'xx_YY'" in bad_locale.output
