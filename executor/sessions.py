"""A session call on the executor: the state it starts from, and the state it commits.

Before the run (on the loop): read the session's committed state and what its budget has left,
lower the call's limits to it, and bring the state's pages into the local cache (only those
missing are fetched). In the run (on the wasm thread): `restore` into the fresh instance, and,
once the call succeeded, `capture` what changed. After it (on the loop): store the new pages
and manifest (unreferenced, so they expire unless the commit takes them), and hand the settle
a `Commit`, which it applies only while the session still holds the state the call started
from.
"""

from __future__ import annotations

import msgspec
import redis.asyncio as aioredis
import wasmtime

from executor.sandbox import Refused
from executor.state import Baseline, Manifest, PageCache, capture, restore, state_cid
from relay.bus import Commit
from relay.keys import Keys
from relay.schemas import EffectivePolicy, ErrorInfo, WasmExecRequested
from relay.states import StateStore

PAGE_CACHE_BYTES = 256 * 1024 * 1024


class SessionCall:
    """One session call's state, from its start to its commit."""

    def __init__(self, base: str, manifest: Manifest | None, pages: dict[str, bytes],
                 policy: EffectivePolicy, max_state_bytes: int) -> None:
        self.base = base
        """The committed state the call starts from ("" for the module's fresh state)."""
        self.policy = policy
        """The call's limits, lowered to what its session's budget has left."""
        self._manifest = manifest
        self._pages = pages
        self._max_state_bytes = max_state_bytes
        self._baseline = Baseline.fresh()
        self._captured: tuple[Manifest, dict[str, bytes]] | None = None

    def restore(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None:
        """On the wasm thread, right after instantiation. Raises Refused."""
        if self._manifest is None:
            return
        try:
            self._baseline = restore(store, instance, self._manifest, self._pages)
        except ValueError as exc:
            raise Refused(ErrorInfo("memory_limit", f"the session's state cannot be "
                                       f"restored under this call's limits: {exc}")) from None
        self._pages = {}  # in the instance now (the cache keeps its own copies)

    def capture(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None:
        """On the wasm thread, once the call returned successfully. Raises Refused."""
        manifest, new_pages = capture(store, instance, self._baseline)
        if manifest.size > self._max_state_bytes:
            raise Refused(ErrorInfo("memory_limit", f"the session's state would be "
                                       f"{manifest.size} bytes, over the limit of "
                                       f"{self._max_state_bytes} (RELAY_MAX_STATE_BYTES)"))
        self._captured = manifest, new_pages


class SessionStates:
    """The executor's side of sessions: one per executor, with its local page cache."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, max_state_bytes: int,
                 orphan_ttl_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.max_state_bytes = max_state_bytes
        self.store = StateStore(client, keys, orphan_ttl_ms=orphan_ttl_ms)
        self.cache = PageCache(PAGE_CACHE_BYTES)

    async def begin(self, request: WasmExecRequested) -> SessionCall:
        """What the call starts from. Raises Refused (its session is gone, or its state)."""
        assert request.session_id is not None
        fields = await self.client.hmget(self.keys.session(request.session_id), [
            "state_cid", "budget_gas", "gas_used", "budget_time", "time_used"])
        if fields[0] is None:
            raise Refused(ErrorInfo("internal", f"session {request.session_id} is gone"))
        base = fields[0].decode()
        policy = _within_budget(request.policy, fields[1:])
        policy = msgspec.structs.replace(
            policy, max_memory=min(policy.max_memory, self.max_state_bytes))
        if not base:
            return SessionCall("", None, {}, policy, self.max_state_bytes)
        raw = await self.store.manifest(base)
        if raw is None:
            raise Refused(ErrorInfo("internal", f"the session's state {base} is missing"))
        manifest = Manifest.decode(raw)
        pages, missing = self.cache.get_many(manifest.stored_pages())
        if missing:
            fetched = await self.store.pages(missing)
            self.cache.put_many(fetched)
            pages.update(fetched)
        return SessionCall(base, manifest, pages, policy, self.max_state_bytes)

    async def commit(self, call: SessionCall) -> Commit | None:
        """Store what a successful call captured; the Commit for its settle (None when it
        captured nothing: it did not succeed)."""
        if call._captured is None:
            return None
        manifest, new_pages = call._captured
        encoded = manifest.encode()
        cid = state_cid(encoded)
        if cid != call.base:
            await self.store.save(encoded, cid, new_pages)
            self.cache.put_many(new_pages)
        return Commit(call.base, cid, manifest.size)


def _within_budget(policy: EffectivePolicy, fields: list[bytes | None]) -> EffectivePolicy:
    """`policy` lowered to what the budget has left now (the calls before this one ran since
    it was accepted). Raises Refused when they left nothing."""
    budget_gas, gas_used, budget_time, time_used = (f.decode() if f else "" for f in fields)
    changes = {}
    if budget_gas:
        left = int(budget_gas) - int(gas_used or 0)
        if left <= 0:
            raise Refused(ErrorInfo("out_of_gas", "the session's budget has no gas left"))
        changes["max_gas"] = min(policy.max_gas, left)
    if budget_time:
        left = int(float(budget_time) - float(time_used or 0))
        if left <= 0:
            raise Refused(ErrorInfo("timeout", "the session's budget has no time left"))
        changes["max_time"] = min(policy.max_time, left)
    return msgspec.structs.replace(policy, **changes) if changes else policy
