"""The pipeline scheduler: the bus consumer that advances pipelines (relay.pipelines).

Every gateway process runs one (`relay dev` runs the gateway app, so it has one too), in the
consumer group `pipelines` on `relay:events:followed` (the events of pipeline nodes, batch
items and executions with a webhook callback, copied from `relay:events` by the scripts that
emit them: relay/lua/events.lib.lua). It reads the `wasm_exec_completed` entries of
node executions (told apart from the rest by their bytes, before decoding anything) when the
gateway's fan-in saw one pass (`wake`), or after a second without any, runs the
one script of that transition, starts the nodes it queued and cancels what it says to cancel,
and only then acknowledges the entry. An entry left pending by a process that died is taken
over by a peer (XAUTOCLAIM) and done again: the script changes nothing twice, and lists again
the queued nodes whose execution does not exist yet.

A second loop runs the pipelines' timers: retries in backoff, and each pipeline's watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis

from relay import budgets
from relay.batches import BatchStore
from relay.blobs import BlobGone, BlobStore, decode_output
from relay.bus import Bus, create_group, read_group, reclaimed
from relay.connection import shared_link
from relay.environments import tag
from relay.keys import Keys
from relay.memo import Memo, MemoAccept, MemoKey, digest
from relay.pipelines import (
    NodeResult,
    NodeSpec,
    PipelineStore,
    Reply,
    Unresolvable,
    literal_of,
    node_request_id,
    ref_of,
    resolve_pointer,
)
from relay.schemas import ErrorInfo, InputRef, WasmExecRequested, decode_completed, now_iso

log = logging.getLogger("relay.scheduler")

COMPLETED_PREFIX = b'{"type":"wasm_exec_completed"'
PIPELINE_MARK = b'"pipeline_id":"'
"""In a completion's bytes only when it belongs to a pipeline (outside one it is null)."""
BATCH_MARK = b'"batch_id":"'
"""In a completion's bytes only when it belongs to a batch (outside one it is absent)."""


def _ours(data: bytes) -> bool:
    """A pipeline node's or a batch item's completion (or, rarely, another one whose inputs
    have such a member: decoding tells)."""
    return data.startswith(COMPLETED_PREFIX) and (PIPELINE_MARK in data or BATCH_MARK in data)
READ_COUNT = 100
RECLAIM_IDLE_MS = 10_000
"""An entry pending this long lost its consumer (a transition takes milliseconds, or the
seconds of a cancel's confirmation)."""
RECLAIM_EVERY_S = 5.0
TIMERS_PER_ROUND = 100
FULL_RETRY_MS = 1000
"""When the queue is full (`RELAY_MAX_QUEUE`), a pipeline's queued nodes are tried again
this much later."""
LAUNCHED_KEPT = 20_000
"""Attempts this process accepted, remembered so that they need no look in Redis when a
later transition lists them again (about 4 MiB); past this many they are forgotten (each then
costs one EXISTS)."""
READ_BLOB_BYTES = 1 << 20
"""The largest large output a reference is resolved from here: one with a pointer, or one a
function's parameter takes (read and decoded in this process). A whole output for a WASI
command is passed by reference, whatever its size: the executor reads it."""

