"""The executor's cache of compiled modules, over a real Redis and a real sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import wasmtime

from executor.cache import CompiledModules, ModuleGone
from executor.sandbox import LinkError, Sandbox
from relay import connection
from relay.keys import Keys
from relay.modules import ModuleStore, inspect
from relay.settings import Settings


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ModuleStore]:
    client = connection.connect(settings.redis_url or "")
    yield ModuleStore(client, Keys(settings.prefix))
    await client.aclose()


async def put(store: ModuleStore, wat: str) -> str:
    wasm = bytes(wasmtime.wat2wasm(wat))
    info = inspect(wasm)
    await store.put(info, wasm, "alice")
    return info.cid


def returning(value: int) -> str:
    return f'(module (func (export "main") (result i32) i32.const {value}))'


async def test_concurrent_gets_share_one_compile(sandbox: Sandbox, store: ModuleStore) -> None:
    cid = await put(store, returning(1))
    modules = CompiledModules(sandbox, store)
    got = await asyncio.gather(*(modules.get(cid) for _ in range(20)))
    # Each compile makes a new Prepared: one object for all means one compile.
    assert len({id(module.prepared) for module in got}) == 1
    assert got[0].info == await store.info(cid)
    assert await modules.get(cid) is got[0]


async def test_a_deleted_module_is_gone(sandbox: Sandbox, store: ModuleStore) -> None:
    cid = await put(store, returning(2))
    assert await store.delete(cid, "alice") is None
    modules = CompiledModules(sandbox, store)
    waiters = await asyncio.gather(*(modules.get(cid) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(error, ModuleGone) for error in waiters), waiters
    with pytest.raises(ModuleGone):  # not remembered: asked again, it is looked up again
        await modules.get(cid)


async def test_a_module_that_cannot_link_is_refused_every_time(sandbox: Sandbox,
                                                               store: ModuleStore) -> None:
    cid = await put(store, '(module (import "env" "f" (func)) (func (export "main")))')
    modules = CompiledModules(sandbox, store)
    waiters = await asyncio.gather(*(modules.get(cid) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(error, LinkError) for error in waiters), waiters
    with pytest.raises(LinkError, match=r"env\.f"):
        await modules.get(cid)


async def test_the_least_recently_used_goes_first(sandbox: Sandbox, store: ModuleStore) -> None:
    a, b, c = [await put(store, returning(value)) for value in (10, 20, 30)]
    modules = CompiledModules(sandbox, store, capacity=2)
    first_a, first_b = await modules.get(a), await modules.get(b)
    assert await modules.get(a) is first_a  # a is now the most recently used
    first_c = await modules.get(c)  # over capacity: b goes
    assert await modules.get(a) is first_a
    assert await modules.get(c) is first_c
    again_b = await modules.get(b)  # compiled again (and a, least recent now, goes)
    assert again_b is not first_b and again_b.info == first_b.info
    assert await modules.get(a) is not first_a
