"""Rate limiting per principal, shared through Redis, with the IETF RateLimit fields."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from executor.worker import Executor
from relay.gateway.app import create_app
from relay.settings import Settings
from tests.conftest import ADD_WAT, BOB_KEY, assert_problem, client_for, upload, with_settings

EXECUTE = "/intent/execute-wasm"


@pytest.fixture
async def limited(settings: Settings) -> AsyncIterator[Any]:
    """A gateway allowing 3 execute requests per 60 s per principal."""
    application = create_app(with_settings(settings, rate_limit=3, rate_window_ms=60_000))
    async with application.router.lifespan_context(application):
        yield application


def rate_fields(response: httpx.Response) -> tuple[int, int, int, int]:
    """(q, w, r, t) from RateLimit-Policy and RateLimit."""
    policy = re.fullmatch(r'"(\w+)";q=(\d+);w=(\d+)', response.headers["ratelimit-policy"])
    state = re.fullmatch(r'"(\w+)";r=(\d+);t=(\d+)', response.headers["ratelimit"])
    assert policy and state, response.headers
    assert policy.group(1) == state.group(1)
    return int(policy.group(2)), int(policy.group(3)), int(state.group(2)), int(state.group(3))


async def test_over_the_limit_is_429_with_retry_after(limited: Any, executor: Executor) -> None:
    async with client_for(limited, "alice-secret-key") as alice:
        module = await upload(alice, ADD_WAT)
        answers = [await alice.post(EXECUTE, json={"cid": module["cid"], "inputs": [i, 1]})
                   for i in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [rate_fields(a)[2] for a in answers] == [2, 1, 0, 0]
    q, w, _, t = rate_fields(answers[0])
    assert (q, w) == (3, 60) and 0 < t <= 60
    refused = answers[3]
    body = assert_problem(refused, 429, "rate-limited")
    retry_after = int(refused.headers["retry-after"])
    assert body["retry_after"] == retry_after
    assert retry_after >= rate_fields(refused)[3] > 0  # never earlier than t


async def test_limits_are_per_principal(limited: Any, executor: Executor) -> None:
    async with client_for(limited, "alice-secret-key") as alice, client_for(
            limited, BOB_KEY) as bob:
        module = await upload(alice, ADD_WAT)
        body = {"cid": module["cid"], "inputs": [1, 1]}
        for _ in range(3):
            assert (await alice.post(EXECUTE, json=body)).status_code == 200
        assert (await alice.post(EXECUTE, json=body)).status_code == 429
        assert (await bob.post(EXECUTE, json=body)).status_code == 200


async def test_limit_is_shared_by_gateway_replicas(settings: Settings, limited: Any,
                                                   executor: Executor) -> None:
    replica = create_app(with_settings(settings, rate_limit=3, rate_window_ms=60_000))
    async with replica.router.lifespan_context(replica), client_for(
            limited, "alice-secret-key") as first, client_for(
            replica, "alice-secret-key") as second:
        module = await upload(first, ADD_WAT)
        body = {"cid": module["cid"], "inputs": [1, 1]}
        statuses = [(await client.post(EXECUTE, json=body)).status_code
                    for client in (first, second, first, second)]
    assert statuses == [200, 200, 200, 429]


async def test_rate_limited_caller_with_a_bad_body_gets_429(limited: Any) -> None:
    async with client_for(limited, "alice-secret-key") as alice:
        for _ in range(3):
            response = await alice.post(EXECUTE, content=b"{broken")
            assert_problem(response, 400, "invalid-request")
            assert rate_fields(response)[0] == 3  # errors after the limiter carry the fields too
        assert_problem(await alice.post(EXECUTE, content=b"{broken"), 429, "rate-limited")


async def test_unauthenticated_requests_do_not_count(limited: Any) -> None:
    async with client_for(limited, None) as anonymous, client_for(
            limited, "alice-secret-key") as alice:
        for _ in range(5):
            assert (await anonymous.post(EXECUTE, json={})).status_code == 401
        response = await alice.post(EXECUTE, json={})
    assert response.status_code == 400
    assert rate_fields(response)[2] == 2


async def test_other_routes_are_not_limited(limited: Any) -> None:
    async with client_for(limited, "alice-secret-key") as alice:
        for _ in range(5):
            response = await alice.get("/modules")
            assert response.status_code == 200
            assert "ratelimit" not in response.headers


async def test_rate_limit_zero_turns_the_default_limit_off(settings: Settings) -> None:
    application = create_app(with_settings(settings, rate_limit=0))
    async with application.router.lifespan_context(application), client_for(
            application, "alice-secret-key") as alice:
        answers = [await alice.post(EXECUTE, content=b"{}") for _ in range(5)]
        health = (await alice.get("/intent/execute-wasm/health")).json()
    assert {a.status_code for a in answers} == {400}
    assert all("ratelimit" not in a.headers for a in answers)
    assert health["features"]["rate_limiting"] is False
