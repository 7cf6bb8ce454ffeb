"""The console's pages doing their jobs: the browser's filters and pages, watches added
through the form (and refused with the reason), subscriptions, deliveries, users, the
live stream over a real server, and the ``pgherald user`` commands."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
from click.testing import CliRunner

from pgherald import routing_admin
from pgherald.cli_web import user as user_cli
from pgherald.store import errors as error_store
from pgherald.web import accounts
from pgherald.web.server import Server, serve
from tests.conftest import Database
from tests.integration.web_support import (
    PASSWORD,
    SECRET,
    append,
    console,
    csrf_of,
    event,
    sign_in,
    store,
    user,
)


def _ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr id="change-(\d+)"', html)]


def test_the_change_browser_filters_and_pages(db: Database) -> None:
    settings = store(db, ["orders", "staff"])
    start = datetime(2024, 5, 1, tzinfo=UTC)
    events = [
        event(i, "orders" if i % 3 else "staff", row=i % 5, op="update" if i % 2 else "insert",
              name=f"name{i}", when=start + timedelta(hours=i))
        for i in range(1, 121)
    ]  # fmt: skip
    append(db, settings, events)
    user(settings, "ada", "admin")
    with console(settings) as client:
        b = sign_in(client, "ada")
        first = b.get("/changes")
        assert _ids(first) == list(range(120, 70, -1))
        assert "sse-connect=" in first  # the first page is live
        older = re.search(r'href="([^"]+)" rel="next"', first)
        assert older is not None
        second = b.get(older.group(1).replace("&amp;", "&"))
        assert _ids(second) == list(range(70, 20, -1))
        assert "sse-connect=" not in second and "Back to the newest" in second

        staff = _ids(b.get("/changes?watch=staff&op=insert"))
        assert staff == [i for i in range(120, 0, -1) if i % 3 == 0 and i % 2 == 0][:50]
        row = _ids(b.get("/changes?watch=orders&key=4"))
        assert row == [i for i in range(120, 0, -1) if i % 3 and i % 5 == 4]
        found = _ids(b.get("/changes?q=NAME11"))
        assert found == [119, 118, 117, 116, 115, 114, 113, 112, 111, 110, 11]
        window = _ids(b.get("/changes?since=2024-05-01T10:00&until=2024-05-01T12:00"))
        assert window == [12, 11, 10]  # until is inclusive to the minute

        for bad, message in [
            ("/changes?op=explode", "unknown operation"),
            ("/changes?key=4", "choose a watch"),
            ("/changes?since=yesterday", "is not a time"),
            ("/changes?before=abc", "must be a log id"),
            ("/changes?q=" + "x" * 201, "at most 200"),
        ]:
            r = client.get(bad)
            assert r.status_code == 400 and message in r.text, bad

        detail = b.get("/events/5")
        assert "name5" in detail and "History of" not in detail
        history = b.get("/history?watch=orders&key=%5B%224%22%5D")
        assert history.count('class="panel stack"') == len(row)


def test_adding_a_watch_through_the_form(db: Database) -> None:
    settings = store(db, [])
    db.execute("CREATE TABLE public.staff (id int PRIMARY KEY, name text, pay numeric)")
    db.execute("CREATE TABLE public.nokey (a int)")
    user(settings, "ed", "editor")
    with console(settings) as client:
        b = sign_in(client, "ed")
        form = b.get("/watches/new")
        assert '<option value="public.staff">' in form and "pgherald." not in form
        refusals = [
            ({"table": "public.missing"}, "no table public.missing"),
            ({"table": "public.nokey", "method": "trigger"}, "no primary key"),
            ({"table": "public.staff", "columns": "id, nope"}, "nope"),
            ({"table": "public.staff", "every": "15m", "method": "trigger"}, "snapshot"),
            ({"table": "public.staff", "method": "magic"}, "unknown capture method"),
            ({"table": "<b>bold</b>"}, "cannot read table name"),
        ]
        for data, reason in refusals:
            r = b.post("/watches", data)
            assert r.status_code == 400, data
            assert reason in r.text, (data, r.text[-2000:])
            assert 'role="alert"' in r.text
            assert "<b>bold</b>" not in r.text  # the form comes back, escaped
        assert db.execute("SELECT count(*) FROM pgherald.watches") == [(0,)]

        r = b.post(
            "/watches",
            {"table": "public.staff", "name": "pay", "method": "trigger", "ignore": "name"},
        )
        assert r.status_code == 200 and "Watch added" in r.text
        assert db.execute("SELECT name, method, ignore_columns FROM pgherald.watches") == [
            ("pay", "trigger", ["name"])
        ]
        r = b.post(
            "/watches",
            {"table": "public.staff", "name": "snap", "method": "snapshot", "every": "1h"},
        )
        assert r.status_code == 200 and "every 1h" in r.text
        dashboard = b.get("/")
        assert "pay" in dashboard and "snap" in dashboard and "next run in" in dashboard


def test_dashboard_shows_activity_and_errors(db: Database) -> None:
    settings = store(db, ["orders", "staff"])
    now = datetime.now(UTC)
    append(db, settings, [event(1, "orders", when=now), event(2, "orders", row=2, when=now)])
    append(db, settings, [event(3, "staff", when=now - timedelta(days=3))])
    with db.connect() as conn:
        error_store.record_error(conn, settings.schema, "boom <b>", watch="staff")
    db.execute("UPDATE pgherald.watches SET status = 'error', last_error = 'boom <b>'")
    user(settings, "vi", "viewer", ["orders", "staff"])
    with console(settings) as client:
        b = sign_in(client, "vi")
        rows = b.get("/?partial=1")
        orders, staff = rows.split("</tr>")[:2]
        assert '<a href="/changes?watch=orders">2</a>' in orders
        assert '<a href="/changes?watch=staff">0</a>' in staff
        assert '/watch?name=staff#errors">1</a>' in staff
        assert "boom &lt;b&gt;" in staff
        detail = b.get("/watch?name=staff")
        assert "boom &lt;b&gt;" in detail and "Subscriptions" not in detail
        assert '<dt>Keeps changes</dt><dd>forever <span class="muted">(no retain is set)' in detail

    # how long a watch keeps its changes: its own retain, else the configuration's
    db.execute("UPDATE pgherald.watches SET retain = '90d' WHERE name = 'orders'")
    with console(settings.with_overrides(retain="400d")) as client:
        b = sign_in(client, "vi")
        assert "<dt>Keeps changes</dt><dd>for 90d</dd>" in b.get("/watch?name=orders")
        staff_page = b.get("/watch?name=staff")
        inherited = '<dd>for 400d <span class="muted">(the configuration&#39;s retain)</span>'
        assert inherited in staff_page


def test_subscriptions_and_deliveries(db: Database) -> None:
    settings = store(db, ["orders"])
    routing_admin.add_sink(settings, "hook", "webhook", options={"url": "http://127.0.0.1:9/"})
    user(settings, "ed", "editor")
    with console(settings) as client:
        b = sign_in(client, "ed")
        page = b.get("/subscriptions")
        assert "No subscriptions yet." in page
        bad = b.post("/subscriptions/add", {"sink": "hook", "watch": "orders", "where": "a =="})
        assert bad.status_code == 400 and 'role="alert"' in bad.text
        r = b.post(
            "/subscriptions/add",
            {"sink": "hook", "watch": "orders", "ops": ["insert", "update"], "where": "id > 1"},
        )
        assert r.status_code == 303
        subs = routing_admin.list_subscriptions(settings)
        assert [(s.sink, s.watch, s.filter["ops"]) for s in subs] == [
            ("hook", "orders", ["insert", "update"])
        ]
        assert "id &gt; 1" in b.get("/subscriptions")
        append(db, settings, [event(1, "orders")])
        db.execute(
            "INSERT INTO pgherald.deliveries (event_id, sink, status, last_error)"
            " VALUES (1, 'hook', 'dead', '<script>nope</script>')"
        )
        deliveries = b.get("/deliveries?status=dead")
        assert "&lt;script&gt;nope" in deliveries and "/events/1" in deliveries
        assert b.get("/deliveries?sink=other").count("No deliveries.") == 1
        r = b.post("/subscriptions/remove", {"sink": "hook", "watch": "orders"})
        assert r.status_code == 303 and routing_admin.list_subscriptions(settings) == []


def test_admins_manage_users_and_keep_one_admin(db: Database) -> None:
    settings = store(db, ["orders", "secret"])
    user(settings, "ada", "admin")
    with console(settings) as client:
        b = sign_in(client, "ada")
        b.get("/users")
        short = b.post("/users/add", {"name": "vi", "password": "short", "role": "viewer"})
        assert short.status_code == 400 and "at least 10 characters" in short.text
        r = b.post(
            "/users/add",
            {"name": "vi", "password": PASSWORD, "role": "viewer", "watches": ["orders"]},
        )
        assert r.status_code == 303
        vi = accounts.get_user(settings, "vi")
        assert vi is not None and vi.role == "viewer" and vi.watches == ("orders",)
        r = b.post(
            "/users/update",
            {"name": "vi", "action": "save", "role": "editor", "watches": ["orders", "secret"]},
        )
        assert r.status_code == 303
        vi = accounts.get_user(settings, "vi")
        assert vi is not None and vi.role == "editor" and vi.watches == ("orders", "secret")
        last = b.post("/users/update", {"name": "ada", "action": "remove"})
        assert last.status_code == 400 and "only admin" in last.text
        demote = b.post("/users/update", {"name": "ada", "action": "save", "role": "viewer"})
        assert demote.status_code == 400 and "only admin" in demote.text
        r = b.post("/users/update", {"name": "vi", "action": "password", "password": "x" * 12})
        assert r.status_code == 303
        assert accounts.verify(accounts.get_user(settings, "vi"), "x" * 12)
        r = b.post("/users/update", {"name": "vi", "action": "remove"})
        assert r.status_code == 303 and accounts.get_user(settings, "vi") is None


def _sse_lines(response: httpx.Response, want: int, seconds: float = 20) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    for line in response.iter_lines():
        lines.append(line)
        if sum(1 for x in lines if x.startswith("id: ")) >= want or time.monotonic() > deadline:
            break
    return lines


def test_live_stream_over_a_real_server(db: Database) -> None:
    settings = store(db, ["orders", "secret"])
    append(db, settings, [event(1, "orders")])
    user(settings, "vi", "viewer", ["orders"])
    server = Server(settings, port=0, secret=SECRET).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            page = client.get("/login")
            r = client.post(
                "/login", data={"name": "vi", "password": PASSWORD, "csrf": csrf_of(page.text)}
            )
            assert r.status_code == 303
            with client.stream("GET", "/changes/stream?after=1", timeout=30) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                threading.Timer(
                    0.5,
                    append,
                    (db, settings, [event(2, "secret"), event(3, "orders", op="update")]),
                ).start()
                lines = _sse_lines(stream, 1)
            assert "id: 3" in lines and "event: change" in lines
            assert not any("secret" in x for x in lines)
            # a browser that reconnects says where it was; it gets only what came after
            append(db, settings, [event(4, "orders", row=4)])
            with client.stream(
                "GET", "/changes/stream?after=1", headers={"Last-Event-ID": "3"}, timeout=30
            ) as stream:
                lines = _sse_lines(stream, 1)
            assert [x for x in lines if x.startswith("id: ")] == ["id: 4"]
            # removed while watching: the stream says so and ends
            with client.stream("GET", "/changes/stream", timeout=30) as stream:
                threading.Timer(0.5, accounts.remove_user, (settings, "vi")).start()
                threading.Timer(0.8, append, (db, settings, [event(5, "orders")])).start()
                lines = list(stream.iter_lines())
            assert "event: signed-out" in lines and "id: 5" not in lines
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        assert not server.thread.is_alive()


def test_serve_runs_until_stopped(db: Database) -> None:
    settings = store(db, [])
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop), kwargs={"port": 0})
    thread.start()
    time.sleep(1)
    assert thread.is_alive()
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_user_commands(db: Database) -> None:
    settings = store(db, ["orders"])
    runner = CliRunner()
    env = {"PGHERALD_DSN": settings.dsn}

    def run(*args: str, input: str | None = None) -> tuple[int, str]:
        result = runner.invoke(user_cli, list(args), env=env, input=input)
        return result.exit_code, result.output + (
            str(result.exception or "") if result.exit_code else ""
        )

    code, out = run("add", "ada", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    assert code == 0 and "added user 'ada' (admin)" in out
    code, out = run("add", "ada", "--password-stdin", input=PASSWORD + "\n")
    assert code == 1 and "exists already" in out
    code, out = run("add", "vi", "--watch", "orders", "--password-stdin", input="short\n")
    assert code == 1 and "at least 10 characters" in out
    code, out = run("add", "vi", "--watch", "nope", "--password-stdin", input=PASSWORD + "\n")
    assert code == 1 and "no such watch" in out and accounts.get_user(settings, "vi") is None
    code, out = run("add", "vi", "--watch", "orders", "--password-stdin", input=PASSWORD + "\n")
    assert code == 0 and "may read orders" in out
    code, out = run("list")
    assert code == 0 and "ada\tadmin\tevery watch" in out and "vi\tviewer\torders" in out
    code, out = run("role", "ada", "viewer")
    assert code == 1 and "only admin" in out
    code, out = run("password", "vi", "--password-stdin", input="another password\n")
    assert code == 0 and accounts.verify(accounts.get_user(settings, "vi"), "another password")
    code, out = run("deny", "vi", "orders")
    assert code == 0 and accounts.get_user(settings, "vi").watches == ()  # type: ignore[union-attr]
    code, out = run("remove", "vi")
    assert code == 0 and accounts.get_user(settings, "vi") is None
    code, out = run("remove", "vi")
    assert code == 1 and "no user named 'vi'" in out
