"""Pipelines: DAGs of executions (the contract's "Pipelines").

The domain, apart from HTTP and from the bus consumer that advances pipelines
(relay.scheduler): checking a graph (duplicate ids, unknown references, cycles), resolving a
node's inputs from the outputs of the nodes it refers to, and the pipeline's state in Redis.

Every change of a pipeline's state is one Lua script (relay/lua/pipeline_*.lua, sharing
pipeline.lib.lua): create, a node's attempt done, a timer due (a retry, or the watchdog), stop.
Each answers the same way: the executions to cancel, and every queued node with its attempt;
the caller accepts those whose execution does not exist yet. So a caller that dies between a
script and its accepts loses nothing (the next transition, or the watchdog, lists them again)
and queues nothing twice (an attempt's request id is derived from the pipeline, the node and
the attempt, and accepting it again joins the execution).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis

from relay.bus import Script
from relay.connection import shared_link
from relay.errors import FieldError, InvalidRequest, NotFound
from relay.keys import Keys
from relay.schemas import (
    EffectivePolicy,
    ErrorInfo,
    PipelineNode,
    PipelineNodeState,
    PipelinePage,
    PipelineProgressCounts,
    PipelineSummary,
    PipelineView,
    Priority,
    RunEnvironment,
    encode,
    now_iso,
)

KEEP_MS = 7 * 86_400_000
"""How long a finished pipeline's state is kept (GET, the list) after it finished."""
STAGING_TTL_MS = 3_600_000
"""Staged node keys of a create that never ran its script (the gateway died) expire."""
WRITE_CHUNK = 1000
"""Hash fields per HSET while staging a pipeline's nodes."""
NODE_STATUSES = ("pending", "queued", "running", "retrying", "completed", "failed", "skipped",
                 "cancelled")

_LIBS = ("events", "pipeline")
_CREATE = Script.named("pipeline_create", libs=_LIBS)
_DONE = Script.named("pipeline_done", libs=_LIBS)
_TIMER = Script.named("pipeline_timer", libs=_LIBS)
_STOP = Script.named("pipeline_stop", libs=_LIBS)


# --- references between nodes ---


def ref_of(item: Any) -> str | None:
    """The node an input item refers to (`{"$ref": id, "pointer"?}`), or None."""
    if isinstance(item, dict) and "$ref" in item:
        ref = item["$ref"]
        return ref if isinstance(ref, str) else None
    return None


def literal_of(item: Any) -> tuple[bool, Any]:
    """(True, the value) for `{"$literal": value}`; (True, item) for a plain value; (False,
    None) for a reference."""
    if isinstance(item, dict) and "$ref" in item:
        return False, None
    if isinstance(item, dict) and set(item) == {"$literal"}:
        return True, item["$literal"]
    return True, item


def item_problem(item: Any) -> str | None:
    """What is wrong with an input item's reference syntax, if anything."""
    if not isinstance(item, dict) or "$ref" not in item:
        return None
    if not isinstance(item["$ref"], str):
        return "$ref must be a node id (a string)"
    unknown = set(item) - {"$ref", "pointer"}
    if unknown:
        return f"a reference takes only $ref and pointer, not {', '.join(sorted(unknown))}"
    pointer = item.get("pointer", "")
    if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
        return "pointer must be a JSON pointer (RFC 6901): empty, or starting with /"
    return None


class Graph(NamedTuple):
    """A checked pipeline's shape: each node's distinct dependencies and dependents."""

    dependencies: dict[str, list[str]]
    dependents: dict[str, list[str]]


