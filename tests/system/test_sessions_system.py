"""Sessions under real processes: gateways and executors as separate `relay` processes on the
test's Redis, over real HTTP. State that outlives the executor process that wrote it, an
executor SIGKILLed mid-call, 50 callers racing on one session through two gateways, a cancelled
call.

Each test asserts what a caller sees (outputs, statuses, `state_cid`) and what a bus consumer
sees (which executor started what, in which order), and waits on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import Processes, wait_for
from tests.relay.gateway.test_sessions import COUNTER_WAT, call, make_session
from tests.system.test_faults import (
    ASYNC,
    TERMINAL,
    BusView,
    assert_one_ending,
    client_for,
    finished,
    running_in_wasm,
    started_by,
)

# COUNTER_WAT's `add` and `calls` (a counter in a global and a call count in memory, neither
# exported), and `work`: adds 1 to the counter `iters` times, a function call each. A run cut
# short has changed the live state part-way (none of which may be committed), and a run's
# output says which state it started from: that state's counter plus `iters`. Its own module,
# not COUNTER_WAT extended, so that what other tests add to COUNTER_WAT cannot clash with it.
WORK_WAT = """(module
  (global $total (mut i64) (i64.const 0))
  (memory 1)
  (func (export "add") (param i64) (result i64)
    (global.set $total (i64.add (global.get $total) (local.get 0)))
    (i64.store (i32.const 0) (i64.add (i64.load (i32.const 0)) (i64.const 1)))
    (global.get $total))
  (func (export "calls") (result i64) (i64.load (i32.const 0)))
  (func $one_more (global.set $total (i64.add (global.get $total) (i64.const 1))))
  (func (export "work") (param $iters i64) (result i64) (local $i i64)
    (block $done (loop $more
      (br_if $done (i64.ge_u (local.get $i) (local.get $iters)))
      (call $one_more)
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $more)))
    (global.get $total)))"""
LONG = {"max_gas": 10**12, "max_time": 120_000}
# A short lease, so a killed executor's call is taken over within about 2 s; a short drain, so
# stopping the processes at the end does not wait for a long call.
EXECUTOR_ENV = {"RELAY_LEASE": "1500", "RELAY_DRAIN_GRACE": "1000"}


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[BusView]:
    assert settings.redis_url is not None
    client = aioredis.Redis.from_url(settings.redis_url)
    yield BusView(client, Keys(settings.prefix))
    await client.aclose()


async def executors(processes: Processes, bus: BusView, count: int,
                    ) -> dict[str, subprocess.Popen[bytes]]:
    """`count` executor processes, by node name, once each has registered."""
    started = [processes.start("executor", **EXECUTOR_ENV) for _ in range(count)]
    return {await bus.node_of(process): process for process in started}


async def ok(http: httpx.AsyncClient, session_id: str, entrypoint: str,
             inputs: list[Any]) -> dict[str, Any]:
    """A sync call that succeeded: its result."""
    response = await call(http, session_id, entrypoint, inputs)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert result["success"] is True, result
    return result


async def call_async(http: httpx.AsyncClient, session_id: str, entrypoint: str,
                     inputs: list[Any], **fields: Any) -> str:
    response = await http.post(f"/sessions/{session_id}/calls", headers=ASYNC,
                               json={"entrypoint": entrypoint, "inputs": inputs, **fields})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


async def status_of(http: httpx.AsyncClient, request_id: str) -> str:
    status: str = (await http.get(f"/executions/{request_id}")).json()["status"]
    return status


async def session_view(http: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await http.get(f"/sessions/{session_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def nodes_that_started(bus: BusView, request_id: str) -> list[str]:
    return [e["executor_node"] for e in await bus.of_type("execution_started", request_id)]


def positions(events: list[dict[str, Any]], *kinds: str) -> dict[str, list[int]]:
    """Request id -> the indices in `events` (the stream, oldest first) of its events of these
    kinds."""
    found: dict[str, list[int]] = {}
    for index, event in enumerate(events):
        if event["type"] in kinds:
            found.setdefault(event["request_id"], []).append(index)
    return found


async def iterations_for(http: httpx.AsyncClient, cid: str, seconds: float) -> int:
    """How many `work` iterations take about `seconds` on this machine's executors (measured
    with a stateless execute of the same module)."""
    probe = 20_000_000
    response = await http.post("/intent/execute-wasm", json={
        "cid": cid, "entrypoint": "work", "inputs": [probe], "policy": LONG})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["success"] is True and result["output"] == probe, result
    return int(probe * seconds * 1000 / max(result["duration"], 1.0))


async def test_state_lives_on_across_executor_processes(processes: Processes,
                                                        bus: BusView) -> None:
    """Calls 1-2 on one executor process, the rest on another started after the first exited
    (so nothing of the state is in its memory): each output is the sum of every input so far,
    and the counter in memory counts every call."""
    async with client_for(processes.gateway()) as http:
        [(first_node, first)] = (await executors(processes, bus, 1)).items()
        sid = (await make_session(http, COUNTER_WAT))["session_id"]
        results = [await ok(http, sid, "add", [value]) for value in (5, 7)]
        first.terminate()
        assert first.wait(15) == 0
        [second_node] = await executors(processes, bus, 1)
        results += [await ok(http, sid, "add", [value]) for value in (30, 100)]
        results.append(await ok(http, sid, "calls", []))
        view = await session_view(http, sid)
    served_by = [await nodes_that_started(bus, r["request_id"]) for r in results]
    assert second_node != first_node
    assert served_by == [[first_node]] * 2 + [[second_node]] * 3
    assert [r["output"] for r in results] == [5, 12, 42, 142, 4]
    states = [r["state_cid"] for r in results]
    assert len(set(states[:4])) == 4, states  # every add changed the state
    assert states[4] == states[3]  # reading it changed nothing: the same content, the same CID
    assert view["status"] == "idle" and view["state_cid"] == states[4]


async def test_executor_killed_mid_call_the_call_reruns_from_the_committed_state(
        processes: Processes, bus: BusView) -> None:
    """SIGKILL the executor running a long call: the session keeps the state from before the
    call; after the lease, another executor runs the call again from that state; the two calls
    queued behind it wait, then run in order."""
    async with client_for(processes.gateway()) as http:
        nodes = await executors(processes, bus, 2)
        session = await make_session(http, WORK_WAT)
        sid = session["session_id"]
        iters = await iterations_for(http, session["cid"], seconds=2.5)
        before = (await ok(http, sid, "add", [5]))["state_cid"]
        work = await call_async(http, sid, "work", [iters], policy=LONG)
        behind = [await call_async(http, sid, "add", [value]) for value in (1, 2)]
        victim = (await started_by(bus, work))["executor_node"]
        await running_in_wasm(bus, work, victim)
        assert [await status_of(http, rid) for rid in behind] == ["queued", "queued"]
        view = await session_view(http, sid)
        assert (view["status"], view["current"], view["state_cid"]) == ("running", work, before)

        nodes[victim].kill()
        nodes[victim].wait(10)
        view = await session_view(http, sid)
        assert (view["current"], view["state_cid"]) == (work, before)
        assert [await status_of(http, rid) for rid in behind] == ["queued", "queued"]

        async def rerun() -> list[str] | None:
            started = await nodes_that_started(bus, work)
            return started if len(started) >= 2 else None

        started = await wait_for(rerun, timeout_s=15)
        done = await finished(http, work, timeout_s=30)
        results = [await finished(http, rid, timeout_s=15) for rid in behind]
        counted = await ok(http, sid, "calls", [])
    assert started == [victim, next(node for node in nodes if node != victim)]
    assert done["status"] == "completed", done
    assert done["output"] == 5 + iters  # from the committed 5, not from where the victim was
    assert done["state_cid"] != before
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert [r["output"] for r in results] == [5 + iters + 1, 5 + iters + 3]
    assert counted["output"] == 3  # adds only; `work` does not count
    events = await bus.events()
    ended = positions(events, *TERMINAL)
    queued_started = positions(events, "execution_started")
    assert len(ended[work]) == 1
    for rid in behind:  # each ran once, after the call ahead of it ended
        assert len(queued_started[rid]) == 1 and len(ended[rid]) == 1
    assert ended[work][0] < queued_started[behind[0]][0] < ended[behind[0]][0] \
        < queued_started[behind[1]][0]
    assert_one_ending(await bus.events(work))


async def test_50_concurrent_calls_through_two_gateways_run_once_each_in_order(
        processes: Processes, bus: BusView) -> None:
    """50 calls at once on one session, half through each of two gateway processes, served by
    two executors: each ran exactly once, one at a time, in the order they were accepted, and
    none lost another's update."""
    gateways = [processes.gateway(), processes.gateway()]
    await executors(processes, bus, 2)
    async with client_for(gateways[0]) as first, client_for(gateways[1]) as second:
        sid = (await make_session(first, COUNTER_WAT))["session_id"]
        responses = await asyncio.gather(*(call((first, second)[i % 2], sid, "add", [1])
                                           for i in range(50)))
        assert [r.status_code for r in responses] == [200] * 50, [r.text for r in responses]
        results = [r.json() for r in responses]
        counted = await ok(second, sid, "calls", [])
        view = await session_view(first, sid)
    assert sorted(r["output"] for r in results) == list(range(1, 51))
    assert counted["output"] == 50
    assert view["state_cid"] == counted["state_cid"] and view["status"] == "idle"
    output_of = {r["request_id"]: r["output"] for r in results}
    assert len(output_of) == 50  # 50 distinct executions: no call was deduplicated
    events = await bus.events()
    accepted = [e["request_id"] for e in events
                if e["type"] == "execution_queued" and e["request_id"] in output_of]
    assert len(accepted) == 50
    # The n-th accepted saw the n-1 before it, so gave n.
    assert [output_of[rid] for rid in accepted] == list(range(1, 51))
    started = positions(events, "execution_started")
    ended = positions(events, *TERMINAL)
    for rid in accepted:
        assert len(started[rid]) == 1 and len(ended[rid]) == 1, rid
    for ahead, behind in itertools.pairwise(accepted):
        assert ended[ahead][0] < started[behind][0]  # one at a time


