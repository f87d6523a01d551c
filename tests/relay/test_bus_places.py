"""The places of `max_active`, as the bus's start and settle scripts keep them (real Redis, no
executor): parking over the cap, putting back as places free, and every settle giving a place
back exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from relay.bus import Bus
from relay.keys import Keys
from relay.schemas import (
    EffectivePolicy,
    ErrorInfo,
    ExecuteResponse,
    ExecutionStarted,
    WasmExecRequested,
    decode_requested,
    now_iso,
)
from relay.settings import Settings

TTL_MS = 60_000


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    bus = Bus(client, Keys(settings.prefix), events_retention=1000, requests_retention=1000)
    await bus.ensure_group()
    yield bus
    await client.aclose()


def request(n: int, principal: str = "alice") -> WasmExecRequested:
    return WasmExecRequested(
        request_id=f"{principal}-{n}", cid="bafkrei-test", entrypoint="main", inputs=[n],
        policy=EffectivePolicy(max_memory=1, max_gas=1, max_time=1), user_id=principal,
        timestamp=now_iso())


async def accept(bus: Bus, *requests: WasmExecRequested, max_active: int = 1) -> None:
    for one in requests:
        accepted = await bus.accept(one, f"fp-{one.request_id}", max_active=max_active)
        assert accepted.is_new


async def take(bus: Bus, consumer: str = "c") -> list[tuple[bytes, WasmExecRequested]]:
    return [(entry_id, decode_requested(data))
            for entry_id, data in await bus.read(consumer, 100, 10)]


async def start(bus: Bus, entry_id: bytes, one: WasmExecRequested, consumer: str = "c") -> str:
    started = ExecutionStarted(request_id=one.request_id, executor_node=consumer,
                               timestamp=now_iso())
    return await bus.start(started, one, entry_id, consumer)


def done(one: WasmExecRequested, code: str | None = None) -> ExecuteResponse:
    return ExecuteResponse(success=code is None, request_id=one.request_id, cid=one.cid,
                           output=None, gas_used=0, duration=0.0, executed_at=now_iso(),
                           error=ErrorInfo(code, "x") if code else None)  # type: ignore[arg-type]


async def places(bus: Bus, principal: str = "alice") -> tuple[int, int]:
    """(places held, entries parked)."""
    keys = bus.keys
    return (int(await bus.client.scard(keys.active(principal))),
            int(await bus.client.llen(keys.waiting(principal))))


async def test_over_the_cap_an_entry_is_parked_then_put_back_when_a_place_frees(
        bus: Bus) -> None:
    first, second, bobs = request(1), request(2), request(1, "bob")
    await accept(bus, first, second, bobs)
    (a, _), (b, _), (c, _) = await take(bus)
    assert await start(bus, a, first) == "started"
    assert await start(bus, b, second) == "parked"
    assert await start(bus, c, bobs) == "started"  # another principal's places are its own
    assert await places(bus) == (1, 1)
    # Parked: out of the stream (not pending, not there), and still `queued` for its caller.
    assert await bus.client.xrange(bus.keys.requests, b, b) == []
    assert [p["message_id"] for p in await bus.client.xpending_range(
        bus.keys.requests, Keys.EXECUTOR_GROUP, "-", "+", 10)] == [a, c]
    assert await bus.client.hget(bus.keys.execution(second.request_id), "status") == b"queued"

    assert await bus.finish(a, first, done(first), TTL_MS, "c")
    assert await places(bus) == (0, 0)
    [(again, back)] = await take(bus)
    assert back == second
    assert await start(bus, again, back) == "started"
    assert await places(bus) == (1, 0)


async def test_a_run_taken_over_by_a_peer_keeps_its_one_place(bus: Bus) -> None:
    first = request(1)
    await accept(bus, first, max_active=2)
    [(a, _)] = await take(bus)
    assert await start(bus, a, first) == "started"
    await bus.client.xclaim(bus.keys.requests, Keys.EXECUTOR_GROUP, "peer", 0, [a], justid=True)
    assert await start(bus, a, first, "peer") == "started"
    assert await places(bus) == (1, 0)
    # The stalled owner's settle is refused and frees nothing; the peer's frees it once.
    assert not await bus.finish(a, first, done(first), TTL_MS, "c")
    assert await places(bus) == (1, 0)
    assert await bus.finish(a, first, done(first, "cancelled"), TTL_MS, "peer")
    assert await places(bus) == (0, 0)


async def test_an_entry_taken_over_is_not_parked_by_its_old_owner(bus: Bus) -> None:
    first, second = request(1), request(2)
    await accept(bus, first, second)
    (a, _), (b, _) = await take(bus)
    assert await start(bus, a, first) == "started"
    await bus.client.xclaim(bus.keys.requests, Keys.EXECUTOR_GROUP, "peer", 0, [b], justid=True)
    assert await start(bus, b, second) == "lost"
    assert await places(bus) == (1, 0)


@pytest.mark.parametrize("code", [None, "trap", "timeout", "cancelled", "internal"])
async def test_every_ending_gives_the_place_back(bus: Bus, code: str | None) -> None:
    first, second = request(1), request(2)
    await accept(bus, first, second)
    (a, _), (b, _) = await take(bus)
    assert await start(bus, a, first) == "started"
    assert await start(bus, b, second) == "parked"
    assert await bus.finish(a, first, done(first, code), TTL_MS, "c")
    assert await places(bus) == (0, 0)
    # A second settle of the same execution (a duplicate run) gives nothing back twice.
    [(again, _)] = await take(bus)
    assert await start(bus, again, second) == "started"
    assert not await bus.finish(a, first, done(first), TTL_MS, "c")
    assert await places(bus) == (1, 0)


async def test_cancelled_while_parked_it_leaves_the_waiting_list(bus: Bus) -> None:
    first, second = request(1), request(2)
    await accept(bus, first, second)
    (a, _), (b, _) = await take(bus)
    assert await start(bus, a, first) == "started"
    assert await start(bus, b, second) == "parked"
    assert await bus.cancel_queued(second, done(second, "cancelled"), TTL_MS)
    assert await places(bus) == (1, 0)
    # A queued-only cancel of a started run does nothing, and frees no place.
    assert not await bus.cancel_queued(first, done(first, "cancelled"), TTL_MS)
    assert await places(bus) == (1, 0)


async def test_a_finished_execution_is_neither_started_nor_parked(bus: Bus) -> None:
    first, second = request(1), request(2)
    await accept(bus, first, second)
    (a, _), (b, _) = await take(bus)
    assert await start(bus, a, first) == "started"
    assert await bus.cancel_queued(second, done(second, "cancelled"), TTL_MS)
    assert await start(bus, b, second) == "finished"
    assert await places(bus) == (1, 0)
