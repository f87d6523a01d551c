"""Environments: the shipped presets, admin-only changes with versions, and executions run in
them (WASI env and args, capabilities refused at validation, caps, the version kept)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    assert_problem,
    client_for,
    running,
    upload,
    wait_for,
    with_settings,
)
from tests.relay.gateway.test_budgets import (
    ASYNC,
    LOOP_WAT,
    ROOT_KEY,
    admin_settings,
    alice,
    gateway,
    root,
)

__all__ = ["admin_settings", "alice", "gateway", "root"]  # fixtures
# A WASI command printing its argv, a line `--`, then its environment, one string a line (as
# `args_get` and `environ_get` give them, their NULs turned into newlines).
ENV_ARGS_WAT = """(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 3)
  (func $emit (param $at i32) (param $length i32) (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $length)))
      (if (i32.eqz (i32.load8_u (i32.add (local.get $at) (local.get $i))))
        (then (i32.store8 (i32.add (local.get $at) (local.get $i)) (i32.const 10))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (i32.store (i32.const 8) (local.get $at))
    (i32.store (i32.const 12) (local.get $length))
    (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16))))
  (func (export "_start")
    (drop (call $args_sizes (i32.const 0) (i32.const 4)))
    (drop (call $args (i32.const 1024) (i32.const 65536)))
    (call $emit (i32.const 65536) (i32.load (i32.const 4)))
    (i32.store (i32.const 20) (i32.const 0x0a2d2d))
    (call $emit (i32.const 20) (i32.const 3))
    (drop (call $environ_sizes (i32.const 0) (i32.const 4)))
    (drop (call $environ (i32.const 1024) (i32.const 65536)))
    (call $emit (i32.const 65536) (i32.load (i32.const 4)))))"""
CLOCK_WAT = """(module
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $now (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "main") (result i32) (call $now (i32.const 0) (i64.const 1) (i32.const 0))))"""
RANDOM_WAT = """(module
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "main") (result i32) (call $random (i32.const 0) (i32.const 8))))"""


def printed(output: str) -> tuple[list[str], list[str]]:
    """ENV_ARGS_WAT's output as (argv, environment)."""
    args, environment = output.split("--\n")
    return args.splitlines(), environment.splitlines()


async def test_the_shipped_presets_are_listed_and_read(alice: httpx.AsyncClient,
                                                        admin_settings: Settings) -> None:
    listed = await alice.get("/environments")
    assert listed.status_code == 200, listed.text
    page = listed.json()
    assert [item["name"] for item in page["items"]] == ["pure", "wasi"]
    assert page["next_cursor"] is None
    wasi = (await alice.get("/environments/wasi")).json()
    assert wasi["version"] == 1
    assert wasi["policy"] == {"max_gas": admin_settings.max_gas,
                              "max_memory": admin_settings.max_memory_bytes,
                              "max_time": admin_settings.max_time_ms,
                              "max_stack": admin_settings.max_stack_bytes}
    assert wasi["wasi"] == {"enabled": True, "env": {}, "args": [], "clock": True,
                            "random": True}
    assert wasi["max_output_bytes"] == admin_settings.max_output_bytes
    pure = (await alice.get("/environments/pure")).json()
    assert pure["wasi"]["enabled"] is False
    assert_problem(await alice.get("/environments/nope"), 404, "not-found")
    first = (await alice.get("/environments", params={"limit": 1})).json()
    assert [item["name"] for item in first["items"]] == ["pure"]
    rest = (await alice.get("/environments", params={"cursor": first["next_cursor"]})).json()
    assert [item["name"] for item in rest["items"]] == ["wasi"]


async def test_only_an_administrator_changes_them(alice: httpx.AsyncClient,
                                                  root: httpx.AsyncClient) -> None:
    body = {"description": "tight", "policy": {"max_gas": 5000}}
    assert_problem(await alice.put("/environments/tight", json=body), 403, "forbidden")
    assert_problem(await alice.delete("/environments/wasi"), 403, "forbidden")
    created = await root.put("/environments/tight", json=body)
    assert created.status_code == 200, created.text
    assert created.json()["version"] == 1
    assert created.json()["policy"]["max_gas"] == 5000
    changed = await root.put("/environments/tight", json={**body, "description": "tighter"})
    assert changed.json()["version"] == 2
    assert (await alice.get("/environments/tight")).json()["description"] == "tighter"
    # A GET's body sent back: its version must still be the current one.
    stale = created.json()
    assert_problem(await root.put("/environments/tight", json=stale), 409, "conflict")
    current = (await root.get("/environments/tight")).json()
    assert (await root.put("/environments/tight", json=current)).json()["version"] == 3
    # The shipped ones change like any other, and stay.
    wasi = await root.put("/environments/wasi", json={"wasi": {"env": {"MODE": "x"}}})
    assert wasi.json()["version"] == 2
    assert_problem(await root.delete("/environments/wasi"), 409, "conflict")
    assert_problem(await root.delete("/environments/pure"), 409, "conflict")
    assert (await root.delete("/environments/tight")).status_code == 204
    assert_problem(await alice.get("/environments/tight"), 404, "not-found")
    assert_problem(await root.delete("/environments/tight"), 404, "not-found")
    # Made again, it does not reuse a version (memoized results are keyed by it).
    again = await root.put("/environments/tight", json=body)
    assert again.json()["version"] == 4