async def test_cancelled_running_call_leaves_the_state_and_the_next_call_goes_on(
        processes: Processes, bus: BusView) -> None:
    """DELETE /executions/{id} on a session's running call: it ends `cancelled`, commits
    nothing, and the call queued behind it runs from the state before it."""
    async with client_for(processes.gateway()) as http:
        [node] = await executors(processes, bus, 1)
        sid = (await make_session(http, WORK_WAT))["session_id"]
        before = (await ok(http, sid, "add", [5]))["state_cid"]
        work = await call_async(http, sid, "work", [2**62], policy=LONG)  # runs until cancelled
        following = await call_async(http, sid, "add", [1])
        await running_in_wasm(bus, work, node)
        assert await status_of(http, following) == "queued"
        cancelled = await http.delete(f"/executions/{work}")
        assert cancelled.status_code in (200, 202), cancelled.text
        done = await finished(http, work, timeout_s=10)
        after = await finished(http, following, timeout_s=10)
        counted = await ok(http, sid, "calls", [])
        view = await session_view(http, sid)
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled", done
    assert done["state_cid"] == before
    assert after["status"] == "completed" and after["output"] == 6, after
    assert counted["output"] == 2
    assert view["status"] == "idle" and view["state_cid"] == counted["state_cid"]
    assert_one_ending(await bus.events(work))
