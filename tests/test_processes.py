"""Gateway and executors as separate real processes on one Redis, over real HTTP."""

from __future__ import annotations

import json

import httpx
import redis

from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import ALICE_KEY, ROOT, Processes, wait_for

FIB_WAT = (ROOT / "examples" / "fib.wat").read_text()
HEADERS = {"X-API-Key": ALICE_KEY}


def upload(base: str, wat: str) -> str:
    response = httpx.post(f"{base}/modules", content=wat.encode(), headers=HEADERS)
    assert response.status_code in (200, 201), response.text
    cid: str = response.json()["cid"]
    return cid


async def test_gateway_and_executor_processes_serve_a_sync_execute(
        processes: Processes) -> None:
    base = processes.gateway()
    processes.start("executor")
    cid = upload(base, (ROOT / "examples" / "calculator.wat").read_text())
    response = httpx.post(f"{base}/intent/execute-wasm", headers=HEADERS, timeout=30,
                          json={"cid": cid, "inputs": [5, 3]})
    assert response.status_code == 200, response.text
    assert response.json()["output"] == 8
    health = httpx.get(f"{base}/intent/execute-wasm/health").json()
    assert health["executors"] == 1
    assert health["status"] == "healthy"


async def test_two_executors_share_the_work(processes: Processes, settings: Settings) -> None:
    base = processes.gateway()
    for _ in range(2):
        processes.start("executor", RELAY_EXECUTOR_CONCURRENCY="1")
    cid = upload(base, FIB_WAT)
    request_ids = []
    for n in range(24):
        response = httpx.post(f"{base}/intent/execute-wasm", headers={
            **HEADERS, "Prefer": "respond-async"}, json={"cid": cid, "inputs": [22 + n % 3],
                                                         "idempotency_key": f"share-{n}"})
        assert response.status_code == 202, response.text
        request_ids.append(response.json()["request_id"])

    def all_completed() -> bool:
        return all(httpx.get(f"{base}/executions/{rid}", headers=HEADERS).json()["status"]
                   == "completed" for rid in request_ids)

    await wait_for(all_completed, timeout_s=30, interval_s=0.1)
    keys = Keys(settings.prefix)
    with redis.Redis.from_url(settings.redis_url or "") as client:
        events = [json.loads(fields[b"data"]) for _, fields in client.xrange(keys.events)]
    nodes = {e["executor_node"] for e in events if e["type"] == "execution_started"}
    assert len(nodes) == 2, f"one executor did all the work: {nodes}"
    terminal = [e for e in events if e["type"] in ("execution_complete", "execution_error")]
    assert sorted(e["request_id"] for e in terminal) == sorted(request_ids)

