"""Webhooks under real processes: the gateway and a `relay webhooks` deliverer are SIGKILLed
between two attempts of a delivery; a deliverer started afterwards makes the next attempt."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
from pytest_httpserver import HTTPServer
from standardwebhooks import Webhook
from werkzeug import Request, Response

from relay.settings import Settings
from tests.conftest import ADD_WAT, ALICE_KEY, Processes, wait_for

WEBHOOKS = {"RELAY_WEBHOOK_ALLOW_HTTP": "1", "RELAY_WEBHOOK_ALLOW_PRIVATE": "1",
            "RELAY_WEBHOOK_SCHEDULE": "3s"}


async def test_a_delivery_survives_its_deliverers_being_killed(
        processes: Processes, settings: Settings, httpserver: HTTPServer) -> None:
    got: list[tuple[float, dict[str, str], bytes]] = []

    def answer(request: Request) -> Response:
        got.append((time.monotonic(), dict(request.headers), request.get_data()))
        return Response("", status=500 if len(got) == 1 else 200)

    httpserver.expect_request("/hook", method="POST").respond_with_handler(answer)
    url = f"http://127.0.0.1:{httpserver.port}/hook"
    gateway = processes.gateway(**WEBHOOKS)
    processes.start("webhooks", **WEBHOOKS)
    processes.start("executor")
    headers = {"X-API-Key": ALICE_KEY}
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=30) as http:
        cid = (await http.post("/modules", content=ADD_WAT.encode())).json()["cid"]
        response = await http.post("/intent/execute-wasm", json={
            "cid": cid, "inputs": [20, 22], "callback_url": url})
        request_id = response.json()["request_id"]

        async def first_logged() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = (
                await http.get(f"/executions/{request_id}/deliveries")).json()["items"]
            return items if items else None
        first = await wait_for(first_logged, timeout_s=20)
        secret = (await http.get("/webhooks/secret")).json()["secret"]
    assert len(got) == 1 and first[0]["status_code"] == 500
    assert first[0]["next_attempt_at"] is not None
    for process in processes.running[:2]:  # the gateway and the deliverer beside it
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    processes.start("webhooks", **WEBHOOKS)
    await wait_for(lambda: len(got) == 2, timeout_s=30)
    gateway = processes.gateway(**WEBHOOKS)
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=30) as http:
        async def both_logged() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = (
                await http.get(f"/executions/{request_id}/deliveries")).json()["items"]
            return items if len(items) == 2 else None
        log = await wait_for(both_logged, timeout_s=10)
    assert [(e["attempt"], e["status_code"]) for e in log] == [(1, 500), (2, 200)]
    (_, first_headers, first_body), (_, second_headers, second_body) = got
    assert first_headers["Webhook-Id"] == second_headers["Webhook-Id"]
    assert second_headers["Relay-Attempt"] == "2"
    event = Webhook(secret).verify(second_body, second_headers)
    assert event == Webhook(secret).verify(first_body, first_headers)
    assert event["type"] == "execution_complete" and event["output"] == 42
