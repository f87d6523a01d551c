"""Pipelines over HTTP: real Redis, a real executor, the gateway's own scheduler."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import msgspec

from relay.keys import Keys
from relay.pipelines import node_request_id
from tests.conftest import (
    ADD_WAT,
    BOB_KEY,
    Served,
    assert_problem,
    event_entries,
    upload,
    wait_for,
)
from tests.relay.gateway.test_events import EVENTS, client, sse_messages

PAIR_WAT = """(module (func (export "main") (param i32) (result i32 i32)
  local.get 0 local.get 0 i32.const 2 i32.mul))"""
TRAP_WAT = """(module (func (export "main") (param i32) (result i32) unreachable))"""
# Spins `n` times, then returns n: a node that takes a moment.
SPIN_WAT = """(module (func (export "main") (param i32) (result i32) (local i32)
  (block (loop (br_if 1 (i32.ge_u (local.get 1) (local.get 0)))
    (local.set 1 (i32.add (local.get 1) (i32.const 1))) (br 0)))
  local.get 0))"""
FOREVER_WAT = """(module (func (export "main") (param i32) (result i32)
  (loop (br 0)) i32.const 0))"""


async def _cid(http: httpx.AsyncClient, wat: str) -> str:
    cid: str = (await upload(http, wat))["cid"]
    return cid


async def _post(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await http.post("/pipelines", json=body)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["status"] == "running"
    assert response.headers["location"] == answer["links"]["self"]
    pipeline_id: str = answer["pipeline_id"]
    return pipeline_id


async def _finished(http: httpx.AsyncClient, pipeline_id: str,
                    timeout_s: float = 30) -> dict[str, Any]:
    async def ended() -> dict[str, Any] | None:
        view: dict[str, Any] = (await http.get(f"/pipelines/{pipeline_id}")).json()
        return view if view["status"] != "running" else None
    view: dict[str, Any] = await wait_for(ended, timeout_s=timeout_s, interval_s=0.05)
    return view


async def _pipeline_events(settings: Any, pipeline_id: str) -> list[dict[str, Any]]:
    return [event for _, fields in await event_entries(settings)
            if (event := json.loads(fields[b"data"])).get("pipeline_id") == pipeline_id
            and event["type"].startswith("pipeline_")]


async def test_a_diamond_computes_its_value(http: httpx.AsyncClient, executor: Any,
                                            settings: Any) -> None:
    add, pair = await _cid(http, ADD_WAT), await _cid(http, PAIR_WAT)
    pipeline_id = await _post(http, {"nodes": [
        {"id": "a", "cid": add, "inputs": [1, 2]},
        {"id": "b", "cid": pair, "inputs": [{"$ref": "a"}]},
        {"id": "c", "cid": add, "inputs": [{"$ref": "a"}, {"$literal": 10}]},
        {"id": "d", "cid": add, "inputs": [{"$ref": "b", "pointer": "/1"}, {"$ref": "c"}]},
    ]})
    view = await _finished(http, pipeline_id)
    assert view["status"] == "completed", view
    assert {n: s["output"] for n, s in view["nodes"].items()} == {
        "a": 3, "b": [3, 6], "c": 13, "d": 19}
    assert view["progress"]["completed"] == 4 and view["progress"]["percent"] == 100
    assert view["finished_at"] is not None
    # Each node is an ordinary execution carrying its pipeline.
    node = view["nodes"]["d"]
    assert node["attempts"] == 1
    assert node["request_id"] == node_request_id(pipeline_id, "d", 1)
    execution = (await http.get(f"/executions/{node['request_id']}")).json()
    assert execution["status"] == "completed" and execution["output"] == 19
    assert execution["pipeline_id"] == pipeline_id
    its_events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)
                  if json.loads(fields[b"data"]).get("request_id") == node["request_id"]]
    assert {e["type"] for e in its_events} >= {"execution_queued", "execution_started",
                                               "execution_complete"}
    assert all(e["pipeline_id"] == pipeline_id for e in its_events)
    events = await _pipeline_events(settings, pipeline_id)
    assert events[-1]["type"] == "pipeline_complete" and events[-1]["status"] == "completed"
    assert [e for e in events if e["type"] == "pipeline_complete"] == events[-1:]
    # d was queued only after b and c completed.
    order = [(e["node"], e["node_status"]) for e in events if e["type"] == "pipeline_progress"]
    assert order.index(("d", "queued")) > order.index(("b", "completed"))
    assert order.index(("d", "queued")) > order.index(("c", "completed"))
    # Listed, newest first; bob sees nothing of it.
    listed = (await http.get("/pipelines")).json()
    assert [p["pipeline_id"] for p in listed["items"]] == [pipeline_id]
    assert listed["next_cursor"] is None


async def test_a_completion_advances_its_pipeline_at_once(http: httpx.AsyncClient,
                                                           executor: Any, settings: Any) -> None:
    """The scheduler reads its group as soon as the gateway's fan-in sees a node's completion
    pass, not on its once-a-second fallback read: along a chain, from each node's
    `execution_complete` to its pipeline's `completed` for it (when Redis appended each) takes
    milliseconds."""
    add = await _cid(http, ADD_WAT)
    nodes = [{"id": "n0", "cid": add, "inputs": [0, 1], "memoize": False}]
    nodes += [{"id": f"n{i}", "cid": add, "inputs": [{"$ref": f"n{i - 1}"}, 1],
               "memoize": False} for i in range(1, 12)]
    pipeline_id = await _post(http, {"nodes": nodes})
    view = await _finished(http, pipeline_id)
    assert view["nodes"]["n11"]["output"] == 12
    appended: dict[tuple[str, str], float] = {}
    requests = {node["request_id"]: name for name, node in view["nodes"].items()}
    for entry_id, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        at = int(entry_id.split(b"-")[0]) / 1000
        if event["type"] == "execution_complete" and event["request_id"] in requests:
            appended[(requests[event["request_id"]], "ran")] = at
        elif event["type"] == "pipeline_progress" and event["pipeline_id"] == pipeline_id \
                and event["node_status"] == "completed":
            appended[(event["node"], "counted")] = at
    gaps = sorted(appended[(f"n{i}", "counted")] - appended[(f"n{i}", "ran")] for i in range(12))
    assert gaps[len(gaps) // 2] < 0.2, gaps


async def test_each_attempt_is_accepted_once(http: httpx.AsyncClient, app: Any,
                                             executor: Any) -> None:
    """Every transition's reply lists all the pipeline's queued nodes, and a read's
    completions run their transitions at once: the scheduler still accepts each attempt once
    (accepting one again would only join it, but it cost some nine accepts a node)."""
    gw = app.state.gateway
    add = await _cid(http, ADD_WAT)
    accepted: list[str] = []
    real_accept = gw.bus.accept

    async def counted(request: Any, *args: Any, **kwargs: Any) -> Any:
        accepted.append(request.request_id)
        return await real_accept(request, *args, **kwargs)
    gw.bus.accept = counted
    nodes = [{"id": f"n{d}_{w}", "cid": add, "memoize": False,
              "inputs": [0, 1] if d == 0 else [{"$ref": f"n{d - 1}_{w}"}, 1]}
             for d in range(4) for w in range(16)]
    pipeline_id = await _post(http, {"nodes": nodes, "max_concurrency": 16})
    view = await _finished(http, pipeline_id)
    assert view["status"] == "completed"
    assert all(view["nodes"][f"n3_{w}"]["output"] == 4 for w in range(16))
    assert sorted(accepted) == sorted(node["request_id"] for node in view["nodes"].values())


async def test_fan_out_never_exceeds_max_concurrency(http: httpx.AsyncClient, executor: Any,
                                                     settings: Any) -> None:
    spin = await _cid(http, SPIN_WAT)
    nodes = [{"id": f"n{i}", "cid": spin, "inputs": [20_000]} for i in range(200)]
    nodes.append({"id": "sum", "cid": spin, "inputs": [{"$ref": "n199"}]})
    pipeline_id = await _post(http, {"nodes": nodes, "max_concurrency": 8})
    view = await _finished(http, pipeline_id, timeout_s=120)
    assert view["status"] == "completed", view["progress"]
    assert view["progress"]["completed"] == 201
    # Replayed from the events: queued/retrying places held at once never exceed 8.
    holding: set[str] = set()
    most = 0
    for event in await _pipeline_events(settings, pipeline_id):
        if event["type"] != "pipeline_progress":
            continue
        if event["node_status"] in ("queued", "retrying"):
            holding.add(event["node"])
        else:
            holding.discard(event["node"])
        most = max(most, len(holding))
    assert most == 8
    # Ready nodes go in declaration order.
    queued = [e["node"] for e in await _pipeline_events(settings, pipeline_id)
              if e.get("node_status") == "queued"]
    assert queued[:200] == [f"n{i}" for i in range(200)]


async def test_a_failing_node_skips_its_dependents(http: httpx.AsyncClient, executor: Any,
                                                   settings: Any) -> None:
    add, trap = await _cid(http, ADD_WAT), await _cid(http, TRAP_WAT)
    pipeline_id = await _post(http, {"nodes": [
        {"id": "bad", "cid": trap, "inputs": [1]},
        {"id": "after", "cid": add, "inputs": [{"$ref": "bad"}, 1]},
        {"id": "later", "cid": add, "inputs": [{"$ref": "after"}, 1]},
        {"id": "free", "cid": add, "inputs": [2, 2]},
    ]})
    view = await _finished(http, pipeline_id)
    assert view["status"] == "failed"
    statuses = {n: s["status"] for n, s in view["nodes"].items()}
    assert statuses == {"bad": "failed", "after": "skipped", "later": "skipped",
                        "free": "completed"}
    assert view["nodes"]["bad"]["error"]["code"] == "trap"
    assert view["nodes"]["after"]["request_id"] is None
    assert view["nodes"]["free"]["output"] == 4


async def test_fail_fast_cancels_the_rest(http: httpx.AsyncClient, executor: Any) -> None:
    trap, forever, add = (await _cid(http, TRAP_WAT), await _cid(http, FOREVER_WAT),
                          await _cid(http, ADD_WAT))
    pipeline_id = await _post(http, {"fail_fast": True, "max_concurrency": 2, "nodes": [
        {"id": "long", "cid": forever, "inputs": [0], "policy": {"max_time": 60_000}},
        {"id": "bad", "cid": trap, "inputs": [1]},
        {"id": "waits", "cid": add, "inputs": [1, 1]},
    ]})
    view = await _finished(http, pipeline_id)
    assert view["status"] == "failed"
    statuses = {n: s["status"] for n, s in view["nodes"].items()}
    assert statuses == {"long": "cancelled", "bad": "failed", "waits": "cancelled"}
    execution = (await http.get(f"/executions/{view['nodes']['long']['request_id']}")).json()
    assert execution["status"] == "cancelled"


async def test_retries_back_off_and_then_fail(http: httpx.AsyncClient, executor: Any,
                                              settings: Any) -> None:
    trap = await _cid(http, TRAP_WAT)
    pipeline_id = await _post(http, {"nodes": [
        {"id": "t", "cid": trap, "inputs": [1], "retries": 2, "retry_on": ["trap"]},
        {"id": "no", "cid": trap, "inputs": [1], "retries": 2, "retry_on": ["timeout"]},
    ]})
    view = await _finished(http, pipeline_id)
    assert view["nodes"]["t"]["status"] == "failed"
    assert view["nodes"]["t"]["attempts"] == 3
    assert view["nodes"]["no"]["attempts"] == 1  # trap is not in its retry_on
    # The attempts are distinct executions, queued after 0.5 s x 2^k x [0.5, 1].
    queued_at = [time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
                 + int(e["timestamp"][20:23]) / 1000
                 for e in await _pipeline_events(settings, pipeline_id)
                 if e.get("node") == "t" and e.get("node_status") == "queued"]
    assert len(queued_at) == 3
    first, second = queued_at[1] - queued_at[0], queued_at[2] - queued_at[1]
    # At least the backoff; at most it plus a loaded machine's latency.
    assert 0.25 <= first < 1.25, first
    assert 0.5 <= second < 2.0, second
    ids = {node_request_id(pipeline_id, "t", k) for k in (1, 2, 3)}
    for request_id in ids:
        assert (await http.get(f"/executions/{request_id}")).json()["error"]["code"] == "trap"


async def test_a_reference_of_the_wrong_type_is_invalid_input(http: httpx.AsyncClient,
                                                              executor: Any) -> None:
    add, pair = await _cid(http, ADD_WAT), await _cid(http, PAIR_WAT)
    pipeline_id = await _post(http, {"nodes": [
        {"id": "p", "cid": pair, "inputs": [4]},
        {"id": "whole", "cid": add, "inputs": [{"$ref": "p"}, 1], "retries": 3},
        {"id": "nowhere", "cid": add, "inputs": [{"$ref": "p", "pointer": "/7"}, 1]},
    ]})
    view = await _finished(http, pipeline_id)
    assert view["status"] == "failed"
    whole = view["nodes"]["whole"]
    assert whole["status"] == "failed" and whole["attempts"] == 1  # never retried
    assert whole["error"]["code"] == "invalid_input"
    assert "array" in whole["error"]["message"]
    assert view["nodes"]["nowhere"]["error"]["code"] == "invalid_input"
    # It never ran: no execution exists.
    assert (await http.get(f"/executions/{whole['request_id']}")).status_code == 404


async def test_validation_errors_point_at_the_problem(http: httpx.AsyncClient) -> None:
    add = await _cid(http, ADD_WAT)

    async def refused(body: dict[str, Any]) -> dict[str, Any]:
        return assert_problem(await http.post("/pipelines", json=body), 400, "invalid-request")

    body = await refused({"nodes": [{"id": "a", "cid": add, "inputs": [1, 2]},
                                    {"id": "a", "cid": add, "inputs": [1, 2]}]})
    assert body["errors"][0]["pointer"] == "/nodes/1/id"
    body = await refused({"nodes": [{"id": "a", "cid": add, "inputs": [1, {"$ref": "zz"}]}]})
    assert body["errors"][0]["pointer"] == "/nodes/0/inputs/1"
    body = await refused({"nodes": [
        {"id": "free", "cid": add, "inputs": [1, 2]},
        {"id": "x", "cid": add, "inputs": [{"$ref": "z"}, 1]},
        {"id": "y", "cid": add, "inputs": [{"$ref": "x"}, 1]},
        {"id": "z", "cid": add, "inputs": [{"$ref": "y"}, 1]},
    ]})
    assert body["errors"][0]["pointer"] in ("/nodes/1", "/nodes/2", "/nodes/3")
    for node in ("x", "y", "z"):
        assert node in body["detail"]
    assert "free" not in body["detail"]
    body = await refused({"nodes": [{"id": "a", "cid": add, "inputs": [1, "two"]},
                                    {"id": "b", "cid": add, "inputs": [1]},
                                    {"id": "c", "cid": add, "entrypoint": "nope", "inputs": []},
                                    {"id": "d", "cid": add, "inputs": [1, 2],
                                     "policy": {"max_gas": 10**15}}]})
    pointers = [e["pointer"] for e in body["errors"]]
    assert pointers == ["/nodes/0/inputs/1", "/nodes/1/inputs", "/nodes/2/entrypoint",
                        "/nodes/3/policy/max_gas"]
    body = await refused({"nodes": [{"id": "a", "cid": "bafkreibhmtmv24yn2zu7udv53bwwvgryl"
                                                 "zhbep2e52p72tly7wjiufzpom", "inputs": []}]})
    assert body["errors"][0]["pointer"] == "/nodes/0/cid"
    body = await refused({"nodes": [{"id": "bad id!", "cid": add}]})
    assert body["errors"][0]["pointer"] == "/nodes/0/id"
    await refused({"nodes": []})
    await refused({"nodes": [{"id": "a", "cid": add, "inputs": [1, 2]}], "max_concurrency": 65})
    # Nothing was stored.
    assert (await http.get("/pipelines")).json()["items"] == []


async def test_too_many_nodes(http: httpx.AsyncClient, app: Any) -> None:
    add = await _cid(http, ADD_WAT)
    gw = app.state.gateway
    gw.settings = msgspec.structs.replace(gw.settings, max_pipeline_nodes=3)
    response = await http.post("/pipelines", json={"nodes": [
        {"id": f"n{i}", "cid": add, "inputs": [1, 2]} for i in range(4)]})
    body = assert_problem(response, 400, "invalid-request")
    assert body["errors"][0]["pointer"] == "/nodes"


async def test_another_principal_sees_nothing(http: httpx.AsyncClient, bob: httpx.AsyncClient,
                                              executor: Any) -> None:
    add = await _cid(http, ADD_WAT)
    pipeline_id = await _post(http, {"nodes": [{"id": "a", "cid": add, "inputs": [1, 2]}]})
    await _finished(http, pipeline_id)
    assert_problem(await bob.get(f"/pipelines/{pipeline_id}"), 404, "not-found")
    assert_problem(await bob.delete(f"/pipelines/{pipeline_id}"), 404, "not-found")
    assert (await bob.get("/pipelines")).json() == {"items": [], "next_cursor": None}
    assert_problem(await http.get("/pipelines/nope"), 404, "not-found")


async def test_delete_cancels_it(http: httpx.AsyncClient, executor: Any) -> None:
    forever, add = await _cid(http, FOREVER_WAT), await _cid(http, ADD_WAT)
    pipeline_id = await _post(http, {"nodes": [
        {"id": "long", "cid": forever, "inputs": [0], "policy": {"max_time": 60_000}},
        {"id": "next", "cid": add, "inputs": [{"$ref": "long"}, 1]},
    ]})

    async def running() -> bool:
        view = (await http.get(f"/pipelines/{pipeline_id}")).json()
        return bool(view["nodes"]["long"]["status"] == "running")
    await wait_for(running)
    response = await http.delete(f"/pipelines/{pipeline_id}")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["status"] == "cancelled"
    assert {n: s["status"] for n, s in view["nodes"].items()} == {
        "long": "cancelled", "next": "cancelled"}
    assert_problem(await http.delete(f"/pipelines/{pipeline_id}"), 409, "conflict")


async def test_the_same_idempotency_key_is_the_same_pipeline(http: httpx.AsyncClient,
                                                             executor: Any) -> None:
    add = await _cid(http, ADD_WAT)
    body = {"idempotency_key": "k1", "nodes": [{"id": "a", "cid": add, "inputs": [1, 2]}]}
    first = await _post(http, body)
    again = await http.post("/pipelines", json=body)
    assert again.status_code == 202 and again.json()["pipeline_id"] == first
    assert again.headers["idempotent-replayed"] == "true"
    body["nodes"][0]["inputs"] = [2, 2]  # type: ignore[index]
    assert_problem(await http.post("/pipelines", json=body), 422, "idempotency-key-reuse")
    await _finished(http, first)
    assert len((await http.get("/pipelines")).json()["items"]) == 1


async def test_a_crash_between_transition_and_accept_queues_once(
        http: httpx.AsyncClient, app: Any, executor: Any, settings: Any) -> None:
    """The scheduler runs a transition's script and dies before accepting what it queued:
    the entry stays pending; done again (a peer's reclaim), the node is queued exactly once."""
    gw = app.state.gateway
    add = await _cid(http, ADD_WAT)
    launches: list[str] = []
    real_launch = gw.scheduler.launch

    async def dies_once(pipeline_id: str, queued: list[tuple[str, int]]) -> None:
        if any(node == "b" for node, _ in queued) and not launches:
            launches.append("died")
            raise RuntimeError("killed between the script and the accept")
        await real_launch(pipeline_id, queued)
    gw.scheduler.launch = dies_once
    pipeline_id = await _post(http, {"nodes": [
        {"id": "a", "cid": add, "inputs": [1, 2]},
        {"id": "b", "cid": add, "inputs": [{"$ref": "a"}, 1]},
    ]})

    async def b_queued() -> bool:
        view = (await http.get(f"/pipelines/{pipeline_id}")).json()
        return bool(view["nodes"]["b"]["status"] == "queued" and launches)
    await wait_for(b_queued)
    keys = Keys(settings.prefix)
    request_id = node_request_id(pipeline_id, "b", 1)
    assert not await gw.client.exists(keys.execution(request_id))
    pending = await gw.client.xpending(keys.followed, Keys.PIPELINE_GROUP)
    assert pending["pending"] == 1  # the completion of a, not acknowledged
    # A peer takes it over and does it again: b is accepted, once.
    gw.scheduler.launch = real_launch
    await gw.scheduler.reclaim(min_idle_ms=0)
    view = await _finished(http, pipeline_id)
    assert view["status"] == "completed" and view["nodes"]["b"]["output"] == 4
    assert view["nodes"]["b"]["attempts"] == 1
    queued = [fields for _, fields in await event_entries(settings)
              if json.loads(fields[b"data"]).get("request_id") == request_id
              and json.loads(fields[b"data"])["type"] == "execution_queued"]
    assert len(queued) == 1


async def test_sse_narrows_to_a_pipeline(served: Served, executor: Any) -> None:
    async with client(served) as http:
        add = await _cid(http, ADD_WAT)
        other = await _post(http, {"nodes": [{"id": "x", "cid": add, "inputs": [5, 5]}]})
        await _finished(http, other)
        pipeline_id = await _post(http, {"nodes": [
            {"id": "a", "cid": add, "inputs": [1, 2]},
            {"id": "b", "cid": add, "inputs": [{"$ref": "a"}, 1]}]})
        seen: list[dict[str, Any]] = []
        async with http.stream("GET", EVENTS, params={"pipeline_id": pipeline_id,
                                                      "last_event_id": "0"}) as stream:
            async with asyncio.timeout(15):
                async for message in sse_messages(stream):
                    if message.data is None:
                        continue
                    seen.append(message.json)
                    if message.json["type"] == "pipeline_complete":
                        break
        assert all(event.get("pipeline_id") == pipeline_id for event in seen)
        types = [event["type"] for event in seen]
        assert types.count("pipeline_progress") == 4 and types[-1] == "pipeline_complete"
        assert types.count("execution_queued") == 2 and types.count("execution_complete") == 2
        async with client(served, BOB_KEY) as bob:
            assert_problem(await bob.get(EVENTS, params={"pipeline_id": pipeline_id}), 404,
                           "not-found")


async def test_a_memoized_rerun_reaches_no_executor(http: httpx.AsyncClient, executor: Any,
                                                    settings: Any) -> None:
    add = await _cid(http, ADD_WAT)
    nodes = [{"id": "a", "cid": add, "inputs": [1, 2]},
             {"id": "b", "cid": add, "inputs": [{"$ref": "a"}, 4]},
             {"id": "fresh", "cid": add, "inputs": [5, 5], "memoize": False}]
    first = await _finished(http, await _post(http, {"nodes": nodes}))
    assert {n: s.get("cached") for n, s in first["nodes"].items()} == {
        "a": False, "b": False, "fresh": None}
    again = await _finished(http, await _post(http, {"nodes": nodes}))
    assert again["status"] == "completed"
    assert {n: (s["output"], s.get("cached")) for n, s in again["nodes"].items()} == {
        "a": (3, True), "b": (7, True), "fresh": (10, None)}
    started = {json.loads(fields[b"data"])["request_id"] for _, fields
               in await event_entries(settings)
               if json.loads(fields[b"data"])["type"] == "execution_started"}
    assert again["nodes"]["a"]["request_id"] not in started
    assert again["nodes"]["b"]["request_id"] not in started
    assert again["nodes"]["fresh"]["request_id"] in started
