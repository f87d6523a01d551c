"""Each principal's places for open event streams, shared by every gateway (real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from relay.errors import TooManyStreams
from relay.gateway import slots as slots_module
from relay.gateway.slots import LEASE_MS, StreamSlots
from relay.keys import Keys
from relay.settings import Settings


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.Redis.from_url(settings.redis_url or "")
    yield redis_client
    await redis_client.aclose()


async def test_two_gateways_share_one_cap_and_racing_opens_never_pass_it(
        client: aioredis.Redis, settings: Settings) -> None:
    keys = Keys(settings.prefix)
    first, second = StreamSlots(client, keys, 5), StreamSlots(client, keys, 5)
    results = await asyncio.gather(*(gateway.acquire("alice") for gateway in (first, second)
                                     for _ in range(6)), return_exceptions=True)
    assert sum(isinstance(result, str) for result in results) == 5
    assert all(isinstance(result, (str, TooManyStreams)) for result in results)
    assert first.held + second.held == 5
    # Another principal has places of its own.
    await first.acquire("bob")


async def test_a_released_place_is_free_at_once(client: aioredis.Redis,
                                                settings: Settings) -> None:
    slots = StreamSlots(client, Keys(settings.prefix), 1)
    stream = await slots.acquire("alice")
    with pytest.raises(TooManyStreams) as refused:
        await slots.acquire("alice")
    assert refused.value.status == 429 and refused.value.slug == "too-many-streams"
    await slots.release("alice", stream)
    assert slots.held == 0
    await slots.acquire("alice")


async def test_the_places_of_a_gateway_that_died_come_back_after_the_lease(
        client: aioredis.Redis, settings: Settings) -> None:
    keys = Keys(settings.prefix)
    dead = StreamSlots(client, keys, 2)
    await dead.acquire("alice")
    await dead.acquire("alice")
    live = StreamSlots(client, keys, 2)
    with pytest.raises(TooManyStreams):
        await live.acquire("alice")
    # As LEASE_MS later: the dead gateway renewed nothing.
    seconds, micros = await client.time()
    now_ms = seconds * 1000 + micros // 1000
    members = await client.zrange(keys.streams("alice"), 0, -1)
    await client.zadd(keys.streams("alice"), dict.fromkeys(members, now_ms - 1))
    await live.acquire("alice")
    assert 0 < await client.pttl(keys.streams("alice")) <= LEASE_MS


async def test_a_live_gateway_renews_its_leases_but_not_a_closed_streams(
        client: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots_module, "LEASE_MS", 300)  # renewed every 100 ms
    keys = Keys(settings.prefix)
    slots = StreamSlots(client, keys, 3)
    kept = await slots.acquire("alice")
    closed = await slots.acquire("alice")
    before = await client.zscore(keys.streams("alice"), kept)
    renewing = asyncio.create_task(slots.renew())
    try:
        await slots.release("alice", closed)
        await asyncio.sleep(0.25)
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
    assert await client.zrange(keys.streams("alice"), 0, -1) == [kept.encode()]
    after = await client.zscore(keys.streams("alice"), kept)
    assert before is not None and after is not None and after > before
