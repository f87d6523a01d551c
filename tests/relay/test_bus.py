"""What internal consumers see on the bus: entries, fields and order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from executor import progress
from executor.worker import Executor
from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import ADD_WAT, FIXTURES, upload

REQUESTED_FIELDS = {"type", "request_id", "cid", "entrypoint", "inputs", "policy", "user_id",
                    "session_id", "timestamp"}


async def entries(settings: Settings, stream: str) -> list[dict[str, Any]]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        return [json.loads(fields[b"data"]) for _, fields in await client.xrange(stream)]
    finally:
        await client.aclose()


async def test_lifecycle_events_in_order_with_contract_fields(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    module = await upload(http, ADD_WAT)
    result = (await http.post("/intent/execute-wasm",
                              json={"cid": module["cid"], "inputs": [2, 2]})).json()
    keys = Keys(settings.prefix)
    events = [e for e in await entries(settings, keys.events)
              if e["request_id"] == result["request_id"]]
    assert [e["type"] for e in events] == ["execution_queued", "execution_started",
                                           "execution_complete", "wasm_exec_completed"]
    queued, started, complete, completed = events
    assert queued["cid"] == module["cid"] and queued["position"] >= 0
    assert started["executor_node"] == "test-executor"
    assert complete["success"] is True and complete["output"] == 4
    assert complete["gas_used"] == result["gas_used"]
    assert REQUESTED_FIELDS | {"success", "output", "error", "gas_used", "duration"} <= set(
        completed)
    assert completed["user_id"] == "alice"
    assert all(e["timestamp"].endswith("Z") for e in events)

    [requested] = await entries(settings, keys.requests)
    assert set(requested) >= REQUESTED_FIELDS
    assert requested["type"] == "wasm_exec_requested"
    assert requested["entrypoint"] == "main"
    assert requested["inputs"] == [2, 2]
    # v1's three limits, and v1.1's max_stack beside them.
    assert requested["policy"] == {"max_memory": 67108864, "max_gas": 1000000000,
                                   "max_time": 5000, "max_stack": 1048576}


async def test_a_trap_ends_with_execution_error(http: httpx.AsyncClient, executor: Executor,
                                               settings: Settings) -> None:
    module = await upload(http, '(module (func (export "main") unreachable))')
    result = (await http.post("/intent/execute-wasm", json={"cid": module["cid"]})).json()
    events = [e for e in await entries(settings, Keys(settings.prefix).events)
              if e["request_id"] == result["request_id"]]
    assert [e["type"] for e in events][-2:] == ["execution_error", "wasm_exec_completed"]
    assert events[-2]["error"]["code"] == "trap"
    assert events[-1]["success"] is False


async def test_duplicate_requests_run_once(http: httpx.AsyncClient, executor: Executor,
                                           settings: Settings) -> None:
    module = await upload(http, ADD_WAT)
    body = {"cid": module["cid"], "inputs": [1, 2], "idempotency_key": "once"}
    responses = await asyncio.gather(*(http.post("/intent/execute-wasm", json=body)
                                       for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1, "every caller gets the same body"
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 19
    events = await entries(settings, Keys(settings.prefix).events)
    assert sum(e["type"] == "execution_started" for e in events) == 1
    assert len(await entries(settings, Keys(settings.prefix).requests)) == 1


async def test_example_bus_consumer_reads_each_completion_once(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, process_env

    module = await upload(http, ADD_WAT)
    ids = [(await http.post("/intent/execute-wasm", json={"cid": module["cid"],
                                                          "inputs": [n, 1]})).json()["request_id"]
           for n in range(2)]

    def consume() -> str:
        done = subprocess.run([sys.executable, "examples/bus_consumer.py", "--burst"],
                              env=process_env(settings), cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=True)
        return done.stdout

    first = await asyncio.to_thread(consume)
    assert sorted(line[:12] for line in first.splitlines()) == sorted(i[:12] for i in ids)
    assert "by alice: ok" in first
    assert await asyncio.to_thread(consume) == "", "everything was acknowledged the first time"


async def test_a_short_run_announces_its_start_before_its_output(
        http: httpx.AsyncClient, executor: Executor, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A short run does not announce its start on its own (its settle script does), but what
    it printed is published before that: `execution_started` must still come first."""
    monkeypatch.setattr(progress, "ANNOUNCE_AFTER_S", 60.0)  # every run counts as short
    module = await upload(http, (FIXTURES / "json_sum.wasm").read_bytes())
    result = (await http.post("/intent/execute-wasm",
                              json={"cid": module["cid"], "inputs": [1, 2, 3]})).json()
    assert result["output"] == {"sum": 6, "count": 3}
    events = [e for e in await entries(settings, Keys(settings.prefix).events)
              if e["request_id"] == result["request_id"]]
    assert [e["type"] for e in events] == ["execution_queued", "execution_started",
                                           "execution_output", "execution_complete",
                                           "wasm_exec_completed"]
    assert events[1]["timestamp"] == result["executed_at"]


async def test_each_execution_lists_its_client_events_and_the_list_expires_with_it(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    """The scripts that append an execution's events also list their ids under the execution
    (its history is read from there, not by scanning the stream), and the list expires with
    the record."""
    module = await upload(http, ADD_WAT)
    result = (await http.post("/intent/execute-wasm",
                              json={"cid": module["cid"], "inputs": [3, 4]})).json()
    keys = Keys(settings.prefix)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        listed = await client.lrange(keys.execution_events(result["request_id"]), 0, -1)
        ttl_ms = await client.pttl(keys.execution_events(result["request_id"]))
        record_ttl_ms = await client.pttl(keys.execution(result["request_id"]))
        retained = [(entry_id, json.loads(fields[b"data"])["type"])
                    for entry_id, fields in await client.xrange(keys.events)
                    if json.loads(fields[b"data"])["request_id"] == result["request_id"]]
    finally:
        await client.aclose()
    assert [entry_id for entry_id, _ in retained[:-1]] == listed  # wasm_exec_completed: no
    assert retained[-1][1] == "wasm_exec_completed"
    assert 0 < ttl_ms <= settings.idempotency_ttl_ms
    assert abs(ttl_ms - record_ttl_ms) < 1000
