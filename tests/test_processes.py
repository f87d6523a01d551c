"""Gateway and executors as separate real processes on one Redis, over real HTTP."""

from __future__ import annotations

import json

import httpx
import redis

from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import ALICE_KEY, ROOT, Processes, upload, wait_for


def client_for(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"X-API-Key": ALICE_KEY}, timeout=30)


async def test_gateway_and_executor_processes_serve_a_sync_execute(
        processes: Processes) -> None:
    async with client_for(processes.gateway()) as http:
        processes.start("executor")
        module = await upload(http, (ROOT / "examples" / "calculator.wat").read_text())
        response = await http.post("/intent/execute-wasm",
                                   json={"cid": module["cid"], "inputs": [5, 3]})
        assert response.status_code == 200, response.text
        assert response.json()["output"] == 8
        health = (await http.get("/intent/execute-wasm/health")).json()
        assert health["executors"] == 1
        assert health["status"] == "healthy"


async def test_two_executors_share_the_work(processes: Processes, settings: Settings) -> None:
    async with client_for(processes.gateway()) as http:
        for _ in range(2):
            processes.start("executor", RELAY_EXECUTOR_CONCURRENCY="1", RELAY_EXECUTOR_PREFETCH="0")

        async def both_alive() -> bool:
            health = (await http.get("/intent/execute-wasm/health")).json()
            return bool(health["executors"] == 2)

        await wait_for(both_alive, timeout_s=20)
        module = await upload(http, (ROOT / "examples" / "fib.wat").read_text())
        request_ids = []
        for n in range(24):
            response = await http.post(
                "/intent/execute-wasm", headers={"Prefer": "respond-async"},
                json={"cid": module["cid"], "inputs": [27 + n % 3], "idempotency_key": f"k{n}"})
            assert response.status_code == 202, response.text
            request_ids.append(response.json()["request_id"])

        async def all_completed() -> bool:
            views = [(await http.get(f"/executions/{rid}")).json() for rid in request_ids]
            return all(view["status"] == "completed" for view in views)

        await wait_for(all_completed, timeout_s=30, interval_s=0.1)
    keys = Keys(settings.prefix)
    with redis.Redis.from_url(settings.redis_url or "") as client:
        events = [json.loads(fields[b"data"]) for _, fields in client.xrange(keys.events)]
    nodes = {e["executor_node"] for e in events if e["type"] == "execution_started"}
    assert len(nodes) == 2, f"one executor did all the work: {nodes}"
    terminal = [e for e in events if e["type"] in ("execution_complete", "execution_error")]
    assert sorted(e["request_id"] for e in terminal) == sorted(request_ids)