@pytest.mark.parametrize(("body", "pointer"), [
    ({"policy": {"max_gas": 10**13}}, "/policy/max_gas"),
    ({"policy": {"max_time": 300_001}}, "/policy/max_time"),
    ({"policy": {"max_memory": 0}}, "/policy/max_memory"),
    ({"policy": {"max_stack": 2**30}}, "/policy/max_stack"),
    ({"max_output_bytes": 2**40}, "/max_output_bytes"),
    ({"wasi": {"env": {"BAD=KEY": "v"}}}, "/wasi/env"),
    ({"wasi": {"env": {"K": "a\u0000b"}}}, "/wasi/env/K"),
    ({"wasi": {"args": ["x" * 4097]}}, "/wasi/args/0"),
    ({"wasi": {"args": ["x"] * 129}}, "/wasi/args"),
    ({"wasi": {"env": {f"K{i}": "v" for i in range(129)}}}, "/wasi/env"),
    ({"wasi": {"args": ["x" * 4000] * 20}}, "/wasi"),
    ({"wasi": {"enabled": False, "args": ["a"]}}, "/wasi/enabled"),
    ({"name": "other"}, "/name"),
    ({"description": "d" * 1025}, "/description"),
    ({"surprise": 1}, "/surprise"),
])
async def test_bad_and_hostile_bodies_are_400(root: httpx.AsyncClient, body: dict[str, Any],
                                               pointer: str) -> None:
    problem = assert_problem(await root.put("/environments/bad", json=body), 400,
                             "invalid-request")
    assert problem["errors"][0]["pointer"] == pointer, problem
    assert_problem(await root.get("/environments/bad"), 404, "not-found")


async def test_bad_names_and_huge_bodies(root: httpx.AsyncClient) -> None:
    assert_problem(await root.put("/environments/Bad_Name", json={}), 400, "invalid-request")
    assert_problem(await root.put("/environments/" + "a" * 65, json={}), 400,
                   "invalid-request")
    huge = b'{"description": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    assert_problem(await root.put("/environments/big", content=huge), 413,
                   "payload-too-large")


