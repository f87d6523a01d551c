"""Session states in Redis (relay.states, lua/states.lib.lua): pages stored once and shared,
orphans that expire, references that keep states and let them go without leaking a key."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from importlib import resources

import pytest
import redis.asyncio as aioredis

from executor.state import Manifest, state_cid
from relay import connection
from relay.bus import Script
from relay.keys import Keys
from relay.settings import Settings
from relay.states import StateGone, StateStore
from tests.conftest import wait_for

PAGE = 65536
LONG_TTL_MS = 600_000


def page(fill: int) -> bytes:
    """A page half random (as memory is), so each compresses to its own bytes."""
    return bytes([fill]) * (PAGE // 2) + os.urandom(PAGE // 2)


def state_of(*pages: bytes | None) -> tuple[bytes, str, dict[str, bytes]]:
    """(manifest bytes, state_cid, its pages by hash) of a memory made of `pages` (None: zero)."""
    hashes = tuple(hashlib.sha256(p).hexdigest() if p else "" for p in pages)
    manifest = Manifest(v=1, pages=hashes, globals=((0, "i32", 7),)).encode()
    return manifest, state_cid(manifest), {h: p for h, p in zip(hashes, pages, strict=True) if p}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    assert settings.redis_url is not None
    redis_client = connection.connect(settings.redis_url)
    yield redis_client
    await redis_client.aclose()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.prefix)


@pytest.fixture
def states(client: aioredis.Redis, keys: Keys) -> StateStore:
    return StateStore(client, keys, orphan_ttl_ms=LONG_TTL_MS)


async def all_keys(client: aioredis.Redis, keys: Keys) -> set[str]:
    return {key.decode() async for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000)}


async def ttls(client: aioredis.Redis, keys: Keys) -> list[int]:
    return [await client.pttl(key) for key in await all_keys(client, keys)]


async def test_two_states_sharing_pages_store_each_page_once(
        states: StateStore, client: aioredis.Redis, keys: Keys) -> None:
    p1, p2, p3 = page(1), page(2), page(3)
    a_manifest, a, a_pages = state_of(p1, p2, None, p2)
    b_manifest, b, b_pages = state_of(p2, p3)
    await states.save(a_manifest, a, a_pages)
    await states.save(b_manifest, b, b_pages)
    h1, h2, h3 = (hashlib.sha256(p).hexdigest() for p in (p1, p2, p3))
    assert await all_keys(client, keys) == {keys.state(a), keys.state(b), keys.page(h1),
                                            keys.page(h2), keys.page(h3)}
    # Orphans until held: every key expires.
    assert all(ttl > 0 for ttl in await ttls(client, keys))
    assert await client.hget(keys.state(a), "size") == str(4 * PAGE).encode()

    assert await states.ref(a) and await states.ref(b)
    assert await client.hgetall(keys.page_refs) == {h1.encode(): b"1", h2.encode(): b"3",
                                                    h3.encode(): b"1"}
    assert all(ttl == -1 for ttl in await ttls(client, keys))  # held: permanent
    assert await client.hget(keys.state(a), "refs") == b"1"


async def test_when_the_last_reference_goes_everything_goes(
        states: StateStore, client: aioredis.Redis, keys: Keys) -> None:
    shared = page(9)
    a_manifest, a, a_pages = state_of(page(1), shared)
    b_manifest, b, b_pages = state_of(shared, page(2), None)
    await states.save(a_manifest, a, a_pages)
    await states.save(b_manifest, b, b_pages)
    assert await states.ref(a, 2) and await states.ref(b)
    assert await client.hget(keys.state(a), "refs") == b"2"

    assert await states.unref(a)  # one of a's two holders
    assert len(await all_keys(client, keys)) == 6
    assert await states.unref(a)  # a's own page goes, the shared one stays for b
    assert await all_keys(client, keys) == {keys.state(b), keys.page_refs,
                                            *(keys.page(h) for h in b_pages)}
    assert await states.pages(b_pages) == b_pages
    assert await states.unref(b)
    assert await all_keys(client, keys) == set()
    assert not await states.unref(b)  # not held (gone): nothing to drop
    assert await all_keys(client, keys) == set()


async def test_orphans_expire(client: aioredis.Redis, keys: Keys) -> None:
    states = StateStore(client, keys, orphan_ttl_ms=200)
    manifest, cid, pages = state_of(page(1), page(2))
    await states.save(manifest, cid, pages)
    assert len(await all_keys(client, keys)) == 3

    async def gone() -> bool:
        return not await all_keys(client, keys)

    await wait_for(gone, timeout_s=5)
    assert not await states.ref(cid)  # too late to hold it: nothing taken, nothing left
    assert await all_keys(client, keys) == set()


async def test_saving_again_keeps_an_orphan_for_another_ttl(
        client: aioredis.Redis, keys: Keys) -> None:
    shared = page(5)
    a_manifest, a, a_pages = state_of(shared)
    b_manifest, b, b_pages = state_of(shared, page(6))
    await StateStore(client, keys, orphan_ttl_ms=1_000).save(a_manifest, a, a_pages)
    await StateStore(client, keys, orphan_ttl_ms=LONG_TTL_MS).save(b_manifest, b, b_pages)
    [shared_hash] = a_pages
    assert await client.pttl(keys.page(shared_hash)) > 1_000  # b needs it: it lives as long
    assert await client.pttl(keys.state(a)) <= 1_000  # a itself is not saved again


async def test_a_manifest_and_its_pages_round_trip(
        states: StateStore, client: aioredis.Redis, keys: Keys) -> None:
    manifest, cid, pages = state_of(page(1), None, page(2))
    written = await states.save(manifest, cid, pages)
    assert len(manifest) < written < 2 * PAGE  # half of each page is compressible
    fresh = StateStore(client, keys, orphan_ttl_ms=LONG_TTL_MS)  # nothing cached
    assert await fresh.manifest(cid) == manifest
    assert Manifest.decode(manifest).pages[1] == ""
    assert await fresh.pages(Manifest.decode(manifest).pages) == pages
    assert await fresh.manifest(state_of(page(3))[1]) is None
    assert await states.save(manifest, cid, pages) == 0  # all there: nothing written

    [one, _] = pages
    await client.delete(keys.page(one))
    with pytest.raises(StateGone, match=one):
        await fresh.pages(pages)


async def test_a_large_state_round_trips(states: StateStore) -> None:
    # More pages than one script call or MGET carries, past the size compressed off the loop.
    memory = [page(i % 251) for i in range(150)]
    manifest, cid, pages = state_of(*memory)
    await states.save(manifest, cid, pages)
    assert await states.pages(pages) == pages


async def test_a_state_whose_page_went_meanwhile_cannot_be_held(
        states: StateStore, client: aioredis.Redis, keys: Keys) -> None:
    shared = page(7)
    a_manifest, a, a_pages = state_of(shared)
    b_manifest, b, b_pages = state_of(shared, page(8))
    await states.save(a_manifest, a, a_pages)
    assert await states.ref(a)
    await states.save(b_manifest, b, b_pages)  # shared is a's, held: left as it is
    assert await states.unref(a)  # ... and dropped with a before b is held
    assert not await states.ref(b)
    assert await client.hget(keys.state(b), "refs") is None  # nothing taken
    assert not await client.exists(keys.page_refs)


async def test_the_library_works_inside_another_script(
        states: StateStore, client: aioredis.Redis, keys: Keys) -> None:
    """A commit-like script: hold the new state, drop the old, in one step; a null state (the
    fresh state, JSON null) is nothing to hold or drop."""
    library = resources.files("relay").joinpath("lua/states.lib.lua").read_text()
    swap = Script(library + """
local old = cjson.decode(ARGV[2])
local took = state_ref(ARGV[1], ARGV[3])
local dropped = state_unref(ARGV[1], old)
return {took and 1 or 0, dropped and 1 or 0}""")
    first_manifest, first, first_pages = state_of(page(1))
    second_manifest, second, second_pages = state_of(page(2))
    await states.save(first_manifest, first, first_pages)
    await states.save(second_manifest, second, second_pages)

    async def run(old: str, new: str) -> list[int]:
        result: list[int] = await client.eval(swap.source, 0, keys.prefix, old, new)
        return result

    assert await run("null", first) == [1, 1]
    assert await run(f'"{first}"', second) == [1, 1]
    assert await all_keys(client, keys) == {keys.state(second), keys.page_refs,
                                            *(keys.page(h) for h in second_pages)}
    assert await run(f'"{second}"', "") == [1, 1]
    assert await all_keys(client, keys) == set()


async def test_refs_ignore_the_fresh_state(states: StateStore, client: aioredis.Redis,
                                           keys: Keys) -> None:
    assert await states.ref("") and await states.unref("")
    assert await all_keys(client, keys) == set()
    with pytest.raises(ValueError):
        await states.ref("x", 0)
