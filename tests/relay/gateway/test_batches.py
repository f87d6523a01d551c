"""Batches: many execute requests in one, each item through the whole pipeline on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from pytest_httpserver import HTTPServer
from standardwebhooks import Webhook

from executor.worker import Executor
from relay.gateway.app import create_app
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    assert_problem,
    client_for,
    event_entries,
    upload,
    wait_for,
    with_settings,
)
from tests.relay.gateway.test_pipelines import SPIN_WAT, TRAP_WAT
from tests.relay.gateway.test_webhooks import LOCAL, Receiver
from tests.relay.gateway.test_webhooks import gateway as webhook_gateway
from tests.relay.pipeline.test_pipeline import DENY_BOB_CALCULATOR, gateway, policy_dir

BATCH = "/intent/execute-wasm/batch"
__all__ = ["gateway", "policy_dir"]  # fixtures


async def test_every_item_is_answered_in_order_with_its_own_outcome(
        gateway: Any, policy_dir: Path, executor: Executor) -> None:
    (policy_dir / "deny.cedar").write_text(DENY_BOB_CALCULATOR)
    gateway.state.gateway.policies.reload_if_changed()
    async with client_for(gateway, ALICE_KEY) as alice, client_for(gateway, BOB_KEY) as bob:
        await upload(alice, ADD_WAT, name="calculator")
        add = (await upload(bob, ADD_WAT))["cid"]
        trap = (await upload(bob, TRAP_WAT))["cid"]
        items: list[dict[str, Any]] = []
        for i in range(100):
            if i % 10 == 3:
                items.append({"cid": add, "inputs": [i]})  # one input short: 400
            elif i % 10 == 7:
                items.append({"cid": trap, "inputs": [i]})
            elif i == 50:
                items.append({"cid": "glyph://calculator", "inputs": [1, 2]})  # forbidden
            else:
                items.append({"cid": add, "inputs": [i, 1]})
        response = await bob.post(BATCH, json={"items": items})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["batch_id"].startswith("bat_")
        results = body["results"]
        assert len(results) == 100
        for i, result in enumerate(results):
            if i % 10 == 3:
                assert result["status"] == 400 and result["type"] == "/problems/invalid-request"
                assert result["errors"][0]["pointer"] == f"/items/{i}/inputs"
            elif i % 10 == 7:
                assert result["success"] is False and result["error"]["code"] == "trap"
            elif i == 50:
                assert result["status"] == 403 and result["type"] == "/problems/forbidden"
            else:
                assert result["success"] is True and result["output"] == i + 1, (i, result)
        # The batch, as kept: every item has ended; the refused ones have no execution.
        view = (await bob.get(f"/batches/{body['batch_id']}")).json()
        assert view["status"] == "completed" and view["total"] == 100
        assert view["completed"] == 100
        assert [item["status"] for item in view["items"][:8]] == [
            "completed", "completed", "completed", "refused", "completed", "completed",
            "completed", "failed"]
        assert view["items"][50]["problem"]["status"] == 403
        assert view["items"][0]["request_id"] == results[0]["request_id"]
        item = (await bob.get(f"/executions/{results[0]['request_id']}")).json()
        assert item["batch_id"] == body["batch_id"]
        # Its executions are listed under it; another principal sees none of it.
        listed = (await bob.get(f"/executions?batch_id={body['batch_id']}&limit=500")).json()
        assert len(listed["items"]) == 100 - 10 - 1
        assert_problem(await alice.get(f"/batches/{body['batch_id']}"), 404, "not-found")
        assert (await alice.get(f"/executions?batch_id={body['batch_id']}")).json()[
            "items"] == []


async def test_the_rate_limit_counts_each_item(settings: Settings, executor: Executor) -> None:
    application = create_app(with_settings(settings, rate_limit=5, rate_window_ms=60_000))
    async with application.router.lifespan_context(application), \
            client_for(application, ALICE_KEY) as alice:
        add = (await upload(alice, ADD_WAT))["cid"]
        response = await alice.post(BATCH, json={"items": [
            {"cid": add, "inputs": [i, 0]} for i in range(8)]})
        results = response.json()["results"]
        assert [r.get("output") for r in results[:5]] == [0, 1, 2, 3, 4]
        for refused in results[5:]:
            assert refused["status"] == 429 and refused["type"] == "/problems/rate-limited"
        # A refused item was never accepted: the principal has the five that ran, no more.
        listed = (await alice.get("/executions?limit=500")).json()["items"]
        assert len(listed) == 5
        # The window is used up: the next request is refused too.
        assert_problem(await alice.post("/intent/execute-wasm",
                                        json={"cid": add, "inputs": [1, 1]}), 429, "rate-limited")


async def test_an_async_batch_ends_with_one_batch_complete(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    spin = (await upload(http, SPIN_WAT))["cid"]
    response = await http.post(BATCH, json={"items": [
        {"cid": spin, "inputs": [200_000]}, {"cid": spin, "inputs": [1]},
        {"cid": spin, "inputs": []}]}, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    batch_id = response.json()["batch_id"]
    assert response.headers["location"] == response.json()["links"]["self"] \
        == f"/batches/{batch_id}"

    # The last item's completion ends it (nobody reads the batch meanwhile).
    async def complete_events() -> list[dict[str, Any]] | None:
        found = [event for _, fields in await event_entries(settings)
                 if (event := json.loads(fields[b"data"]))["type"] == "batch_complete"]
        return found or None
    events = await wait_for(complete_events)
    assert len(events) == 1
    assert events[0]["batch_id"] == batch_id and events[0]["total"] == 3
    view = (await http.get(f"/batches/{batch_id}")).json()
    assert view["status"] == "completed" and view["finished_at"] is not None
    assert [item["status"] for item in view["items"]] == ["completed", "completed", "refused"]


async def test_a_batch_of_replays_is_complete_at_once(http: httpx.AsyncClient,
                                                      executor: Executor) -> None:
    add = (await upload(http, ADD_WAT))["cid"]
    item = {"cid": add, "inputs": [2, 2], "idempotency_key": "k"}
    first = (await http.post(BATCH, json={"items": [item]})).json()
    again = await http.post(BATCH, json={"items": [item, item]},
                            headers={"Prefer": "respond-async"})
    view = (await http.get(f"/batches/{again.json()['batch_id']}")).json()
    assert view["status"] == "completed", view
    assert [i["request_id"] for i in view["items"]] == [first["results"][0]["request_id"]] * 2


async def test_bad_batches_are_problems(http: httpx.AsyncClient, settings: Settings) -> None:
    add = (await upload(http, ADD_WAT))["cid"]
    one = {"cid": add, "inputs": [1, 1]}
    for body, pointer in [({"items": []}, "/items"),
                          ({"items": [one] * (settings.max_batch + 1)}, "/items"),
                          ({"items": one}, "/items"),
                          ({"items": [one], "colour": 1}, "/colour"),
                          ({"items": [one], "callback_events": ["batch_complete"]},
                           "/callback_events"),
                          ({"items": [one], "callback_url": "https://127.0.0.1/hook"},
                           "/callback_url")]:
        problem = assert_problem(await http.post(BATCH, json=body), 400, "invalid-request")
        assert problem["errors"][0]["pointer"] == pointer, (body, problem)
    assert_problem(await http.get("/batches/bat_000000000000000000000000"), 404, "not-found")


async def test_a_batch_callback_gets_one_signed_batch_complete(
        settings: Settings, executor: Executor, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/batch", 200)
    async with webhook_gateway(settings, **LOCAL) as (http, _):
        add = (await upload(http, ADD_WAT))["cid"]
        response = await http.post(BATCH, json={
            "items": [{"cid": add, "inputs": [i, i]} for i in range(3)],
            "callback_url": receiver.url}, headers={"Prefer": "respond-async"})
        assert response.status_code == 202, response.text
        batch_id = response.json()["batch_id"]
        await wait_for(lambda: len(receiver.got) == 1, timeout_s=15)
        secret = (await http.get("/webhooks/secret")).json()["secret"]
        _, headers, body = receiver.got[0]
        event = Webhook(secret).verify(body, headers)
        assert (event["type"], event["batch_id"], event["total"]) == (
            "batch_complete", batch_id, 3)


async def test_an_item_joining_an_execution_from_outside_ends_when_the_batch_is_read(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    spin = (await upload(http, SPIN_WAT))["cid"]
    item = {"cid": spin, "inputs": [20_000_000], "idempotency_key": "outside"}
    alone = await http.post("/intent/execute-wasm", json=item,
                            headers={"Prefer": "respond-async"})
    response = await http.post(BATCH, json={"items": [item]},
                               headers={"Prefer": "respond-async"})
    batch_id = response.json()["batch_id"]
    assert (await http.get(f"/batches/{batch_id}")).json()["status"] == "running"

    async def ended() -> bool:
        state = (await http.get(f"/executions/{alone.json()['request_id']}")).json()
        return state["status"] == "completed"
    await wait_for(ended)
    # Its completion carries no batch_id (the execution began outside the batch): reading the
    # batch finds it ended, and ends the batch.
    view = (await http.get(f"/batches/{batch_id}")).json()
    assert view["status"] == "completed" and view["finished_at"] is not None, view
    assert view["items"] == [{"request_id": alone.json()["request_id"], "status": "completed"}]
    events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
    assert [e["batch_id"] for e in events if e["type"] == "batch_complete"] == [batch_id]
