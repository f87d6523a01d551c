"""`policy.max_stack` and a trap's `error.frames`, through the real gateway, Redis and executor."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime

from executor.worker import Executor
from relay.gateway.app import create_app
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ROOT,
    Served,
    assert_problem,
    client_for,
    event_entries,
    upload,
    with_settings,
)
from tests.relay.gateway.test_events import EVENTS, client, collect, terminals
from tests.relay.gateway.test_execute import run

# main(n) recurses n deep and returns n: about 48 bytes of stack a level (wasmtime 50).
DEPTH_WAT = """(module (func $down (export "main") (param i32) (result i32)
  local.get 0 i32.eqz if (result i32) i32.const 0 else
  local.get 0 i32.const 1 i32.sub call $down i32.const 1 i32.add end))"""
# A trap two calls deep, in a module with a memory: the executor compiles a copy with more
# exports (executor.binary), so offsets in the copy are not offsets in this module.
NESTED_WAT = """(module (memory 1)
  (func $inner (param i32) (result i32) unreachable)
  (func $middle (param i32) (result i32) local.get 0 call $inner)
  (func $outer (export "main") (param i32) (result i32) local.get 0 call $middle))"""
# main(n) recurses n deep, then traps.
DEEP_TRAP_WAT = """(module (func $rec (export "main") (param i32) (result i32)
  local.get 0 i32.eqz if (result i32) unreachable else
  local.get 0 i32.const 1 i32.sub call $rec end))"""
UNREACHABLE, CALL = 0x00, 0x10


async def test_max_stack_bounds_how_deep_a_module_recurses(http: httpx.AsyncClient,
                                                          executor: Executor) -> None:
    cid = (await upload(http, DEPTH_WAT))["cid"]
    assert (await run(http, cid, [5000]))["output"] == 5000  # the default: 1 MiB
    small = await run(http, cid, [5000], max_stack=65536)
    assert small["success"] is False and small["output"] is None
    assert small["error"]["code"] == "stack_overflow"
    assert "65536" in small["error"]["message"]
    assert (await run(http, cid, [5000], max_stack=262144))["output"] == 5000
    # Never more than asked: 100000 runs with 65536 bytes, too few for 1500 levels (72000).
    assert (await run(http, cid, [1000], max_stack=100000))["output"] == 1000
    rounded = await run(http, cid, [1500], max_stack=100000)
    assert rounded["error"]["code"] == "stack_overflow"
    # The executor keeps serving runs of every stack size, the default's included.
    assert (await run(http, cid, [5000]))["output"] == 5000


async def test_max_stack_is_refused_over_its_ceiling_or_below_one(
        settings: Settings, executor: Executor) -> None:
    application = create_app(with_settings(settings, max_stack_bytes=262144))
    async with application.router.lifespan_context(application), \
            client_for(application, "alice-secret-key") as http:
        cid = (await upload(http, ADD_WAT))["cid"]
        for value, detail in ((262145, "over the ceiling of 262144"), (0, ""), (-1, ""),
                              ("big", "")):
            response = await http.post("/intent/execute-wasm", json={
                "cid": cid, "inputs": [1, 2], "policy": {"max_stack": value}})
            problem = assert_problem(response, 400, "invalid-request")
            assert problem["errors"][0]["pointer"] == "/policy/max_stack", problem
            assert detail in problem["errors"][0]["detail"]
        assert (await run(http, cid, [1, 2], max_stack=262144))["output"] == 3


@pytest.fixture
def capped_settings(settings: Settings, tmp_path: Path) -> Settings:
    shutil.copy(ROOT / "relay" / "policies" / "default.cedar", tmp_path / "default.cedar")
    (tmp_path / "principals.toml").write_text("[principals.alice]\nmax_stack = 65536\n")
    return with_settings(settings, policy_dir=str(tmp_path))


@pytest.fixture
async def capped(capped_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(capped_settings)
    async with application.router.lifespan_context(application), \
            client_for(application, "alice-secret-key") as http:
        yield http


async def test_a_principals_max_stack_caps_it_and_lowers_the_default(
        capped: httpx.AsyncClient, executor: Executor) -> None:
    cid = (await upload(capped, DEPTH_WAT))["cid"]
    response = await capped.post("/intent/execute-wasm", json={
        "cid": cid, "inputs": [1], "policy": {"max_stack": 65537}})
    problem = assert_problem(response, 400, "invalid-request")
    assert problem["errors"] == [{"pointer": "/policy/max_stack",
                                  "detail": "65537 is over your cap of 65536"}]
    # Left out, it is the cap: 5000 levels do not fit in 64 KiB.
    assert (await run(capped, cid, [5000]))["error"]["code"] == "stack_overflow"
    assert (await run(capped, cid, [1000]))["output"] == 1000


async def test_max_stack_is_part_of_the_request_and_its_id(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    cid = (await upload(http, DEPTH_WAT))["cid"]
    plain = await run(http, cid, [10])
    # A request that leaves max_stack out keeps the id it had before max_stack existed: the
    # sha256 of the canonical request with the three v1 limits only.
    canonical = {"cid": cid, "entrypoint": "main", "inputs": [10],
                 "policy": {"max_memory": settings.default_max_memory_bytes,
                            "max_gas": settings.default_max_gas,
                            "max_time": settings.default_max_time_ms}}
    fingerprint = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode())
    v1_id = hashlib.sha256(f"5:alice{fingerprint.hexdigest()}".encode()).hexdigest()
    assert plain["request_id"] == v1_id
    # Asking for the default is the same request; asking for less is another one.
    same = await http.post("/intent/execute-wasm", json={
        "cid": cid, "inputs": [10], "policy": {"max_stack": settings.max_stack_bytes}})
    assert same.json()["request_id"] == v1_id
    assert same.headers["idempotent-replayed"] == "true"
    other = await run(http, cid, [10], max_stack=65536)
    assert other["request_id"] != v1_id
    # On the bus, the effective policy carries it.
    policies = {}
    for _, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        if event["type"] == "wasm_exec_completed":
            policies[event["request_id"]] = event["policy"]
    assert policies[v1_id]["max_stack"] == settings.max_stack_bytes
    assert policies[other["request_id"]]["max_stack"] == 65536


def offsets_land_on(wasm: bytes, frames: list[dict[str, Any]]) -> list[int]:
    """The opcode at each frame's offset in the module as uploaded."""
    return [wasm[frame["module_offset"]] for frame in frames]


