"""Pipelines under real processes: two gateway processes (each runs a scheduler in group
`pipelines`) and an executor on the test's Redis. One gateway is SIGKILLed while the pipeline
runs: the other finishes it, each node queued exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
from datetime import datetime
from typing import Any

import httpx

from relay.pipelines import node_request_id
from relay.settings import Settings
from tests.conftest import ADD_WAT, ALICE_KEY, ROOT, Processes, event_entries, wait_for
from tests.relay.gateway.test_pipelines import SPIN_WAT


async def test_a_killed_gateway_loses_no_node_and_queues_none_twice(
        processes: Processes, settings: Settings) -> None:
    first, second = processes.gateway(), processes.gateway()
    processes.start("executor")
    headers = {"X-API-Key": ALICE_KEY}
    async with httpx.AsyncClient(base_url=first, headers=headers, timeout=30) as http:
        response = await http.post("/modules", content=SPIN_WAT.encode())
        cid = response.json()["cid"]
        # 8 chains of 8: each node waits for the one before it, so completions keep coming.
        nodes: list[dict[str, Any]] = []
        for chain in range(8):
            for step in range(8):
                inputs = ([200_000] if step == 0
                          else [{"$ref": f"c{chain}s{step - 1}"}])
                # Not memoized: every node runs (they are all the same computation).
                nodes.append({"id": f"c{chain}s{step}", "cid": cid, "inputs": inputs,
                              "memoize": False})
        response = await http.post("/pipelines", json={"nodes": nodes, "max_concurrency": 8})
        assert response.status_code == 202, response.text
        pipeline_id = response.json()["pipeline_id"]

        async def some_done() -> bool:
            view = (await http.get(f"/pipelines/{pipeline_id}")).json()
            return bool(view["progress"]["completed"] >= 8)
        await wait_for(some_done, timeout_s=60)
    processes.running[0].send_signal(signal.SIGKILL)
    async with httpx.AsyncClient(base_url=second, headers=headers, timeout=30) as http:
        async def ended() -> dict[str, Any] | None:
            view: dict[str, Any] = (await http.get(f"/pipelines/{pipeline_id}")).json()
            return view if view["status"] != "running" else None
        view = await wait_for(ended, timeout_s=90, interval_s=0.2)
    assert view["status"] == "completed", view["progress"]
    assert all(node["attempts"] == 1 for node in view["nodes"].values())
    assert all(node["output"] == 200_000 for node in view["nodes"].values())
    queued: dict[str, int] = {}
    for _, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        if event["type"] == "execution_queued" and event.get("pipeline_id") == pipeline_id:
            queued[event["request_id"]] = queued.get(event["request_id"], 0) + 1
    assert len(queued) == 64 and set(queued.values()) == {1}


async def test_every_process_killed_mid_pipeline_it_still_completes_once(
        processes: Processes, settings: Settings) -> None:
    """The gateway and the executor SIGKILLed in the middle of a 100-node pipeline, new ones
    started: it completes, each node run as one attempt, each result counted once."""
    lease = {"RELAY_LEASE": "1500", "RELAY_DRAIN_GRACE": "1000"}
    gateway = processes.gateway()
    processes.start("executor", **lease)
    headers = {"X-API-Key": ALICE_KEY}
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=30) as http:
        cid = (await http.post("/modules", content=SPIN_WAT.encode())).json()["cid"]
        nodes: list[dict[str, Any]] = []
        for chain in range(10):
            for step in range(10):
                inputs = ([1_000_000] if step == 0
                          else [{"$ref": f"c{chain}s{step - 1}"}])
                # Not memoized: every node runs (they are all the same computation).
                nodes.append({"id": f"c{chain}s{step}", "cid": cid, "inputs": inputs,
                              "memoize": False})
        response = await http.post("/pipelines", json={"nodes": nodes, "max_concurrency": 10})
        assert response.status_code == 202, response.text
        pipeline_id = response.json()["pipeline_id"]

        async def under_way() -> bool:
            view = (await http.get(f"/pipelines/{pipeline_id}")).json()
            return bool(view["progress"]["completed"] >= 20)
        await wait_for(under_way, timeout_s=90)
    for process in processes.running:
        process.send_signal(signal.SIGKILL)
    gateway = processes.gateway()
    processes.start("executor", **lease)
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=30) as http:
        async def ended() -> dict[str, Any] | None:
            view: dict[str, Any] = (await http.get(f"/pipelines/{pipeline_id}")).json()
            return view if view["status"] != "running" else None
        view = await wait_for(ended, timeout_s=120, interval_s=0.2)
    assert view["status"] == "completed", view["progress"]
    assert all(node["attempts"] == 1 for node in view["nodes"].values())
    assert all(node["output"] == 1_000_000 for node in view["nodes"].values())
    queued: dict[str, int] = {}
    ended_runs: dict[str, int] = {}
    for _, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        if event.get("pipeline_id") != pipeline_id:
            continue
        if event["type"] == "execution_queued":
            queued[event["request_id"]] = queued.get(event["request_id"], 0) + 1
        if event["type"] in ("execution_complete", "execution_error"):
            ended_runs[event["request_id"]] = ended_runs.get(event["request_id"], 0) + 1
    assert len(queued) == 100 and set(queued.values()) == {1}
    assert len(ended_runs) == 100 and set(ended_runs.values()) == {1}


FIB_WAT = (ROOT / "relay" / "examples" / "fib.wat").read_text()
FIB_41 = 165_580_141


async def test_a_node_whose_executor_dies_is_retried_as_internal_and_counted_once(
        processes: Processes, settings: Settings) -> None:
    """The issue's retry test. An executor SIGKILLed mid-node: its run is re-run by a peer (the
    same attempt, the same request_id: not a retry); killed again, the entry has had its
    RELAY_MAX_DELIVERIES (2) and is dead-lettered, which ends the attempt `internal`. The
    pipeline then retries the node (a new attempt, a new request_id) after 0.5 s x 2^k x [0.5,
    1]. Twice so, then the third attempt completes: one result, counted once."""
    crash = {"RELAY_LEASE": "1000", "RELAY_MAX_DELIVERIES": "2"}
    gateway = processes.gateway()
    for _ in range(2):  # a survivor takes over (or dead-letters) what a killed one held
        processes.start("executor", **crash)
    headers = {"X-API-Key": ALICE_KEY}
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=30) as http:
        fib = (await http.post("/modules", content=FIB_WAT.encode())).json()["cid"]
        add = (await http.post("/modules", content=ADD_WAT.encode())).json()["cid"]
        response = await http.post("/pipelines", json={"nodes": [
            # fib(41) runs for seconds: long enough to be killed in the middle.
            {"id": "fib", "cid": fib, "inputs": [41], "retries": 3,
             "policy": {"max_gas": 10**11, "max_time": 60_000}},
            {"id": "next", "cid": add, "inputs": [{"$ref": "fib", "pointer": ""}, 0]},
        ]})
        assert response.status_code == 202, response.text
        pipeline_id = response.json()["pipeline_id"]
        for attempt in (1, 2):
            request_id = node_request_id(pipeline_id, "fib", attempt)
            for delivery in (1, 2):
                victim = await _running(settings, request_id, delivery)
                _process_of(processes, victim).send_signal(signal.SIGKILL)
                processes.start("executor", **crash)

        async def ended() -> dict[str, Any] | None:
            view: dict[str, Any] = (await http.get(f"/pipelines/{pipeline_id}")).json()
            return view if view["status"] != "running" else None
        view = await wait_for(ended, timeout_s=60, interval_s=0.1)
        assert view["status"] == "completed", view
        node = view["nodes"]["fib"]
        assert node["status"] == "completed" and node["output"] == FIB_41
        assert node["attempts"] == 3  # the re-runs after a crash were not retries
        assert node["request_id"] == node_request_id(pipeline_id, "fib", 3)
        assert view["nodes"]["next"]["output"] == FIB_41
        assert view["progress"]["completed"] == 2 and view["progress"]["percent"] == 100
        for attempt in (1, 2):
            failed = (await http.get(
                f"/executions/{node_request_id(pipeline_id, 'fib', attempt)}")).json()
            assert failed["status"] == "failed" and failed["error"]["code"] == "internal"
    events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
    mine = [e for e in events if e.get("pipeline_id") == pipeline_id]
    changes = [e for e in mine if e["type"] == "pipeline_progress" and e["node"] == "fib"]
    assert [e["node_status"] for e in changes] == [
        "queued", "retrying", "queued", "retrying", "queued", "completed"]
    # Each retry waits its backoff from the failure (`retrying`) to the next attempt (`queued`):
    # 0.5 s x 2^k x [0.5, 1] for k = 0, 1, plus at most a loaded machine's latency.
    gaps = [_at(changes[i + 1]) - _at(changes[i]) for i in (1, 3)]
    assert 0.25 <= gaps[0] < 0.5 + 0.75, gaps
    assert 0.5 <= gaps[1] < 1.0 + 1.0, gaps
    for attempt, runs in ((1, 2), (2, 2), (3, 1)):
        request_id = node_request_id(pipeline_id, "fib", attempt)
        started = [e for e in mine if e["type"] == "execution_started"
                   and e["request_id"] == request_id]
        assert len(started) == runs, (attempt, started)
        ends = [e for e in mine if e.get("request_id") == request_id
                and e["type"] in ("execution_complete", "execution_error")]
        assert len(ends) == 1, (attempt, ends)
    # Counted once: one completion of the node, one run of its dependent, one ending.
    assert [e["node_status"] for e in mine if e["type"] == "pipeline_progress"
            and e["node"] == "next"] == ["queued", "completed"]
    assert [e["status"] for e in mine if e["type"] == "pipeline_complete"] == ["completed"]


async def _running(settings: Settings, request_id: str, delivery: int) -> str:
    """The executor running `request_id`'s `delivery`-th run, once that run reports progress
    (it is inside the module)."""
    async def inside() -> str | None:
        events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
        mine = [e for e in events if e.get("request_id") == request_id]
        starts = [i for i, e in enumerate(mine) if e["type"] == "execution_started"]
        if len(starts) < delivery:
            return None
        assert len(starts) == delivery, f"run {len(starts)} began before {delivery} was killed"
        after = mine[starts[-1]:]
        if not any(e["type"] == "execution_progress" for e in after):
            return None
        assert not any(e["type"] in ("execution_complete", "execution_error") for e in after)
        node: str = after[0]["executor_node"]
        return node
    node: str = await wait_for(inside, timeout_s=30, interval_s=0.01)
    return node


def _process_of(processes: Processes, executor_node: str) -> subprocess.Popen[bytes]:
    """The executor process whose consumer name is `executor_node` (it holds its pid)."""
    found = [p for p in processes.running if f"-{p.pid}-" in executor_node]
    assert len(found) == 1, executor_node
    return found[0]


def _at(event: dict[str, Any]) -> float:
    """An event's `timestamp`, in epoch seconds."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()
