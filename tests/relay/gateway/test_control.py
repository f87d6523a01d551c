"""Pause, resume and cancel of running executions; progress and output while they run."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import (
    ALICE_KEY,
    BOB_KEY,
    FIXTURES,
    ROOT,
    Served,
    assert_problem,
    event_entries,
    upload,
    wait_for,
)

FIB_WAT = (ROOT / "relay" / "examples" / "fib.wat").read_text()
# fib(40) runs 0.6 s on a fast machine: long enough for progress (every 250 ms of running) and
# to be paused while it runs. (fib(38) can end within 250 ms.)
FIB_40 = 102_334_155
LOOP_WAT = '(module (func (export "main") (loop br 0)))'
ASYNC = {"Prefer": "respond-async"}
LONG = {"max_gas": 10**11, "max_time": 60_000}


async def events_of(settings: Settings, request_id: str) -> list[dict[str, Any]]:
    events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
    return [e for e in events if e["request_id"] == request_id]


async def start(http: httpx.AsyncClient, wat: str, inputs: list[Any],
                policy: dict[str, int] | None = None) -> str:
    module = await upload(http, wat)
    response = await http.post("/intent/execute-wasm", headers=ASYNC, json={
        "cid": module["cid"], "inputs": inputs, "policy": policy or LONG})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]

    async def running() -> bool:
        state = (await http.get(f"/executions/{request_id}")).json()
        return bool(state["status"] == "running")

    await wait_for(running, timeout_s=10)
    return request_id


async def test_pause_then_resume_gives_the_right_answer(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    request_id = await start(http, FIB_WAT, [40])
    paused = await http.post(f"/executions/{request_id}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    assert (await http.get(f"/executions/{request_id}")).json()["status"] == "paused"
    progress_at_pause = [e for e in await events_of(settings, request_id)
                         if e["type"] == "execution_progress"]
    # Well past several progress intervals: a paused run reports nothing.
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        assert (await http.get(f"/executions/{request_id}")).json()["status"] == "paused"
    still = [e for e in await events_of(settings, request_id)
             if e["type"] == "execution_progress"]
    assert still == progress_at_pause, "progress while paused"
    resumed = await http.post(f"/executions/{request_id}/resume")
    assert resumed.status_code == 200, resumed.text

    async def finished() -> dict[str, Any] | None:
        state: dict[str, Any] = (await http.get(f"/executions/{request_id}")).json()
        return state if state["status"] == "completed" else None

    state = await wait_for(finished, timeout_s=30)
    assert state["output"] == FIB_40
    types = [e["type"] for e in await events_of(settings, request_id)]
    assert types.index("execution_paused") < types.index("execution_resumed")
    assert types[-2:] == ["execution_complete", "wasm_exec_completed"]


async def test_progress_reports_gas_used_that_never_decreases(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    module = await upload(http, FIB_WAT)
    result = await http.post("/intent/execute-wasm", json={
        "cid": module["cid"], "inputs": [40], "policy": LONG})
    assert result.json()["output"] == FIB_40
    progress = [e for e in await events_of(settings, result.json()["request_id"])
                if e["type"] == "execution_progress"]
    assert progress, "a run of several hundred ms reports progress"
    gas = [e["gas_used"] for e in progress]
    assert gas == sorted(gas) and gas[-1] <= result.json()["gas_used"]
    assert all(0 <= e["progress"] <= 100 for e in progress)
    assert progress[-1]["progress"] == round(gas[-1] * 100 / LONG["max_gas"], 2)


async def test_cancel_of_a_running_infinite_loop(http: httpx.AsyncClient, executor: Executor,
                                                settings: Settings) -> None:
    request_id = await start(http, LOOP_WAT, [])
    asked = time.monotonic()
    cancelled = await http.delete(f"/executions/{request_id}")
    assert time.monotonic() - asked < 1.0
    assert cancelled.status_code == 200, cancelled.text
    state = cancelled.json()
    assert state["status"] == "cancelled"
    assert state["error"]["code"] == "cancelled"
    terminal = [e for e in await events_of(settings, request_id)
                if e["type"] in ("execution_complete", "execution_error")]
    assert [e["error"]["code"] for e in terminal] == ["cancelled"]
    assert_problem(await http.delete(f"/executions/{request_id}"), 409, "conflict")


async def test_cancel_while_paused(http: httpx.AsyncClient, executor: Executor) -> None:
    request_id = await start(http, LOOP_WAT, [])
    assert (await http.post(f"/executions/{request_id}/pause")).status_code == 200
    cancelled = await http.delete(f"/executions/{request_id}")
    assert cancelled.json()["status"] == "cancelled"


async def test_cancel_of_a_queued_execution(http: httpx.AsyncClient,
                                            settings: Settings) -> None:
    module = await upload(http, FIB_WAT)
    response = await http.post("/intent/execute-wasm", headers=ASYNC,
                               json={"cid": module["cid"], "inputs": [5]})
    request_id = response.json()["request_id"]
    cancelled = await http.delete(f"/executions/{request_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["error"]["code"] == "cancelled"
    # An executor arriving later finds it settled and does not run it.
    from relay import connection

    client = connection.connect(settings.redis_url or "")
    await Executor(settings, client, read_block_ms=100).run(burst=True)
    await client.aclose()
    types = [e["type"] for e in await events_of(settings, request_id)]
    assert types == ["execution_queued", "execution_error", "wasm_exec_completed"]


async def test_control_in_the_wrong_state_is_409(http: httpx.AsyncClient,
                                                 executor: Executor) -> None:
    module = await upload(http, FIB_WAT)
    done = (await http.post("/intent/execute-wasm", json={"cid": module["cid"],
                                                          "inputs": [3]})).json()
    for action in ("pause", "resume"):
        assert_problem(await http.post(f"/executions/{done['request_id']}/{action}"), 409,
                       "conflict")
    running = await start(http, LOOP_WAT, [])
    assert_problem(await http.post(f"/executions/{running}/resume"), 409, "conflict")
    await http.delete(f"/executions/{running}")


async def test_another_principals_execution_cannot_be_controlled(
        http: httpx.AsyncClient, bob: httpx.AsyncClient, executor: Executor) -> None:
    request_id = await start(http, LOOP_WAT, [])
    for method, path in (("POST", "pause"), ("POST", "resume"), ("DELETE", "")):
        url = f"/executions/{request_id}/{path}".rstrip("/")
        assert_problem(await bob.request(method, url), 404, "not-found")
    assert (await http.get(f"/executions/{request_id}")).json()["status"] == "running"
    await http.delete(f"/executions/{request_id}")


async def test_additional_gas_over_the_ceiling_is_400(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    request_id = await start(http, LOOP_WAT, [])
    assert (await http.post(f"/executions/{request_id}/pause")).status_code == 200
    over = await http.post(f"/executions/{request_id}/resume",
                           json={"additional_gas": settings.max_gas})
    body = assert_problem(over, 400, "invalid-request")
    assert body["errors"][0]["pointer"] == "/additional_gas"
    bad = await http.post(f"/executions/{request_id}/resume", json={"additional_gas": -1})
    assert_problem(bad, 400, "invalid-request")
    assert (await http.get(f"/executions/{request_id}")).json()["status"] == "paused"
    await http.delete(f"/executions/{request_id}")


async def test_wasi_output_streams_while_it_runs(http: httpx.AsyncClient, executor: Executor,
                                                settings: Settings) -> None:
    module = await upload(http, (FIXTURES / "ticker.wasm").read_bytes())
    result = await http.post("/intent/execute-wasm", json={"cid": module["cid"], "inputs": [5],
                                                           "policy": LONG})
    assert result.status_code == 200
    events = await events_of(settings, result.json()["request_id"])
    chunks = [e for e in events if e["type"] == "execution_output"]
    assert chunks and {e["stream"] for e in chunks} == {"stdout"}
    assert "".join(e["data"] for e in chunks).splitlines() == [
        "step 1", "step 2", "step 3", "step 4", "step 5", "done"]
    last_chunk = max(i for i, e in enumerate(events) if e["type"] == "execution_output")
    terminal = next(i for i, e in enumerate(events) if e["type"] == "execution_complete")
    assert last_chunk < terminal


async def test_websocket_control(served: Served, executor: Executor) -> None:
    async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=30) as http:
        request_id = await start(http, LOOP_WAT, [])
        url = served.url.replace("http", "ws", 1) + f"/ws/executions/{request_id}"
        async with ws_connect(url, additional_headers={"X-API-Key": ALICE_KEY}) as ws:
            await ws.send(json.dumps({"action": "resume"}))  # not paused: refused
            await ws.send(json.dumps({"action": "pause"}))
            seen: list[dict[str, Any]] = []
            async for message in ws:
                event = json.loads(message)
                seen.append(event)
                if event["type"] == "execution_paused":
                    await ws.send(json.dumps({"action": "cancel"}))
    types = [e["type"] for e in seen]
    assert "control_error" in types
    assert next(e for e in seen if e["type"] == "control_error")["status"] == 409
    assert types.index("execution_paused") < types.index("execution_error")
    assert seen[-1]["type"] == "execution_error"
    assert seen[-1]["error"]["code"] == "cancelled"


async def test_bob_cannot_control_over_websocket(served: Served, executor: Executor) -> None:
    async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=30) as http:
        request_id = await start(http, LOOP_WAT, [])
        url = served.url.replace("http", "ws", 1) + f"/ws/executions/{request_id}"
        async with ws_connect(url, additional_headers={"X-API-Key": BOB_KEY}) as ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"action": "cancel"}))
                await ws.recv()
        assert ws.close_code == 4404
        assert (await http.get(f"/executions/{request_id}")).json()["status"] == "running"
        await http.delete(f"/executions/{request_id}")


async def test_a_pause_over_the_executors_paused_cap_is_refused_over_websocket(
        served: Served, executor: Executor) -> None:
    """The executor runs 2 at once, so it holds 1 paused: a second pause is `control_error`
    409, and the refusal (an answer for the gateway) is never sent to a client as an event."""
    async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=30) as http:
        held = await start(http, LOOP_WAT, [])
        assert (await http.post(f"/executions/{held}/pause")).status_code == 200
        module = await upload(http, LOOP_WAT)
        response = await http.post("/intent/execute-wasm", headers=ASYNC, json={
            "cid": module["cid"], "policy": LONG, "idempotency_key": "second"})
        second = response.json()["request_id"]
        await wait_for(lambda: _running(http, second))
        url = served.url.replace("http", "ws", 1) + f"/ws/executions/{second}"
        seen: list[dict[str, Any]] = []
        async with ws_connect(url, additional_headers={"X-API-Key": ALICE_KEY}) as ws:
            await ws.send(json.dumps({"action": "pause"}))
            async for message in ws:
                event = json.loads(message)
                seen.append(event)
                if event["type"] == "control_error":
                    await ws.send(json.dumps({"action": "cancel"}))
        assert_problem(await http.post(f"/executions/{held}/pause"), 409, "conflict")
        await http.delete(f"/executions/{held}")
    types = [e["type"] for e in seen]
    refusal = next(e for e in seen if e["type"] == "control_error")
    assert refusal["status"] == 409 and "paused" in refusal["detail"]
    assert "execution_paused" not in types and "control_refused" not in types
    assert seen[-1]["type"] == "execution_error" and seen[-1]["error"]["code"] == "cancelled"


async def _running(http: httpx.AsyncClient, request_id: str) -> bool:
    state = (await http.get(f"/executions/{request_id}")).json()
    return bool(state["status"] == "running")