async def test_a_wasi_module_reads_its_env_and_args(alice: httpx.AsyncClient,
                                                    root: httpx.AsyncClient,
                                                    executor: Executor) -> None:
    module = await upload(alice, ENV_ARGS_WAT)
    plain = await alice.post("/intent/execute-wasm", json={"cid": module["cid"]})
    assert plain.json()["output"] == "--\n", "the default environment has no env and no args"
    env = {"GREETING": "hello world", "EMPTY": "", "UNICODE": "žluťoučký"}
    args = ["prog", "--flag", "two words"]
    created = await root.put("/environments/greeter", json={"wasi": {"env": env, "args": args}})
    assert created.status_code == 200, created.text
    answer = await alice.post("/intent/execute-wasm",
                              json={"cid": module["cid"], "environment": "greeter"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["success"], answer.json()
    seen_args, seen_env = printed(answer.json()["output"])
    assert seen_args == args
    assert sorted(seen_env) == sorted(f"{key}={value}" for key, value in env.items())
    state = (await alice.get(f"/executions/{answer.json()['request_id']}")).json()
    assert state["environment"] == {"name": "greeter", "version": 1}
    default = (await alice.get(f"/executions/{plain.json()['request_id']}")).json()
    assert default["environment"] == {"name": "wasi", "version": 1}


async def test_pure_refuses_a_wasi_module(alice: httpx.AsyncClient) -> None:
    module = await upload(alice, ENV_ARGS_WAT)
    refused = await alice.post("/intent/execute-wasm",
                               json={"cid": module["cid"], "environment": "pure"})
    problem = assert_problem(refused, 400, "invalid-request")
    assert problem["errors"][0]["pointer"] == "/environment"
    assert "wasi_snapshot_preview1.args_sizes_get" in problem["detail"]
    session = await alice.post("/sessions", json={"cid": module["cid"], "environment": "pure"})
    assert assert_problem(session, 400, "invalid-request")["errors"][0]["pointer"] == \
        "/environment"


async def test_a_pure_module_runs_in_pure(alice: httpx.AsyncClient, executor: Executor) -> None:
    adder = await upload(alice, ADD_WAT)
    answer = await alice.post("/intent/execute-wasm", json={
        "cid": adder["cid"], "inputs": [2, 3], "environment": "pure"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["output"] == 5
    state = (await alice.get(f"/executions/{answer.json()['request_id']}")).json()
    assert state["environment"] == {"name": "pure", "version": 1}


async def test_clocks_and_randomness_withheld_are_refused_by_name(
        alice: httpx.AsyncClient, root: httpx.AsyncClient, executor: Executor) -> None:
    clock = await upload(alice, CLOCK_WAT)
    random = await upload(alice, RANDOM_WAT)
    await root.put("/environments/timeless", json={"wasi": {"clock": False}})
    await root.put("/environments/determined", json={"wasi": {"random": False}})
    refused = await alice.post("/intent/execute-wasm",
                               json={"cid": clock["cid"], "environment": "timeless"})
    problem = assert_problem(refused, 400, "invalid-request")
    assert problem["errors"][0]["pointer"] == "/environment"
    assert "clock_time_get" in problem["detail"] and "clocks" in problem["detail"]
    refused = await alice.post("/intent/execute-wasm",
                               json={"cid": random["cid"], "environment": "determined"})
    problem = assert_problem(refused, 400, "invalid-request")
    assert "random_get" in problem["detail"] and "randomness" in problem["detail"]
    # Each runs where its capability is offered.
    for module, name in ((clock, "determined"), (random, "timeless")):
        answer = await alice.post("/intent/execute-wasm",
                                  json={"cid": module["cid"], "environment": name})
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"] == 0, answer.json()


async def test_unknown_environment_is_400_everywhere(alice: httpx.AsyncClient) -> None:
    adder = await upload(alice, ADD_WAT)
    for path, body, pointer in (
            ("/intent/execute-wasm", {"cid": adder["cid"], "inputs": [1, 2],
                                      "environment": "nowhere"}, "/environment"),
            ("/sessions", {"cid": adder["cid"], "environment": "nowhere"}, "/environment"),
            ("/pipelines", {"nodes": [{"id": "a", "cid": adder["cid"], "inputs": [1, 2],
                                       "environment": "nowhere"}]}, "/nodes/0/environment"),
            ("/intent/execute-wasm", {"cid": adder["cid"], "inputs": [1, 2],
                                      "environment": "Not A Name"}, "/environment")):
        problem = assert_problem(await alice.post(path, json=body), 400, "invalid-request")
        assert problem["errors"][0]["pointer"] == pointer, (path, problem)


async def test_caps_and_defaults_come_from_the_environment(
        alice: httpx.AsyncClient, root: httpx.AsyncClient, executor: Executor) -> None:
    loop = await upload(alice, LOOP_WAT)
    await root.put("/environments/small", json={"policy": {"max_gas": 5000, "max_time": 2000}})
    over = await alice.post("/intent/execute-wasm", json={
        "cid": loop["cid"], "environment": "small", "policy": {"max_gas": 5001}})
    problem = assert_problem(over, 400, "invalid-request")
    assert problem["errors"][0]["pointer"] == "/policy/max_gas"
    assert "environment" in problem["detail"]
    over = await alice.post("/intent/execute-wasm", json={
        "cid": loop["cid"], "environment": "small", "policy": {"max_time": 2001}})
    assert assert_problem(over, 400, "invalid-request")["errors"][0]["pointer"] == \
        "/policy/max_time"
    # Omitted, the gas is the default lowered to the environment's cap.
    ran = await alice.post("/intent/execute-wasm", json={"cid": loop["cid"],
                                                         "environment": "small"})
    assert ran.status_code == 200, ran.text
    assert ran.json()["error"]["code"] == "out_of_gas"
    assert ran.json()["gas_used"] == 5000
    within = await alice.post("/intent/execute-wasm", json={
        "cid": loop["cid"], "environment": "small", "policy": {"max_gas": 3000}})
    assert within.json()["gas_used"] == 3000
    await root.put("/environments/shallow", json={"policy": {"max_stack": 65536}})
    deep = await alice.post("/intent/execute-wasm", json={
        "cid": loop["cid"], "environment": "shallow", "policy": {"max_stack": 65537}})
    assert assert_problem(deep, 400, "invalid-request")["errors"][0]["pointer"] == \
        "/policy/max_stack"


async def test_an_execution_keeps_the_version_it_was_accepted_with(
        alice: httpx.AsyncClient, root: httpx.AsyncClient, admin_settings: Settings) -> None:
    module = await upload(alice, ENV_ARGS_WAT)
    await root.put("/environments/moving", json={"wasi": {"env": {"V": "one"}}})
    accepted = await alice.post("/intent/execute-wasm", headers=ASYNC, json={
        "cid": module["cid"], "environment": "moving"})
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["request_id"]
    # Changed (and then deleted) while the execution waits for an executor.
    changed = await root.put("/environments/moving", json={"wasi": {"env": {"V": "two"}}})
    assert changed.json()["version"] == 2
    assert (await root.delete("/environments/moving")).status_code == 204

    async def finished() -> dict[str, Any] | None:
        state: dict[str, Any] = (await alice.get(f"/executions/{request_id}")).json()
        return state if state["status"] == "completed" else None

    async with running(admin_settings, "late-executor"):
        state = await wait_for(finished)
    assert printed(state["output"]) == ([], ["V=one"])
    assert state["environment"] == {"name": "moving", "version": 1}


async def test_the_environment_is_part_of_the_request(alice: httpx.AsyncClient,
                                                      root: httpx.AsyncClient) -> None:
    """Without a key, the same body in another environment, or another version of it, is
    another execution; with a key, it is a reuse (422)."""
    adder = await upload(alice, ADD_WAT)
    body = {"cid": adder["cid"], "inputs": [1, 2]}
    await root.put("/environments/other", json={})
    ids = set()
    for extra in ({}, {"environment": "wasi"}, {"environment": "pure"},
                  {"environment": "other"}):
        accepted = await alice.post("/intent/execute-wasm", headers=ASYNC,
                                    json={**body, **extra})
        ids.add(accepted.json()["request_id"])
    assert len(ids) == 3, "the default named or not is one execution; pure and other two more"
    await root.put("/environments/other", json={"description": "v2"})
    again = await alice.post("/intent/execute-wasm", headers=ASYNC,
                             json={**body, "environment": "other"})
    assert again.json()["request_id"] not in ids
    keyed = {**body, "idempotency_key": "k1"}
    assert (await alice.post("/intent/execute-wasm", headers=ASYNC, json=keyed)).status_code \
        == 202
    reuse = await alice.post("/intent/execute-wasm", headers=ASYNC,
                             json={**keyed, "environment": "pure"})
    assert_problem(reuse, 422, "idempotency-key-reuse")


async def test_output_is_capped_by_the_environment(alice: httpx.AsyncClient,
                                                   root: httpx.AsyncClient,
                                                   executor: Executor) -> None:
    module = await upload(alice, ENV_ARGS_WAT)
    await root.put("/environments/quiet", json={"max_output_bytes": 4,
                                               "wasi": {"args": ["abcdefgh"]}})
    answer = await alice.post("/intent/execute-wasm",
                              json={"cid": module["cid"], "environment": "quiet"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["output"] == "abcd", "writes past the cap fail in the module"


async def test_a_session_runs_its_calls_in_its_environment(alice: httpx.AsyncClient,
                                                          root: httpx.AsyncClient,
                                                          executor: Executor) -> None:
    loop = await upload(alice, LOOP_WAT)
    await root.put("/environments/short", json={"policy": {"max_gas": 7000}})
    created = await alice.post("/sessions", json={"cid": loop["cid"], "environment": "short"})
    assert created.status_code == 201, created.text
    assert created.json()["environment"] == "short"
    session_id = created.json()["session_id"]
    call = await alice.post(f"/sessions/{session_id}/calls", json={})
    assert call.json()["gas_used"] == 7000, call.json()
    over = await alice.post(f"/sessions/{session_id}/calls",
                            json={"policy": {"max_gas": 7001}})
    assert assert_problem(over, 400, "invalid-request")["errors"][0]["pointer"] == \
        "/policy/max_gas"
    plain = await alice.post("/sessions", json={"cid": loop["cid"]})
    assert plain.json()["environment"] == "wasi"


async def test_pipeline_nodes_run_in_their_environment(alice: httpx.AsyncClient,
                                                       root: httpx.AsyncClient,
                                                       executor: Executor) -> None:
    module = await upload(alice, ENV_ARGS_WAT)
    await root.put("/environments/node-env", json={"wasi": {"env": {"NODE": "yes"}}})
    created = await alice.post("/pipelines", json={"nodes": [
        {"id": "a", "cid": module["cid"], "environment": "node-env"},
        {"id": "b", "cid": module["cid"]}]})
    assert created.status_code == 202, created.text
    pipeline_id = created.json()["pipeline_id"]

    async def done() -> dict[str, Any] | None:
        view: dict[str, Any] = (await alice.get(f"/pipelines/{pipeline_id}")).json()
        return view if view["status"] != "running" else None

    view = await wait_for(done)
    assert view["status"] == "completed", view
    assert printed(view["nodes"]["a"]["output"]) == ([], ["NODE=yes"])
    assert printed(view["nodes"]["b"]["output"]) == ([], [])
    node = (await alice.get(f"/executions/{view['nodes']['a']['request_id']}")).json()
    assert node["environment"] == {"name": "node-env", "version": 1}
    refused = await alice.post("/pipelines", json={"nodes": [
        {"id": "a", "cid": module["cid"], "environment": "pure"}]})
    assert assert_problem(refused, 400, "invalid-request")["errors"][0]["pointer"] == \
        "/nodes/0/environment"


async def test_the_default_environment_is_configurable(settings: Settings,
                                                       admin_settings: Settings) -> None:
    from relay.gateway.app import create_app
    pure_first = with_settings(admin_settings, default_environment="pure")
    application = create_app(pure_first)
    async with application.router.lifespan_context(application), \
            client_for(application, ALICE_KEY) as alice, \
            client_for(application, ROOT_KEY) as root:
        module = await upload(alice, ENV_ARGS_WAT)
        refused = await alice.post("/intent/execute-wasm", json={"cid": module["cid"]})
        assert assert_problem(refused, 400, "invalid-request")["errors"][0]["pointer"] == \
            "/environment"
        session = await alice.post("/sessions", json={"cid": (await upload(alice, ADD_WAT))["cid"]})
        assert session.json()["environment"] == "pure"
    named = with_settings(admin_settings, default_environment="custom")
    application = create_app(named)
    async with application.router.lifespan_context(application), \
            client_for(application, ALICE_KEY) as alice, \
            client_for(application, ROOT_KEY) as root:
        adder = await upload(alice, ADD_WAT)
        body = {"cid": adder["cid"], "inputs": [1, 2]}
        missing = await alice.post("/intent/execute-wasm", json=body)
        assert "custom" in assert_problem(missing, 400, "invalid-request")["detail"]
        await root.put("/environments/custom", json={})
        assert (await alice.post("/intent/execute-wasm", headers=ASYNC, json=body)).status_code \
            == 202
        assert_problem(await root.delete("/environments/custom"), 409, "conflict")


async def test_memoized_results_are_kept_apart_by_environment_and_version(
        alice: httpx.AsyncClient, root: httpx.AsyncClient, executor: Executor) -> None:
    adder = await upload(alice, ADD_WAT)
    body = {"cid": adder["cid"], "inputs": [20, 22], "memoize": True}

    async def cached(**extra: Any) -> bool:
        answer = await alice.post("/intent/execute-wasm", json={**body, **extra})
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"] == 42
        return bool(answer.json()["cached"])

    assert not await cached()
    assert await cached(policy={"max_gas": 10**6}), "same environment: answered from the memo"
    await root.put("/environments/calc", json={})
    assert not await cached(environment="calc")
    assert not await cached(environment="pure")
    assert await cached(environment="calc", policy={"max_gas": 10**6})
    await root.put("/environments/calc", json={"description": "v2"})
    assert not await cached(environment="calc"), "another version: computed again"


async def test_batch_items_run_in_their_environment(alice: httpx.AsyncClient,
                                                    root: httpx.AsyncClient,
                                                    executor: Executor) -> None:
    module = await upload(alice, ENV_ARGS_WAT)
    await root.put("/environments/batched", json={"wasi": {"args": ["item"]}})
    response = await alice.post("/intent/execute-wasm/batch", json={"items": [
        {"cid": module["cid"], "environment": "batched"},
        {"cid": module["cid"], "environment": "pure"},
        {"cid": module["cid"], "environment": "nowhere"},
        {"cid": module["cid"]}]})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert printed(results[0]["output"]) == (["item"], [])
    for index in (1, 2):
        assert results[index]["status"] == 400, results[index]
        assert results[index]["errors"][0]["pointer"] == f"/items/{index}/environment"
    assert printed(results[3]["output"]) == ([], [])
