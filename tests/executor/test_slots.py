"""How many entries an executor takes: `concurrency + prefetch` running or waiting to run; one
whose run ended and whose result is being written holds no slot, up to as many again."""

from __future__ import annotations

import asyncio

from executor.worker import Executor
from relay.connection import connect
from relay.settings import Settings
from tests.conftest import with_settings


async def test_a_run_being_settled_holds_no_slot_up_to_as_many_again(settings: Settings) -> None:
    client = connect(settings.redis_url or "")
    worker = Executor(with_settings(settings, executor_concurrency=1, executor_prefetch=1),
                      client)
    held: list[asyncio.Task[None]] = []

    def take(count: int) -> None:  # entries the executor holds, as `_spawn` adds them
        for _ in range(count):
            held.append(asyncio.create_task(asyncio.sleep(60)))
            worker._running.add(held[-1])

    try:
        assert worker.free_slots() == 2
        take(2)
        assert worker.free_slots() == 0  # one running, one waiting for the thread
        worker._settling = 2  # both runs ended: their settles are under way
        assert worker.free_slots() == 2
        take(2)
        assert worker.free_slots() == 0
        worker._settling = 4  # a slow Redis: no more than twice the slots are held
        assert worker.free_slots() == 0
    finally:
        for task in held:
            task.cancel()
        worker.sandbox.close()
        await client.aclose()
