"""Batcher: concurrent calls coalesced into one send, each caller getting its own result.

`send` here stands where the bus puts a Redis pipeline: it records the batches it is given, so
the tests see what would have gone out in one round trip.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.batching import Batcher


class Recorder:
    """A send that returns item * 10, or the exception an item asks for; it can be held open
    to play a round trip in flight."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.entered.set()
        await self.release.wait()
        return [ValueError(f"item {item} refused") if item < 0 else item * 10 for item in items]


async def test_a_lone_call_goes_out_at_once_alone() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send)
    # No timer to wait out: the result comes back well within a round trip's time.
    assert await asyncio.wait_for(batcher(4), timeout=0.5) == 40
    assert send.batches == [[4]]


async def test_calls_made_together_go_out_in_one_send() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send)
    results = await asyncio.gather(*(batcher(item) for item in range(20)))
    assert results == [item * 10 for item in range(20)]
    assert send.batches == [list(range(20))]


async def test_calls_arriving_while_a_batch_is_in_flight_go_out_together_next() -> None:
    send = Recorder()
    send.release.clear()
    batcher: Batcher[int, int] = Batcher(send)
    first = asyncio.create_task(batcher(0))
    await send.entered.wait()
    later = [asyncio.create_task(batcher(item)) for item in range(1, 11)]
    await asyncio.sleep(0.01)
    assert send.batches == [[0]], "nothing more is sent while a round trip is in flight"
    send.release.set()
    assert await first == 0
    assert [await task for task in later] == [item * 10 for item in range(1, 11)]
    assert send.batches == [[0], list(range(1, 11))]


async def test_a_batch_never_exceeds_max_batch() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send, max_batch=256)
    results = await asyncio.gather(*(batcher(item) for item in range(600)))
    assert results == [item * 10 for item in range(600)]
    assert [len(batch) for batch in send.batches] == [256, 256, 88]
    assert [item for batch in send.batches for item in batch] == list(range(600))


async def test_an_item_s_exception_reaches_its_caller_only() -> None:
    send = Recorder()
    batcher: Batcher[int, int] = Batcher(send)
    results = await asyncio.gather(batcher(1), batcher(-2), batcher(3), return_exceptions=True)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "item -2 refused"
    assert len(send.batches) == 1


async def test_a_failed_send_fails_its_batch_and_the_next_call_still_goes_out() -> None:
    calls: list[list[int]] = []

    async def send(items: list[int]) -> list[int | Exception]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("Redis went away")
        return [item for item in items]

    batcher: Batcher[int, int] = Batcher(send)
    results = await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)
    assert [type(result) for result in results] == [ConnectionError, ConnectionError]
    assert str(results[0]) == "Redis went away"
    assert await batcher(3) == 3
    assert calls == [[1, 2], [3]]


async def test_a_caller_that_gives_up_leaves_the_others_their_results() -> None:
    send = Recorder()
    send.release.clear()
    batcher: Batcher[int, int] = Batcher(send)
    tasks = [asyncio.create_task(batcher(item)) for item in range(3)]
    await send.entered.wait()
    tasks[1].cancel()
    send.release.set()
    assert await tasks[0] == 0 and await tasks[2] == 20
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert send.batches == [[0, 1, 2]], "an item already sent is not sent again"
