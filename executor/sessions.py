"""A session call on the executor: the state it starts from, and the state it commits.

Before the run (on the loop): read the session's committed state and what its budget has left,
and lower the call's limits to it. When this executor ran the session's last call and still
holds its instance (a *resident*, whose memory and globals are exactly the committed state:
states are named by their content), the call runs in it as it is; otherwise the state's pages
come into the local cache (only those missing are fetched) and `restore` writes them into a
fresh instance on the wasm thread. Once the call succeeded, `capture` finds what changed (on
the wasm thread); then (on the loop) the new pages and manifest are stored, unreferenced, so
they expire unless the commit takes them, and the settle gets a `Commit`, which it applies only
while the session still holds the state the call started from. The instance then stays
resident for the session's next call; a call that did not succeed drops it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import msgspec
import redis.asyncio as aioredis
import wasmtime

from executor.sandbox import Refused
from executor.state import (
    PAGE_BYTES,
    Baseline,
    Captured,
    Manifest,
    PageCache,
    capture,
    restore,
    state_cid,
)
from relay.bus import Commit
from relay.keys import Keys
from relay.schemas import EffectivePolicy, ErrorInfo, WasmExecRequested
from relay.sessions import BUDGET_FIELDS, Remaining, remaining
from relay.states import StateStore

PAGE_CACHE_BYTES = 256 * 1024 * 1024
RESIDENT_BYTES = 512 * 1024 * 1024
"""Memory the resident instances of one executor hold at most, all together."""
MAX_RESIDENTS = 64


class Resident(NamedTuple):
    """A session's instance kept between calls, holding exactly the state `state_cid`."""

    state_cid: str
    store: wasmtime.Store
    instance: wasmtime.Instance
    baseline: Baseline
    max_stack: int
    """The `max_stack` of the call that left it: its Store's Engine has that stack."""

    @property
    def size(self) -> int:
        return len(self.baseline.digests) * PAGE_BYTES


