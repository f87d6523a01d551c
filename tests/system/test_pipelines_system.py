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
                nodes.append({"id": f"c{chain}s{step}", "cid": cid, "inputs": inputs})
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
