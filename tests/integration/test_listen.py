"""The raw LISTEN/NOTIFY ``Listener`` against real servers: delivery, runtime channel changes,
hostile names, PostgreSQL's commit and folding rules, callbacks that fail, slow consumers,
and reconnection after the backend is killed or the server restarts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import psycopg
import pytest
from psycopg import sql

from pgherald.db.embedded import EmbeddedCluster, free_port
from pgherald.errors import ConfigError, ConnectionFailed, PgHeraldError
from pgherald.sources.listen import MAX_PAYLOAD_BYTES, Listener, Notification, check_channel
from tests.conftest import Database

T = TypeVar("T")
WAIT = 10.0
"""Seconds to wait for something that should happen at once (generous, for a busy machine)."""


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(60):
            return await scenario()

    return asyncio.run(bounded())


async def sender(dsn: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def notify(
    conn: psycopg.AsyncConnection[tuple[object, ...]], channel: str, payload: str
) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def take(it: AsyncIterator[Notification], n: int = 1) -> list[Notification]:
    got = []
    async with asyncio.timeout(WAIT):
        for _ in range(n):
            got.append(await anext(it))
    return got


async def nothing_more(it: AsyncIterator[Notification], seconds: float = 0.3) -> None:
    try:
        async with asyncio.timeout(seconds):
            extra = await anext(it)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected notification {extra}")


async def until(condition: Callable[[], bool], what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- delivery --------------------------------------------------------------------------------


def test_delivers_to_sync_and_async_callbacks_and_to_async_for(db: Database) -> None:
    async def scenario() -> None:
        seen_sync: list[Notification] = []
        seen_async: list[Notification] = []

        async def record(n: Notification) -> None:
            await asyncio.sleep(0)
            seen_async.append(n)

        async with Listener(db.dsn, ["alpha", "beta"]) as listener:
            listener.add_callback(seen_sync.append)
            listener.add_callback(record)
            assert listener.connected and listener.channels == ("alpha", "beta")
            it = aiter(listener)
            conn = await sender(db.dsn)
            async with conn:
                await notify(conn, "alpha", "one")
                await notify(conn, "beta", "two")
                await conn.execute("NOTIFY alpha")  # no payload
                await notify(conn, "gamma", "not listened to")
                pid = conn.info.backend_pid
                got = await take(it, 3)
            expected = [
                Notification("alpha", "one", pid),
                Notification("beta", "two", pid),
                Notification("alpha", "", pid),
            ]
            assert got == expected
            await nothing_more(it)
            await until(lambda: len(seen_async) == 3, "the async callback")
            assert seen_sync == expected and seen_async == expected
        assert not listener.connected
        with pytest.raises(StopAsyncIteration):
            await anext(it)

    run(scenario)


def test_every_async_for_loop_sees_every_notification(db: Database) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, ["c"]) as listener, await sender(db.dsn) as conn:
            first, second = aiter(listener), aiter(listener)
            for i in range(3):
                await notify(conn, "c", str(i))
            assert [n.payload for n in await take(first, 3)] == ["0", "1", "2"]
            assert [n.payload for n in await take(second, 3)] == ["0", "1", "2"]

    run(scenario)


def test_the_first_loop_gets_what_arrived_before_it_started(db: Database) -> None:
    async def scenario() -> None:
        async with await sender(db.dsn) as conn:
            async with Listener(db.dsn, ["early"]) as listener:
                await notify(conn, "early", "before any loop")
                await asyncio.sleep(0.2)  # received and dispatched meanwhile
                first = aiter(listener)
                await notify(conn, "early", "during")
                assert [n.payload for n in await take(first, 2)] == ["before any loop", "during"]
                second = aiter(listener)  # later loops start from their beginning
                await notify(conn, "early", "last")
                assert [n.payload for n in await take(second)] == ["last"]
                assert [n.payload for n in await take(first)] == ["last"]

            # With a callback, nothing is kept for a loop that may never come.
            seen: list[str] = []
            async with Listener(db.dsn, ["early"]) as listener:
                listener.add_callback(lambda n: seen.append(n.payload))
                await notify(conn, "early", "to the callback")
                await until(lambda: seen == ["to the callback"], "the callback")
                assert len(listener._subscriptions) == 0
                late = aiter(listener)
                await notify(conn, "early", "both")
                assert [n.payload for n in await take(late)] == ["both"]

    run(scenario)


def test_channels_change_at_runtime_promptly_while_a_loop_waits(db: Database) -> None:
    async def scenario() -> None:
        received: asyncio.Queue[Notification] = asyncio.Queue()

        # A ping interval far beyond the test: listen() must not wait for a ping to run.
        async with Listener(db.dsn, ["a"], ping_interval=3600) as listener:

            async def consume() -> None:
                async for n in listener:
                    await received.put(n)

            consumer = asyncio.create_task(consume())
            await asyncio.sleep(0.2)  # the loop is now waiting for a notification
            async with await sender(db.dsn) as conn:
                started = time.monotonic()
                await listener.listen("b")
                await listener.listen("b")  # harmless twice
                assert time.monotonic() - started < 2
                assert listener.channels == ("a", "b")
                await notify(conn, "b", "to b")
                async with asyncio.timeout(WAIT):
                    assert (await received.get()).payload == "to b"

                started = time.monotonic()
                await listener.unlisten("a")
                await listener.unlisten("never listened")
                assert time.monotonic() - started < 2
                assert list(listener.channels) == ["b"]
                await notify(conn, "a", "to a, no longer heard")
                await notify(conn, "b", "marker")
                async with asyncio.timeout(WAIT):
                    assert (await received.get()).payload == "marker"
                assert received.empty()
            consumer.cancel()

    run(scenario)


def test_many_notifications_survive_frequent_interruptions_of_the_reader(db: Database) -> None:
    """The reader is cancelled for every ping and channel change; none may be lost."""

    async def scenario() -> None:
        async with Listener(db.dsn, ["bulk"], ping_interval=0.005) as listener:
            it = aiter(listener)
            async with await sender(db.dsn) as conn:

                async def churn() -> None:
                    for i in range(30):
                        await listener.listen(f"extra{i}")
                        await listener.unlisten(f"extra{i}")

                churner = asyncio.create_task(churn())
                for batch in range(20):
                    async with conn.transaction():
                        for i in range(25):
                            await notify(conn, "bulk", f"{batch}:{i}")
                got = await take(it, 500)
                await churner
            assert [n.payload for n in got] == [f"{b}:{i}" for b in range(20) for i in range(25)]

    run(scenario)


def test_a_slow_consumer_makes_the_listener_wait_without_losing_anything(db: Database) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, ["slow"], max_pending=4) as listener:
            it = aiter(listener)
            padding = "p" * 1000  # so that one network read holds only a few
            async with await sender(db.dsn) as conn:
                for i in range(60):
                    await notify(conn, "slow", f"{i} {padding}")
                await asyncio.sleep(0.5)  # the listener reads until its queues are full
                held = len(listener._incoming) + sum(len(s._items) for s in listener._subscriptions)
                assert 8 <= held <= 30  # bounded by max_pending and one read, not all 60
                await listener.listen("other")  # still served while reading is paused
                got = []
                for _ in range(60):
                    got.extend(await take(it))
                    await asyncio.sleep(0)
            assert [n.payload.split()[0] for n in got] == [str(i) for i in range(60)]

    run(scenario)


# -- channel names ---------------------------------------------------------------------------

HOSTILE = [
    "MixedCase",
    "lower",
    "with space",
    'double"quote',
    "single'quote",
    "semi; DROP TABLE x; --",
    "percent %s %(x)s %%",
    "back\\slash",
    "café ☕ 日本",
    "new\nline",
    "é" * 31 + "x",  # 63 bytes exactly
    "$1",
]


def test_hostile_channel_names_round_trip(db: Database) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, HOSTILE[:6]) as listener, await sender(db.dsn) as conn:
            for name in HOSTILE[6:]:
                await listener.listen(name)
            assert listener.channels == tuple(HOSTILE)
            it = aiter(listener)
            for name in HOSTILE:
                await notify(conn, name, f"payload of {name}")
            got = await take(it, len(HOSTILE))
            assert [(n.channel, n.payload) for n in got] == [
                (c, f"payload of {c}") for c in HOSTILE
            ]
            # The NOTIFY statement with a quoted identifier reaches the same listener.
            for name in HOSTILE:
                await conn.execute(
                    sql.SQL("NOTIFY {}, {}").format(sql.Identifier(name), sql.Literal("again"))
                )
            assert [n.channel for n in await take(it, len(HOSTILE))] == HOSTILE
            # Case matters: "MixedCase" is not "mixedcase" (unquoted NOTIFY folds to lower).
            await conn.execute("NOTIFY MixedCase, 'folded'")
            await notify(conn, "lower", "marker")
            assert [n.channel for n in await take(it)] == ["lower"]
            for name in HOSTILE:
                await listener.unlisten(name)
            await listener.listen("end")
            for name in HOSTILE:
                await notify(conn, name, "unheard")
            await notify(conn, "end", "marker")
            assert [n.channel for n in await take(it)] == ["end"]

    run(scenario)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "cannot be empty"),
        ("x" * 64, "64 bytes long; PostgreSQL channel names are at most 63 bytes"),
        ("é" * 32, "64 bytes long"),
        ("nul\x00inside", "NUL"),
        ("\udcff", "not valid Unicode"),
        (42, "must be a string"),
    ],
)
def test_bad_channel_names_are_refused_with_one_clear_error(name: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")) as caught:
        check_channel(name)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"cannot be empty|bytes|NUL|Unicode|string"):
        Listener("dbname=x", [name])  # type: ignore[list-item]


def test_runtime_listen_refuses_bad_names_and_changes_nothing(db: Database) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, ["ok"]) as listener:
            with pytest.raises(ConfigError, match="at most 63 bytes"):
                await listener.listen("y" * 64)
            with pytest.raises(ConfigError, match="empty"):
                await listener.unlisten("")
            assert listener.channels == ("ok",)
            assert listener.connected

    run(scenario)


# -- PostgreSQL's rules: commit, rollback, folding --------------------------------------------


def test_notifications_in_a_transaction_arrive_only_at_commit(db: Database) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, ["tx", "marker"]) as listener:
            it = aiter(listener)
            async with await sender(db.dsn) as writer, await sender(db.dsn) as other:
                async with writer.transaction():
                    await notify(writer, "tx", "first")
                    await notify(writer, "tx", "second")
                    # A notification committed meanwhile arrives; the open transaction's do not.
                    await notify(other, "marker", "while open")
                    assert [n.payload for n in await take(it)] == ["while open"]
                    await nothing_more(it)
                assert [n.payload for n in await take(it, 2)] == ["first", "second"]

    run(scenario)


def test_a_rolled_back_transaction_or_savepoint_notifies_nobody(db: Database) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, ["rb"]) as listener:
            it = aiter(listener)
            async with await sender(db.dsn) as conn:
                await conn.execute("BEGIN")
                await notify(conn, "rb", "rolled back")
                await conn.execute("ROLLBACK")
                async with conn.transaction():
                    await notify(conn, "rb", "kept")
                    await conn.execute("SAVEPOINT s")
                    await notify(conn, "rb", "in a rolled back savepoint")
                    await conn.execute("ROLLBACK TO SAVEPOINT s")
                    await notify(conn, "rb", "kept too")
                await notify(conn, "rb", "after")
            assert [n.payload for n in await take(it, 3)] == ["kept", "kept too", "after"]
            await nothing_more(it)

    run(scenario)


def test_duplicates_within_a_transaction_are_folded_distinct_payloads_are_not(
    db: Database,
) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, ["d", "e"]) as listener:
            it = aiter(listener)
            async with await sender(db.dsn) as conn:
                async with conn.transaction():
                    for payload in ["x", "x", "y", "x", "", "", "y", "z"]:
                        await notify(conn, "d", payload)
                    await notify(conn, "e", "x")  # same payload, another channel: kept
                got = await take(it, 5)
                assert [(n.channel, n.payload) for n in got] == [
                    ("d", "x"),
                    ("d", "y"),
                    ("d", ""),
                    ("d", "z"),
                    ("e", "x"),
                ]
                await nothing_more(it)
                # Across transactions nothing is folded.
                await notify(conn, "d", "x")
                await notify(conn, "d", "x")
                assert [n.payload for n in await take(it, 2)] == ["x", "x"]

    run(scenario)


def test_payloads_up_to_the_limit_arrive_whole_longer_ones_are_refused(db: Database) -> None:
    async def scenario() -> None:
        async with Listener(db.dsn, ["big"]) as listener, await sender(db.dsn) as conn:
            it = aiter(listener)
            largest = "é" * ((MAX_PAYLOAD_BYTES - 1) // 2) + "x"  # 7999 bytes in UTF-8
            assert len(largest.encode()) == MAX_PAYLOAD_BYTES
            await notify(conn, "big", largest)
            assert [n.payload for n in await take(it)] == [largest]
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="too long"):
                await notify(conn, "big", "y" * (MAX_PAYLOAD_BYTES + 1))
            assert listener.connected

    run(scenario)


# -- failures --------------------------------------------------------------------------------


def test_a_raising_callback_is_logged_and_the_others_go_on(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []

        def broken(n: Notification) -> None:
            raise RuntimeError(f"boom on {n.payload}")

        async def broken_async(n: Notification) -> None:
            await asyncio.sleep(0)
            raise ValueError("async boom")

        async with Listener(db.dsn, ["cb"]) as listener, await sender(db.dsn) as conn:
            listener.add_callback(broken)
            listener.add_callback(broken_async)
            listener.add_callback(lambda n: seen.append(n.payload))
            for payload in ("1", "2", "3"):
                await notify(conn, "cb", payload)
            await until(lambda: len(seen) == 3, "the healthy callback")
            listener.remove_callback(broken)
            await notify(conn, "cb", "4")
            await until(lambda: len(seen) == 4, "the healthy callback")
            assert listener.connected
        return seen

    with caplog.at_level(logging.ERROR, logger="pgherald.listen"):
        assert run(scenario) == ["1", "2", "3", "4"]
    failures = [r for r in caplog.records if r.exc_info]
    assert [type(r.exc_info[1]).__name__ for r in failures if r.exc_info] == [
        "RuntimeError",
        "ValueError",
    ] * 3 + ["ValueError"]


def test_start_fails_with_one_clear_error(db: Database) -> None:
    with pytest.raises(ConfigError, match="not a valid libpq connection string"):
        Listener("host=x password=secret = =", ["a"])
    with pytest.raises(ConfigError, match="list of names"):
        Listener(db.dsn, "abc")

    async def unreachable() -> None:
        listener = Listener(f"host=127.0.0.1 port={free_port()} password=hunter22", ["a"])
        with pytest.raises(ConnectionFailed) as caught:
            async with listener:
                raise AssertionError("entered")
        message = str(caught.value)
        assert "connection refused" in message and "hunter22" not in message
        assert "\n" not in message
        assert not listener.connected
        with pytest.raises(PgHeraldError, match="closed"):
            await listener.listen("b")

    run(unreachable)


def test_close_ends_loops_and_the_session(db: Database) -> None:
    async def scenario() -> None:
        listener = Listener(db.dsn, ["z"])
        await listener.listen("before start")  # remembered, LISTENed at start
        await listener.start()
        pid = listener.backend_pid
        assert pid is not None
        loop_ended = asyncio.Event()

        async def consume() -> None:
            async for _ in listener:
                pass
            loop_ended.set()

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        await listener.close()
        await listener.close()  # harmless twice
        async with asyncio.timeout(WAIT):
            await loop_ended.wait()
        await consumer
        assert not listener.connected and listener.backend_pid is None
        async with await sender(db.dsn) as conn:
            cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            assert await cur.fetchone() == (0,)

    run(scenario)


def test_close_still_delivers_what_was_received(db: Database) -> None:
    async def scenario() -> None:
        calls: list[str] = []
        listener = Listener(db.dsn, ["held"])
        loop_saw: list[str] = []

        async def slow(n: Notification) -> None:
            calls.append(n.payload)
            await asyncio.sleep(0.05)

        async def consume() -> None:
            async for n in listener:
                loop_saw.append(n.payload)

        listener.add_callback(slow)
        async with listener, await sender(db.dsn) as conn:
            consumer = asyncio.create_task(consume())
            await asyncio.sleep(0.1)
            async with conn.transaction():
                for i in range(5):
                    await notify(conn, "held", str(i))
            await until(lambda: len(calls) == 1, "the first callback")
            # Closed while four notifications still wait for the slow callback.
        await consumer
        assert calls == loop_saw == ["0", "1", "2", "3", "4"]

    run(scenario)


# -- reconnection ----------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    listener = Listener("dbname=x", reconnect_delay=0.5, max_reconnect_delay=8)
    for attempt, ceiling in [(1, 0.5), (2, 1), (3, 2), (4, 4), (5, 8), (6, 8), (50, 8)]:
        delays = {listener._backoff(attempt) for _ in range(200)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, delays)
        assert len(delays) > 100  # jittered, so that many listeners do not return in step


def test_reconnects_after_its_backend_is_terminated(db: Database) -> None:
    async def scenario() -> None:
        reconnected = asyncio.Event()
        heard: list[Notification] = []

        async def on_reconnect() -> None:
            reconnected.set()

        async with Listener(
            db.dsn, ["r"], on_reconnect=on_reconnect, reconnect_delay=0.05, max_reconnect_delay=0.2
        ) as listener:
            listener.add_callback(heard.append)
            it = aiter(listener)
            await listener.listen("added at runtime")
            old_pid = listener.backend_pid
            async with await sender(db.dsn) as conn:
                await conn.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
                async with asyncio.timeout(WAIT):
                    await reconnected.wait()
                assert listener.connected and listener.reconnects == 1
                assert listener.backend_pid not in (None, old_pid)
                # LISTEN again on every channel, including the one added at runtime.
                await notify(conn, "r", "after")
                await notify(conn, "added at runtime", "after too")
                got = await take(it, 2)
            assert [(n.channel, n.payload) for n in got] == [
                ("r", "after"),
                ("added at runtime", "after too"),
            ]
            await until(lambda: len(heard) == 2, "the callback")

    run(scenario)


def test_reconnects_after_the_server_restarts(private_cluster: EmbeddedCluster) -> None:
    dsn = private_cluster.dsn()

    async def scenario() -> None:
        calls: list[bool] = []
        async with Listener(
            dsn,
            ["restart"],
            reconnect_delay=0.05,
            max_reconnect_delay=0.5,
            on_reconnect=lambda: calls.append(listener.connected),
        ) as listener:
            it = aiter(listener)
            restart = asyncio.create_task(asyncio.to_thread(private_cluster.restart))
            await until(lambda: not listener.connected, "the loss to be noticed")
            # While disconnected, listen() returns at once and applies at reconnection.
            await listener.listen("added while down")
            await restart
            await until(lambda: bool(calls), "on_reconnect", within=30)
            assert calls == [True] and listener.reconnects == 1
            async with await sender(dsn) as conn:
                await notify(conn, "restart", "after")
                await notify(conn, "added while down", "heard")
                got = await take(it, 2)
            assert [n.payload for n in got] == ["after", "heard"]

    run(scenario)


def test_on_reconnect_runs_before_later_notifications_are_delivered(db: Database) -> None:
    async def scenario() -> None:
        order: list[str] = []

        async def resync() -> None:
            await asyncio.sleep(0.2)
            order.append("resync")

        async with Listener(db.dsn, ["o"], on_reconnect=resync, reconnect_delay=0.05) as listener:
            listener.add_callback(lambda n: order.append(n.payload))
            async with await sender(db.dsn) as conn:
                await conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
                await until(lambda: listener.reconnects == 1, "the reconnection")
                await notify(conn, "o", "new")
                await until(lambda: "new" in order, "the notification")
        assert order == ["resync", "new"]

    run(scenario)
