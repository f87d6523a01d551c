"""The gateway's background loops are supervised, and what a client sends cannot stop them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import redis.asyncio as aioredis
from websockets.asyncio.client import connect as ws_connect

from executor.worker import Executor
from relay import relay_version
from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import ADD_WAT, ALICE_KEY, Served, upload, wait_for
from tests.relay.gateway.test_control import LOOP_WAT, start


async def test_a_failed_fan_in_is_restarted_and_readiness_says_so_meanwhile(
        app: Any, http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    gateway = app.state.gateway
    gateway.supervisor.min_backoff_s = 2.0  # long enough to see it down
    assert (await http.get("/readyz")).status_code == 200
    # An entry the fan-in cannot route (no `data`): its loop fails on it.
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        await client.xadd(Keys(settings.prefix).events, {"user": "alice"})
    finally:
        await client.aclose()

    async def reported_down() -> bool:
        ready = await http.get("/readyz")
        health = (await http.get("/intent/execute-wasm/health")).json()
        return (ready.status_code == 503 and "events fan-in" in ready.json()["detail"]
                and health["status"] == "degraded"
                and health.get("loops_down") == ["events fan-in"])

    await wait_for(reported_down, timeout_s=2.0)
    await wait_for(lambda: _ready(http), timeout_s=10)
    health = (await http.get("/intent/execute-wasm/health")).json()
    assert "loops_down" not in health
    # The restarted reader delivers results again: a sync caller gets its answer.
    module = await upload(http, ADD_WAT)
    result = await http.post("/intent/execute-wasm",
                             json={"cid": module["cid"], "inputs": [2, 3]})
    assert result.status_code == 200, result.text
    assert result.json()["output"] == 5


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def test_the_index_links_to_routes_that_exist_without_credentials(
        app: Any, http: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://relay") as anonymous:
        index = await anonymous.get("/")
    assert index.status_code == 200
    assert index.json()["version"] == relay_version()
    links = index.json()["links"]
    assert {"docs", "console", "openapi", "health"} <= set(links)
    served = {route.path for route in app.routes}
    assert set(links.values()) <= served | {"/executions/{id}", "/names/{name}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://relay") as anonymous:
        assert (await anonymous.get(links["console"])).status_code == 200
    assert (await http.get(links["openapi"])).status_code == 200


async def test_health_reports_the_event_stream_it_serves(http: httpx.AsyncClient) -> None:
    health = (await http.get("/intent/execute-wasm/health")).json()
    assert health["features"]["sse_events"] is True
    assert health["features"]["bus_events"] is True


async def test_negative_additional_gas_over_websocket_is_refused_and_control_goes_on(
        served: Served, executor: Executor) -> None:
    async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=30) as http:
        request_id = await start(http, LOOP_WAT, [])  # running, long limits
        url = served.url.replace("http", "ws", 1) + f"/ws/executions/{request_id}"
        seen: list[dict[str, Any]] = []
        async with ws_connect(url, additional_headers={"X-API-Key": ALICE_KEY}) as ws:
            await ws.send(json.dumps({"action": "pause"}))
            async for message in ws:
                event = json.loads(message)
                seen.append(event)
                if event["type"] == "execution_paused":
                    await ws.send(json.dumps({"action": "resume", "additional_gas": -5}))
                elif event["type"] == "control_error":
                    # Refused at the gateway: the executor's control loop never saw it, and
                    # the execution is still paused and still under control.
                    state = (await http.get(f"/executions/{request_id}")).json()
                    assert state["status"] == "paused"
                    await ws.send(json.dumps({"action": "resume"}))
                elif event["type"] == "execution_resumed":
                    await ws.send(json.dumps({"action": "cancel"}))
    refusal = next(e for e in seen if e["type"] == "control_error")
    assert refusal["status"] == 400
    assert "additional_gas" in refusal["detail"]
    types = [e["type"] for e in seen]
    assert types.index("execution_paused") < types.index("control_error")
    assert types.index("control_error") < types.index("execution_resumed")
    assert seen[-1]["type"] == "execution_error"
    assert seen[-1]["error"]["code"] == "cancelled"


async def test_a_websocket_whose_history_was_trimmed_says_so_and_ends(
        served: Served, executor: Executor, settings: Settings) -> None:
    async with httpx.AsyncClient(base_url=served.url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=30) as http:
        module = await upload(http, ADD_WAT)
        done = await http.post("/intent/execute-wasm", json={"cid": module["cid"],
                                                            "inputs": [1, 2]})
        request_id = done.json()["request_id"]
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:  # what RELAY_EVENTS_RETENTION does to old events, all at once
            await client.xtrim(Keys(settings.prefix).events, maxlen=0)
        finally:
            await client.aclose()
        url = served.url.replace("http", "ws", 1) + f"/ws/executions/{request_id}"
        async with ws_connect(url, additional_headers={"X-API-Key": ALICE_KEY}) as ws, \
                asyncio.timeout(10):  # it used to wait forever for the trimmed terminal event
            messages = [json.loads(message) async for message in ws]  # until it closes
        assert ws.close_code == 1000
    assert [message["type"] for message in messages] == ["events_lost"]
