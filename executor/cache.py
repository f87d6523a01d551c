"""Compiled modules by CID: compiling is milliseconds, instantiating a prepared module microseconds.

A CID names immutable bytes, so an entry never goes stale; the cache is bounded by count (LRU).
Behind it, when the executor has one, the disk cache (executor.diskcache): a module compiled by
an earlier run of the executor (or a peer sharing the directory) is loaded from there rather
than compiled again. `preload` fills both at start (RELAY_PRELOAD).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from executor.diskcache import DiskModules
from executor.sandbox import Prepared, Sandbox
from relay.metrics import Metrics
from relay.modules import ModuleStore
from relay.schemas import ModuleInfo

log = logging.getLogger("relay.executor.cache")


class ModuleGone(LookupError):
    """The module was deleted after the execution was accepted."""


class Compiled(NamedTuple):
    info: ModuleInfo
    """What the gateway validated the execution against (see `relay.modules.runs_as_command`)."""
    prepared: Prepared


class CompiledModules:
    def __init__(self, sandbox: Sandbox, store: ModuleStore, capacity: int = 256, *,
                 disk: DiskModules | None = None, metrics: Metrics | None = None) -> None:
        """`disk`: compiled modules kept across restarts (its fingerprint the sandbox's).
        `metrics`: where each module made ready is counted, by source (compiled or disk)."""
        if disk is not None and disk.fingerprint != sandbox.fingerprint:
            raise ValueError("the disk cache is for another engine configuration")
        self.sandbox = sandbox
        self.store = store
        self.capacity = capacity
        self.disk = disk
        self.metrics = metrics
        self.sources: Counter[str] = Counter()
        """Modules made ready, by source: `compiled` or `disk`."""
        self._entries: OrderedDict[str, Compiled] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Compiled]] = {}

    def cached(self, cid: str) -> bool:
        """Whether the module is compiled and in memory (ready without a thread hop)."""
        return cid in self._entries

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
        prepared = await asyncio.to_thread(self.sandbox.prepare, wasm, disk=self.disk, cid=cid)
        source = "disk" if prepared.from_disk else "compiled"
        self.sources[source] += 1
        if self.metrics is not None:
            self.metrics.count(f"module_load:{source}")
        return Compiled(stored.info, prepared)

    async def preload(self, references: Iterable[str]) -> int:
        """Compile (or load from disk) each module named, a CID or a `glyph://NAME@TAG`; one
        that cannot be (no such module or name, invalid, Redis unreachable) is logged and
        skipped. Returns how many are ready."""
        ready = 0
        for reference in references:
            try:
                cid = (await self.store.resolve(reference)).cid
                compiled = await self.get(cid)
            except Exception as exc:
                log.warning("RELAY_PRELOAD: skipping %s: %s", reference, exc)
                continue
            ready += 1
            log.info("RELAY_PRELOAD: %s (%s) ready, %s", reference, cid,
                     "loaded from disk" if compiled.prepared.from_disk else "compiled")
        return ready
