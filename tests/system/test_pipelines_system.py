"""Pipelines under real processes: two gateway processes (each runs a scheduler in group
`pipelines`) and an executor on the test's Redis. One gateway is SIGKILLed while the pipeline
runs: the other finishes it, each node queued exactly once."""

from __future__ import annotations

import json
import signal
from typing import Any

import httpx

from relay.settings import Settings
from tests.conftest import ALICE_KEY, Processes, event_entries, wait_for
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
