"""Memoized results: `"memoize": true` answered from a stored successful run, without running."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec

from executor.worker import Executor
from relay.gateway.app import create_app
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    FIXTURES,
    assert_problem,
    client_for,
    event_entries,
    running,
    upload,
    wait_for,
    with_settings,
)

# Counts to n through a call per step: a gas use that grows with n.
COUNT_WAT = """(module
  (func $next (param i32) (result i32) local.get 0 i32.const 1 i32.add)
  (func (export "main") (param $n i32) (result i32) (local $i i32)
    (loop $again
      local.get $i call $next local.set $i
      local.get $i local.get $n i32.lt_s br_if $again)
    local.get $i))"""
TRIPLE_WAT = """(module (func (export "main") (param i64) (result i64 i64 i64)
  local.get 0 local.get 0 local.get 0))"""
TRAP_WAT = '(module (func (export "main") (param i32) (result i32) unreachable))'
# Imports randomness and a clock (never memoized), though `main` calls neither.
RANDOM_WAT = """(module
  (import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func (param i32 i64 i32) (result i32)))
  (func (export "main") (param i32) (result i32) local.get 0))"""


async def execute(client: httpx.AsyncClient, cid: str, inputs: list[Any], *,
                  key: str | None = None, **fields: Any) -> httpx.Response:
    body = {"cid": cid, "inputs": inputs, "memoize": True, **fields}
    if key is not None:
        body["idempotency_key"] = key
    response = await client.post("/intent/execute-wasm", json=body)
    assert response.status_code == 200, response.text
    return response


async def events_of(settings: Settings, request_id: str) -> list[dict[str, Any]]:
    """The client events of one execution on the bus, oldest first."""
    found = []
    for _, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        if event.get("request_id") == request_id and event["type"] != "wasm_exec_completed":
            found.append(event)
    return found


async def runs(settings: Settings) -> int:
    """How many runs an executor started (every `execution_started` on the bus)."""
    return sum(1 for _, fields in await event_entries(settings)
               if json.loads(fields[b"data"])["type"] == "execution_started")


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def test_a_second_memoized_request_is_answered_without_running(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    first = (await execute(http, cid, [2, 3], key="one")).json()
    assert first["success"] is True and first["output"] == 5
    assert first["cached"] is False and "memo_of" not in first
    assert await runs(settings) == 1

    second = await execute(http, cid, [2, 3], key="two")
    assert "idempotent-replayed" not in second.headers
    hit = second.json()
    assert hit["request_id"] != first["request_id"]
    assert hit == {**first, "request_id": hit["request_id"], "cached": True,
                   "memo_of": first["request_id"]}
    assert await runs(settings) == 1  # no executor ran it

    # An execution like any other: finished, cached, with its own events.
    state = (await http.get(f"/executions/{hit['request_id']}")).json()
    assert state["status"] == "completed" and state["cached"] is True
    assert state["output"] == 5 and state["gas_used"] == first["gas_used"]
    events = await events_of(settings, hit["request_id"])
    assert [event["type"] for event in events] == ["execution_queued", "execution_complete"]
    assert events[1]["cached"] is True and events[1]["output"] == 5
    assert events[1]["gas_used"] == first["gas_used"]

    # Other inputs are another computation.
    other = (await execute(http, cid, [2, 4], key="three")).json()
    assert other["output"] == 6 and other["cached"] is False
    assert await runs(settings) == 2


async def test_a_hit_is_answered_with_no_executor_at_all(http: httpx.AsyncClient,
                                                         settings: Settings) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    async with running(settings, "memo-executor"):
        first = (await execute(http, cid, [20, 22], key="a")).json()
    hit = (await execute(http, cid, [20, 22], key="b")).json()
    assert hit["output"] == 42 and hit["cached"] is True
    assert hit["memo_of"] == first["request_id"]
    # A request that misses just waits queued: nothing runs it.
    missed = await http.post("/intent/execute-wasm", json={
        "cid": cid, "inputs": [1, 1], "memoize": True}, headers={"Prefer": "respond-async"})
    assert missed.status_code == 202


async def test_a_policy_too_small_for_the_producing_run_runs_again(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    cid = (await upload(http, COUNT_WAT))["cid"]
    first = (await execute(http, cid, [1000], key="one")).json()
    gas = first["gas_used"]
    assert first["output"] == 1000 and gas > 1000

    # Less gas than the producing run used: it runs (and runs out).
    starved = (await execute(http, cid, [1000], key="two", policy={"max_gas": gas // 2})).json()
    assert starved["success"] is False and starved["error"]["code"] == "out_of_gas"
    assert starved["cached"] is False
    assert await runs(settings) == 2
    # Exactly its gas fits.
    fits = (await execute(http, cid, [1000], key="three", policy={"max_gas": gas})).json()
    assert fits["cached"] is True and fits["memo_of"] == first["request_id"]
    assert fits["gas_used"] == gas

    # The memory recorded is the producing run's max_memory (the default): a request allowing
    # less runs again, and its run, recorded with its smaller max_memory, answers the next.
    small = {"max_memory": 1_048_576}
    less = (await execute(http, cid, [1000], key="four", policy=small)).json()
    assert less["cached"] is False and less["output"] == 1000
    assert await runs(settings) == 3
    again = (await execute(http, cid, [1000], key="five", policy=small)).json()
    assert again["cached"] is True and again["memo_of"] == less["request_id"]
    assert await runs(settings) == 3


async def test_a_producing_run_with_more_stack_than_asked_for_runs_again(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    first = (await execute(http, cid, [1, 2], key="one", policy={"max_stack": 65536})).json()
    assert first["cached"] is False
    # Its max_stack, 65536, is within the default's: a hit.
    more = (await execute(http, cid, [1, 2], key="two")).json()
    assert more["cached"] is True and more["memo_of"] == first["request_id"]
    # Less stack than the producing run had: it runs, and its run answers the next ones.
    less = (await execute(http, cid, [1, 2], key="three", policy={"max_stack": 32768})).json()
    assert less["cached"] is False and less["output"] == 3
    again = (await execute(http, cid, [1, 2], key="four", policy={"max_stack": 32768})).json()
    assert again["cached"] is True and again["memo_of"] == less["request_id"]
    assert await runs(settings) == 2

async def test_failures_are_never_memoized(http: httpx.AsyncClient, executor: Executor,
                                           settings: Settings) -> None:
    cid = (await upload(http, TRAP_WAT))["cid"]
    for key in ("one", "two"):
        result = (await execute(http, cid, [1], key=key)).json()
        assert result["success"] is False and result["error"]["code"] == "trap"
        assert result["cached"] is False
    assert await runs(settings) == 2


async def test_a_module_importing_randomness_or_a_clock_is_never_memoized(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    module = await upload(http, RANDOM_WAT)
    for key in ("one", "two"):
        result = (await execute(http, module["cid"], [7], key=key)).json()
        assert result["success"] is True and result["output"] == 7
        assert result["cached"] is False and "memo_of" not in result
    assert await runs(settings) == 2


async def test_a_wasi_command_is_memoized(http: httpx.AsyncClient, executor: Executor,
                                          settings: Settings) -> None:
    cid = (await upload(http, (FIXTURES / "json_sum.wasm").read_bytes()))["cid"]
    first = (await execute(http, cid, [1, 2, 39], key="one")).json()
    assert first["output"] == {"sum": 42, "count": 3} and first["cached"] is False
    hit = (await execute(http, cid, [1, 2, 39], key="two")).json()
    assert hit["output"] == {"sum": 42, "count": 3} and hit["cached"] is True
    assert await runs(settings) == 1


async def test_a_request_without_memoize_is_unchanged(http: httpx.AsyncClient,
                                                      executor: Executor,
                                                      settings: Settings) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    await execute(http, cid, [2, 3], key="memo")
    plain = await http.post("/intent/execute-wasm", json={"cid": cid, "inputs": [2, 3]})
    assert plain.status_code == 200
    assert set(plain.json()) == {"success", "request_id", "cid", "output", "gas_used",
                                 "duration", "executed_at", "error"}
    assert await runs(settings) == 2


async def test_scope_is_the_principal_unless_global(settings: Settings,
                                                    executor: Executor) -> None:
    async with gateway(settings) as app, client_for(app, ALICE_KEY) as alice, \
            client_for(app, BOB_KEY) as bob:
        cid = (await upload(alice, ADD_WAT))["cid"]
        mine = (await execute(alice, cid, [4, 5], key="k")).json()
        theirs = (await execute(bob, cid, [4, 5], key="k")).json()
        assert theirs["cached"] is False  # bob does not see alice's result
        assert await runs(settings) == 2

    shared = with_settings(settings, memo_scope="global")
    async with gateway(shared) as app, client_for(app, ALICE_KEY) as alice, \
            client_for(app, BOB_KEY) as bob:
        first = (await execute(alice, cid, [6, 7], key="k3")).json()
        hit = (await execute(bob, cid, [6, 7], key="k3")).json()
        assert hit["cached"] is True and hit["output"] == 13
        assert "memo_of" not in hit  # another's request id is not told
        assert hit["gas_used"] == first["gas_used"]
        assert await runs(settings) == 3
        # The principal scope's results are not the global scope's.
        again = (await execute(alice, cid, [4, 5], key="k4")).json()
        assert again["cached"] is False and mine["cached"] is False


async def test_a_memoized_result_expires(settings: Settings, executor: Executor) -> None:
    short = with_settings(settings, memo_ttl_ms=1000)
    async with gateway(short) as app, client_for(app, ALICE_KEY) as alice:
        cid = (await upload(alice, ADD_WAT))["cid"]
        await execute(alice, cid, [1, 1], key="one")
        assert (await execute(alice, cid, [1, 1], key="two")).json()["cached"] is True
        await asyncio.sleep(1.3)
        # Gone, though this gateway still holds what it read of it: it runs again...
        third = (await execute(alice, cid, [1, 1], key="three")).json()
        assert third["cached"] is False
        assert await runs(settings) == 2
        # ...and its run is the new entry, which this gateway reads afresh.
        fourth = (await execute(alice, cid, [1, 1], key="four")).json()
        assert fourth["cached"] is True and fourth["memo_of"] == third["request_id"]


async def test_idempotency_comes_first(http: httpx.AsyncClient, executor: Executor,
                                       settings: Settings) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    first = await execute(http, cid, [3, 3], key="one")
    hit = await execute(http, cid, [3, 3], key="two")
    assert hit.json()["cached"] is True
    # The same key again replays what that key got, byte for byte.
    for original, key in ((first, "one"), (hit, "two")):
        replay = await execute(http, cid, [3, 3], key=key)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == original.content
    # So does the same body without a key (its automatic key is the request itself).
    plain = await execute(http, cid, [3, 3])
    assert plain.json()["cached"] is True and "idempotent-replayed" not in plain.headers
    again = await execute(http, cid, [3, 3])
    assert again.headers["idempotent-replayed"] == "true" and again.content == plain.content
    assert await runs(settings) == 1
    # A reused explicit key with another request is still 422.
    reused = await http.post("/intent/execute-wasm", json={
        "cid": cid, "inputs": [3, 4], "memoize": True, "idempotency_key": "two"})
    assert_problem(reused, 422, "idempotency-key-reuse")
    # `memoize` is part of the request: the same body without it is another execution.
    assert msgspec.json.decode(plain.content)["request_id"] != (await http.post(
        "/intent/execute-wasm", json={"cid": cid, "inputs": [3, 3]})).json()["request_id"]


async def test_a_hit_costs_no_budget(http: httpx.AsyncClient, executor: Executor,
                                     settings: Settings) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    budget = await http.post("/budgets", json={"max_executions": 1})
    assert budget.status_code == 201, budget.text
    budget_id = budget.json()["budget_id"]
    first = (await execute(http, cid, [8, 8], key="one")).json()
    assert first["success"] is True

    # The budget is used up: a new run is refused, a hit is not.
    refused = await http.post("/intent/execute-wasm", json={"cid": cid, "inputs": [8, 9]})
    assert_problem(refused, 429, "budget-exhausted")
    hit = (await execute(http, cid, [8, 8], key="two")).json()
    assert hit["cached"] is True

    async def settled() -> dict[str, Any]:
        usage: dict[str, Any] = (await http.get(f"/budgets/{budget_id}/usage")).json()
        return usage if usage["reserved"]["gas"] == 0 else {}

    usage = await wait_for(settled)
    assert usage["executions"] == 1 and usage["gas_used"] == first["gas_used"]


async def test_a_hit_of_a_large_output_names_its_blob_everywhere(settings: Settings) -> None:
    blobs = with_settings(settings, inline_output_bytes=16)  # three i64s of 2^62 are over it
    async with gateway(blobs) as app, client_for(app, ALICE_KEY) as alice, \
            running(blobs, "memo-executor"):
        cid = (await upload(alice, TRIPLE_WAT))["cid"]
        first = (await execute(alice, cid, [2**62], key="one")).json()
        ref = first["output_ref"]
        assert first["output"] is None and first["cached"] is False
        hit = (await execute(alice, cid, [2**62], key="two")).json()
        assert hit["cached"] is True and hit["output_ref"] == ref
        output = await alice.get(f"/executions/{hit['request_id']}/output")
        assert output.json() == [2**62] * 3
        events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
        ends = [event for event in events if event.get("request_id") == hit["request_id"]
                and event["type"] in ("execution_complete", "wasm_exec_completed")]
        assert [event["output_ref"] for event in ends] == [ref, ref]
        assert all(event["cached"] is True for event in ends)
