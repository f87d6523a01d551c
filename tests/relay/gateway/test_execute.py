"""Executions through the real gateway, Redis and executor: outputs, limits, traps, WASI."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import redis

from executor.worker import Executor
from relay import connection
from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    FIXTURES,
    assert_problem,
    serve,
    upload,
    wait_for,
    with_settings,
)

LOOP_WAT = '(module (func (export "main") (loop br 0)))'
RECURSE_WAT = '(module (func $f (export "main") (result i32) call $f))'
DIV_WAT = """(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.div_s))"""
GROW_WAT = """(module (memory (export "memory") 1)
  (func (export "main") (loop
    (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
    br 0)))"""
BIG_MEMORY_WAT = '(module (memory (export "memory") 64) (func (export "main")))'
MULTI_WAT = """(module (func (export "main") (param i64 f64) (result i64 f64 i32)
  local.get 0 local.get 1 i32.const 7))"""
IMPORTS_WAT = '(module (import "env" "host_fn" (func)) (func (export "main")))'


async def run(http: httpx.AsyncClient, cid: str, inputs: list[Any] | None = None,
              **policy: int) -> dict[str, Any]:
    body: dict[str, Any] = {"cid": cid, "inputs": inputs or []}
    if policy:
        body["policy"] = policy
    response = await http.post("/intent/execute-wasm", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_function_output_and_result_fields(http: httpx.AsyncClient,
                                                 executor: Executor) -> None:
    module = await upload(http, ADD_WAT)
    result = await run(http, module["cid"], [40, 2])
    assert result["success"] is True
    assert result["output"] == 42
    assert result["gas_used"] > 0
    assert isinstance(result["duration"], int | float) and result["duration"] >= 0
    assert result["executed_at"].endswith("Z")
    assert set(result) == {"success", "request_id", "cid", "output", "gas_used", "duration",
                           "executed_at", "error"}


async def test_several_results_are_an_array_and_none_is_null(http: httpx.AsyncClient,
                                                             executor: Executor) -> None:
    multi = await upload(http, MULTI_WAT)
    assert (await run(http, multi["cid"], [2**40, 1.5]))["output"] == [2**40, 1.5, 7]
    empty = await upload(http, BIG_MEMORY_WAT)
    assert (await run(http, empty["cid"]))["output"] is None


@pytest.mark.parametrize(
    ("wat", "inputs", "policy", "code"),
    [
        (LOOP_WAT, [], {"max_gas": 100_000}, "out_of_gas"),
        (RECURSE_WAT, [], {}, "stack_overflow"),
        (DIV_WAT, [1, 0], {}, "trap"),
        (GROW_WAT, [], {"max_memory": 4 * 65536}, "memory_limit"),
        (GROW_WAT.replace('(export "memory") ', ""), [], {"max_memory": 4 * 65536},
         "memory_limit"),
        (BIG_MEMORY_WAT, [], {"max_memory": 65536}, "memory_limit"),
    ],
    ids=["out_of_gas", "stack_overflow", "trap", "memory_grow", "memory_grow_unexported",
         "memory_initial"],
)
async def test_each_limit_and_trap_has_its_code(http: httpx.AsyncClient, executor: Executor,
                                                wat: str, inputs: list[Any],
                                                policy: dict[str, int], code: str) -> None:
    module = await upload(http, wat)
    result = await run(http, module["cid"], inputs, **policy)
    assert result["success"] is False
    assert result["output"] is None
    assert result["error"]["code"] == code
    assert result["error"]["message"]


async def test_out_of_gas_reports_the_whole_budget_used(http: httpx.AsyncClient,
                                                        executor: Executor) -> None:
    module = await upload(http, LOOP_WAT)
    result = await run(http, module["cid"], max_gas=12_345)
    assert result["gas_used"] == 12_345


async def test_infinite_loop_times_out_promptly(http: httpx.AsyncClient,
                                                executor: Executor) -> None:
    module = await upload(http, LOOP_WAT)
    started = time.monotonic()
    result = await run(http, module["cid"], max_time=300, max_gas=10**12)
    elapsed = time.monotonic() - started
    assert result["error"]["code"] == "timeout"
    assert 300 <= result["duration"] < 1000
    assert elapsed < 2.0, f"took {elapsed:.2f} s to answer a 300 ms timeout"


async def test_executor_keeps_serving_after_hostile_modules(http: httpx.AsyncClient,
                                                            executor: Executor) -> None:
    hostile = [await upload(http, wat) for wat in (LOOP_WAT, RECURSE_WAT, GROW_WAT)]
    adder = await upload(http, ADD_WAT)
    results = await asyncio.gather(
        *(run(http, module["cid"], max_time=500, max_memory=8 * 65536, max_gas=10**12)
          for module in hostile),
        run(http, adder["cid"], [2, 3]),
    )
    assert [r["error"]["code"] for r in results[:3]] == ["timeout", "stack_overflow",
                                                         "memory_limit"]
    assert results[3]["output"] == 5
    assert (await run(http, adder["cid"], [7, 8]))["output"] == 15


async def test_unknown_import_is_invalid_module(http: httpx.AsyncClient,
                                                executor: Executor) -> None:
    module = await upload(http, IMPORTS_WAT)
    assert module["imports"] == [{"module": "env", "name": "host_fn", "kind": "func"}]
    result = await run(http, module["cid"])
    assert result["error"]["code"] == "invalid_module"
    assert "env.host_fn" in result["error"]["message"]


async def test_wasi_command_reads_inputs_and_returns_stdout_json(http: httpx.AsyncClient,
                                                                 executor: Executor) -> None:
    module = await upload(http, (FIXTURES / "json_sum.wasm").read_bytes())
    assert module["wasi"] is True
    result = await run(http, module["cid"], [1, 2, 39])
    assert result["success"] is True
    assert result["output"] == {"sum": 42, "count": 3}


async def test_wasi_nonzero_exit(http: httpx.AsyncClient, executor: Executor) -> None:
    module = await upload(http, (FIXTURES / "json_sum.wasm").read_bytes())
    result = await run(http, module["cid"], ["not", "numbers"])
    assert result["success"] is False
    assert result["error"]["code"] == "exit_nonzero"
    assert "2" in result["error"]["message"]


async def test_wasi_module_reaches_nothing_on_the_host(http: httpx.AsyncClient,
                                                       executor: Executor) -> None:
    module = await upload(http, (FIXTURES / "escape.wasm").read_bytes())
    result = await run(http, module["cid"])
    assert result["success"] is True
    reached = result["output"]
    assert reached and set(reached.values()) == {False}, reached


async def test_wasi_text_output_that_is_not_json_is_a_string(http: httpx.AsyncClient,
                                                             executor: Executor) -> None:
    module = await upload(http, (FIXTURES / "ticker.wasm").read_bytes())
    result = await run(http, module["cid"], [2])
    assert result["success"] is True
    assert result["output"].splitlines() == ["step 1", "step 2", "done"]


async def test_a_wasi_module_whose_start_takes_inputs_is_a_plain_call(
        http: httpx.AsyncClient, executor: Executor) -> None:
    """Not a command (its `_start` has a parameter): validated and run as a call, the gateway
    and the executor agreeing (relay.modules.runs_as_command)."""
    module = await upload(http, """(module
      (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
      (func (export "_start") (param i32) (result i32)
        (i32.mul (local.get 0) (i32.const 2))))""")
    assert module["wasi"] is False
    result = await run(http, module["cid"], [21])
    assert result["error"] is None and result["output"] == 42
    response = await http.post("/intent/execute-wasm", json={"cid": module["cid"], "inputs": []})
    assert response.status_code == 400, response.text  # its one input is checked


async def test_async_execute_then_poll(http: httpx.AsyncClient, executor: Executor) -> None:
    module = await upload(http, ADD_WAT)
    response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                               json={"cid": module["cid"], "inputs": [20, 22]})
    assert response.status_code == 202
    accepted = response.json()
    request_id = accepted["request_id"]
    assert accepted["status"] == "queued"
    assert response.headers["location"] == f"/executions/{request_id}"
    assert accepted["links"] == {
        "self": f"/executions/{request_id}",
        "events": f"/intent/execute-wasm/events?request_id={request_id}",
    }

    async def finished() -> dict[str, Any] | None:
        view: dict[str, Any] = (await http.get(f"/executions/{request_id}")).json()
        return view if view["status"] == "completed" else None

    view = await wait_for(finished)
    assert view["output"] == 42
    assert view["success"] is True
    assert view["request_id"] == request_id
    assert view["cid"] == module["cid"]
    other = await http.get(f"/executions/{request_id}", headers={"X-API-Key": BOB_KEY})
    assert other.status_code == 404


async def test_queued_without_executor_then_served(http: httpx.AsyncClient,
                                                   settings: Any) -> None:
    module = await upload(http, ADD_WAT)
    response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                               json={"cid": module["cid"], "inputs": [1, 1]})
    request_id = response.json()["request_id"]
    view = (await http.get(f"/executions/{request_id}")).json()
    assert view["status"] == "queued"
    assert "output" not in view
    from relay import connection

    client = connection.connect(settings.redis_url)
    worker = Executor(settings, client, read_block_ms=100)
    await worker.run(burst=True)
    await client.aclose()
    view = (await http.get(f"/executions/{request_id}")).json()
    assert view["status"] == "completed" and view["output"] == 2


async def test_a_result_is_published_as_its_run_ends_not_with_the_runs_taken_with_it(
        http: httpx.AsyncClient, settings: Settings) -> None:
    """An executor takes several entries in one read; a quick run among them is answered
    before the slower ones after it run (each holds the executor's loop, as an inline run
    does for up to 10 ms)."""
    module = await upload(http, ADD_WAT)
    # One execution run first, as on any Redis that has run one: its scripts are loaded.
    await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                    json={"cid": module["cid"], "inputs": [0, 0]})
    warm_client = connection.connect(settings.redis_url)
    await Executor(settings, warm_client, read_block_ms=100).run(burst=True)
    await warm_client.aclose()
    request_ids = []
    for inputs in ([1, 1], [2, 2], [3, 3], [4, 4]):  # the quick one, then three slow ones
        response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                                   json={"cid": module["cid"], "inputs": inputs})
        request_ids.append(response.json()["request_id"])
    quick_record = Keys(settings.prefix).execution(request_ids[0])
    redis_client = redis.Redis.from_url(settings.redis_url or "")
    seen_quick: list[bool] = []
    # One read takes all four; the module is loaded before it.
    client = connection.connect(settings.redis_url)
    worker = Executor(with_settings(settings, executor_concurrency=1, executor_prefetch=3,
                                    preload=(module["cid"],)), client, read_block_ms=100)
    run_inline = worker.sandbox.try_inline

    def try_inline(prepared: Any, entrypoint: str, inputs: list[Any], policy: Any) -> Any:
        if inputs != [1, 1] and not seen_quick:
            # The first slow run: it holds the loop until the quick result is in Redis (2 s
            # at most), which it is only if the quick run's settle went out when it ended.
            deadline = time.monotonic() + 2
            while not redis_client.hexists(quick_record, "result") and (
                    time.monotonic() < deadline):
                time.sleep(0.005)
            seen_quick.append(bool(redis_client.hexists(quick_record, "result")))
        return run_inline(prepared, entrypoint, inputs, policy)

    worker.sandbox.try_inline = try_inline  # type: ignore[method-assign]
    try:
        await worker.run(burst=True)
    finally:
        redis_client.close()
        await client.aclose()
    assert seen_quick == [True]
    for request_id, output in zip(request_ids, (2, 4, 6, 8), strict=True):
        view = (await http.get(f"/executions/{request_id}")).json()
        assert view["status"] == "completed" and view["output"] == output


async def test_module_deleted_after_acceptance_is_module_not_found(
        http: httpx.AsyncClient, settings: Any) -> None:
    module = await upload(http, ADD_WAT)
    response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                               json={"cid": module["cid"], "inputs": [1, 1]})
    request_id = response.json()["request_id"]
    assert (await http.delete(f"/modules/{module['cid']}")).status_code == 204
    from relay import connection

    client = connection.connect(settings.redis_url)
    await Executor(settings, client, read_block_ms=100).run(burst=True)
    await client.aclose()
    view = (await http.get(f"/executions/{request_id}")).json()
    assert view["status"] == "failed"
    assert view["error"]["code"] == "module_not_found"


async def test_a_name_moved_through_another_gateway_runs_the_new_module(
        http: httpx.AsyncClient, executor: Executor, settings: Any) -> None:
    from relay.gateway.app import create_app

    first = await upload(http, ADD_WAT, name="moving")
    assert (await run(http, "glyph://moving", [2, 3]))["output"] == 5  # this gateway caches it
    second = await upload(http, DIV_WAT)
    other = create_app(settings)
    async with other.router.lifespan_context(other), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=other), base_url="http://other",
            headers=dict(http.headers)) as replica:
        moved = await replica.put("/names/moving/latest", json={"cid": second["cid"]})
        assert moved.status_code == 200
    result = await run(http, "glyph://moving", [6, 3])
    assert result["cid"] == second["cid"] != first["cid"]
    assert result["output"] == 2


async def test_a_bare_module_name_is_refused_with_the_glyph_reference_it_meant(
        http: httpx.AsyncClient) -> None:
    """A first try at the API writes the module's name as its `cid`: the 400 says what to send."""
    response = await http.post("/intent/execute-wasm", json={"cid": "calculator", "inputs": [1]})
    body = assert_problem(response, 400, "invalid-request")
    assert "glyph://calculator" in body["detail"]
    assert body["errors"][0]["pointer"] == "/cid"
    assert "glyph://calculator" in body["errors"][0]["detail"]


async def test_a_sync_execute_still_running_after_the_sync_wait_is_answered_202(
        settings: Settings, executor: Executor) -> None:
    """The answer comes at the sync wait's end (50 ms), while the run goes on (2 s of its
    max_time), and says where to follow it; the run's result is there after."""
    async with serve(with_settings(settings, sync_wait_ms=50)) as gateway, \
            httpx.AsyncClient(base_url=gateway.url, headers={"X-API-Key": ALICE_KEY},
                              timeout=30) as http:
        module = await upload(http, '(module (func (export "main") (loop br 0)))')
        began = time.monotonic()
        response = await http.post("/intent/execute-wasm", json={
            "cid": module["cid"], "inputs": [], "policy": {"max_time": 2000, "max_gas": 10**12}})
        assert response.status_code == 202, response.text
        assert time.monotonic() - began < 1.5
        request_id = response.json()["request_id"]
        assert response.headers["location"] == f"/executions/{request_id}"

        async def ended() -> dict[str, Any] | None:
            record: dict[str, Any] = (await http.get(f"/executions/{request_id}")).json()
            return record if record["status"] in ("completed", "failed") else None

        record = await wait_for(ended, timeout_s=20)
        assert record["error"]["code"] == "timeout"
