"""The execute pipeline as a whole: the order of its stages, authorization, caps, idempotency
across gateway processes, and the metrics that count what happened."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from executor.worker import Executor
from relay.gateway.app import create_app
from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    ROOT,
    Processes,
    assert_problem,
    client_for,
    upload,
    wait_for,
    with_settings,
)

EXECUTE = "/intent/execute-wasm"
DENY_BOB_CALCULATOR = """
forbid(principal == User::"bob", action == Action::"execute", resource)
when { resource.name == "calculator" };
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A copy of the shipped policies that a test may edit while the gateway runs."""
    directory = tmp_path / "policies"
    shutil.copytree(ROOT / "relay" / "policies", directory)
    return directory


@pytest.fixture
async def gateway(settings: Settings, policy_dir: Path) -> AsyncIterator[Any]:
    application = create_app(with_settings(settings, policy_dir=str(policy_dir)))
    async with application.router.lifespan_context(application):
        yield application


async def events_of(settings: Settings) -> list[dict[str, Any]]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        entries = await client.xrange(Keys(settings.prefix).events)
    finally:
        await client.aclose()
    return [json.loads(fields[b"data"]) for _, fields in entries]


async def test_forbidden_module_is_403_even_with_a_fresh_key(
        gateway: Any, policy_dir: Path, executor: Executor) -> None:
    (policy_dir / "deny.cedar").write_text(DENY_BOB_CALCULATOR)
    gateway.state.gateway.policies.reload_if_changed()
    async with client_for(gateway, ALICE_KEY) as alice, client_for(gateway, BOB_KEY) as bob:
        await upload(alice, ADD_WAT, name="calculator")
        assert (await alice.post(EXECUTE, json={"cid": "glyph://calculator",
                                                "inputs": [1, 2]})).status_code == 200
        for key in ("first", "second"):
            refused = await bob.post(EXECUTE, json={"cid": "glyph://calculator", "inputs": [1, 2],
                                                    "idempotency_key": key})
            assert_problem(refused, 403, "forbidden")
        # By CID rather than by name, the policy on the name does not apply.
        cid = (await alice.get("/names/calculator")).json()["tags"]["latest"]
        assert (await bob.post(EXECUTE, json={"cid": cid, "inputs": [1, 2]})).status_code == 200


async def test_a_replay_needs_no_new_authorization(
        gateway: Any, policy_dir: Path, executor: Executor) -> None:
    async with client_for(gateway, BOB_KEY) as bob:
        await upload(bob, ADD_WAT, name="calculator")
        body = {"cid": "glyph://calculator", "inputs": [4, 5], "idempotency_key": "k"}
        first = await bob.post(EXECUTE, json=body)
        assert first.status_code == 200
        (policy_dir / "deny.cedar").write_text(DENY_BOB_CALCULATOR)
        gateway.state.gateway.policies.reload_if_changed()
        replay = await bob.post(EXECUTE, json=body)
        assert replay.status_code == 200
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content
        fresh = await bob.post(EXECUTE, json={**body, "idempotency_key": "new"})
        assert_problem(fresh, 403, "forbidden")


async def test_hot_reload_of_a_forbid(gateway: Any, policy_dir: Path, executor: Executor) -> None:
    async with client_for(gateway, BOB_KEY) as bob:
        await upload(bob, ADD_WAT, name="calculator")
        assert (await bob.post(EXECUTE, json={"cid": "glyph://calculator",
                                              "inputs": [1, 1]})).status_code == 200
        (policy_dir / "deny.cedar").write_text(DENY_BOB_CALCULATOR)

        attempts = iter(range(10**6))

        async def refused() -> bool:  # the gateway's own watcher picks the file up
            # New inputs each time: a repeated request would be a replay, never refused.
            answer = await bob.post(EXECUTE, json={"cid": "glyph://calculator",
                                                   "inputs": [next(attempts), 2]})
            return answer.status_code == 403

        await wait_for(refused, timeout_s=10, interval_s=0.2)


async def test_broken_policy_keeps_the_last_good_set_and_degrades_health(
        gateway: Any, policy_dir: Path, executor: Executor) -> None:
    async with client_for(gateway, ALICE_KEY) as alice:
        module = await upload(alice, ADD_WAT)
        (policy_dir / "broken.cedar").write_text("permit(principal, action, resource")

        async def degraded() -> bool:
            health = (await alice.get("/intent/execute-wasm/health")).json()
            return bool(health["status"] == "degraded" and "broken.cedar" in
                        health.get("policy_error", ""))

        await wait_for(degraded, timeout_s=10, interval_s=0.2)
        ran = await alice.post(EXECUTE, json={"cid": module["cid"], "inputs": [1, 1]})
        assert ran.status_code == 200  # the last good set still permits


async def test_principal_caps_refuse_above_and_lower_the_defaults(
        settings: Settings, policy_dir: Path, executor: Executor) -> None:
    (policy_dir / "principals.toml").write_text(
        "[principals.bob]\nmax_gas = 5000\nmax_time = 1000\n")
    application = create_app(with_settings(settings, policy_dir=str(policy_dir)))
    async with application.router.lifespan_context(application), client_for(
            application, BOB_KEY) as bob, client_for(application, ALICE_KEY) as alice:
        module = await upload(bob, ADD_WAT)
        over = await bob.post(EXECUTE, json={"cid": module["cid"], "inputs": [1, 1],
                                             "policy": {"max_gas": 5001}})
        body = assert_problem(over, 400, "invalid-request")
        assert [e["pointer"] for e in body["errors"]] == ["/policy/max_gas"]
        accepted = await bob.post(EXECUTE, headers={"Prefer": "respond-async"},
                                  json={"cid": module["cid"], "inputs": [1, 1]})
        assert accepted.status_code == 202
        alice_ok = await alice.post(EXECUTE, json={"cid": module["cid"], "inputs": [1, 1],
                                                   "policy": {"max_gas": 5001}})
        assert alice_ok.status_code == 200  # the cap is bob's alone
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        entries = await client.xrange(Keys(settings.prefix).requests)
    finally:
        await client.aclose()
    policies = [json.loads(f[b"data"])["policy"] for _, f in entries
                if json.loads(f[b"data"])["user_id"] == "bob"]
    assert policies == [{"max_memory": settings.default_max_memory_bytes, "max_gas": 5000,
                         "max_time": 1000, "max_stack": settings.max_stack_bytes}]


async def test_principal_rate_limit_override(settings: Settings, policy_dir: Path) -> None:
    (policy_dir / "principals.toml").write_text("[principals.bob]\nrate_limit = 1\n")
    application = create_app(with_settings(settings, policy_dir=str(policy_dir), rate_limit=50))
    async with application.router.lifespan_context(application), client_for(
            application, BOB_KEY) as bob:
        first = await bob.post(EXECUTE, content=b"{}")
        second = await bob.post(EXECUTE, content=b"{}")
    assert first.status_code == 400
    assert first.headers["ratelimit-policy"].endswith(";q=1;w=60")
    assert_problem(second, 429, "rate-limited")


async def test_upload_and_reads_follow_the_policies(gateway: Any, policy_dir: Path) -> None:
    (policy_dir / "default.cedar").write_text(
        'permit(principal, action == Action::"upload", resource);\n'
        'permit(principal, action == Action::"execute", resource) '
        "when { resource.owner == principal };\n")
    gateway.state.gateway.policies.reload_if_changed()
    async with client_for(gateway, ALICE_KEY) as alice, client_for(gateway, BOB_KEY) as bob:
        module = await upload(alice, ADD_WAT)
        assert (await alice.get(f"/modules/{module['cid']}")).status_code == 200
        assert_problem(await bob.get(f"/modules/{module['cid']}"), 403, "forbidden")
        assert_problem(await bob.get(f"/modules/{module['cid']}/wasm"), 403, "forbidden")
        listed = (await bob.get("/modules")).json()["modules"]
        assert module["cid"] not in [m["cid"] for m in listed]
        assert module["cid"] in [m["cid"] for m in (await alice.get("/modules")).json()["modules"]]
        assert_problem(await bob.post(EXECUTE, json={"cid": module["cid"], "inputs": [1, 1]}),
                       403, "forbidden")


async def test_metrics_move_when_their_events_happen(gateway: Any, executor: Executor,
                                                     policy_dir: Path) -> None:
    async def read(client: httpx.AsyncClient) -> dict[str, float]:
        text = (await client.get("/metrics")).text
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^(relay_\S+) (\S+)$", text, re.MULTILINE)}

    async with client_for(gateway, ALICE_KEY) as alice, client_for(gateway, None) as anon:
        before = await read(anon)
        module = await upload(alice, ADD_WAT)
        trap = await upload(alice, '(module (func (export "main") unreachable))')
        body = {"cid": module["cid"], "inputs": [1, 1], "idempotency_key": "m"}
        assert (await alice.post(EXECUTE, json=body)).status_code == 200
        assert (await alice.post(EXECUTE, json=body)).status_code == 200  # replay
        assert (await alice.post(EXECUTE, json={"cid": trap["cid"]})).status_code == 200
        assert (await alice.post(EXECUTE, content=b"[]")).status_code == 400
        (policy_dir / "deny.cedar").write_text("forbid(principal, action, resource);")
        gateway.state.gateway.policies.reload_if_changed()
        assert (await alice.post(EXECUTE, json={"cid": module["cid"],
                                                "inputs": [2, 2]})).status_code == 403

        def moved(after: dict[str, float], name: str) -> float:
            return after.get(name, 0) - before.get(name, 0)

        async def all_moved() -> dict[str, float] | None:
            after = await read(anon)
            ok = (moved(after, "relay_execute_wasm_success_total") == 1
                  and moved(after, "relay_execute_wasm_error_total") == 1
                  and moved(after, 'relay_execute_wasm_error_total{code="trap"}') == 1
                  and moved(after, "relay_execute_wasm_idempotent_hit_total") == 1
                  and moved(after, "relay_execute_wasm_invalid_request_total") == 1
                  and moved(after, "relay_execute_wasm_permission_denied_total") == 1
                  and moved(after, "relay_execute_wasm_duration_seconds_count") == 2
                  and moved(after, "relay_execute_wasm_gas_used_count") == 2)
            return after if ok else None

        after = await wait_for(all_moved, timeout_s=10, interval_s=0.2)
    assert [after[f'relay_queue_depth{{priority="{p}"}}'] for p in ("high", "normal", "low")] \
        == [0, 0, 0]
    assert after["relay_pending_entries"] == 0
    assert after["relay_executors"] == 1


async def test_rate_limited_metric(settings: Settings) -> None:
    """Refused with a bad body (validation fails while the limiter answers) and with a good
    one (validation passes, then the verdict): 429 both times, counted once each, and nothing
    queued."""
    application = create_app(with_settings(settings, rate_limit=1))
    async with application.router.lifespan_context(application), client_for(
            application, ALICE_KEY) as alice:
        module = await upload(alice, ADD_WAT)
        body = {"cid": module["cid"], "inputs": [1, 2]}
        first = await alice.post(EXECUTE, headers={"Prefer": "respond-async"}, json=body)
        assert first.status_code == 202
        assert (await alice.post(EXECUTE, content=b"{}")).status_code == 429
        refused = await alice.post(EXECUTE, headers={"Prefer": "respond-async"},
                                   json={**body, "inputs": [3, 4]})
        assert_problem(refused, 429, "rate-limited")
        assert refused.headers["retry-after"]
        text = (await alice.get("/metrics")).text
        queued = await application.state.gateway.client.xlen(Keys(settings.prefix).requests)
    assert re.search(r"^relay_execute_wasm_rate_limited_total 2$", text, re.MULTILINE)
    assert queued == 1


async def test_concurrent_duplicates_across_two_gateway_processes_run_once(
        processes: Processes, settings: Settings) -> None:
    urls = [processes.gateway(), processes.gateway()]
    processes.start("executor")
    clients = [httpx.AsyncClient(base_url=url, headers={"X-API-Key": ALICE_KEY}, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) for url in urls]
    try:
        module = await upload(clients[0], (ROOT / "relay" / "examples" / "fib.wat").read_text())
        body = {"cid": module["cid"], "inputs": [24], "idempotency_key": "only-once"}
        answers = await asyncio.gather(*(clients[i % 2].post(EXECUTE, json=body)
                                         for i in range(200)))
    finally:
        for client in clients:
            await client.aclose()
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1, "every caller gets the same bytes"
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 199
    events = await events_of(settings)
    assert sum(e["type"] == "execution_started" for e in events) == 1
    assert sum(e["type"] == "execution_complete" for e in events) == 1


async def test_queue_over_its_bound_is_503_with_retry_after(settings: Settings) -> None:
    application = create_app(with_settings(settings, max_queue=2))
    async with application.router.lifespan_context(application), client_for(
            application, ALICE_KEY) as alice:
        module = await upload(alice, ADD_WAT)
        answers = [await alice.post(EXECUTE, headers={"Prefer": "respond-async"},
                                    json={"cid": module["cid"], "inputs": [n, 0]})
                   for n in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 503]
        assert_problem(answers[2], 503, "unavailable")
        assert int(answers[2].headers["retry-after"]) > 0
        # What was accepted still answers: a repeat of it is not new work.
        repeat = await alice.post(EXECUTE, headers={"Prefer": "respond-async"},
                                  json={"cid": module["cid"], "inputs": [0, 0]})
        assert repeat.status_code == 202