CheckInput = Callable[[str, Any], "str | None"]
"""What is wrong with a value for a parameter of a wasm type, if anything."""
Cancel = Callable[[str, str], Awaitable[None]]
"""Cancel the execution (principal, request id) wherever it is; nothing if it has ended."""


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Scheduler:
    def __init__(self, client: aioredis.Redis, keys: Keys, bus: Bus, store: PipelineStore, *,
                 max_active: Callable[[str], int], cancel: Cancel, check_input: CheckInput,
                 max_input_bytes: int, batches: BatchStore | None = None,
                 memo: Memo | None = None, memo_global: bool = False,
                 consumer: str | None = None, read_block_ms: int = 1000,
                 timer_interval_s: float = 0.05) -> None:
        self.client = client
        self.link = shared_link(client)
        self.keys = keys
        self.bus = bus
        self.store = store
        self.max_active = max_active
        self.cancel = cancel
        self.check_input = check_input
        self.max_input_bytes = max_input_bytes
        """What a node's inputs passed by reference add up to at most (RELAY_MAX_OUTPUT_BYTES:
        the largest output a run may write is the largest input a run is given)."""
        self.blobs = BlobStore(client, keys)
        self.batches = batches
        """Told when a batch's item ends (relay.batches): this consumer reads those too."""
        self.memo = memo
        """Answers nodes (`memoize`, the default) from stored results (relay.memo)."""
        self.memo_global = memo_global
        """RELAY_MEMO_SCOPE=global: every principal's results answer every principal."""
        self.consumer = consumer or consumer_name()
        self.read_block_ms = read_block_ms
        self.timer_interval_s = timer_interval_s
        self._wake = asyncio.Event()
        self._launching: set[str] = set()
        """Attempts (request ids) this process is accepting now."""
        self._launched: set[str] = set()
        """Attempts this process accepted (at most LAUNCHED_KEPT)."""

    # --- the consumer ---

    async def ensure_group(self) -> None:
        await create_group(self.client, self.keys.followed, Keys.PIPELINE_GROUP)

    def wake(self) -> None:
        """A node's completion is on the stream (the gateway's fan-in saw it): read now."""
        self._wake.set()

    async def consume(self) -> None:
        """Advance pipelines from their nodes' completions, until cancelled.

        The group is read when `wake` says a node completed, and every `read_block_ms`
        anyway; it is not blocked on. Most entries are other executions' events, and a
        blocking read woke this process for each burst of them: a memo hit's three events cost
        it a read and an acknowledgement, more Redis round trips than the hit itself. The
        read every `read_block_ms` takes a completion nobody told about (the fan-in was
        reconnecting) and acknowledges the others in bulk."""
        await self.ensure_group()
        next_reclaim = 0.0
        while True:
            if time.monotonic() >= next_reclaim:
                await self.reclaim()
                next_reclaim = time.monotonic() + RECLAIM_EVERY_S
            self._wake.clear()  # before the read: a completion seen during it reads again
            try:
                read = await read_group(self.link, self.keys.followed, Keys.PIPELINE_GROUP,
                                        self.consumer, READ_COUNT)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()
                continue
            entries = [(entry_id, fields.get(b"data", b"")) for entry_id, fields in read]
            if entries:
                await self.handle(entries)
            if len(entries) < READ_COUNT:  # else more are waiting: read on
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.read_block_ms / 1000):
                        await self._wake.wait()

    async def reclaim(self, min_idle_ms: int = RECLAIM_IDLE_MS) -> None:
        """Take over the entries another consumer left pending (it died mid-transition)."""
        async for entries in reclaimed(self.client, self.keys.followed, Keys.PIPELINE_GROUP,
                                       self.consumer, min_idle_ms, READ_COUNT):
            await self.handle(entries)

    async def handle(self, entries: list[tuple[bytes, bytes]]) -> None:
        """Advance pipelines by the completions among `entries`; acknowledge every entry but
        those whose transition failed (they stay pending and are taken over later)."""
        ours = [(entry_id, data) for entry_id, data in entries if _ours(data)]
        done: list[bytes] = [entry_id for entry_id, data in entries if not _ours(data)]
        if ours:
            outcomes = await asyncio.gather(*(self.completed(data) for _, data in ours),
                                            return_exceptions=True)
            for (entry_id, _), outcome in zip(ours, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    log.error("a pipeline transition failed; it is retried later",
                              exc_info=outcome)
                else:
                    done.append(entry_id)
        if done:
            await self.link.execute("XACK", self.keys.followed, Keys.PIPELINE_GROUP, *done)

    async def completed(self, data: bytes) -> None:
        """One node execution's `wasm_exec_completed`: its transition, then what it started
        (or a batch item's: the batch is told)."""
        event = decode_completed(data)
        if event.batch_id and self.batches is not None:
            code = event.error.code if event.error is not None else ""
            await self.batches.ended(event.batch_id, event.request_id, "completed" if event.success
                                     else "cancelled" if code == "cancelled" else "failed")
        pipeline_id = event.pipeline_id
        if pipeline_id is None:
            return
        output_ref = getattr(event, "output_ref", None)
        cached = getattr(event, "cached", None)
        result = NodeResult(output=event.output, error=event.error,
                            output_ref=None if output_ref is msgspec.UNSET else output_ref,
                            cached=None if cached is msgspec.UNSET else cached)
        if event.success:
            outcome, code = "completed", ""
        else:
            code = event.error.code if event.error is not None else "internal"
            outcome = "cancelled" if code == "cancelled" else "failed"
        # The script finds the node of the attempt (nothing if the pipeline expired).
        reply = await self.store.done(pipeline_id, "", event.request_id, outcome, code, result,
                                      random.uniform(0.5, 1.0))
        await self.apply(pipeline_id, reply)

    # --- timers ---

    async def timers(self) -> None:
        """Run due retries and watchdogs, until cancelled."""
        while True:
            due = await self.store.due_timers(TIMERS_PER_ROUND)
            for pipeline_id, node in due:
                await self.apply(pipeline_id, await self.store.fire(pipeline_id, node))
            if len(due) < TIMERS_PER_ROUND:
                await asyncio.sleep(self.timer_interval_s)

    # --- acting on a transition ---

    async def apply(self, pipeline_id: str, reply: Reply) -> None:
        """Cancel what a transition stopped, and accept its queued nodes that have no
        execution yet."""
        if reply.cancel:
            principal, _ = await self.store.principal_of(pipeline_id)
            if principal is not None:
                await asyncio.gather(*(self.cancel(principal, request_id)
                                       for request_id in reply.cancel))
        if reply.queued:
            await self.launch(pipeline_id, reply.queued)

    async def launch(self, pipeline_id: str, queued: list[tuple[str, int]]) -> None:
        """Accept each queued node's attempt unless its execution exists already: inputs
        resolved from the outputs it refers to, or failed with `invalid_input` if they do not
        fit. A stopping pipeline's nodes are cancelled instead.

        Every transition lists all the pipeline's queued nodes, and a batch of completions
        runs its transitions at once: without looking aside at what this process accepted or
        is accepting, each of 50 columns' transitions looked up all 50 queued executions and
        accepted the other new ones again (joins), some nine accepts a node."""
        attempts = [(node, request_id) for node, attempt in queued
                    if (request_id := node_request_id(pipeline_id, node, attempt))
                    not in self._launching and request_id not in self._launched]
        if not attempts:
            return
        self._launching.update(request_id for _, request_id in attempts)
        try:
            await self._launch(pipeline_id, attempts)
        finally:
            self._launching.difference_update(request_id for _, request_id in attempts)

    async def _launch(self, pipeline_id: str, attempts: list[tuple[str, str]]) -> None:
        """`launch` for attempts (node, request id) this process has not accepted."""
        principal, stopping, unstarted = await self.store.unstarted(pipeline_id, attempts)
        if principal is None or not unstarted:
            return
        missing = [(node, request_id) for node, request_id, _ in unstarted]
        followups: list[Reply] = []
        if stopping:
            await self.store.assign(pipeline_id, missing)
            for node, request_id in missing:
                followups.append(await self._fail(pipeline_id, node, request_id, ErrorInfo(
                    "cancelled", "the pipeline was stopped before it started")))
        else:
            specs = [spec for _, _, spec in unstarted]
            refs = {ref for spec in specs if spec is not None for item in spec.inputs
                    if (ref := ref_of(item)) is not None}
            outputs = await self.store.assign(pipeline_id, missing, refs)
            starts = []
            for (node, request_id), spec in zip(missing, specs, strict=True):
                if spec is None:
                    continue
                inputs, by_reference, problem = await self._inputs(spec, outputs)
                if problem is not None:
                    followups.append(await self._fail(pipeline_id, node, request_id,
                                                      ErrorInfo("invalid_input", problem)))
                    continue
                request = WasmExecRequested(
                    request_id=request_id, cid=spec.cid, entrypoint=spec.entrypoint,
                    inputs=inputs, policy=spec.policy, user_id=principal, timestamp=now_iso(),
                    pipeline_id=pipeline_id)
                if by_reference:
                    request.input_refs = by_reference
                if spec.memoize:
                    request.memoize = True  # its result says `cached` (relay.memo)
                if spec.priority != "normal":  # left out for normal, as on execute
                    request.priority = spec.priority
                if spec.environment is not None:
                    request.environment = spec.environment
                starts.append((node, request, spec))
            refused = await asyncio.gather(*(self._accept(principal, pipeline_id, request, spec)
                                             for _, request, spec in starts))
            for (node, request, _), refusal in zip(starts, refused, strict=True):
                if refusal is not None:
                    followups.append(await self._fail(pipeline_id, node, request.request_id,
                                                      refusal))
            # Stopped (DELETE, fail_fast) while these were accepted: its cancel did not find
            # them yet, so cancel them here.
            if starts and (await self.store.principal_of(pipeline_id))[1]:
                await asyncio.gather(*(self.cancel(principal, request.request_id)
                                       for _, request, _ in starts))
        for reply in followups:
            await self.apply(pipeline_id, reply)

    async def _fail(self, pipeline_id: str, node: str, request_id: str,
                    error: ErrorInfo) -> Reply:
        outcome = "cancelled" if error.code == "cancelled" else "failed"
        return await self.store.done(pipeline_id, node, request_id, outcome, error.code,
                                     NodeResult(error=error), random.uniform(0.5, 1.0))

    async def _accept(self, principal: str, pipeline_id: str, request: WasmExecRequested,
                      spec: NodeSpec) -> ErrorInfo | None:
        """Publish a node's attempt as an ordinary execution (authorized at POST); the error
        to fail it with when a budget refuses it."""
        explicit = frozenset(spec.explicit)
        max_active = self.max_active(principal)
        memo: MemoAccept | None = None
        if self.memo is not None and spec.memoize and spec.memoizable:
            key = MemoKey(digest(spec.cid, spec.entrypoint, memo_inputs(request),
                                 "" if spec.environment is None else tag(spec.environment)),
                          None if self.memo_global else principal)
            memo = await self.memo.prepare(key, request)
        # The request id is the attempt's own: it is found again only by that id (a join).
        # A memo hit finishes it at once: its completion comes back like any other's.
        accepted = await self.bus.accept(request, request.request_id, max_active=max_active,
                                         explicit=explicit, memo=memo)
        for _ in range(budgets.LOWER_ATTEMPTS):
            if accepted.status != "lower":
                break
            accepted = await self.bus.accept(budgets.lowered(request, accepted.budget),
                                             request.request_id, max_active=max_active,
                                             explicit=explicit, memo=memo)
        if not accepted.full and accepted.status not in ("budget", "lower"):
            if len(self._launched) >= LAUNCHED_KEPT:
                self._launched.clear()
            self._launched.add(request.request_id)
        if accepted.full:
            await self.store.watch_again(pipeline_id, FULL_RETRY_MS)
        elif accepted.status in ("budget", "lower"):
            # `internal`: retried like any infrastructure refusal, if the node has retries.
            return ErrorInfo("internal", "refused: a budget of the principal has no room for "
                             "it (" + budgets.refusal(accepted).detail + ")")
        return None

    async def _inputs(self, spec: NodeSpec, outputs: dict[str, NodeResult]
                      ) -> tuple[list[Any], list[InputRef], str | None]:
        """The node's inputs with references resolved (a large output for a WASI command by
        reference: null in its place, and an InputRef), or what is wrong with them."""
        values: list[Any] = []
        by_reference: list[InputRef] = []
        for index, item in enumerate(spec.inputs):
            ref = ref_of(item)
            if ref is None:
                values.append(literal_of(item)[1])
                continue
            result = outputs.get(ref)
            if result is None:
                return [], [], f"input {index}: node {ref} has no output"
            pointer, output = item.get("pointer", ""), result.output
            blob = result.output_ref if output is None else None
            if blob is not None:
                cid, size = blob["cid"], blob["size"]
                if not pointer and spec.params is None:
                    values.append(None)
                    by_reference.append(InputRef(index=index, cid=cid, size=size))
                    continue
                if size > READ_BLOB_BYTES:
                    return [], [], (
                        f"input {index}: the output of node {ref} is {size} bytes, stored as a "
                        f"blob: a WASI command is given it whole, but a JSON pointer into it or "
                        f"a function's parameter reads at most {READ_BLOB_BYTES} bytes; have "
                        f"node {ref} write the part needed as its own output")
                try:
                    output = decode_output(b"".join([part async for part in
                                                     self.blobs.read(cid, 0, size)]))
                except BlobGone:
                    return [], [], f"input {index}: the output of node {ref} has expired"
            try:
                values.append(resolve_pointer(output, pointer))
            except Unresolvable as exc:
                return [], [], f"input {index} ($ref {ref}): {exc}"
        total = sum(ref.size for ref in by_reference)
        if total > self.max_input_bytes:
            return [], [], (f"the outputs this node is given by reference add up to {total} "
                            f"bytes, over the {self.max_input_bytes} a run may be given")
        if spec.params is not None:
            if len(values) != len(spec.params):
                return [], [], (f"{spec.entrypoint} takes {len(spec.params)} inputs, got "
                                f"{len(values)}")
            for index, (kind, value) in enumerate(zip(spec.params, values, strict=True)):
                problem = self.check_input(kind, value)
                if problem is not None:
                    return [], [], f"input {index}: {problem}"
        return values, by_reference, None


def memo_inputs(request: WasmExecRequested) -> Any:
    """What a node's memo key takes for its inputs: with inputs passed by reference, the blobs'
    CIDs too (in a shape no list of literal inputs has)."""
    if not request.input_refs:
        return request.inputs
    return {"inputs": request.inputs,
            "by_reference": [[ref.index, ref.cid] for ref in request.input_refs]}