async def test_a_trap_names_the_functions_it_was_in_innermost_first(
        served: Served, executor: Executor, settings: Settings) -> None:
    wasm = bytes(wasmtime.wat2wasm(NESTED_WAT))
    async with client(served) as http:
        cid = (await upload(http, wasm))["cid"]
        result = await run(http, cid, [1])
        error = result["error"]
        assert error["code"] == "trap"
        assert [(f["func_index"], f["func_name"]) for f in error["frames"]] == [
            (0, "inner"), (1, "middle"), (2, "outer")]
        # The trap site is the `unreachable`, the others the calls they were in.
        assert offsets_land_on(wasm, error["frames"]) == [UNREACHABLE, CALL, CALL]

        # The same error everywhere the execution's result is read.
        request_id = result["request_id"]
        state = (await http.get(f"/executions/{request_id}")).json()
        assert state["error"] == error
        async with http.stream("GET", EVENTS, params={"request_id": request_id,
                                                      "last_event_id": "0"}) as stream:
            messages = await collect(stream, terminals(1))
        terminal = next(m.json for m in messages if m.data and "error" in m.json)
        assert terminal["type"] == "execution_error" and terminal["error"] == error
    completed = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
    assert [e["error"] for e in completed
            if e["type"] == "wasm_exec_completed" and e["request_id"] == request_id] == [error]


async def test_a_module_without_names_has_null_names(http: httpx.AsyncClient,
                                                     executor: Executor) -> None:
    # NESTED_WAT without `$` labels: its binary has no name section.
    wasm = bytes(wasmtime.wat2wasm("""(module (memory 1)
      (func (param i32) (result i32) unreachable)
      (func (param i32) (result i32) local.get 0 call 0)
      (func (export "main") (param i32) (result i32) local.get 0 call 1))"""))
    assert b"name" not in wasm
    cid = (await upload(http, wasm))["cid"]
    frames = (await run(http, cid, [1]))["error"]["frames"]
    assert [(f["func_index"], f["func_name"]) for f in frames] == [
        (0, None), (1, None), (2, None)]
    assert offsets_land_on(wasm, frames) == [UNREACHABLE, CALL, CALL]


async def test_a_deep_trap_keeps_at_most_32_frames_the_innermost(
        http: httpx.AsyncClient, executor: Executor) -> None:
    wasm = bytes(wasmtime.wat2wasm(DEEP_TRAP_WAT))
    cid = (await upload(http, wasm))["cid"]
    frames = (await run(http, cid, [100]))["error"]["frames"]
    # wasmtime itself records 20 frames at most; Relay would cut more at 32.
    assert 1 <= len(frames) <= 32
    assert {(f["func_index"], f["func_name"]) for f in frames} == {(0, "rec")}
    assert offsets_land_on(wasm, frames) == [UNREACHABLE] + [CALL] * (len(frames) - 1)


async def test_a_stack_overflow_has_frames(http: httpx.AsyncClient, executor: Executor) -> None:
    cid = (await upload(http, DEPTH_WAT))["cid"]
    error = (await run(http, cid, [100_000], max_stack=16384))["error"]
    assert error["code"] == "stack_overflow"
    assert 1 <= len(error["frames"]) <= 32
    assert {f["func_name"] for f in error["frames"]} == {"down"}
    # Caught on entering a function, its innermost frame may have no offset.
    assert all(f["module_offset"] is None or f["module_offset"] > 0 for f in error["frames"])