class SessionCall:
    """One session call's state, from its start to its commit (`executor.sandbox.StateHooks`)."""

    def __init__(self, base: str, policy: EffectivePolicy, max_state_bytes: int, *,
                 manifest: Manifest | None = None, pages: dict[str, bytes] | None = None,
                 resident: Resident | None = None) -> None:
        self.base = base
        """The committed state the call starts from ("" for the module's fresh state)."""
        self.policy = policy
        """The call's limits, lowered to what its session's budget has left."""
        self.resident = resident
        """The instance to run in, holding `base` already (None: a fresh one)."""
        self._manifest = manifest
        self._pages = pages or {}
        self._max_state_bytes = max_state_bytes
        self._baseline = resident.baseline if resident else Baseline.fresh()
        self.ran_in: tuple[wasmtime.Store, wasmtime.Instance] | None = None
        """The store and instance the call ran in, once it has."""
        self.captured: Captured | None = None
        """What a successful call left (None until then)."""

    def restore(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None:
        """On the wasm thread, right after instantiation (never for a resident). Raises
        Refused."""
        self.ran_in = store, instance
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
        self.ran_in = store, instance
        captured = capture(store, instance, self._baseline)
        if captured.manifest.size > self._max_state_bytes:
            raise Refused(ErrorInfo("memory_limit", f"the session's state would be "
                                    f"{captured.manifest.size} bytes, over the limit of "
                                    f"{self._max_state_bytes} (RELAY_MAX_STATE_BYTES)"))
        self.captured = captured


class SessionStates:
    """The executor's side of sessions: one per executor, with its local page cache and its
    resident instances. Used from the executor's event loop only."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, max_state_bytes: int,
                 orphan_ttl_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.max_state_bytes = max_state_bytes
        self.store = StateStore(client, keys, orphan_ttl_ms=orphan_ttl_ms)
        self.cache = PageCache(PAGE_CACHE_BYTES)
        self._residents: OrderedDict[str, Resident] = OrderedDict()
        """Session id -> its instance, least recently used first. A call takes its session's
        out while it runs, so no two runs ever share one."""

    async def begin(self, request: WasmExecRequested) -> SessionCall:
        """What the call starts from. Raises Refused (its session is gone, or its state, or its
        budget has nothing left)."""
        session_id = request.session_id
        assert session_id is not None
        fields = await self.client.hmget(self.keys.session(session_id), [
            "state_cid", *BUDGET_FIELDS, "closed"])
        resident = self._residents.pop(session_id, None)
        if fields[0] is None:
            raise Refused(ErrorInfo("internal", f"session {session_id} is gone"))
        if fields[5] == b"1":  # a close whose cancel missed it (its gateway died meanwhile)
            raise Refused(ErrorInfo("cancelled", f"session {session_id} was closed"))
        base = fields[0].decode()
        budget = {name: value.decode() for name, value in zip(BUDGET_FIELDS, fields[1:5],
                                                              strict=True) if value}
        policy = _within_budget(request.policy, remaining(budget))
        policy = msgspec.structs.replace(
            policy, max_memory=min(policy.max_memory, self.max_state_bytes))
        # Only an instance holding the committed state itself (a peer may have run calls
        # since), on the Engine of this call's stack.
        if resident is not None and resident.state_cid == base and base \
                and resident.size <= policy.max_memory \
                and resident.max_stack == policy.max_stack:
            return SessionCall(base, policy, self.max_state_bytes, resident=resident)
        if not base:
            return SessionCall("", policy, self.max_state_bytes)
        raw = await self.store.manifest(base)
        if raw is None:
            raise Refused(ErrorInfo("internal", f"the session's state {base} is missing"))
        manifest = Manifest.decode(raw)
        pages, missing = self.cache.get_many(manifest.stored_pages())
        if missing:
            fetched = await self.store.pages(missing)
            self.cache.put_many(fetched)
            pages.update(fetched)
        return SessionCall(base, policy, self.max_state_bytes, manifest=manifest, pages=pages)

    async def commit(self, call: SessionCall, session_id: str, *,
                     keep: bool = True) -> Commit | None:
        """Store what a successful call captured and (with `keep`) keep its instance resident;
        the Commit for its settle (None when it captured nothing: it did not succeed). WASI
        modules' instances are not kept: their store's WASI context is per run."""
        captured = call.captured
        if captured is None or call.ran_in is None:
            return None
        encoded = captured.manifest.encode()
        cid = state_cid(encoded)
        if cid != call.base:
            await self.store.save(encoded, cid, captured.new_pages)
            self.cache.put_many(captured.new_pages)
        if keep:
            store, instance = call.ran_in
            self._keep(session_id, Resident(cid, store, instance, captured.baseline,
                                            call.policy.max_stack))
        return Commit(call.base, cid, captured.manifest.size)

    def release(self, call: SessionCall, session_id: str) -> None:
        """A call that will not run here after all gives its resident back."""
        if call.resident is not None and call.ran_in is None:
            self._keep(session_id, call.resident)

    def holds(self, session_id: str, state_cid: str) -> bool:
        """Whether this executor keeps the session's instance in the state `state_cid` (it ran
        the call that committed it)."""
        resident = self._residents.get(session_id)
        return resident is not None and resident.state_cid == state_cid

    def _keep(self, session_id: str, resident: Resident) -> None:
        self._residents[session_id] = resident
        total = sum(kept.size for kept in self._residents.values())
        while self._residents and (len(self._residents) > MAX_RESIDENTS
                                   or total > RESIDENT_BYTES):
            _, evicted = self._residents.popitem(last=False)
            total -= evicted.size


def _within_budget(policy: EffectivePolicy, left: Remaining) -> EffectivePolicy:
    """`policy` lowered to what the budget has `left` now (the calls before this one ran since
    it was accepted). Raises Refused when they left nothing."""
    changes = {}
    if left.gas is not None:
        if left.gas == 0:
            raise Refused(ErrorInfo("out_of_gas", "the session's budget has no gas left"))
        changes["max_gas"] = min(policy.max_gas, left.gas)
    if left.time is not None:
        if left.time == 0:
            raise Refused(ErrorInfo("timeout", "the session's budget has no time left"))
        changes["max_time"] = min(policy.max_time, left.time)
    return msgspec.structs.replace(policy, **changes) if changes else policy
