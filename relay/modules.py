"""Modules: inspecting uploads with wasmtime, storing them by CID, and naming them.

A module's bytes never change under its CID, so its metadata is cached in-process for good
(evicted only when this process deletes it). Names can move, so they are always read from Redis.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import redis.asyncio as aioredis
import wasmtime

from relay import cid as cids
from relay.errors import FieldError, InvalidRequest, NotFound
from relay.keys import Keys
from relay.schemas import (
    FunctionSignature,
    ImportInfo,
    ModuleInfo,
    ModulePage,
    decode_module_info,
    encode,
)

WASI_MODULE = "wasi_snapshot_preview1"
MAX_PAGE_SIZE = 200
WASM_MAGIC = b"\0asm"
_KINDS = {
    wasmtime.FuncType: "func",
    wasmtime.MemoryType: "memory",
    wasmtime.TableType: "table",
    wasmtime.GlobalType: "global",
}


def _inspector() -> wasmtime.Engine:
    # What the executors' engine accepts (executor.sandbox): no multi-memory, since the Store's
    # limiter caps each memory and `max_memory` must cap them all.
    config = wasmtime.Config()
    config.wasm_multi_memory = False
    return wasmtime.Engine(config)


_INSPECTOR = _inspector()


class StoredModule(NamedTuple):
    info: ModuleInfo
    owner: str
    """The principal that first uploaded it."""


class Resolved(NamedTuple):
    cid: str
    name: cids.GlyphName | None
    """The name the request used, if any: its binding must still be `cid` when accepted."""


class InvalidModule(ValueError):
    """The upload is neither a valid WebAssembly binary nor WAT text that compiles."""


def to_binary(body: bytes) -> bytes:
    """The binary form of an upload: binary as is, WAT text compiled (so both share a CID)."""
    if body.startswith(WASM_MAGIC):
        return body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidModule("neither a wasm binary (\\0asm header) nor UTF-8 WAT text") from None
    try:
        return bytes(wasmtime.wat2wasm(text))
    except wasmtime.WasmtimeError as exc:
        raise InvalidModule(f"not a wasm binary, and not valid WAT: {exc}") from None


def inspect(wasm: bytes) -> ModuleInfo:
    """Validate and describe a binary module. Slow for big modules: call it off the event loop.

    `wasi` says it is a WASI command module: it imports from WASI_MODULE and exports `_start`
    with no parameters and no results (see `runs_as_command`).
    Raises InvalidModule with wasmtime's reason.
    """
    try:
        module = wasmtime.Module(_INSPECTOR, wasm)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModule(f"invalid WebAssembly: {exc}") from None
    exports = [
        FunctionSignature(
            name=export.name,
            params=[str(t) for t in export.type.params],
            results=[str(t) for t in export.type.results],
        )
        for export in module.exports
        if isinstance(export.type, wasmtime.FuncType)
    ]
    imports = [
        ImportInfo(module=imp.module, name=imp.name or "", kind=_KINDS.get(type(imp.type), "other"))
        for imp in module.imports
    ]
    is_command = any(e.name == "_start" and not e.params and not e.results for e in exports)
    uses_wasi = any(imp.module == WASI_MODULE for imp in imports)
    return ModuleInfo(cid=cids.compute(wasm), size=len(wasm), exports=exports, imports=imports,
                      wasi=is_command and uses_wasi)


def runs_as_command(info: ModuleInfo, entrypoint: str) -> bool:
    """Whether an execution of `entrypoint` runs the module as a WASI command: its inputs as JSON
    on stdin, its output what it writes to stdout. Otherwise `entrypoint` is called with the
    inputs as arguments and returns the output (WASI imports, if any, still provided)."""
    return info.wasi and entrypoint == "_start"


class ModuleStore:
    """Modules and glyph names in Redis, shared by every gateway and executor."""

    def __init__(self, client: aioredis.Redis, keys: Keys, cache_size: int = 1024) -> None:
        self.client = client
        self.keys = keys
        self._cache: OrderedDict[str, StoredModule] = OrderedDict()
        self._names: OrderedDict[cids.GlyphName, str] = OrderedDict()
        self._cache_size = cache_size

    async def put(self, info: ModuleInfo, wasm: bytes, owner: str) -> bool:
        """Store a module; False when it was stored already (the first owner stays)."""
        key = self.keys.module(info.cid)
        created = await self.client.hsetnx(key, "owner", owner)
        if created:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, mapping={"wasm": wasm, "meta": encode(info)})
            pipe.zadd(self.keys.modules, {info.cid: time.time()})
            await pipe.execute()
        return bool(created)

    async def stored(self, cid: str) -> StoredModule | None:
        cached = self._cache.get(cid)
        if cached is not None:
            return cached
        raw, owner = await self.client.hmget(self.keys.module(cid), ["meta", "owner"])
        if raw is None:
            return None
        stored = StoredModule(decode_module_info(raw), owner.decode())
        self._cache[cid] = stored
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return stored

    async def info(self, cid: str) -> ModuleInfo | None:
        stored = await self.stored(cid)
        return None if stored is None else stored.info

    async def require(self, cid: str) -> StoredModule:
        stored = await self.stored(cid)
        if stored is None:
            raise NotFound(f"no module {cid}")
        return stored

    async def wasm(self, cid: str) -> bytes | None:
        data: bytes | None = await self.client.hget(self.keys.module(cid), "wasm")
        return data

    async def page(self, cursor: int, limit: int,
                   visible: Callable[[str, StoredModule], bool]) -> ModulePage:
        """Modules newest first, those `visible(cid, module)` only; `next_cursor` is an opaque
        offset for the next page (a page may hold fewer than `limit` when some are hidden)."""
        found = await self.client.zrevrange(self.keys.modules, cursor, cursor + limit)
        shown = []
        for cid in (c.decode() for c in found[:limit]):
            stored = await self.stored(cid)
            if stored is not None and visible(cid, stored):
                shown.append(stored.info)
        next_cursor = str(cursor + limit) if len(found) > limit else None
        return ModulePage(modules=shown, next_cursor=next_cursor)

    async def delete(self, cid: str) -> None:
        """Delete a module. Names bound to it then resolve to nothing."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.module(cid))
        pipe.zrem(self.keys.modules, cid)
        await pipe.execute()
        self._cache.pop(cid, None)

    async def resolve(self, reference: str) -> Resolved:
        """The canonical CID a request's `cid` names. Raises InvalidRequest or NotFound.

        A name's binding comes from this process's cache when it has one: the accept script
        checks it is still current (see `Bus.accept`) and the caller calls `forget` and
        resolves again when it is not, so a moved name costs a retry, never a stale run.
        """
        try:
            parsed = cids.parse_reference(reference)
        except cids.InvalidCid as exc:
            raise InvalidRequest.at("/cid", str(exc)) from None
        if isinstance(parsed, str):
            return Resolved(parsed, None)
        cached = self._names.get(parsed)
        if cached is not None:
            return Resolved(cached, parsed)
        found = await self.client.hget(self.keys.name(parsed.name), parsed.tag)
        if found is None:
            raise NotFound(f"no module is named {parsed.name}@{parsed.tag}",
                           errors=[_cid_error(f"{parsed.name}@{parsed.tag} is not bound")])
        cid = str(found.decode())
        self._names[parsed] = cid
        if len(self._names) > self._cache_size:
            self._names.popitem(last=False)
        return Resolved(cid, parsed)

    def forget(self, name: cids.GlyphName) -> None:
        """Drop a cached name binding found stale."""
        self._names.pop(name, None)

    async def name_owner(self, name: str) -> str | None:
        """The principal that first bound `name`, None for a free name."""
        owner = await self.client.hget(self.keys.name_owners, name)
        return None if owner is None else str(owner.decode())

    async def bind(self, name: str, tag: str, cid: str, principal: str) -> bool:
        """Bind (or move) `name@tag` to a stored module; the first principal to bind a name owns
        it. False, binding nothing, when the name is another principal's. Raises NotFound."""
        if not await self.client.exists(self.keys.module(cid)):
            raise NotFound(f"no module {cid}", errors=[_cid_error("no module with this CID")])
        # HSETNX settles a race between two first binders: only one becomes the owner.
        if (not await self.client.hsetnx(self.keys.name_owners, name, principal)
                and await self.name_owner(name) != principal):
            return False
        await self.client.hset(self.keys.name(name), tag, cid)
        self._names[cids.GlyphName(name, tag)] = cid
        return True

    async def tags(self, name: str) -> dict[str, str]:
        found = await self.client.hgetall(self.keys.name(name))
        if not found:
            raise NotFound(f"no module is named {name}")
        return {tag.decode(): cid.decode() for tag, cid in sorted(found.items())}


def _cid_error(detail: str) -> FieldError:
    return FieldError("/cid", detail)
