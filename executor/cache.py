"""Compiled modules by CID: compiling is milliseconds, instantiating a prepared module microseconds.

A CID names immutable bytes, so an entry never goes stale; the cache is bounded by count (LRU).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import NamedTuple

from executor.sandbox import Prepared, Sandbox
from relay.modules import ModuleStore
from relay.schemas import ModuleInfo


class ModuleGone(LookupError):
    """The module was deleted after the execution was accepted."""


class Compiled(NamedTuple):
    info: ModuleInfo
    """What the gateway validated the execution against (see `relay.modules.runs_as_command`)."""
    prepared: Prepared


class CompiledModules:
    def __init__(self, sandbox: Sandbox, store: ModuleStore, capacity: int = 256) -> None:
        self.sandbox = sandbox
        self.store = store
        self.capacity = capacity
        self._entries: OrderedDict[str, Compiled] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Compiled]] = {}

    async def get(self, cid: str) -> Compiled:
        """The module, compiled. Raises ModuleGone, or sandbox.LinkError if it cannot run here."""
        compiled = self._entries.get(cid)
        if compiled is not None:
            self._entries.move_to_end(cid)
            return compiled
        loading = self._loading.get(cid)
        if loading is not None:  # one compile per CID, however many executions wait for it
            return await asyncio.shield(loading)
        future: asyncio.Future[Compiled] = asyncio.get_running_loop().create_future()
        self._loading[cid] = future
        try:
            compiled = await self._load(cid)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, get it through shield
            raise
        finally:
            del self._loading[cid]
        future.set_result(compiled)
        self._entries[cid] = compiled
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return compiled

    async def _load(self, cid: str) -> Compiled:
        wasm = await self.store.wasm(cid)
        stored = await self.store.stored(cid) if wasm is not None else None
        if wasm is None or stored is None:
            raise ModuleGone(f"module {cid} was deleted")
        return Compiled(stored.info, await asyncio.to_thread(self.sandbox.prepare, wasm))
