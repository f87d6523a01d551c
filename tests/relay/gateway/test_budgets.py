"""Budgets: CRUD, who sees and changes what, and the accounting of executions against them."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    API_KEYS,
    BOB_KEY,
    ROOT,
    Processes,
    assert_problem,
    client_for,
    upload,
    wait_for,
    with_settings,
)

ROOT_KEY = "root-secret-key"
ADMINS = ('permit (principal == User::"root", action == Action::"admin", '
          'resource == Relay::"gateway");')
LOOP_WAT = '(module (func (export "main") (loop br 0)))'
# Runs a loop of `n` calls: a gas use that grows with n, the same every run.
COUNT_WAT = """(module
  (func $next (param i32) (result i32) local.get 0 i32.const 1 i32.add)
  (func (export "main") (param $n i32) (result i32) (local $i i32)
    (loop $again
      local.get $i call $next local.set $i
      local.get $i local.get $n i32.lt_s br_if $again)
    local.get $i))"""
ASYNC = {"Prefer": "respond-async"}
DAY_MS = 86_400_000


@pytest.fixture
def admin_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings, with root as an administrator (Action::"admin")."""
    shutil.copy(ROOT / "relay" / "policies" / "default.cedar", tmp_path / "default.cedar")
    (tmp_path / "admins.cedar").write_text(ADMINS)
    return with_settings(settings, policy_dir=str(tmp_path),
                         api_keys=(*API_KEYS, ("root", ROOT_KEY)))


