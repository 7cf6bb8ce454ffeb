"""Listen watches: NOTIFY channels captured into the change log as ``message`` events."""

from __future__ import annotations

import asyncio
import time

import pytest
from psycopg import sql

from pgherald import Herald, admin
from pgherald.errors import WatchError
from tests import capture_harness as h
from tests.acceptance._cli import assert_fails, assert_ok, cli
from tests.conftest import Database

ODD = 'Odd "channel", with %s'


def notify(db: Database, channel: str, payload: str) -> None:
    with db.connect() as conn:
        conn.execute(b"SELECT pg_notify(%s, %s)", (channel, payload))


def test_notifications_become_message_events(db: Database) -> None:
    settings = h.install(db.dsn, [], settings=h.settings_for(db.dsn, method="trigger"), slot=False)
    added = admin.add_listen_watch(settings, "alerts", ["jobs", ODD, "jobs"])
    assert added.watch.options == {"channels": ["jobs", ODD]}
    assert "at most once" in added.notes[0]
    with h.capturing(settings) as capture:
        assert capture.listen is not None
        with db.connect(autocommit=False) as conn:
            conn.execute(b"SELECT pg_notify('jobs', 'rolled back')")
            conn.rollback()
            conn.execute(b"SELECT pg_notify('jobs', 'one')")
            conn.execute(b"SELECT pg_notify('jobs', 'one')")  # folded by the server
            conn.execute(sql.SQL("NOTIFY {}, 'two'").format(sql.Identifier(ODD)))
            conn.execute(b"SELECT pg_notify('elsewhere', 'not watched')")
            pid = conn.info.backend_pid
            conn.commit()
        deadline = time.monotonic() + 20
        while capture.listen.stored < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    events = [e for e in h.stored_events(settings) if e.op == "message"]
    assert [(e.watch, e.table, h.texts(e.new)) for e in events] == [
        ("alerts", "jobs", {"channel": "jobs", "payload": "one", "pid": str(pid)}),
        ("alerts", ODD, {"channel": ODD, "payload": "two", "pid": str(pid)}),
    ]
    assert {e.method for e in events} == {"listen"}
    assert len({e.event_id for e in events}) == 2


def test_bad_listen_watches_are_refused(db: Database) -> None:
    settings = h.install(db.dsn, [], settings=h.settings_for(db.dsn), slot=False)
    with pytest.raises(WatchError, match="at least one --channel"):
        admin.add_listen_watch(settings, "w", [])
    with pytest.raises(WatchError, match="at most 63 bytes"):
        admin.add_listen_watch(settings, "w", ["x" * 64])
    admin.add_listen_watch(settings, "w", ["a"])
    with pytest.raises(WatchError, match="exists already"):
        admin.add_listen_watch(settings, "w", ["b"])
    assert [w.name for w in admin.list_watches(settings) if w.method == "listen"] == ["w"]


def test_herald_gets_messages(db: Database) -> None:
    settings = h.settings_for(db.dsn)
    admin.init(settings)
    admin.add_listen_watch(settings, "alerts", ["jobs"])

    async def main() -> list[str]:
        async with Herald(settings=settings) as herald:
            seen: list[str] = []

            async def collect() -> None:
                async for change in herald.changes(ops={"message"}):
                    assert change.new is not None
                    seen.append(str(change.new["payload"]))
                    if len(seen) == 2:
                        return

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.3)
            await asyncio.to_thread(notify, db, "jobs", "first")
            await asyncio.to_thread(notify, db, "jobs", "second")
            await asyncio.wait_for(task, 20)
            return seen

    assert asyncio.run(main()) == ["first", "second"]


def test_cli_watch_add_channel(db: Database) -> None:
    admin.init(h.settings_for(db.dsn))
    out = assert_ok(
        cli("watch", "add", "alerts", "--channel", "jobs", "--channel", ODD, dsn=db.dsn)
    )
    assert out.stdout.startswith("added watch 'alerts' on channel(s) 'jobs',")
    listed = assert_ok(cli("watch", "list", dsn=db.dsn)).stdout
    assert "alerts" in listed and "listen" in listed and "channel jobs, channel" in listed
    assert_fails(
        cli("watch", "add", "x", "--channel", "jobs", "--key", "id", dsn=db.dsn),
        "--channel cannot be combined with --key",
    )
