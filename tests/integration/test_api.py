"""The Python API (``Herald``) on real PostgreSQL, with logical and trigger capture."""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from pgherald import ChangeEvent, Herald, admin
from pgherald.config import Settings
from pgherald.errors import ConfigError
from pgherald.store import deliveries
from tests.conftest import Database


def settings_for(db: Database, **overrides: Any) -> Settings:
    return Settings(dsn=db.dsn, slot=f"pgherald_{db.name}", **overrides)


def write(db: Database, *statements: str) -> None:
    with db.connect() as conn:
        for s in statements:
            conn.execute(s.encode())


async def take(changes: Any, n: int, seconds: float = 30.0) -> list[ChangeEvent]:
    out: list[ChangeEvent] = []

    async def collect() -> None:
        async for change in changes:
            out.append(change)
            if len(out) == n:
                return

    await asyncio.wait_for(collect(), seconds)
    return out


@pytest.mark.parametrize("method", ["logical", "trigger"])
def test_async_for_gets_filtered_typed_changes(db: Database, method: str) -> None:
    write(db, "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric(10,2))")
    settings = settings_for(db, method=method)

    async def main() -> list[ChangeEvent]:
        async with Herald(settings=settings) as herald:
            changes = herald.changes("public.orders", ops={"insert", "update"})
            # The watch is created on first use; write once the iterator is running.
            task = asyncio.create_task(take(changes, 3))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(
                write,
                db,
                "INSERT INTO orders VALUES (1, 'new', 10.50)",
                "UPDATE orders SET status = 'paid', total = 12 WHERE id = 1",
                "DELETE FROM orders WHERE id = 1",
                "INSERT INTO orders VALUES (2, 'new', 1)",
            )
            return await task

    got = asyncio.run(main())
    assert [(c.op, dict(c.key)) for c in got] == [
        ("insert", {"id": "1"}),
        ("update", {"id": "1"}),
        ("insert", {"id": "2"}),
    ]
    assert {c.method for c in got} == {method}
    update = got[1]
    fields = {f.name: (f.old, f.new) for f in update.changed_fields}
    assert fields["status"][1] == "paid"
    assert fields["total"][1] == Decimal("12.00")  # typed by the driver's loaders
    if method == "trigger":  # trigger capture always knows the old row
        assert fields["total"][0] == Decimal("10.50")
    watches = admin.list_watches(settings)
    assert [(w.table_name, w.method) for w in watches] == [("orders", method)]


def test_callbacks_sync_and_async_and_a_failing_one_does_not_stop_the_others(
    db: Database,
) -> None:
    write(db, "CREATE TABLE ports (id int PRIMARY KEY, name text)")
    settings = settings_for(db, method="trigger")
    herald = Herald(settings=settings, retry_delay=0.01)
    seen_sync: list[tuple[str, str]] = []
    seen_async: list[tuple[str, str]] = []
    calls = {"flaky": 0, "broken": 0}

    @herald.on("public.ports", ops={"update", "delete"})
    def sync_cb(change: ChangeEvent) -> None:
        seen_sync.append((change.op, change.key["id"]))

    @herald.on("public.ports")
    async def async_cb(change: ChangeEvent) -> None:
        seen_async.append((change.op, change.key["id"]))

    @herald.on("public.ports", retries=2)
    def flaky(change: ChangeEvent) -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("first call fails, the retry works")

    @herald.on("public.ports", ops={"insert"}, retries=1)
    def broken(change: ChangeEvent) -> None:
        calls["broken"] += 1
        raise ValueError(f"cannot handle {change.key['id']}")

    runner = threading.Thread(target=herald.run)
    runner.start()
    deadline = time.monotonic() + 30
    while herald.capture is None or not herald.handlers or herald._stop is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    write(
        db,
        "INSERT INTO ports VALUES (1, 'Hamburg'), (2, 'Genoa')",
        "UPDATE ports SET name = 'Genova' WHERE id = 2",
        "DELETE FROM ports WHERE id = 1",
    )
    while len(seen_async) < 4 or len(seen_sync) < 2 or calls["broken"] < 4:
        assert time.monotonic() < deadline, (seen_async, seen_sync, calls)
        time.sleep(0.05)
    time.sleep(0.3)  # the dead deliveries are recorded after the last call
    herald.stop()
    runner.join(30)
    assert not runner.is_alive()
    assert seen_async == [("insert", "1"), ("insert", "2"), ("update", "2"), ("delete", "1")]
    assert seen_sync == [("update", "2"), ("delete", "1")]
    assert calls["broken"] == 4  # two inserts, each tried twice
    with psycopg.connect(db.dsn) as conn:
        dead = deliveries.list_outcomes(conn, settings.schema)
    assert [(d.status, d.attempts) for d in dead] == [("dead", 2), ("dead", 2)]
    assert {d.sink for d in dead} == {
        "python:tests.integration.test_api."
        "test_callbacks_sync_and_async_and_a_failing_one_does_not_stop_the_others.<locals>.broken"
    }
    assert all(d.last_error and d.last_error.startswith("ValueError: cannot handle") for d in dead)


def test_follows_a_log_that_another_pgherald_fills(db: Database) -> None:
    """With capture=False (or when another process holds the slot), Herald only reads."""
    write(db, "CREATE TABLE t (id int PRIMARY KEY)")
    settings = settings_for(db, method="trigger")
    admin.init(settings)
    admin.add_watch(settings, "t")

    async def main() -> list[ChangeEvent]:
        async with Herald(settings=settings, capture=False) as reader:
            assert reader.capture is None
            async with Herald(settings=settings) as capturer:
                assert capturer.capture is not None
                task = asyncio.create_task(take(reader.changes("t", since="beginning"), 2))
                await asyncio.to_thread(write, db, "INSERT INTO t VALUES (1)", "DELETE FROM t")
                return await task

    got = asyncio.run(main())
    assert [c.op for c in got] == ["insert", "delete"]


def test_bad_input_is_one_clear_error(db: Database) -> None:
    herald = Herald(db.dsn)
    with pytest.raises(ConfigError, match=r"unknown operation.*'upsert'"):
        herald.on("t", ops={"upsert"})
    with pytest.raises(ConfigError, match="needs a DSN"):
        Herald()

    async def main() -> None:
        with pytest.raises(ConfigError, match="inside `async with"):
            async for _ in herald.changes("t"):
                pass

    asyncio.run(main())
