"""`GET /executions`: the caller's executions, newest first, filtered, in exact pages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    assert_problem,
    event_entries,
    upload,
    wait_for,
    with_settings,
)
from tests.relay.gateway.test_outputs import relay
from tests.relay.gateway.test_pipelines import TRAP_WAT, _finished, _post
from tests.relay.gateway.test_sessions import call, make_session

EXECUTE = "/intent/execute-wasm"


async def _run(http: httpx.AsyncClient, cid: str, inputs: list[Any]) -> str:
    response = await http.post(EXECUTE, json={"cid": cid, "inputs": inputs})
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


async def _all(http: httpx.AsyncClient, query: str = "", limit: int = 50) -> list[str]:
    """Every listed request id, page by page."""
    ids: list[str] = []
    cursor = None
    while True:
        url = f"/executions?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        response = await http.get(url)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        ids += [item["request_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


async def test_executions_are_listed_newest_first_and_filtered(
        http: httpx.AsyncClient, bob: httpx.AsyncClient, executor: Any) -> None:
    add, trap = (await upload(http, ADD_WAT))["cid"], (await upload(http, TRAP_WAT))["cid"]
    ran = [await _run(http, add, [i, 1]) for i in range(5)]
    failed = await _run(http, trap, [1])
    session = await make_session(http)
    called = (await call(http, session["session_id"], "add", [2])).json()["request_id"]
    pipeline_id = await _post(http, {"nodes": [{"id": "a", "cid": add, "inputs": [1, 2]}]})
    node = (await _finished(http, pipeline_id))["nodes"]["a"]["request_id"]

    page = (await http.get("/executions")).json()
    assert [item["request_id"] for item in page["items"]] == [node, called, failed, *ran[::-1]]
    assert page["next_cursor"] is None
    first = page["items"][-1]
    assert first["status"] == "completed" and first["output"] == 1  # as GET /executions/{id}
    assert first == (await http.get(f"/executions/{ran[0]}")).json()

    assert await _all(http, "&status=failed") == [failed]
    assert await _all(http, f"&session_id={session['session_id']}") == [called]
    assert await _all(http, f"&pipeline_id={pipeline_id}") == [node]
    assert await _all(http, "&status=completed&session_id=nope") == []
    # Pages of two hold everything once, in order.
    assert await _all(http, limit=2) == [node, called, failed, *ran[::-1]]
    # Another principal lists none of them, and cannot filter its way in.
    assert (await bob.get("/executions")).json() == {"items": [], "next_cursor": None}
    assert (await bob.get(f"/executions?pipeline_id={pipeline_id}")).json()["items"] == []


async def test_pages_stay_exact_while_executions_are_added(http: httpx.AsyncClient,
                                                           executor: Any) -> None:
    add = (await upload(http, ADD_WAT))["cid"]
    before = [await _run(http, add, [i, 0]) for i in range(6)]
    first = (await http.get("/executions?limit=3")).json()
    assert [item["request_id"] for item in first["items"]] == before[:2:-1]
    newer = await _run(http, add, [100, 0])
    rest = (await http.get(f"/executions?limit=3&cursor={first['next_cursor']}")).json()
    # The new one is ahead of the first page: the second goes on where the first stopped.
    assert [item["request_id"] for item in rest["items"]] == before[2::-1]
    assert newer not in [item["request_id"] for item in rest["items"]]


async def test_bad_queries_are_problems(http: httpx.AsyncClient) -> None:
    for query, words in [("status=done", "status must be one of"),
                         ("colour=red", "unknown query parameter 'colour'"),
                         ("cursor=abc", "cursor"),
                         ("limit=501", "limit must be"),
                         ("limit=0", "limit must be")]:
        body = assert_problem(await http.get(f"/executions?{query}"), 400, "invalid-request")
        assert words in body["detail"], (query, body)
    assert_problem(await http.get("/executions", headers={"X-API-Key": "nope"}), 401,
                   "unauthenticated")


async def test_expired_executions_leave_the_list(settings: Settings) -> None:
    async with relay(with_settings(settings, idempotency_ttl_ms=300)) as (alice, _):
        add = (await upload(alice, ADD_WAT))["cid"]
        request_id = await _run(alice, add, [1, 1])
        assert await _all(alice) == [request_id]

        async def gone() -> bool:
            return await _all(alice) == []
        assert await wait_for(gone, timeout_s=10)


async def test_executions_accepted_in_one_millisecond_are_listed_in_acceptance_order(
        http: httpx.AsyncClient, settings: Settings) -> None:
    """Accepted together, many in one millisecond: newest first all the same, by the order of
    their `execution_queued` events (not by their ids within a millisecond)."""
    add = (await upload(http, ADD_WAT))["cid"]

    async def submit(n: int) -> str:
        response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                                   json={"cid": add, "inputs": [n, 1]})
        assert response.status_code == 202, response.text
        request_id: str = response.json()["request_id"]
        return request_id

    submitted = set(await asyncio.gather(*(submit(n) for n in range(30))))
    queued_at = {}
    for entry_id, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        if event["type"] == "execution_queued" and event["request_id"] in submitted:
            ms, seq = entry_id.decode().split("-")
            queued_at[event["request_id"]] = (int(ms), int(seq))
    newest_first = sorted(submitted, key=queued_at.__getitem__, reverse=True)
    assert await _all(http) == newest_first
