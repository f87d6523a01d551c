"""Memoized results: a successful run's result answers later requests for the same computation.

A request with `"memoize": true` names its computation by a key: the sha256 of (module CID,
entrypoint, canonical inputs, environment). The settle of a successful run of such a request
stores its response under that key, in the principal's scope or, with RELAY_MEMO_SCOPE=global,
in one scope shared by all, for RELAY_MEMO_TTL (settle.lua). A later request of the same key is
answered with it, without running anything, when the producing run fits the request's policy:
its gas used within `max_gas`, its memory within `max_memory`, its `max_stack` within this
one's. The memory recorded is the producing run's `max_memory`, its peak memory's upper bound
(the executor does not report the peak), so a request asking for less memory than the producer
had runs again; likewise for the stack.

The gateway reads the entry and prepares the hit's bodies (`Memo.prepare`); the accept script
answers with them only if the entry is still the one read (`of`), atomically with acceptance,
so a hit never queues work nor reserves budget, and its execution record, events and
idempotency key are those of any finished execution. Since the script has the last word, the
gateway keeps the entries it read in memory (`Entries`, for a second) and reads Redis again
only for one it does not hold, holds but which does not fit, or which the script found changed:
a repeated hit costs the one round trip of its acceptance, as a replay does.

Failures are never stored; nor are results of modules that are not `relay.modules.memoizable`
(their responses say `"cached": false`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis
from msgspec import UNSET

from relay.keys import Keys
from relay.schemas import (
    DEFAULT_MAX_STACK,
    ExecutionComplete,
    WasmExecCompleted,
    WasmExecRequested,
    decode_response,
    encode,
    now_iso,
)

_canonical = msgspec.json.Encoder(order="sorted").encode
"""Inputs as one text whatever the order of their objects' keys."""


class MemoKey(NamedTuple):
    """A memoizable request's computation, and whose results may answer it."""

    digest: str
    principal: str | None
    """None: every principal's (RELAY_MEMO_SCOPE=global)."""


def digest(cid: str, entrypoint: str, inputs: list[Any], environment: str = "") -> str:
    """sha256 hex of the computation: module, entrypoint, canonical inputs, environment (its
    name and version once environments exist; "" until then)."""
    return hashlib.sha256(_canonical({"cid": cid, "entrypoint": entrypoint, "inputs": inputs,
                                      "environment": environment})).hexdigest()


class Hit(NamedTuple):
    """What a request answered from a stored result writes and sends, as JSON bodies."""

    of: str
    """The producing request_id: the entry the bodies were made from."""
    response: bytes
    complete: bytes
    """`execution_complete`, with `cached: true`."""
    completed: bytes
    """`wasm_exec_completed`, for bus consumers."""


class MemoAccept(NamedTuple):
    """The accept script's memo arguments for one request (relay.bus.Bus.accept)."""

    key: str
    """The entry's Redis key: read for a hit, and written by the settle of a new run."""
    memory: int
    """What the entry records as the run's memory, should this request produce it."""
    ttl_ms: int
    record_ttl_ms: int
    """How long a hit's execution record lives (RELAY_IDEMPOTENCY_TTL, as any finished one)."""
    hit: Hit | None
    stack: int = DEFAULT_MAX_STACK
    """What the entry records as the run's `max_stack`, should this request produce it."""


class Entry(NamedTuple):
    """A memo entry as read from Redis."""

    of: str
    result: bytes
    gas: int
    memory: int
    stack: int = DEFAULT_MAX_STACK
    """Its run's `max_stack` (entries stored before there was one ran with the default)."""

    def fits(self, request: WasmExecRequested) -> bool:
        """Whether its run fits `request`'s policy."""
        policy = request.policy
        return (self.gas <= policy.max_gas and self.memory <= policy.max_memory
                and self.stack <= policy.max_stack)