@pytest.fixture
async def gateway(admin_settings: Settings) -> AsyncIterator[Any]:
    from relay.gateway.app import create_app

    application = create_app(admin_settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def alice(gateway: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(gateway, ALICE_KEY) as client:
        yield client


@pytest.fixture
async def bob(gateway: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(gateway, BOB_KEY) as client:
        yield client


@pytest.fixture
async def root(gateway: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(gateway, ROOT_KEY) as client:
        yield client


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/budgets", json=body)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/budgets/{response.json()['budget_id']}"
    created: dict[str, Any] = response.json()
    return created


async def usage(client: httpx.AsyncClient, budget_id: str) -> dict[str, Any]:
    response = await client.get(f"/budgets/{budget_id}/usage")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def ms(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


async def run(client: httpx.AsyncClient, cid: str, inputs: list[Any], **fields: Any,
              ) -> httpx.Response:
    return await client.post("/intent/execute-wasm",
                             json={"cid": cid, "inputs": inputs, **fields})


# --- the resource ---


async def test_a_spending_cap_is_created_read_listed_changed_and_deleted(
        alice: httpx.AsyncClient) -> None:
    before = time.time()
    budget = await create(alice, max_gas=1000)
    assert budget["budget_id"].startswith("bud_")
    assert budget == {"budget_id": budget["budget_id"], "principal": "alice", "window": DAY_MS,
                      "max_gas": 1000, "max_time": None, "max_executions": None,
                      "created_by": "alice", "created_at": budget["created_at"]}
    assert before - 1 <= ms(budget["created_at"]) / 1000 <= time.time() + 1
    path = f"/budgets/{budget['budget_id']}"
    assert (await alice.get(path)).json() == budget
    assert (await alice.get("/budgets")).json() == {"items": [budget], "next_cursor": None}

    # Windows are back to back from created_at.
    window = await usage(alice, budget["budget_id"])
    assert window == {"window_start": budget["created_at"], "window_end": window["window_end"],
                      "gas_used": 0, "time_used": 0, "executions": 0,
                      "reserved": {"gas": 0, "time": 0},
                      "remaining": {"gas": 1000, "time": None, "executions": None}}
    assert ms(window["window_end"]) - ms(window["window_start"]) == DAY_MS

    # PUT: the same body; the new limits replace the old (an omitted one is no limit).
    changed = await alice.put(path, json={"window": 3_600_000, "max_time": 50,
                                          "max_executions": 3})
    assert changed.status_code == 200, changed.text
    assert changed.json() == {**budget, "window": 3_600_000, "max_gas": None, "max_time": 50,
                              "max_executions": 3}
    assert (await alice.get(path)).json() == changed.json()
    assert (await usage(alice, budget["budget_id"]))["remaining"] == {
        "gas": None, "time": 50, "executions": 3}

    assert (await alice.delete(path)).status_code == 204
    assert_problem(await alice.get(path), 404, "not-found")
    assert_problem(await alice.get(f"{path}/usage"), 404, "not-found")
    assert_problem(await alice.delete(path), 404, "not-found")
    assert (await alice.get("/budgets")).json() == {"items": [], "next_cursor": None}


async def test_the_list_is_newest_first_in_pages(alice: httpx.AsyncClient) -> None:
    made = [(await create(alice, max_executions=n + 1))["budget_id"] for n in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await alice.get("/budgets", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [item["budget_id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]
    assert pages == 3
    assert_problem(await alice.get("/budgets", params={"limit": 0}), 400, "invalid-request")
    assert_problem(await alice.get("/budgets", params={"limit": 501}), 400, "invalid-request")
    assert_problem(await alice.get("/budgets", params={"cursor": "x"}), 400, "invalid-request")


@pytest.mark.parametrize(("body", "pointer"), [
    ({"window": 0}, "/window"),
    ({"window": 999}, "/window"),
    ({"window": "1"}, "/window"),
    ({"max_gas": 0}, "/max_gas"),
    ({"max_time": -5}, "/max_time"),
    ({"max_executions": 1.5}, "/max_executions"),
    ({"max_gas": 10**16}, "/max_gas"),
    ({"principal": ""}, "/principal"),
    ({"principal": "a b"}, "/principal"),
    ({"principal": "x:y"}, "/principal"),
    ({"colour": "red"}, "/colour"),
])
async def test_bad_bodies_are_400_with_a_pointer(
        alice: httpx.AsyncClient, body: dict[str, Any], pointer: str) -> None:
    for response in (await alice.post("/budgets", json=body),
                     await alice.put(f"/budgets/{(await create(alice))['budget_id']}",
                                     json=body)):
        problem = assert_problem(response, 400, "invalid-request")
        assert [error["pointer"] for error in problem["errors"]] == [pointer], problem


async def test_a_body_that_is_not_json_is_400(alice: httpx.AsyncClient) -> None:
    problem = assert_problem(await alice.post("/budgets", content=b"{"), 400, "invalid-request")
    assert problem["errors"][0]["pointer"] == ""
    assert_problem(await alice.post("/budgets", json=[1]), 400, "invalid-request")


async def test_another_principals_budget_is_404_everywhere(
        alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    budget = await create(alice, max_gas=1000)
    path = f"/budgets/{budget['budget_id']}"
    for response in (await bob.get(path), await bob.get(f"{path}/usage"),
                     await bob.put(path, json={"max_gas": 10**12}), await bob.delete(path)):
        assert_problem(response, 404, "not-found")
    assert (await bob.get("/budgets")).json() == {"items": [], "next_cursor": None}
    assert (await alice.get(path)).json() == budget  # untouched
    for unknown in ("bud_000000000000000000000000", "nonsense", "bud_../x"):
        assert_problem(await alice.get(f"/budgets/{unknown}"), 404, "not-found")
        assert_problem(await alice.get(f"/budgets/{unknown}/usage"), 404, "not-found")


async def test_an_admins_quota_binds_its_principal_who_cannot_change_it(
        alice: httpx.AsyncClient, bob: httpx.AsyncClient, root: httpx.AsyncClient) -> None:
    # Naming another principal needs Action::"admin".
    assert_problem(await alice.post("/budgets", json={"principal": "bob"}), 403, "forbidden")
    assert (await alice.post("/budgets", json={"principal": "alice"})).status_code == 201

    quota = await create(root, principal="alice", max_executions=5)
    assert quota["principal"] == "alice"
    assert quota["created_by"] == "root"
    path = f"/budgets/{quota['budget_id']}"
    # Its principal sees it, and its creator; nobody else.
    assert (await alice.get(path)).json() == quota
    assert quota in (await alice.get("/budgets")).json()["items"]
    assert (await root.get("/budgets")).json()["items"] == [quota]
    assert (await usage(alice, quota["budget_id"]))["remaining"]["executions"] == 5
    assert_problem(await bob.get(path), 404, "not-found")
    # Its principal cannot change or delete it (a quota); its creator can.
    assert_problem(await alice.put(path, json={"max_executions": 500}), 403, "forbidden")
    assert_problem(await alice.delete(path), 403, "forbidden")
    assert (await alice.get(path)).json() == quota
    # A PUT cannot move a budget to another principal.
    problem = assert_problem(await root.put(path, json={"principal": "bob"}), 400,
                             "invalid-request")
    assert problem["errors"][0]["pointer"] == "/principal"
    changed = await root.put(path, json={"principal": "alice", "max_executions": 6})
    assert changed.status_code == 200, changed.text
    assert changed.json()["max_executions"] == 6
    assert (await root.delete(path)).status_code == 204
    assert_problem(await alice.get(path), 404, "not-found")
    assert quota["budget_id"] not in [item["budget_id"] for item in
                                      (await alice.get("/budgets")).json()["items"]]


# --- the accounting ---


async def test_usage_adds_up_exactly_and_a_replay_costs_nothing(
        alice: httpx.AsyncClient, bob: httpx.AsyncClient, executor: Executor) -> None:
    budget = await create(alice, max_gas=10**9, max_time=60_000, max_executions=10)
    module = await upload(alice, COUNT_WAT)
    results = []
    for n in (10, 200, 3000):
        response = await run(alice, module["cid"], [n])
        assert response.status_code == 200, response.text
        assert response.json()["success"], response.text
        results.append(response.json())
    gas = sum(result["gas_used"] for result in results)
    time_ms = sum(math.ceil(result["duration"]) for result in results)
    assert results[0]["gas_used"] < results[1]["gas_used"] < results[2]["gas_used"]
    expected = {"gas_used": gas, "time_used": time_ms, "executions": 3,
                "reserved": {"gas": 0, "time": 0},
                "remaining": {"gas": 10**9 - gas, "time": 60_000 - time_ms, "executions": 7}}
    window = await usage(alice, budget["budget_id"])
    assert {key: window[key] for key in expected} == expected

    # A replay (same key), and a join of a finished one, cost nothing.
    first = await run(alice, module["cid"], [50], idempotency_key="once")
    again = await run(alice, module["cid"], [50], idempotency_key="once")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    window = await usage(alice, budget["budget_id"])
    assert window["executions"] == 4
    assert window["gas_used"] == gas + first.json()["gas_used"]
    # Another principal's executions count toward its own budgets only.
    assert (await run(bob, module["cid"], [10])).status_code == 200
    assert (await usage(alice, budget["budget_id"]))["executions"] == 4


async def test_a_used_up_window_is_429_until_it_ends(
        alice: httpx.AsyncClient, executor: Executor) -> None:
    budget = await create(alice, window=60_000, max_executions=2)
    module = await upload(alice, ADD_WAT)
    for n in range(2):
        assert (await run(alice, module["cid"], [n, 1])).status_code == 200
    refused = await run(alice, module["cid"], [5, 1])
    problem = assert_problem(refused, 429, "budget-exhausted")
    assert budget["budget_id"] in problem["detail"]
    window_end = ms((await usage(alice, budget["budget_id"]))["window_end"])
    expected = math.ceil((window_end - time.time() * 1000) / 1000)
    retry_after = int(refused.headers["retry-after"])
    assert problem["retry_after"] == retry_after
    assert 1 <= retry_after <= 60
    assert abs(retry_after - expected) <= 1, (retry_after, expected)
    # A replay of an execution that ran still answers: it costs nothing.
    assert (await run(alice, module["cid"], [0, 1])).status_code == 200
    assert (await usage(alice, budget["budget_id"]))["executions"] == 2


async def test_an_explicit_limit_over_what_remains_is_429_an_omitted_one_is_lowered(
        alice: httpx.AsyncClient, executor: Executor) -> None:
    budget = await create(alice, max_gas=5000)
    loop = await upload(alice, LOOP_WAT)
    over = await run(alice, loop["cid"], [], policy={"max_gas": 5001})
    problem = assert_problem(over, 429, "budget-exhausted")
    # Used 0, reserved 0: it never fits in this window, so: when the window ends.
    assert int(over.headers["retry-after"]) > 86_000
    assert problem["retry_after"] == int(over.headers["retry-after"])
    assert (await usage(alice, budget["budget_id"]))["executions"] == 0

    # Omitted: the default (10^9) lowered to the 5000 that remain; the loop runs out of it.
    lowered = await run(alice, loop["cid"], [])
    assert lowered.status_code == 200, lowered.text
    assert lowered.json()["error"]["code"] == "out_of_gas"
    assert lowered.json()["gas_used"] == 5000
    window = await usage(alice, budget["budget_id"])
    assert window["gas_used"] == 5000
    assert window["remaining"]["gas"] == 0
    # Used up: a new execution is refused until the window ends, whether the limit is given
    # or not (the same request again is a replay: answered, free).
    replay = await run(alice, loop["cid"], [])
    assert replay.content == lowered.content
    # The lowered request was accepted twice (the second time lowered), and counted once under
    # the rate limit, as the replay is.
    assert _rate_remaining(replay) == _rate_remaining(over) - 2
    for policy in ({}, {"max_gas": 1}):
        refused = await run(alice, loop["cid"], [], policy=policy, idempotency_key=str(policy))
        assert_problem(refused, 429, "budget-exhausted")
        assert int(refused.headers["retry-after"]) > 86_000


def _rate_remaining(response: httpx.Response) -> int:
    found = re.search(r";r=(\d+);", response.headers["ratelimit"])
    assert found, response.headers
    return int(found.group(1))


async def start_loop(client: httpx.AsyncClient, policy: dict[str, int]) -> str:
    module = await upload(client, LOOP_WAT)
    response = await client.post("/intent/execute-wasm", headers=ASYNC,
                                 json={"cid": module["cid"], "policy": policy})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]

    async def running() -> bool:
        state = (await client.get(f"/executions/{request_id}")).json()
        return bool(state["status"] == "running")

    await wait_for(running, timeout_s=10)
    return request_id


async def test_when_only_running_reservations_stand_in_the_way_retry_after_is_1(
        alice: httpx.AsyncClient, executor: Executor) -> None:
    budget = await create(alice, max_time=20_000)
    request_id = await start_loop(alice, {"max_gas": 10**12, "max_time": 20_000})
    window = await usage(alice, budget["budget_id"])
    assert window["reserved"] == {"gas": 10**12, "time": 20_000}  # counted, if not limited
    assert window["remaining"]["time"] == 0
    module = await upload(alice, ADD_WAT)
    for policy in ({}, {"max_time": 1}):
        refused = await run(alice, module["cid"], [1, 2], policy=policy)
        assert_problem(refused, 429, "budget-exhausted")
        assert refused.headers["retry-after"] == "1"
    await asyncio.sleep(0.3)
    assert (await alice.delete(f"/executions/{request_id}")).status_code == 200

    async def released() -> dict[str, Any] | None:
        window = await usage(alice, budget["budget_id"])
        return window if window["reserved"]["time"] == 0 else None

    window = await wait_for(released)
    state = (await alice.get(f"/executions/{request_id}")).json()
    assert window["time_used"] == math.ceil(state["duration"]) > 0
    # What it did not use is free again: an omitted max_time is lowered to what remains.
    assert (await run(alice, module["cid"], [1, 2])).status_code == 200


async def test_additional_gas_reserves_from_every_budget(
        alice: httpx.AsyncClient, executor: Executor) -> None:
    budget = await create(alice, max_gas=3 * 10**11)
    request_id = await start_loop(alice, {"max_gas": 10**11, "max_time": 60_000})
    paused = await alice.post(f"/executions/{request_id}/pause")
    assert paused.status_code == 200, paused.text
    over = await alice.post(f"/executions/{request_id}/resume",
                            json={"additional_gas": 2 * 10**11 + 1})
    assert_problem(over, 429, "budget-exhausted")
    assert over.headers["retry-after"] == "1"  # the reservation of the run itself stands
    assert (await usage(alice, budget["budget_id"]))["reserved"]["gas"] == 10**11
    resumed = await alice.post(f"/executions/{request_id}/resume",
                               json={"additional_gas": 10**11})
    assert resumed.status_code == 200, resumed.text
    assert (await usage(alice, budget["budget_id"]))["reserved"]["gas"] == 2 * 10**11
    await asyncio.sleep(0.2)
    assert (await alice.delete(f"/executions/{request_id}")).status_code == 200

    async def released() -> dict[str, Any] | None:
        window = await usage(alice, budget["budget_id"])
        return window if window["reserved"]["gas"] == 0 else None

    window = await wait_for(released)
    state = (await alice.get(f"/executions/{request_id}")).json()
    assert window["gas_used"] == state["gas_used"]
    assert window["executions"] == 1


async def test_a_cap_counts_only_what_runs_after_it_and_deleting_it_frees_the_principal(
        alice: httpx.AsyncClient, executor: Executor) -> None:
    module = await upload(alice, ADD_WAT)
    assert (await run(alice, module["cid"], [1, 1])).status_code == 200
    budget = await create(alice, max_executions=1)
    assert (await usage(alice, budget["budget_id"]))["executions"] == 0
    assert (await run(alice, module["cid"], [2, 2])).status_code == 200
    assert_problem(await run(alice, module["cid"], [3, 3]), 429, "budget-exhausted")
    assert (await alice.delete(f"/budgets/{budget['budget_id']}")).status_code == 204
    assert (await run(alice, module["cid"], [3, 3])).status_code == 200


async def test_session_calls_count_toward_the_principals_budgets(
        alice: httpx.AsyncClient, executor: Executor) -> None:
    module = await upload(alice, """(module (global $n (mut i32) (i32.const 0))
      (func (export "bump") (result i32)
        (global.set $n (i32.add (global.get $n) (i32.const 1))) (global.get $n)))""")
    created = await alice.post("/sessions", json={"cid": module["cid"]})
    assert created.status_code == 201, created.text
    calls = f"/sessions/{created.json()['session_id']}/calls"
    budget = await create(alice, max_executions=2, max_gas=10**6)
    results = []
    for _ in range(2):
        response = await alice.post(calls, json={"entrypoint": "bump"})
        assert response.status_code == 200, response.text
        results.append(response.json())
    assert [result["output"] for result in results] == [1, 2]
    assert_problem(await alice.post(calls, json={"entrypoint": "bump"}), 429, "budget-exhausted")
    window = await usage(alice, budget["budget_id"])
    assert window["executions"] == 2
    assert window["gas_used"] == sum(result["gas_used"] for result in results)
    assert window["reserved"]["gas"] == 0


# --- across processes ---


async def test_concurrent_executions_on_two_gateways_never_use_more_than_max_gas(
        processes: Processes) -> None:
    """32 executions at once through two gateway processes, run by two executor processes:
    the window's gas_used is the sum of what the ones that ran used, and never over max_gas,
    though together they would use far more."""
    urls = [processes.gateway(), processes.gateway()]
    for _ in range(2):
        processes.start("executor")
    clients = [httpx.AsyncClient(base_url=url, headers={"X-API-Key": ALICE_KEY}, timeout=60)
               for url in urls]
    try:
        module = await upload(clients[0], COUNT_WAT)
        one = await run(clients[1], module["cid"], [20_000])
        assert one.status_code == 200, one.text
        each = one.json()["gas_used"]
        max_gas = 6 * each + each // 2
        budget = await create(clients[0], max_gas=max_gas)

        async def execute(n: int) -> httpx.Response:
            # Half give a max_gas that fits one run; half leave it out (lowered to what is left).
            policy = {"max_gas": each + 100} if n % 2 else {}
            return await run(clients[n % 2], module["cid"], [20_000], policy=policy,
                             idempotency_key=f"k{n}")

        responses = await asyncio.gather(*(execute(n) for n in range(32)))
        ran = [r.json() for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        for response in refused:
            assert_problem(response, 429, "budget-exhausted")
            assert int(response.headers["retry-after"]) >= 1
        assert ran and refused
        window = await usage(clients[1], budget["budget_id"])
        assert window["reserved"] == {"gas": 0, "time": 0}
        assert window["gas_used"] == sum(result["gas_used"] for result in ran)
        assert window["gas_used"] <= max_gas
        assert window["executions"] == len(ran)
        assert sum(result["success"] for result in ran) <= 6
    finally:
        for client in clients:
            await client.aclose()
