"""Compiled modules by CID: compiling is milliseconds, instantiating a prepared module microseconds.

A CID names immutable bytes, so an entry never goes stale; the cache is bounded by count (LRU).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from executor.sandbox import Prepared, Sandbox
from relay.modules import ModuleStore


class ModuleGone(LookupError):
    """The module was deleted after the execution was accepted."""


class CompiledModules:
    def __init__(self, sandbox: Sandbox, store: ModuleStore, capacity: int = 256) -> None:
        self.sandbox = sandbox
        self.store = store
        self.capacity = capacity
        self._entries: OrderedDict[str, Prepared] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Prepared]] = {}

    async def get(self, cid: str) -> Prepared:
        """The prepared module. Raises ModuleGone, or sandbox.LinkError if it cannot run here."""
        prepared = self._entries.get(cid)
        if prepared is not None:
            self._entries.move_to_end(cid)
            return prepared
        loading = self._loading.get(cid)
        if loading is not None:  # one compile per CID, however many executions wait for it
            return await asyncio.shield(loading)
        future: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        self._loading[cid] = future
        try:
            wasm = await self.store.wasm(cid)
            if wasm is None:
                raise ModuleGone(f"module {cid} was deleted")
            prepared = await asyncio.to_thread(self.sandbox.prepare, wasm)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, get it through shield
            raise
        finally:
            del self._loading[cid]
        future.set_result(prepared)
        self._entries[cid] = prepared
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return prepared