class Entries:
    """Memo entries a process read, by Redis key, each for `ttl_s` after it was read, the most
    recently used kept within `max_bytes` of results. The time bound makes a stale entry cost
    at most that long of runs that could have been hits, even for a caller that does not tell
    `Memo.missed`."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> Entry | None:
        held = self._entries.get(key)
        if held is None:
            return None
        if time.monotonic() - held[1] > self.ttl_s:
            self.drop(key)
            return None
        self._entries.move_to_end(key)
        return held[0]

    def put(self, key: str, entry: Entry) -> None:
        self.drop(key)
        if len(entry.result) > self.max_bytes:
            return
        self._entries[key] = (entry, time.monotonic())
        self._bytes += len(entry.result)
        while self._bytes > self.max_bytes:
            _, (oldest, _) = self._entries.popitem(last=False)
            self._bytes -= len(oldest.result)

    def drop(self, key: str) -> None:
        held = self._entries.pop(key, None)
        if held is not None:
            self._bytes -= len(held[0].result)


CACHE_BYTES = 16 * 1024 * 1024
"""Results a process keeps in memory (`Entries`)."""
CACHE_TTL_S = 1.0
"""How long it trusts one it read (the accept script checks it anyway)."""


class Memo:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, ttl_ms: int,
                 record_ttl_ms: int, cache_bytes: int = CACHE_BYTES,
                 cache_ttl_s: float = CACHE_TTL_S) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = ttl_ms
        self.record_ttl_ms = record_ttl_ms
        self.entries = Entries(cache_bytes, cache_ttl_s)

    async def prepare(self, key: MemoKey, request: WasmExecRequested) -> MemoAccept:
        """The entry of `key` (read from Redis unless held and fitting) and, when its run fits
        `request`'s policy, the bodies that answer `request` with it."""
        redis_key = self.keys.memo(key.digest, key.principal)
        entry = self.entries.get(redis_key)
        if entry is None or not entry.fits(request):
            of, result, gas, memory, stack = await self.client.hmget(
                redis_key, ["of", "result", "gas", "memory", "stack"])
            entry = None
            if of is not None and result is not None:
                entry = Entry(of.decode(), result, int(gas), int(memory),
                              int(stack or DEFAULT_MAX_STACK))
                self.entries.put(redis_key, entry)
        hit = None
        if entry is not None and entry.fits(request):
            hit = answer(request, entry.of, entry.result, scoped=key.principal is not None)
        return MemoAccept(redis_key, request.policy.max_memory, self.ttl_ms, self.record_ttl_ms,
                          hit, request.policy.max_stack)

    def missed(self, memo: MemoAccept) -> None:
        """The accept script found the entry `memo` was prepared from gone or replaced (a hit
        was prepared, `memo.hit`, and the script did not take it): read it again next time."""
        self.entries.drop(memo.key)


def answer(request: WasmExecRequested, of: str, result: bytes, *, scoped: bool) -> Hit:
    """The bodies answering `request` with the stored response `result` of request `of`: its
    result fields (gas used, duration and time of the producing run) under this request's id,
    `cached: true`, and `memo_of` when the scope is the principal's own."""
    stored = decode_response(result)
    memo_of = of if scoped else UNSET
    response = msgspec.structs.replace(stored, request_id=request.request_id, cached=True,
                                       memo_of=memo_of)
    complete = ExecutionComplete(request_id=request.request_id, timestamp=now_iso(),
                                 duration=stored.duration, gas_used=stored.gas_used,
                                 output=stored.output, output_ref=stored.output_ref,
                                 cached=True)
    completed = WasmExecCompleted(
        **{field: getattr(request, field) for field in WasmExecRequested.__struct_fields__},
        success=True, output=stored.output, output_ref=stored.output_ref, error=None,
        gas_used=stored.gas_used, duration=stored.duration, executed_at=stored.executed_at,
        cached=True, memo_of=memo_of)
    return Hit(of, encode(response), encode(complete), encode(completed))
