"""Sessions over HTTP, with a real executor: state that lives between calls, in order,
committed only by calls that succeed; budgets; closing; isolation."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
from typing import Any

import httpx
import pytest
import redis.asyncio as redis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    Served,
    assert_problem,
    running,
    upload,
    wait_for,
)
from tests.relay.gateway.test_events import EVENTS, client, sse_messages

# A counter kept both in a global the module does not export and in its memory, which it does
# not export either: both are state.
COUNTER_WAT = """(module
  (global $n (mut i64) (i64.const 0))
  (memory 1)
  (func (export "add") (param i64) (result i64)
    (global.set $n (i64.add (global.get $n) (local.get 0)))
    (i64.store (i32.const 0) (i64.add (i64.load (i32.const 0)) (i64.const 1)))
    (global.get $n))
  (func (export "calls") (result i64) (i64.load (i32.const 0)))
  (func (export "boom") (param i64)
    (global.set $n (local.get 0))
    (i64.store (i32.const 0) (i64.const 777))
    unreachable)
  (func $bump (result i64) (global.set $n (i64.add (global.get $n) (i64.const 1)))
    (global.get $n))
  (func (export "work") (param i64) (result i64) (local $i i64)
    (loop (drop (call $bump))
          (local.set $i (i64.add (local.get $i) (i64.const 1)))
          (br_if 0 (i64.lt_u (local.get $i) (local.get 0))))
    (global.get $n))
  (func (export "spin") (param i64) (local $i i64)
    (global.set $n (i64.const -1))
    (loop (local.set $i (i64.add (local.get $i) (i64.const 1)))
          (br_if 0 (i64.lt_u (local.get $i) (local.get 0))))))"""

TABLE_WAT = """(module (table 2 funcref)
  (func (export "main") (table.set 0 (i32.const 0) (ref.null func))))"""


async def make_session(http: httpx.AsyncClient, wat: str = COUNTER_WAT,
                       **fields: Any) -> dict[str, Any]:
    module = await upload(http, wat)
    response = await http.post("/sessions", json={"cid": module["cid"], **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/sessions/{body['session_id']}"
    return body


async def completed(http: httpx.AsyncClient, request_id: str,
                    timeout_s: float = 10.0) -> dict[str, Any]:
    """The execution once it has completed (fails after `timeout_s`)."""
    async def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = (await http.get(f"/executions/{request_id}")).json()
        return body if body["status"] == "completed" else None

    result: dict[str, Any] = await wait_for(finished, timeout_s)
    return result


async def call(http: httpx.AsyncClient, session_id: str, entrypoint: str,
               inputs: list[Any], **fields: Any) -> httpx.Response:
    return await http.post(f"/sessions/{session_id}/calls",
                           json={"entrypoint": entrypoint, "inputs": inputs, **fields})


async def test_state_lives_on_between_calls(http: httpx.AsyncClient,
                                            executor: Executor) -> None:
    session = await make_session(http)
    assert session["status"] == "idle" and session["state_cid"] is None
    totals = []
    for value in (5, 7, 30):
        response = await call(http, session["session_id"], "add", [value])
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["success"] is True
        assert result["session_id"] == session["session_id"]
        assert result["state_cid"].startswith("b")
        totals.append(result["output"])
    assert totals == [5, 12, 42]
    calls = (await call(http, session["session_id"], "calls", [])).json()
    assert calls["output"] == 3
    state = (await http.get(f"/sessions/{session['session_id']}")).json()
    assert state["status"] == "idle"
    assert state["calls"] == 4
    assert state["state_cid"] == calls["state_cid"]
    assert state["state_size"] == 65536
    assert state["last_result"]["output"] == 3
    assert state["gas_used"] > 0
    alias = (await http.get(f"/sessions/{session['session_id']}/state")).json()
    assert alias["state_cid"] == state["state_cid"]


async def test_a_failed_call_commits_nothing(http: httpx.AsyncClient,
                                             executor: Executor) -> None:
    session = await make_session(http)
    sid = session["session_id"]
    first = (await call(http, sid, "add", [10])).json()
    failed = (await call(http, sid, "boom", [123])).json()
    assert failed["success"] is False and failed["error"]["code"] == "trap"
    assert failed["state_cid"] == first["state_cid"]
    out_of_gas = (await call(http, sid, "spin", [10**9], policy={"max_gas": 10_000})).json()
    assert out_of_gas["error"]["code"] == "out_of_gas"
    state = (await http.get(f"/sessions/{sid}")).json()
    assert state["state_cid"] == first["state_cid"]
    assert (await call(http, sid, "add", [1])).json()["output"] == 11
    assert (await call(http, sid, "calls", [])).json()["output"] == 2


# A count kept in a global, and a recursion as deep as asked (about 48 bytes of stack a level).
DEEP_COUNTER_WAT = """(module (global $n (mut i32) (i32.const 0))
  (func (export "bump") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1))) (global.get $n))
  (func $down (export "down") (param i32) (result i32)
    local.get 0 i32.eqz if (result i32) global.get $n else
    local.get 0 i32.const 1 i32.sub call $down end))"""


async def test_each_call_runs_with_its_own_max_stack(http: httpx.AsyncClient,
                                                    executor: Executor) -> None:
    sid = (await make_session(http, DEEP_COUNTER_WAT))["session_id"]
    assert (await call(http, sid, "bump", [])).json()["output"] == 1
    # The executor keeps the session's instance from that call, on the default stack: this
    # call, with less, runs in another, its state restored.
    small = (await call(http, sid, "down", [2000], policy={"max_stack": 16384})).json()
    assert small["error"]["code"] == "stack_overflow"
    assert (await call(http, sid, "down", [2000])).json()["output"] == 1
    assert (await call(http, sid, "bump", [], policy={"max_stack": 16384})).json()["output"] == 2
    assert (await call(http, sid, "down", [100], policy={"max_stack": 16384})).json()[
        "output"] == 2

async def test_calls_run_one_at_a_time_in_order(http: httpx.AsyncClient,
                                                executor: Executor) -> None:
    session = await make_session(http)
    sid = session["session_id"]
    responses = await asyncio.gather(*(call(http, sid, "add", [1]) for _ in range(20)))
    outputs = sorted(response.json()["output"] for response in responses)
    assert outputs == list(range(1, 21))  # no lost update: each saw the one before
    assert (await call(http, sid, "calls", [])).json()["output"] == 20


async def test_async_call_and_its_events_carry_the_session(http: httpx.AsyncClient,
                                                           executor: Executor) -> None:
    session = await make_session(http)
    sid = session["session_id"]
    response = await call(http, sid, "add", [2], idempotency_key="k1")
    assert response.status_code == 200
    again = await call(http, sid, "add", [2], idempotency_key="k1")
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["output"] == 2
    plain = await http.post(f"/sessions/{sid}/calls", json={"entrypoint": "add", "inputs": [2]},
                            headers={"Prefer": "respond-async"})
    assert plain.status_code == 202
    rid = plain.json()["request_id"]

    done = await completed(http, rid)
    assert done["output"] == 4 and done["session_id"] == sid


async def test_budget_is_cumulative_and_can_be_raised(http: httpx.AsyncClient,
                                                      executor: Executor) -> None:
    session = await make_session(http, budget={"max_calls": 2})
    sid = session["session_id"]
    assert (await call(http, sid, "add", [1])).status_code == 200
    assert (await call(http, sid, "add", [1])).status_code == 200
    assert_problem(await call(http, sid, "add", [1]), 409, "session-exhausted")
    assert (await http.get(f"/sessions/{sid}")).json()["status"] == "exhausted"
    patched = await http.patch(f"/sessions/{sid}", json={"budget": {"max_calls": 3}})
    assert patched.status_code == 200, patched.text
    assert (await call(http, sid, "add", [1])).json()["output"] == 3


async def test_gas_budget_lowers_omitted_limits_and_refuses_explicit_ones(
        http: httpx.AsyncClient, executor: Executor) -> None:
    session = await make_session(http, budget={"max_gas": 50_000})
    sid = session["session_id"]
    assert_problem(await call(http, sid, "add", [1], policy={"max_gas": 60_000}), 409,
                   "session-exhausted")
    spun = (await call(http, sid, "spin", [10**9])).json()
    assert spun["error"]["code"] == "out_of_gas"
    assert spun["gas_used"] <= 50_000
    state = (await http.get(f"/sessions/{sid}")).json()
    assert state["gas_used"] == spun["gas_used"]
    assert state["status"] == "exhausted"


async def test_closed_session_refuses_calls(http: httpx.AsyncClient,
                                            executor: Executor) -> None:
    session = await make_session(http)
    sid = session["session_id"]
    closed = await http.delete(f"/sessions/{sid}")
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    assert_problem(await call(http, sid, "add", [1]), 409, "session-closed")


async def test_modules_a_session_cannot_hold_are_refused(http: httpx.AsyncClient) -> None:
    module = await upload(http, TABLE_WAT)
    body = assert_problem(await http.post("/sessions", json={"cid": module["cid"]}), 400,
                          "invalid-request")
    assert body["errors"][0]["pointer"] == "/cid"
    assert "table" in body["detail"]


async def test_bad_bodies_are_refused(http: httpx.AsyncClient) -> None:
    module = await upload(http, ADD_WAT)
    assert_problem(await http.post("/sessions", json={"cid": module["cid"], "ttl": 0}), 400,
                   "invalid-request")
    assert_problem(await http.post("/sessions", json={"cid": module["cid"], "x": 1}), 400,
                   "invalid-request")
    assert_problem(await http.post("/sessions", json={"cid": "bafkreinope"}), 400,
                   "invalid-request")
    session = await make_session(http)
    assert_problem(await call(http, session["session_id"], "nope", []), 400, "invalid-request")
    assert_problem(await call(http, session["session_id"], "add", ["x"]), 400,
                   "invalid-request")


async def test_a_ttl_over_a_year_is_refused_and_writes_nothing(http: httpx.AsyncClient) -> None:
    """Found by the API fuzz test: a ttl of 7.5e25 ms was 500, and wrote a session whose expiry
    (a float in Redis) could not be read back, so every `GET /sessions` of its owner was 500."""
    module = await upload(http, COUNTER_WAT)
    year = 366 * 86_400_000
    for ttl in (year + 1, 75100387956961898678714368):
        body = assert_problem(await http.post("/sessions", json={"cid": module["cid"],
                                                                 "ttl": ttl}),
                              400, "invalid-request")
        assert body["errors"][0]["pointer"] == "/ttl", body
    listed = await http.get("/sessions")
    assert listed.status_code == 200 and listed.json()["items"] == [], listed.text
    longest = await make_session(http, ttl=year)
    expires = datetime.datetime.fromisoformat(longest["expires_at"].replace("Z", "+00:00"))
    created = datetime.datetime.fromisoformat(longest["created_at"].replace("Z", "+00:00"))
    assert abs((expires - created).total_seconds() - year / 1000) < 5
    listed = await http.get("/sessions")
    assert [item["session_id"] for item in listed.json()["items"]] == [longest["session_id"]]


async def test_another_principal_sees_nothing(http: httpx.AsyncClient, bob: httpx.AsyncClient,
                                              executor: Executor) -> None:
    session = await make_session(http)
    sid = session["session_id"]
    for response in (await bob.get(f"/sessions/{sid}"),
                     await bob.get(f"/sessions/{sid}/state"),
                     await call(bob, sid, "add", [1]),
                     await bob.patch(f"/sessions/{sid}", json={"budget": {}}),
                     await bob.delete(f"/sessions/{sid}"),
                     await bob.post(f"/sessions/{sid}/pause")):
        assert_problem(response, 404, "not-found")
    assert (await bob.get("/sessions")).json() == {"items": [], "next_cursor": None}
    listed = (await http.get("/sessions")).json()
    assert [item["session_id"] for item in listed["items"]] == [sid]


async def test_events_filtered_by_session_replay_then_live(served: Served,
                                                           executor: Executor) -> None:
    async with client(served) as http:
        session = await make_session(http)
        sid = session["session_id"]
        first = (await call(http, sid, "add", [1])).json()["request_id"]
        other = await upload(http, ADD_WAT)
        assert (await http.post("/intent/execute-wasm",
                                json={"cid": other["cid"], "inputs": [1, 2]})).status_code == 200
        events: list[dict[str, Any]] = []
        second: asyncio.Task[httpx.Response] | None = None
        async with http.stream("GET", EVENTS, params={"session_id": sid,
                                                      "last_event_id": "0"}) as stream:
            async with asyncio.timeout(15):
                async for message in sse_messages(stream):
                    if message.data is None:
                        continue
                    events.append(message.json)
                    if message.json["type"] != "execution_complete":
                        continue
                    if second is not None:
                        break
                    second = asyncio.create_task(call(http, sid, "add", [1]))  # live
        assert second is not None
        second_id = (await second).json()["request_id"]
        ids = [event["request_id"] for event in events]
        assert set(ids) == {first, second_id}  # nothing of the execute outside the session
        assert ids == sorted(ids, key=lambda rid: rid == second_id)  # the replay, then live
        assert all(event["session_id"] == sid for event in events)
        types = [event["type"] for event in events]
        assert types[0] == "execution_queued" and types[-1] == "execution_complete"
        assert types.count("execution_complete") == 2
        async with client(served, BOB_KEY) as bob:
            assert_problem(await bob.get(EVENTS, params={"session_id": sid}), 404, "not-found")


async def test_an_idle_session_expires_with_what_it_held(app: Any, http: httpx.AsyncClient,
                                                         settings: Settings,
                                                         executor: Executor) -> None:
    session = await make_session(http, ttl=300)
    sid = session["session_id"]
    assert (await call(http, sid, "add", [3])).status_code == 200
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        held = [key async for key in client.scan_iter(f"{settings.prefix}:state:*")]
        assert len(held) == 1
        sessions = app.state.gateway.sessions
        assert await sessions.sweep() == 0  # not idle long enough yet
        await wait_for(sessions.sweep, timeout_s=5)
        assert_problem(await http.get(f"/sessions/{sid}"), 404, "not-found")
        assert (await http.get("/sessions")).json()["items"] == []
        left = [key async for key in client.scan_iter(f"{settings.prefix}:*")
                if b":state:" in key or b":page" in key or b":session" in key]
        assert left == []
    finally:
        await client.aclose()


async def test_step_pause_and_resume_the_current_call(http: httpx.AsyncClient,
                                                      executor: Executor) -> None:
    session = await make_session(http)
    sid = session["session_id"]
    assert_problem(await http.post(f"/sessions/{sid}/step"), 409, "conflict")  # no call
    accepted = await http.post(f"/sessions/{sid}/calls", headers={"Prefer": "respond-async"},
                               json={"entrypoint": "work", "inputs": [3_000_000],
                                     "step_gas": 1_000_000})
    rid = accepted.json()["request_id"]

    async def paused() -> bool:
        view = (await http.get(f"/sessions/{sid}")).json()
        return bool(view["status"] == "paused" and view["current"] == rid)

    await wait_for(paused)
    stepped = await http.post(f"/sessions/{sid}/step", json={"gas": 1_000_000})
    assert stepped.status_code == 200, stepped.text
    assert stepped.json()["status"] in ("paused", "completed")
    if stepped.json()["status"] == "paused":
        resumed = await http.post(f"/sessions/{sid}/resume")
        assert resumed.status_code in (200, 202)

    assert (await completed(http, rid))["output"] == 3_000_000
    after = (await call(http, sid, "add", [0])).json()
    assert after["output"] == 3_000_000, after


async def test_websocket_streams_a_sessions_calls_and_steers_the_current_one(
        served: Served, executor: Executor) -> None:
    async with client(served) as http:
        session = await make_session(http)
        sid = session["session_id"]
        first = (await call(http, sid, "add", [1])).json()["request_id"]
        url = served.url.replace("http", "ws", 1) + f"/ws/sessions/{sid}"
        async with ws_connect(url, additional_headers={"X-API-Key": ALICE_KEY}) as ws:
            replayed = await asyncio.wait_for(until_terminal(ws), 10)
            assert {event["request_id"] for event in replayed} == {first}
            assert replayed[-1]["type"] == "execution_complete"
            await ws.send(json.dumps({"action": "pause"}))  # nothing runs: refused, not closed
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert refusal["type"] == "control_error" and refusal["status"] == 409
            long = await http.post(f"/sessions/{sid}/calls", headers={"Prefer": "respond-async"},
                                   json={"entrypoint": "work", "inputs": [50_000_000]})
            await ws.send(json.dumps({"action": "cancel"}))
            live = await asyncio.wait_for(until_terminal(ws), 10)
        rid = long.json()["request_id"]
        assert live[-1] == {**live[-1], "type": "execution_error", "request_id": rid}
        assert live[-1]["error"]["code"] == "cancelled"
        assert all(event["session_id"] == sid for event in replayed + live)
        async with ws_connect(url, additional_headers={"X-API-Key": BOB_KEY}) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def until_terminal(ws: Any) -> list[dict[str, Any]]:
    """A WebSocket's events up to the next terminal one."""
    seen = []
    while True:
        event = json.loads(await ws.recv())
        seen.append(event)
        if event["type"] in ("execution_complete", "execution_error"):
            return seen


async def test_calls_alternating_between_executors_never_run_on_a_stale_instance(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    """Each executor keeps a session's instance after a successful call (no restore for the
    next); when a peer ran calls meanwhile, the instance it kept is stale and must not be used."""
    async with running(settings, "test-peer") as peer:
        session = await make_session(http)
        sid = session["session_id"]
        ran_on: list[str] = []
        expected = 0
        # Which executor takes a call is the bus's choice: call until the calls have moved
        # from one to the other and back a few times (under load one may take many in a row).
        while sum(1 for a, b in itertools.pairwise(ran_on) if a != b) < 4:
            assert expected < 300, f"the calls never moved between executors: {ran_on}"
            expected += 1
            result = (await call(http, sid, "add", [1])).json()
            assert result["output"] == expected
            # Whoever ran it keeps the instance in the state it committed.
            ran_on.append("peer" if peer.sessions.holds(sid, result["state_cid"])
                          else "executor")
        assert (await call(http, sid, "calls", [])).json()["output"] == expected