def check_graph(nodes: list[PipelineNode]) -> Graph:
    """The graph of `nodes`. Raises InvalidRequest with a pointer for each duplicate id (the
    second), bad or unknown reference (the input item) and, once those are fine, a cycle
    (pointer to one of its nodes, the detail naming every node of it)."""
    errors: list[FieldError] = []
    index: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.id in index:
            errors.append(FieldError(f"/nodes/{i}/id", f"duplicate node id {node.id!r} (node "
                                     f"{index[node.id]} has it too)"))
        else:
            index[node.id] = i
    dependencies: dict[str, list[str]] = {node.id: [] for node in nodes}
    for i, node in enumerate(nodes):
        for j, item in enumerate(node.inputs):
            problem = item_problem(item)
            ref = ref_of(item)
            if problem is None and ref is not None and ref not in index:
                problem = f"no node has the id {ref!r}"
            if problem is not None:
                errors.append(FieldError(f"/nodes/{i}/inputs/{j}", problem))
            elif ref is not None and ref not in dependencies[node.id]:
                dependencies[node.id].append(ref)
    if errors:
        raise InvalidRequest(errors[0].detail, errors=errors)
    cycle = find_cycle(dependencies)
    if cycle is not None:
        detail = f"the nodes form a cycle: {' -> '.join([*cycle, cycle[0]])}"
        raise InvalidRequest.at(f"/nodes/{index[cycle[0]]}", detail)
    dependents: dict[str, list[str]] = {}
    for node_id, deps in dependencies.items():
        for dep in deps:
            dependents.setdefault(dep, []).append(node_id)
    return Graph(dependencies, dependents)


def find_cycle(dependencies: dict[str, list[str]]) -> list[str] | None:
    """One cycle of the graph (its nodes in order), or None. Iterative depth-first search, so
    10,000 nodes in a chain need no deep recursion."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(dependencies, WHITE)
    for root in dependencies:
        if color[root] != WHITE:
            continue
        path: list[str] = [root]
        stack = [iter(dependencies[root])]
        color[root] = GREY
        while stack:
            child = next(stack[-1], None)
            if child is None:
                color[path.pop()] = BLACK
                stack.pop()
            elif color[child] == GREY:
                return path[path.index(child):]
            elif color[child] == WHITE:
                color[child] = GREY
                path.append(child)
                stack.append(iter(dependencies[child]))
    return None


class Unresolvable(ValueError):
    """A reference that cannot be resolved (its pointer does not lead anywhere)."""


def resolve_pointer(value: Any, pointer: str) -> Any:
    """RFC 6901. Raises Unresolvable."""
    if pointer == "":
        return value
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict):
            if token not in value:
                raise Unresolvable(f"the pointer {pointer} names no member {token!r}")
            value = value[token]
        elif isinstance(value, list):
            if not token.isdigit() or (token != "0" and token.startswith("0")) \
                    or int(token) >= len(value):
                raise Unresolvable(f"the pointer {pointer} names no item {token!r}")
            value = value[int(token)]
        else:
            raise Unresolvable(f"the pointer {pointer} goes into a {type(value).__name__}")
    return value


def node_request_id(pipeline_id: str, node: str, attempt: int) -> str:
    """The request id of a node's attempt: its own execution, never deduplicated by the
    automatic idempotency key (a `p` first: unlike any other kind of id's hashed text)."""
    text = f"p{len(pipeline_id)}:{pipeline_id}{len(node)}:{node}{attempt}"
    return hashlib.sha256(text.encode()).hexdigest()


def pipeline_id_for(principal: str, key: str | None) -> str:
    """A new pipeline's id: derived from the principal and its idempotency key, or random."""
    if key is None:
        return secrets.token_hex(16)
    return hashlib.sha256(f"pl{len(principal)}:{principal}{key}".encode()).hexdigest()[:32]


# --- what is stored per node ---


class NodeSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A node as checked at `POST /pipelines`, kept to build each of its attempts."""

    cid: str
    entrypoint: str
    inputs: list[Any]
    """As given: references are resolved when an attempt is queued."""
    policy: EffectivePolicy
    params: list[str] | None = None
    """The export's parameter types, to check resolved inputs against (None: a WASI command,
    whose inputs go to stdin as JSON)."""
    explicit: list[str] = []
    """The policy limits the node set (budgets lower only the others)."""
    memoize: bool = True
    memoizable: bool = False
    """Its module's results follow from its inputs alone (relay.modules.memoizable)."""
    priority: Priority = "normal"
    """Each attempt's (checked against the principal's `max_priority` at POST)."""
    environment: RunEnvironment | None = None
    """The environment it was accepted in, as each attempt carries it (relay.environments)."""


class NodeResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A node's last attempt's result, as kept and shown."""

    output: Any = None
    output_ref: Any = None
    """A large output's blob (relay.blobs): `{cid, size, content_type}`."""
    error: ErrorInfo | None = None
    cached: bool | None = None


decode_spec = msgspec.json.Decoder(NodeSpec).decode
decode_result = msgspec.json.Decoder(NodeResult).decode


