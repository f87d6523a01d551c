"""Priorities: which requests stream an execution waits on, and the order executors take them
(real Redis, real executors)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from executor.worker import Executor
from relay import connection
from relay.bus import Bus
from relay.gateway.app import create_app
from relay.keys import Keys
from relay.schemas import (
    EffectivePolicy,
    ExecuteResponse,
    ExecutionStarted,
    WasmExecRequested,
    decode_requested,
    now_iso,
)
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ROOT,
    assert_problem,
    client_for,
    event_entries,
    upload,
    wait_for,
    with_settings,
)
from tests.relay.gateway.test_sessions import COUNTER_WAT, call, completed, make_session

EXECUTE = "/intent/execute-wasm"
ASYNC = {"Prefer": "respond-async"}
LOOP_WAT = '(module (func (export "main") (loop br 0)))'
LONG = {"max_gas": 10**12, "max_time": 120_000}


@contextlib.asynccontextmanager
async def one_executor(settings: Settings, **changes: Any) -> AsyncIterator[Executor]:
    """An executor that runs one execution at a time and takes nothing ahead (no prefetch),
    so the order it takes entries in is the order they start."""
    assert settings.redis_url is not None
    client = connection.connect(settings.redis_url)
    worker = Executor(with_settings(settings, executor_concurrency=1, executor_prefetch=0,
                                    **changes), client, name="only-executor", read_block_ms=100)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        worker.cancel_running()
        await asyncio.wait_for(task, 10)
        await client.aclose()


async def submit(http: httpx.AsyncClient, cid: str, inputs: list[Any],
                 **fields: Any) -> str:
    response = await http.post(EXECUTE, headers=ASYNC, json={"cid": cid, "inputs": inputs,
                                                             **fields})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


async def busy(http: httpx.AsyncClient) -> str:
    """An endless execution, running: the only executor is busy until it is cancelled."""
    loop = await upload(http, LOOP_WAT)
    request_id = await submit(http, loop["cid"], [], policy=LONG)

    async def running() -> bool:
        return bool((await http.get(f"/executions/{request_id}")).json()["status"] == "running")

    await wait_for(running, timeout_s=10)
    return request_id


async def start_order(settings: Settings) -> list[str]:
    """The request ids of `execution_started` events, in the order they were published."""
    events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
    return [e["request_id"] for e in events if e["type"] == "execution_started"]


async def all_done(http: httpx.AsyncClient, request_ids: list[str],
                   timeout_s: float = 60) -> None:
    async def done() -> bool:
        for request_id in request_ids:
            if (await http.get(f"/executions/{request_id}")).json()["status"] != "completed":
                return False
        return True

    await wait_for(done, timeout_s=timeout_s, interval_s=0.2)


async def test_high_requests_start_before_the_low_ones_queued_before_them(
        http: httpx.AsyncClient, settings: Settings) -> None:
    # A starvation bound the test cannot reach: this is the priority order alone.
    async with one_executor(settings, priority_starvation_ms=600_000):
        blocker = await busy(http)
        add = (await upload(http, ADD_WAT))["cid"]
        lows = [await submit(http, add, [i, 0], priority="low") for i in range(200)]
        highs = [await submit(http, add, [i, 1], priority="high") for i in range(20)]
        normal = await submit(http, add, [0, 2])
        assert (await http.delete(f"/executions/{blocker}")).status_code == 200
        await all_done(http, [*lows, *highs, normal])
    order = [rid for rid in await start_order(settings) if rid != blocker]
    assert len(order) == 221
    assert set(order[:20]) == set(highs), "every high request starts before the lows"
    assert order[20] == normal
    assert order[21:] == lows, "the lows keep their order among themselves"
    state = (await http.get(f"/executions/{highs[0]}")).json()
    assert state["priority"] == "high"
    assert (await http.get(f"/executions/{normal}")).json()["priority"] == "normal"


async def test_a_low_request_waiting_past_the_bound_goes_before_newer_high_ones(
        http: httpx.AsyncClient, settings: Settings) -> None:
    bound_ms = 300
    async with one_executor(settings, priority_starvation_ms=bound_ms):
        blocker = await busy(http)
        add = (await upload(http, ADD_WAT))["cid"]
        old_low = await submit(http, add, [1, 0], priority="low")
        # The rule is about time: the low one must have waited past the bound.
        await asyncio.sleep(bound_ms * 1.5 / 1000)
        highs = [await submit(http, add, [i, 1], priority="high") for i in range(5)]
        new_low = await submit(http, add, [2, 0], priority="low")
        assert (await http.delete(f"/executions/{blocker}")).status_code == 200
        await all_done(http, [old_low, *highs, new_low])
    order = [rid for rid in await start_order(settings) if rid != blocker]
    assert order[0] == old_low, "the starving low request is taken before the newer highs"
    assert set(order[1:6]) == set(highs)
    assert order[6] == new_low


@pytest.fixture
def capped_settings(settings: Settings, tmp_path: Path) -> Settings:
    shutil.copy(ROOT / "relay" / "policies" / "default.cedar", tmp_path / "default.cedar")
    (tmp_path / "principals.toml").write_text('[principals.alice]\nmax_priority = "normal"\n')
    return with_settings(settings, policy_dir=str(tmp_path))


async def test_a_priority_over_the_principals_ceiling_is_refused(
        capped_settings: Settings) -> None:
    application = create_app(capped_settings)
    async with application.router.lifespan_context(application), \
            client_for(application, "alice-secret-key") as alice, \
            client_for(application, "bob-secret-key") as bob:
        add = (await upload(alice, ADD_WAT))["cid"]
        body = {"cid": add, "inputs": [1, 2], "priority": "high"}
        problem = assert_problem(await alice.post(EXECUTE, headers=ASYNC, json=body), 400,
                                 "invalid-request")
        assert problem["errors"][0]["pointer"] == "/priority"
        assert "normal" in problem["errors"][0]["detail"]
        # At or under the ceiling it is accepted; another principal has the default (high).
        for priority in ("normal", "low"):
            accepted = await alice.post(EXECUTE, headers=ASYNC, json={**body,
                                                                     "priority": priority})
            assert accepted.status_code == 202, accepted.text
        assert (await bob.post(EXECUTE, headers=ASYNC, json=body)).status_code == 202
        # A pipeline node and a session call are held to it too.
        pipeline = await alice.post("/pipelines", json={"nodes": [
            {"id": "a", "cid": add, "inputs": [1, 2]},
            {"id": "b", "cid": add, "inputs": [1, 2], "priority": "high"}]})
        problem = assert_problem(pipeline, 400, "invalid-request")
        assert [e["pointer"] for e in problem["errors"]] == ["/nodes/1/priority"]
        session = await make_session(alice, COUNTER_WAT)
        refused = await call(alice, session["session_id"], "add", [1], priority="high")
        assert assert_problem(refused, 400, "invalid-request")["errors"][0]["pointer"] == \
            "/priority"
        bad = await alice.post(EXECUTE, json={**body, "priority": "urgent"})
        assert assert_problem(bad, 400, "invalid-request")["errors"][0]["pointer"] == \
            "/priority"


async def test_the_priority_is_part_of_the_request(http: httpx.AsyncClient,
                                                   settings: Settings) -> None:
    """Without a key, the same request at another priority is another execution; with a key,
    it is a reuse of the key (422). Each waits on its own stream."""
    add = (await upload(http, ADD_WAT))["cid"]
    normal = await submit(http, add, [1, 2])
    high = await submit(http, add, [1, 2], priority="high")
    assert high != normal
    assert await submit(http, add, [1, 2], priority="normal") == normal
    await submit(http, add, [1, 2], idempotency_key="k")
    reuse = await http.post(EXECUTE, headers=ASYNC, json={
        "cid": add, "inputs": [1, 2], "idempotency_key": "k", "priority": "low"})
    assert_problem(reuse, 422, "idempotency-key-reuse")
    keys = Keys(settings.prefix)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        on = {level: [decode_requested(fields[b"data"]).request_id
                      for _, fields in await client.xrange(keys.requests_of(level))]
              for level in ("high", "normal", "low")}
    finally:
        await client.aclose()
    assert on["high"] == [high]
    assert normal in on["normal"] and high not in on["normal"]
    assert on["low"] == []


async def test_queue_depth_is_reported_by_priority(http: httpx.AsyncClient,
                                                   settings: Settings) -> None:
    add = (await upload(http, ADD_WAT))["cid"]
    for i in range(3):
        await submit(http, add, [i, 0], priority="low")
    await submit(http, add, [0, 1], priority="high")
    text = (await http.get("/metrics")).text
    assert 'relay_queue_depth{priority="high"} 1' in text
    assert 'relay_queue_depth{priority="normal"} 0' in text
    assert 'relay_queue_depth{priority="low"} 3' in text
    # Executions a gateway from before priorities accepted are counted in the total alone:
    # they are normal ones.
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        await client.incrby(Keys(settings.prefix).queued, 2)
    finally:
        await client.aclose()
    assert 'relay_queue_depth{priority="normal"} 2' in (await http.get("/metrics")).text


async def test_a_session_call_goes_to_its_prioritys_stream(
        http: httpx.AsyncClient, settings: Settings) -> None:
    """The second call waits behind the first, then is published on the high stream by the
    settle of the first."""
    session = await make_session(http, COUNTER_WAT)
    sid = session["session_id"]
    first, second = [await http.post(f"/sessions/{sid}/calls", headers=ASYNC, json={
        "entrypoint": "add", "inputs": [n], "priority": priority})
        for n, priority in ((1, "low"), (2, "high"))]
    assert first.status_code == second.status_code == 202, second.text
    keys = Keys(settings.prefix)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        assert await client.xlen(keys.requests_of("low")) == 1
        assert await client.xlen(keys.requests_of("high")) == 0  # behind the first call
        async with one_executor(settings):
            done = await completed(http, second.json()["request_id"])
        assert done["priority"] == "high" and done["output"] == 3
        assert await client.xlen(keys.requests_of("high")) == 1
    finally:
        await client.aclose()


# --- the bus alone: reclaim and dead letters on the high stream, parked entries ---


TTL_MS = 60_000


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    bus = Bus(client, Keys(settings.prefix), events_retention=1000, requests_retention=1000)
    await bus.ensure_group()
    yield bus
    await client.aclose()


def request(n: int, priority: str = "normal") -> WasmExecRequested:
    one = WasmExecRequested(
        request_id=f"r-{n}", cid="bafkrei-test", entrypoint="main", inputs=[n],
        policy=EffectivePolicy(max_memory=1, max_gas=1, max_time=1), user_id="alice",
        timestamp=now_iso())
    if priority != "normal":
        one.priority = priority  # type: ignore[assignment]
    return one


def done(one: WasmExecRequested) -> ExecuteResponse:
    return ExecuteResponse(success=True, request_id=one.request_id, cid=one.cid, output=None,
                           gas_used=0, duration=0.0, executed_at=now_iso(), error=None)


async def test_an_entry_on_the_high_stream_is_reclaimed_then_dead_lettered(bus: Bus) -> None:
    # Two entries with the same id on two streams: each keeps its own lease and count.
    high, normal = request(1, "high"), request(2)
    for one in (high, normal):
        assert (await bus.accept(one, f"fp-{one.request_id}")).is_new
    taken = await bus.read("crashed", 10, 10)
    assert [decode_requested(data).request_id for _, data in taken] == ["r-1", "r-2"]
    entry = taken[0][0]
    assert entry.startswith(b"high/")
    # Its executor died: a peer takes it over once its lease lapses (idle 0 here).
    again, dead = await bus.reclaim("peer", 0, 1, max_deliveries=2)
    assert [(e, decode_requested(d).request_id) for e, d in again] == [(entry, "r-1")]
    assert dead == []
    # The peer dies too: delivered a third time, it is dead-lettered with its stream named.
    again, dead = await bus.reclaim("peer-2", 0, 10, max_deliveries=2)
    assert [e for e, _ in dead] == [entry]
    assert [decode_requested(d).request_id for _, d in again] == ["r-2"]
    await bus.dead_letter(entry, dead[0][1], "test")
    [(_, letter)] = await bus.client.xrange(bus.keys.dead)
    assert letter[b"stream"] == bus.keys.requests_of("high").encode()
    assert letter[b"entry"] == entry.removeprefix(b"high/")
    # The high run's settle acknowledges it on its own stream, by the consumer holding it.
    assert await bus.finish(entry, high, done(high), TTL_MS, "peer-2")
    assert await bus.client.xpending(bus.keys.requests_of("high"), Keys.EXECUTOR_GROUP) \
        == {"pending": 0, "min": None, "max": None, "consumers": []}
    assert (await bus.client.xpending(bus.keys.requests, Keys.EXECUTOR_GROUP))["pending"] == 1


async def test_parked_entries_go_back_to_their_streams_high_first(bus: Bus) -> None:
    first, low, high = request(1), request(2, "low"), request(3, "high")
    for one in (first, low, high):
        assert (await bus.accept(one, f"fp-{one.request_id}", max_active=1)).is_new
    taken = await bus.read("c", 10, 10)
    assert [decode_requested(d).request_id for _, d in taken] == ["r-3", "r-1", "r-2"]
    verdicts = []
    for entry, data in taken:
        one = decode_requested(data)
        started = ExecutionStarted(request_id=one.request_id, executor_node="c",
                                   timestamp=now_iso())
        verdicts.append(await bus.start(started, one, entry, "c"))
    assert verdicts == ["started", "parked", "parked"]
    assert await bus.finish(taken[0][0], high, done(high), TTL_MS, "c")
    # One place freed: the high one would go first, but it ran; of the parked, normal before
    # low, one at a time.
    [(entry, data)] = await bus.read("c", 10, 10)
    assert decode_requested(data).request_id == "r-1" and not entry.startswith(b"low/")
    assert await bus.client.llen(bus.keys.waiting("alice", "low")) == 1


def ids(taken: list[tuple[bytes, bytes]]) -> list[str]:
    return [decode_requested(data).request_id for _, data in taken]


async def test_a_woken_take_keeps_the_order_and_the_count(bus: Bus) -> None:
    """After a take that found every stream drained, a read blocks until an entry is added;
    what was added meanwhile on one stream alone is taken from it in its order, up to the
    count, and a second stream with entries makes high go first again."""
    assert await bus.read("c", 10, 10) == []  # drained: the next read blocks
    for n in (1, 2, 3):
        assert (await bus.accept(request(n), f"fp-{n}")).is_new
    assert ids(await bus.read("c", 2, 1000)) == ["r-1", "r-2"]
    assert ids(await bus.read("c", 10, 1000)) == ["r-3"]
    # Drained again. Entries on two streams since: the later high one goes first.
    for one in (request(4), request(5, "high")):
        assert (await bus.accept(one, f"fp-{one.request_id}")).is_new
    assert ids(await bus.read("c", 1, 1000)) == ["r-5"]
    assert ids(await bus.read("c", 10, 1000)) == ["r-4"]


async def test_a_woken_take_of_what_a_peer_took_first_waits_for_the_next_entry(
        bus: Bus) -> None:
    """A peer takes the entry that wakes a reader: the reader takes nothing, and its next read
    waits for a new entry rather than waking on the one the peer holds."""
    peer = Bus(bus.client, bus.keys, events_retention=1000, requests_retention=1000)
    assert await bus.read("c", 10, 10) == []
    assert (await bus.accept(request(1), "fp-1")).is_new
    assert ids(await peer.read("p", 10, 10)) == ["r-1"]
    assert await bus.read("c", 10, 1000) == []
    waited = asyncio.get_running_loop().time()
    assert await bus.read("c", 10, 300) == []
    assert asyncio.get_running_loop().time() - waited >= 0.25, "woke on the peer's entry"
    assert (await bus.accept(request(2), "fp-2")).is_new
    assert ids(await bus.read("c", 10, 1000)) == ["r-2"]


async def test_a_high_run_whose_executor_died_is_run_by_a_peer(
        http: httpx.AsyncClient, settings: Settings) -> None:
    """A consumer takes a high entry and dies (it never renews its lease); a real executor
    takes the entry over from the high stream once the lease lapses, and runs it."""
    add = (await upload(http, ADD_WAT))["cid"]
    request_id = await submit(http, add, [40, 2], priority="high")
    keys = Keys(settings.prefix)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        dead = Bus(client, keys, events_retention=1000, requests_retention=1000)
        [(entry, _)] = await dead.read("crashed", 1, 10)
        assert entry.startswith(b"high/")
        async with one_executor(settings, lease_ms=300):
            state = await completed(http, request_id)
        assert state["output"] == 42 and state["priority"] == "high"
        pending = await client.xpending(keys.requests_of("high"), Keys.EXECUTOR_GROUP)
        assert pending["pending"] == 0
        assert await client.hget(keys.deliveries_of("high"), entry.removeprefix(b"high/")) \
            is None  # its count is dropped once it is settled
    finally:
        await client.aclose()


async def test_batch_items_have_their_own_priorities(http: httpx.AsyncClient) -> None:
    add = (await upload(http, ADD_WAT))["cid"]
    response = await http.post("/intent/execute-wasm/batch", headers=ASYNC, json={"items": [
        {"cid": add, "inputs": [1, 1], "priority": "low"},
        {"cid": add, "inputs": [1, 2], "priority": "high"},
        {"cid": add, "inputs": [1, 3]},
        {"cid": add, "inputs": [1, 4], "priority": "urgent"}]})
    assert response.status_code == 202, response.text
    view = (await http.get(response.headers["location"])).json()
    items = view["items"]
    assert items[3]["problem"]["errors"][0]["pointer"] == "/items/3/priority"
    priorities = [(await http.get(f"/executions/{item['request_id']}")).json()["priority"]
                  for item in items[:3]]
    assert priorities == ["low", "high", "normal"]


async def test_a_pipeline_node_waits_at_its_own_priority(
        http: httpx.AsyncClient, settings: Settings) -> None:
    add = (await upload(http, ADD_WAT))["cid"]
    created = await http.post("/pipelines", json={"nodes": [
        {"id": "urgent", "cid": add, "inputs": [1, 2], "priority": "high"},
        {"id": "bulk", "cid": add, "inputs": [3, 4], "priority": "low"},
        {"id": "plain", "cid": add, "inputs": [5, 6]}]})
    assert created.status_code == 202, created.text
    location = f"/pipelines/{created.json()['pipeline_id']}"

    async def all_queued() -> dict[str, Any] | None:
        nodes: dict[str, Any] = (await http.get(location)).json()["nodes"]
        return nodes if all(node["status"] == "queued" for node in nodes.values()) else None

    nodes = await wait_for(all_queued, timeout_s=10)
    priorities = {node: (await http.get(f"/executions/{state['request_id']}")).json()["priority"]
                  for node, state in nodes.items()}
    assert priorities == {"urgent": "high", "bulk": "low", "plain": "normal"}
    keys = Keys(settings.prefix)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        on_high = [decode_requested(fields[b"data"]).request_id
                   for _, fields in await client.xrange(keys.requests_of("high"))]
    finally:
        await client.aclose()
    assert on_high == [nodes["urgent"]["request_id"]]


async def test_an_executor_goes_on_after_a_requests_stream_is_deleted(
        settings: Settings, http: httpx.AsyncClient) -> None:
    """An operator deleting `relay:requests:low` (say, to drop a backlog) takes its consumer
    group with it: the take script answers NOGROUP, the executor makes the group again, and
    work on every level still runs."""
    adder = await upload(http, ADD_WAT)
    assert settings.redis_url is not None
    client = connection.connect(settings.redis_url)
    try:
        async with one_executor(settings):
            first = await submit(http, adder["cid"], [1, 2], priority="low")
            await all_done(http, [first])
            await client.delete(Keys(settings.prefix).requests_of("low"))
            again = [await submit(http, adder["cid"], [2, 3], priority=level)
                     for level in ("low", "normal", "high")]
            await all_done(http, again)
    finally:
        await client.aclose()
