"""The delivery engine's connection budget (``engine._Budget``): sinks take turns when
more want connections than it allows, and one that gives up waiting takes nothing."""

from __future__ import annotations

import asyncio
import threading

from pgherald.delivery.engine import _Budget


def test_sinks_take_turns_and_a_stopped_waiter_takes_nothing() -> None:
    async def scenario() -> None:
        budget = _Budget(2)
        never = threading.Event()
        assert await budget.take(never) and budget.try_take()
        assert not budget.try_take() and not budget.wanted

        first = asyncio.create_task(budget.take(never))
        stop = threading.Event()
        second = asyncio.create_task(budget.take(stop))
        await asyncio.sleep(0.05)
        assert budget.wanted and not first.done() and not second.done()

        stop.set()  # the second gives up: it is not handed anything
        assert await second is False
        budget.give()  # the first waiter gets it
        assert await first is True
        assert not budget.wanted and not budget.try_take()

        budget.give()
        budget.give()
        assert budget.free == 2  # nothing lost, nothing made up

        # handed one just as it is told to stop: it keeps it (and gives it back later)
        assert budget.try_take() and budget.try_take()
        late = threading.Event()
        waiting = asyncio.create_task(budget.take(late))
        await asyncio.sleep(0.05)
        budget.give()
        late.set()
        assert await waiting is True
        assert budget.free == 0

    asyncio.run(scenario())