class Reply(NamedTuple):
    """What a transition script answers (see the module's docstring)."""

    cancel: list[str]
    queued: list[tuple[str, int]]


def _reply(raw: list[Any]) -> Reply:
    cancel, flat = raw
    return Reply([r.decode() for r in cancel],
                 [(flat[i].decode(), int(flat[i + 1])) for i in range(0, len(flat), 2)])


class Created(NamedTuple):
    new: bool
    fingerprint: str
    reply: Reply


class PipelineStore:
    """Pipelines' state in Redis, each change one script."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, events_retention: int) -> None:
        self.client = client
        self.link = shared_link(client)
        self.keys = keys
        self.events_retention = events_retention

    async def _run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await script.run(self.client, keys, args)

    async def create(self, pipeline_id: str, principal: str, nodes: list[PipelineNode],
                     specs: list[NodeSpec], graph: Graph, *, max_concurrency: int,
                     fail_fast: bool, fingerprint: str, callback_url: str | None,
                     callback_events: list[str] | None) -> Created:
        """Store a checked pipeline and queue its first nodes (see `Reply`); or, when one with
        this id exists already, nothing (`new` False, its fingerprint)."""
        pipeline = self.keys.pipeline(pipeline_id)
        staged = f"{pipeline}:staging:{secrets.token_hex(8)}"
        fields: dict[str, list[tuple[str, str | bytes | int]]] = {
            ":spec": [(n.id, encode(spec)) for n, spec in zip(nodes, specs, strict=True)],
            ":status": [(n.id, "pending") for n in nodes],
            ":order": [(n.id, i) for i, n in enumerate(nodes)],
            ":unmet": [(n.id, len(graph.dependencies[n.id])) for n in nodes
                       if graph.dependencies[n.id]],
            ":dependents": [(node_id, encode(after)) for node_id, after
                            in graph.dependents.items()],
            ":retry": [(n.id, f"{n.retries}|{','.join(n.retry_on)}") for n in nodes
                       if n.retries],
        }
        pipe = self.client.pipeline(transaction=False)
        for suffix, pairs in fields.items():
            for start in range(0, len(pairs), WRITE_CHUNK):
                mapping = dict(pairs[start:start + WRITE_CHUNK])
                pipe.hset(staged + suffix, mapping=mapping)
            if pairs:
                pipe.pexpire(staged + suffix, STAGING_TTL_MS)
        ready = {n.id: i for i, n in enumerate(nodes) if not graph.dependencies[n.id]}
        for start in range(0, len(nodes), WRITE_CHUNK):
            chunk = dict(list(ready.items())[start:start + WRITE_CHUNK])
            if chunk:
                pipe.zadd(staged + ":ready", chunk)
        pipe.pexpire(staged + ":ready", STAGING_TTL_MS)
        await pipe.execute()
        now_ms = int(time.time() * 1000)
        status, found, *rest = await self._run(_CREATE, [
            pipeline, self.keys.pipelines(principal), self.keys.events,
            self.keys.pipeline_timers,
        ], [pipeline_id, principal, now_iso(), self.events_retention, max_concurrency,
            "1" if fail_fast else "0", len(nodes), now_ms, fingerprint, callback_url or "",
            encode(callback_events) if callback_events is not None else "",
            staged.rsplit(":", 1)[1]])
        if status == b"exists":
            return Created(False, (found or b"").decode(), Reply([], []))
        return Created(True, fingerprint, _reply(rest))

    async def done(self, pipeline_id: str, node: str, request_id: str, outcome: str,
                   code: str, result: NodeResult, backoff_factor: float) -> Reply:
        """A node's attempt `request_id` ended: `outcome` completed, failed or cancelled
        (`code` its error's). Changes nothing for an attempt that is not the current one.
        `node` "": the node whose attempt `request_id` is (none: nothing changes)."""
        return _reply(await self._run(_DONE, [
            self.keys.pipeline(pipeline_id), self.keys.events, self.keys.pipeline_timers,
        ], [pipeline_id, node, request_id, outcome, code, encode(result), now_iso(),
            self.events_retention, KEEP_MS, int(time.time() * 1000), backoff_factor]))

    async def due_timers(self, count: int) -> list[tuple[str, str]]:
        """Up to `count` timers due now: (pipeline id, node or "" for the watchdog)."""
        # Every gateway asks 20 times a second, mostly while idle: over the shared link, at
        # less than half of redis-py's CPU a call.
        members = await self.link.execute(
            "ZRANGEBYSCORE", self.keys.pipeline_timers, "-inf", int(time.time() * 1000),
            "LIMIT", 0, count)
        due = []
        for member in members:
            pipeline_id, _, node = member.decode().partition("\n")
            due.append((pipeline_id, node))
        return due

    async def fire(self, pipeline_id: str, node: str) -> Reply:
        """Run a due timer: a retry queues the node's next attempt."""
        return _reply(await self._run(_TIMER, [
            self.keys.pipeline(pipeline_id), self.keys.events, self.keys.pipeline_timers,
        ], [pipeline_id, node, now_iso(), self.events_retention, int(time.time() * 1000)]))

    async def watch_again(self, pipeline_id: str, delay_ms: int) -> None:
        """Look at the pipeline again in `delay_ms` (its queue was full)."""
        await self.client.zadd(self.keys.pipeline_timers,
                               {f"{pipeline_id}\n": int(time.time() * 1000) + delay_ms})

    async def stop(self, principal: str, pipeline_id: str) -> tuple[str, Reply]:
        """Cancel a pipeline: ("ok", what to cancel and queued nodes) or ("finished", empty).
        Raises NotFound (also for another principal's)."""
        await self.owner_check(principal, pipeline_id)
        status, *rest = await self._run(_STOP, [
            self.keys.pipeline(pipeline_id), self.keys.events, self.keys.pipeline_timers,
        ], [pipeline_id, now_iso(), self.events_retention, KEEP_MS, int(time.time() * 1000)])
        if status == b"missing":
            raise NotFound(f"no pipeline {pipeline_id}")
        if status == b"finished":
            return "finished", Reply([], [])
        return "ok", _reply(rest)

    async def owner_check(self, principal: str, pipeline_id: str) -> None:
        """Raises NotFound unless the pipeline exists and is `principal`'s."""
        if await self.client.hget(self.keys.pipeline(pipeline_id), "principal") \
                != principal.encode():
            raise NotFound(f"no pipeline {pipeline_id}")

    async def principal_of(self, pipeline_id: str) -> tuple[str | None, bool]:
        """The pipeline's principal (None: it is gone) and whether it is stopping."""
        owner, stop = await self.client.hmget(self.keys.pipeline(pipeline_id),
                                              ["principal", "stop"])
        return (owner.decode() if owner is not None else None), bool(stop)

    async def unstarted(self, pipeline_id: str, attempts: list[tuple[str, str]]
                        ) -> tuple[str | None, bool, list[tuple[str, str, NodeSpec | None]]]:
        """In one round trip: the pipeline's principal (None: it is gone), whether it is
        stopping, and those of `attempts` (node, request id) whose execution does not exist
        yet, each with its node's spec."""
        key = self.keys.pipeline(pipeline_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(key, ["principal", "stop"])
        pipe.hmget(key + ":spec", [node for node, _ in attempts])
        for _, request_id in attempts:
            pipe.exists(self.keys.execution(request_id))
        (owner, stop), specs, *found = await pipe.execute()
        missing = [(node, request_id, decode_spec(raw) if raw is not None else None)
                   for (node, request_id), raw, exists
                   in zip(attempts, specs, found, strict=True) if not exists]
        return (owner.decode() if owner is not None else None), bool(stop), missing

    async def assign(self, pipeline_id: str, attempts: list[tuple[str, str]],
                     refs: Iterable[str] = ()) -> dict[str, NodeResult]:
        """Record (node, request id) as each node's current attempt, before accepting it; and,
        in the same round trip, the stored results of the completed ones among `refs`."""
        key = self.keys.pipeline(pipeline_id)
        wanted = sorted(set(refs))
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key + ":current", mapping=dict(attempts))
        pipe.hset(key + ":requests", mapping={rid: node for node, rid in attempts})
        if wanted:
            pipe.hmget(key + ":results", wanted)
            pipe.hmget(key + ":status", wanted)
        _, _, *read = await pipe.execute()
        if not wanted:
            return {}
        raw, statuses = read
        return {node: decode_result(r) for node, r, s in zip(wanted, raw, statuses, strict=True)
                if r is not None and s == b"completed"}

    # --- reading ---

    async def view(self, principal: str, pipeline_id: str) -> PipelineView:
        """`GET /pipelines/{id}`. Raises NotFound (also for another principal's)."""
        key = self.keys.pipeline(pipeline_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.hgetall(key + ":status")
        pipe.hgetall(key + ":attempts")
        pipe.hgetall(key + ":results")
        pipe.hgetall(key + ":order")
        pipe.hgetall(key + ":dependents")
        meta, statuses, attempts, results, order, dependents = await pipe.execute()
        if meta.get(b"principal") != principal.encode():
            raise NotFound(f"no pipeline {pipeline_id}")
        names = sorted((n.decode() for n in statuses), key=lambda n: int(order[n.encode()]))
        status_of = {n: statuses[n.encode()].decode() for n in names}
        # `running` is the execution's own status: read for the queued nodes only.
        queued = [n for n in names if status_of[n] == "queued"]
        if queued:
            pipe = self.client.pipeline(transaction=False)
            for n in queued:
                rid = node_request_id(pipeline_id, n, int(attempts[n.encode()]))
                pipe.hget(self.keys.execution(rid), "status")
            for n, found in zip(queued, await pipe.execute(), strict=True):
                if found in (b"running", b"paused"):
                    status_of[n] = "running"
        needs: dict[str, list[str]] = {n: [] for n in names}
        for node, after in dependents.items():
            for dependent in msgspec.json.decode(after):
                needs[dependent].append(node.decode())
        nodes = {}
        for n in names:
            tries = int(attempts.get(n.encode(), 0))
            state = PipelineNodeState(status=status_of[n], attempts=tries,
                                      needs=sorted(needs[n], key=lambda d: int(order[d.encode()])),
                                      request_id=node_request_id(pipeline_id, n, tries)
                                      if tries else None)
            raw = results.get(n.encode())
            if raw is not None:
                result = decode_result(raw)
                if result.error is None:
                    state.output = result.output
                    if result.output_ref is not None:
                        state.output_ref = result.output_ref
                else:
                    state.error = result.error
                if result.cached is not None:
                    state.cached = result.cached
            nodes[n] = state
        counts = dict.fromkeys(NODE_STATUSES, 0)
        for status in status_of.values():
            counts[status] += 1
        return PipelineView(pipeline_id=pipeline_id, status=meta[b"status"].decode(),
                            progress=_progress(counts, len(names)), nodes=nodes,
                            max_concurrency=int(meta[b"max_concurrency"]),
                            fail_fast=meta[b"fail_fast"] == b"1",
                            created_at=meta[b"created_at"].decode(),
                            finished_at=_text(meta.get(b"finished_at")))

    async def page(self, principal: str, cursor: int, limit: int) -> PipelinePage:
        """The principal's pipelines, newest first, from offset `cursor`."""
        index = self.keys.pipelines(principal)
        ids = [i.decode() for i in await self.client.zrevrange(index, cursor, cursor + limit)]
        more = len(ids) > limit
        ids = ids[:limit]
        pipe = self.client.pipeline(transaction=False)
        for pipeline_id in ids:
            pipe.hmget(self.keys.pipeline(pipeline_id),
                       ["status", "created_at", "finished_at", "total",
                        *(f"n_{s}" for s in NODE_STATUSES)])
        items, gone = [], []
        for pipeline_id, row in zip(ids, await pipe.execute(), strict=True):
            if row[0] is None:
                gone.append(pipeline_id)  # expired
                continue
            counts = {s: int(v or 0) for s, v in zip(NODE_STATUSES, row[4:], strict=True)}
            items.append(PipelineSummary(
                pipeline_id=pipeline_id, status=row[0].decode(),
                progress=_progress(counts, int(row[3])), created_at=row[1].decode(),
                finished_at=_text(row[2])))
        if gone:
            await self.client.zrem(index, *gone)
        return PipelinePage(items=items, next_cursor=str(cursor + limit) if more else None)


def _progress(counts: dict[str, int], total: int) -> PipelineProgressCounts:
    ended = counts["completed"] + counts["failed"] + counts["skipped"] + counts["cancelled"]
    # As the scripts' events say it (pipeline.lib.lua): hundredths, rounded down.
    percent = 100.0 if total == 0 else (10_000 * ended // total) / 100
    return PipelineProgressCounts(total=total, percent=percent, **counts)


def _text(raw: bytes | None) -> str | None:
    return raw.decode() if raw else None
