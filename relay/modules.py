"""Modules: inspecting uploads with wasmtime, storing them by CID, and naming them.

A module's bytes never change under its CID, so its metadata is cached in-process; its owner
can change (deleted, then uploaded again by another), so it is read again after OWNER_TTL_S.
Storing, deleting and binding are each one Lua script, so quotas and the names that keep a
module from being deleted hold under any number of gateways.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from typing import NamedTuple

import redis.asyncio as aioredis
import wasmtime

from relay import cid as cids
from relay import wasmtypes
from relay.errors import Conflict, FieldError, InvalidRequest, NotFound, QuotaExceeded
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
    """Validate and describe a binary module, without compiling it (validation takes
    milliseconds where a compile takes seconds). CPU-bound for big modules: call it off the
    event loop.

    `wasi` says it is a WASI command module: it imports from WASI_MODULE and exports `_start`
    with no parameters and no results (see `runs_as_command`).
    Raises InvalidModule with wasmtime's reason.
    """
    try:
        wasmtime.Module.validate(_INSPECTOR, wasm)
    except wasmtime.WasmtimeError as exc:
        raise InvalidModule(f"invalid WebAssembly: {exc}") from None
    try:
        described = wasmtypes.describe(wasm)
    except (IndexError, ValueError) as exc:  # valid for wasmtime, beyond what we can read
        raise InvalidModule(f"unsupported WebAssembly: {exc}") from None
    exports = [FunctionSignature(name=name, params=signature.params, results=signature.results)
               for name, signature in described.exports]
    imports = [ImportInfo(module=imp.module, name=imp.name, kind=imp.kind)
               for imp in described.imports]
    is_command = any(e.name == "_start" and not e.params and not e.results for e in exports)
    uses_wasi = any(imp.module == WASI_MODULE for imp in imports)
    return ModuleInfo(cid=cids.compute(wasm), size=len(wasm), exports=exports, imports=imports,
                      wasi=is_command and uses_wasi)


def runs_as_command(info: ModuleInfo, entrypoint: str) -> bool:
    """Whether an execution of `entrypoint` runs the module as a WASI command: its inputs as JSON
    on stdin, its output what it writes to stdout. Otherwise `entrypoint` is called with the
    inputs as arguments and returns the output (WASI imports, if any, still provided)."""
    return info.wasi and entrypoint == "_start"


NONDETERMINISTIC_WASI = frozenset({
    "clock_time_get", "clock_res_get", "random_get", "poll_oneoff", "environ_get",
    "environ_sizes_get", "args_get", "args_sizes_get"})
"""WASI calls whose answers do not follow from the module and its inputs: a clock, randomness,
sleeps, the environment and arguments (which environments may set)."""


def memoizable(info: ModuleInfo) -> bool:
    """Whether the module's results follow from its inputs alone, so a stored one may answer a
    `memoize` request (relay.memo): it imports nothing but WASI calls that are not
    NONDETERMINISTIC_WASI. Computed from the imports, so modules stored before it existed have
    it too."""
    return all(imp.module == WASI_MODULE and imp.name not in NONDETERMINISTIC_WASI
               for imp in info.imports)


OWNER_TTL_S = 1.0
"""How long a process trusts a module's owner it read: a module deleted and uploaded again by
another principal (through another gateway) has a new owner, which authorization needs."""


class ModuleStore:
    """Modules and glyph names in Redis, shared by every gateway and executor."""

    def __init__(self, client: aioredis.Redis, keys: Keys, cache_size: int = 1024) -> None:
        self.client = client
        self.keys = keys
        self._cache: OrderedDict[str, tuple[StoredModule, float]] = OrderedDict()
        """By CID: the module and when its owner was read (monotonic seconds)."""
        self._names: OrderedDict[cids.GlyphName, str] = OrderedDict()
        self._cache_size = cache_size
        self._store = client.register_script(_script("store"))
        self._unstore = client.register_script(_script("unstore"))
        self._bind = client.register_script(_script("bind"))

    async def put(self, info: ModuleInfo, wasm: bytes, owner: str, *,
                  max_modules: int = 2**62, max_bytes: int = 2**62) -> bool:
        """Store a module, counted against its owner's quota, in one atomic step; False when it
        was stored already (the first owner stays). Raises QuotaExceeded."""
        stored = await self._store(
            keys=[self.keys.module(info.cid), self.keys.modules, self.keys.module_usage(owner)],
            args=[owner, wasm, encode(info), time.time(), info.cid, max_modules, max_bytes])
        if isinstance(stored, list):
            count, size = stored
            raise quota_exceeded(count, size, max_modules, max_bytes)
        return bool(stored)

    async def usage(self, principal: str) -> tuple[int, int]:
        """How many modules the principal owns, and their bytes."""
        count, size = await self.client.hmget(self.keys.module_usage(principal),
                                              ["count", "bytes"])
        return int(count or 0), int(size or 0)

    async def stored(self, cid: str) -> StoredModule | None:
        """The module (from this process's cache when its owner was read lately); None when
        there is none."""
        cached = self._cache.get(cid)
        now = time.monotonic()
        if cached is not None:
            stored, read_at = cached
            if now - read_at < OWNER_TTL_S:
                return stored
            owner = await self.client.hget(self.keys.module(cid), "owner")
            if owner is not None and owner.decode() == stored.owner:
                self._cache[cid] = (stored, now)
                return stored
        raw, owner = await self.client.hmget(self.keys.module(cid), ["meta", "owner"])
        if raw is None:
            self._cache.pop(cid, None)
            return None
        stored = StoredModule(decode_module_info(raw), owner.decode())
        self._cache[cid] = (stored, now)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return stored

    async def owner(self, cid: str) -> str | None:
        """The module's owner as Redis has it now (never cached); None when there is none."""
        owner = await self.client.hget(self.keys.module(cid), "owner")
        return None if owner is None else str(owner.decode())

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

    async def delete(self, cid: str, owner: str) -> str | None:
        """Delete a module while `owner` owns it and no name points at it, giving its bytes
        back to the owner's quota. Returns None when deleted, else the owner it has now (the
        caller authorized against a stale one). Raises NotFound, or Conflict listing the
        `name@tag`s bound to it, or saying how many live sessions and snapshots hold it."""
        outcome = [part.decode() for part in await self._unstore(
            keys=[self.keys.module(cid), self.keys.modules, self.keys.module_names(cid),
                  self.keys.module_usage(owner), self.keys.module_holds(cid)],
            args=[owner, cid])]
        self._cache.pop(cid, None)
        if outcome[0] == "missing":
            raise NotFound(f"no module {cid}")
        if outcome[0] == "named":
            names = ", ".join(outcome[1:])
            raise Conflict(f"glyph names point at the module: {names}; bind them to another "
                           "module first")
        if outcome[0] == "held":
            raise Conflict(f"the module is in use by {outcome[1]} live sessions and snapshots: "
                           "it can be deleted once those snapshots are deleted and those "
                           "sessions have expired")
        return outcome[1] if outcome[0] == "owner" else None

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
        while True:  # the tag moved between reading it and binding: read it again
            current = await self.client.hget(self.keys.name(name), tag)
            previous = current.decode() if current is not None else ""
            outcome = (await self._bind(
                keys=[self.keys.module(cid), self.keys.name_owners, self.keys.name(name),
                      self.keys.module_names(cid), self.keys.module_names(previous or cid)],
                args=[name, tag, cid, principal, previous])).decode()
            if outcome == "missing":
                raise NotFound(f"no module {cid}", errors=[_cid_error("no module with this CID")])
            if outcome == "taken":
                return False
            if outcome == "bound":
                self._names[cids.GlyphName(name, tag)] = cid
                return True

    async def tags(self, name: str) -> dict[str, str]:
        found = await self.client.hgetall(self.keys.name(name))
        if not found:
            raise NotFound(f"no module is named {name}")
        return {tag.decode(): cid.decode() for tag, cid in sorted(found.items())}


def _cid_error(detail: str) -> FieldError:
    return FieldError("/cid", detail)


def quota_exceeded(count: int, size: int, max_modules: int, max_bytes: int) -> QuotaExceeded:
    """The refusal of one more module to a principal that has `count` of `size` bytes."""
    return QuotaExceeded(f"you have {count} modules of {size} bytes stored; the quota is "
                         f"{max_modules} modules and {max_bytes} bytes: delete some first")


def _script(name: str) -> str:
    """The Lua script `relay/lua/<name>.lua` (package data)."""
    return resources.files("relay").joinpath(f"lua/{name}.lua").read_text()
