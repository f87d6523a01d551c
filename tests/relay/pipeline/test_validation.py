"""Refusals of POST /intent/execute-wasm before anything is queued, authentication on every
route, and how request ids are derived."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    Processes,
    assert_problem,
    cid_of,
    client_for,
    raw_exchange,
    upload,
)

EXECUTE = "/intent/execute-wasm"
ASYNC = {"Prefer": "respond-async"}
MIB = 1024 * 1024

# Several exports, none called `main`: there is no default entrypoint.
IDENTITY_WAT = """(module
  (func (export "i32") (param i32) (result i32) local.get 0)
  (func (export "i64") (param i64) (result i64) local.get 0)
  (func (export "f32") (param f32) (result f32) local.get 0)
  (func (export "f64") (param f64) (result f64) local.get 0))"""

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def request_id_for(principal: str, key: str) -> str:
    """The contract's request id for an explicit idempotency key (length-prefixed principal)."""
    return hashlib.sha256(f"{len(principal)}:{principal}{key}".encode()).hexdigest()


def assert_invalid_at(response: httpx.Response, *pointers: str) -> dict[str, Any]:
    body = assert_problem(response, 400, "invalid-request")
    assert [error["pointer"] for error in body["errors"]] == list(pointers)
    assert all(isinstance(error["detail"], str) and error["detail"] for error in body["errors"])
    return body


@pytest.fixture
async def anonymous(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app, None) as anonymous_client:
        yield anonymous_client


@pytest.fixture
async def add_cid(http: httpx.AsyncClient) -> str:
    cid: str = (await upload(http, ADD_WAT))["cid"]
    return cid


@pytest.fixture
async def identity_cid(http: httpx.AsyncClient) -> str:
    cid: str = (await upload(http, IDENTITY_WAT))["cid"]
    return cid


# --- the CID ---


@pytest.mark.parametrize("cid", [
    "hello",
    "not-a-cid",
    "Qm123",
    "bafk",
    "bafkreibhmtmv24yn2zu7udv53bwwvgrylzhbep2e52p72tly7wjiufzpo",  # one character short
    " bafkreibhmtmv24yn2zu7udv53bwwvgrylzhbep2e52p72tly7wjiufzpom",
    "glyph:/calculator",
    "https://example.com/module.wasm",
])
async def test_garbage_cid_is_400_at_cid(http: httpx.AsyncClient, cid: str) -> None:
    assert_invalid_at(await http.post(EXECUTE, json={"cid": cid}), "/cid")


@pytest.mark.parametrize("cid", ["", 42, None, ["bafk"]])
async def test_empty_or_non_string_cid_is_400_at_cid(http: httpx.AsyncClient, cid: Any) -> None:
    assert_invalid_at(await http.post(EXECUTE, json={"cid": cid}), "/cid")


async def test_missing_cid_is_400_at_cid(http: httpx.AsyncClient) -> None:
    assert_invalid_at(await http.post(EXECUTE, json={"inputs": [1, 2]}), "/cid")


@pytest.mark.parametrize("cid", [
    "glyph://",
    "glyph://@latest",
    "glyph://Calculator",
    "glyph://calculator@Quantum",
    "glyph://has space",
    "glyph://-calculator",
    "glyph://calculator@quantum@two",
    "glyph://" + "a" * 65,
])
async def test_malformed_glyph_name_is_400_at_cid(http: httpx.AsyncClient, cid: str) -> None:
    assert_invalid_at(await http.post(EXECUTE, json={"cid": cid}), "/cid")


async def test_cid_of_a_module_not_stored_is_404_at_cid(http: httpx.AsyncClient) -> None:
    response = await http.post(EXECUTE, json={"cid": cid_of(b"never uploaded")})
    body = assert_problem(response, 404, "not-found")
    assert [error["pointer"] for error in body["errors"]] == ["/cid"]


async def test_deleted_module_is_404_at_cid(http: httpx.AsyncClient, add_cid: str) -> None:
    assert (await http.delete(f"/modules/{add_cid}")).status_code == 204
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2]})
    body = assert_problem(response, 404, "not-found")
    assert [error["pointer"] for error in body["errors"]] == ["/cid"]


@pytest.mark.parametrize("cid", ["glyph://nobody", "glyph://nobody@v1"])
async def test_unknown_glyph_name_is_404_at_cid(http: httpx.AsyncClient, cid: str) -> None:
    body = assert_problem(await http.post(EXECUTE, json={"cid": cid}), 404, "not-found")
    assert [error["pointer"] for error in body["errors"]] == ["/cid"]


async def test_unknown_tag_of_a_known_name_is_404_at_cid(http: httpx.AsyncClient) -> None:
    await upload(http, ADD_WAT, name="calculator", tag="quantum")
    response = await http.post(EXECUTE, json={"cid": "glyph://calculator@classic"})
    body = assert_problem(response, 404, "not-found")
    assert [error["pointer"] for error in body["errors"]] == ["/cid"]


# --- entrypoint and inputs ---


async def test_unknown_entrypoint_is_400_at_entrypoint(
        http: httpx.AsyncClient, add_cid: str) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "entrypoint": "sub",
                                              "inputs": [1, 2]})
    assert_invalid_at(response, "/entrypoint")


async def test_several_exports_without_main_need_an_entrypoint(
        http: httpx.AsyncClient, identity_cid: str) -> None:
    response = await http.post(EXECUTE, json={"cid": identity_cid, "inputs": [1]})
    assert_invalid_at(response, "/entrypoint")


async def test_empty_entrypoint_is_400_at_entrypoint(
        http: httpx.AsyncClient, add_cid: str) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "entrypoint": "",
                                              "inputs": [1, 2]})
    assert_invalid_at(response, "/entrypoint")


@pytest.mark.parametrize("inputs", [[], [1], [1, 2, 3]])
async def test_wrong_number_of_inputs_is_400_at_inputs(
        http: httpx.AsyncClient, add_cid: str, inputs: list[int]) -> None:
    assert_invalid_at(await http.post(EXECUTE, json={"cid": add_cid, "inputs": inputs}),
                      "/inputs")


@pytest.mark.parametrize("inputs", [3, "1, 2", {"a": 1}, None])
async def test_inputs_that_are_not_an_array_are_400_at_inputs(
        http: httpx.AsyncClient, add_cid: str, inputs: Any) -> None:
    assert_invalid_at(await http.post(EXECUTE, json={"cid": add_cid, "inputs": inputs}),
                      "/inputs")


@pytest.mark.parametrize("value", ["2", True, False, 2.5, None, [2], {"value": 2}])
async def test_non_integer_for_i32_is_400_at_its_index(
        http: httpx.AsyncClient, add_cid: str, value: Any) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, value]})
    assert_invalid_at(response, "/inputs/1")


@pytest.mark.parametrize(("entrypoint", "value"), [
    ("f64", "1.5"), ("f64", True), ("f64", None), ("f32", "1"), ("i64", 1.5), ("i64", "1"),
])
async def test_wrong_type_for_other_value_types_is_400_at_its_index(
        http: httpx.AsyncClient, identity_cid: str, entrypoint: str, value: Any) -> None:
    response = await http.post(EXECUTE, json={"cid": identity_cid, "entrypoint": entrypoint,
                                              "inputs": [value]})
    assert_invalid_at(response, "/inputs/0")


@pytest.mark.parametrize(("entrypoint", "value"), [
    ("i32", I32_MAX + 1),
    ("i32", I32_MIN - 1),
    ("i32", 2**32 - 1),  # an unsigned i32 is not in the signed range
    ("i64", I64_MAX + 1),
    ("i64", I64_MIN - 1),
    ("i64", 2**64),
])
async def test_out_of_range_integer_is_400_at_its_index(
        http: httpx.AsyncClient, identity_cid: str, entrypoint: str, value: int) -> None:
    response = await http.post(EXECUTE, json={"cid": identity_cid, "entrypoint": entrypoint,
                                              "inputs": [value]})
    assert_invalid_at(response, "/inputs/0")


async def test_integer_too_big_for_f64_is_400_at_its_index(
        http: httpx.AsyncClient, identity_cid: str) -> None:
    # 1e400 is refused while decoding; the same magnitude written as an integer must be too,
    # not fail later inside the executor.
    response = await http.post(EXECUTE, json={"cid": identity_cid, "entrypoint": "f64",
                                              "inputs": [10**400]}, headers=ASYNC)
    assert_invalid_at(response, "/inputs/0")


async def test_float_literal_out_of_f64_range_is_400_at_its_index(
        http: httpx.AsyncClient, identity_cid: str) -> None:
    body = f'{{"cid": "{identity_cid}", "entrypoint": "f64", "inputs": [1e400]}}'
    response = await http.post(EXECUTE, content=body, headers=ASYNC)
    assert_invalid_at(response, "/inputs/0")


@pytest.mark.parametrize(("entrypoint", "value"), [
    ("i32", I32_MAX), ("i32", I32_MIN), ("i64", I64_MAX), ("i64", I64_MIN),
])
async def test_integer_range_edges_are_accepted_and_run(
        http: httpx.AsyncClient, executor: Executor, identity_cid: str, entrypoint: str,
        value: int) -> None:
    response = await http.post(EXECUTE, json={"cid": identity_cid, "entrypoint": entrypoint,
                                              "inputs": [value]})
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True, response.text
    assert response.json()["output"] == value


@pytest.mark.parametrize("entrypoint", ["f64", "f32"])
async def test_floats_accept_integers(
        http: httpx.AsyncClient, executor: Executor, identity_cid: str, entrypoint: str) -> None:
    response = await http.post(EXECUTE, json={"cid": identity_cid, "entrypoint": entrypoint,
                                              "inputs": [3]})
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True, response.text
    assert response.json()["output"] == 3.0


# --- policy ---


@pytest.mark.parametrize(("field", "value"), [
    ("max_gas", 1_000_000_000_000 + 1),
    ("max_memory", 1_073_741_824 + 1),
    ("max_time", 300_000 + 1),
])
async def test_policy_over_the_ceiling_is_400_at_the_field(
        http: httpx.AsyncClient, add_cid: str, field: str, value: int) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                              "policy": {field: value}})
    assert_invalid_at(response, f"/policy/{field}")


async def test_policy_at_the_ceilings_is_accepted(http: httpx.AsyncClient, add_cid: str) -> None:
    policy = {"max_gas": 1_000_000_000_000, "max_memory": 1_073_741_824, "max_time": 300_000}
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                              "policy": policy}, headers=ASYNC)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("field", ["max_gas", "max_memory", "max_time"])
@pytest.mark.parametrize("value", [0, -1])
async def test_zero_or_negative_policy_is_400_at_the_field(
        http: httpx.AsyncClient, add_cid: str, field: str, value: int) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                              "policy": {field: value}})
    assert_invalid_at(response, f"/policy/{field}")


@pytest.mark.parametrize("value", ["1000", 1.5, True])
async def test_non_integer_policy_is_400_at_the_field(
        http: httpx.AsyncClient, add_cid: str, value: Any) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                              "policy": {"max_gas": value}})
    assert_invalid_at(response, "/policy/max_gas")


async def test_policy_that_is_not_an_object_is_400_at_policy(
        http: httpx.AsyncClient, add_cid: str) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2], "policy": 5})
    assert_invalid_at(response, "/policy")


# --- the body's shape ---


async def test_unknown_top_level_field_is_400_at_it(http: httpx.AsyncClient, add_cid: str) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2], "priority": 1})
    assert_invalid_at(response, "/priority")


async def test_unknown_policy_field_is_400_at_it(http: httpx.AsyncClient, add_cid: str) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                              "policy": {"max_fuel": 10}})
    assert_invalid_at(response, "/policy/max_fuel")


@pytest.mark.parametrize("body", [b'{"cid": ', b"not json", b"", b'{"cid": "x"} trailing'])
async def test_broken_json_is_400(http: httpx.AsyncClient, body: bytes) -> None:
    response = await http.post(EXECUTE, content=body,
                               headers={"Content-Type": "application/json"})
    assert_invalid_at(response, "")


@pytest.mark.parametrize("body", [[], ["bafk"], "bafk", 1, None])
async def test_json_that_is_not_an_object_is_400(http: httpx.AsyncClient, body: Any) -> None:
    response = await http.post(EXECUTE, content=json.dumps(body),
                               headers={"Content-Type": "application/json"})
    assert_invalid_at(response, "")


async def test_body_over_1_mib_is_413(http: httpx.AsyncClient, add_cid: str) -> None:
    body = json.dumps({"cid": add_cid, "inputs": [1, 2], "pad": "x" * MIB}).encode()
    response = await http.post(EXECUTE, content=body,
                               headers={"Content-Type": "application/json"})
    assert_problem(response, 413, "payload-too-large")


async def test_streamed_body_over_1_mib_is_413(http: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"cid": "'
        for _ in range(5):
            yield b"x" * (MIB // 4)
        yield b'"}'

    response = await http.post(EXECUTE, content=chunks(),
                               headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload-too-large")


def test_body_over_1_mib_is_refused_before_it_is_read(processes: Processes) -> None:
    head = (f"POST {EXECUTE} HTTP/1.1\r\nHost: relay\r\nX-API-Key: {ALICE_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {2 * MIB}\r\n\r\n").encode()
    status, headers, _ = raw_exchange(processes.gateway(), head, b'{"cid": "')
    assert status == 413
    assert headers["content-type"].startswith("application/problem+json")


async def test_idempotency_key_header_differing_from_body_is_400(
        http: httpx.AsyncClient, add_cid: str) -> None:
    response = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                              "idempotency_key": "one"},
                               headers={"Idempotency-Key": "two"})
    assert_invalid_at(response, "/idempotency_key")


async def test_refused_requests_are_not_queued(
        http: httpx.AsyncClient, add_cid: str, settings: Settings) -> None:
    assert settings.redis_url is not None
    for body in ({"cid": add_cid, "inputs": [1]}, {"cid": "nope"},
                 {"cid": add_cid, "inputs": [1, 2], "policy": {"max_gas": 0}}):
        assert (await http.post(EXECUTE, json=body)).status_code == 400
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        assert await client.xlen(f"{settings.prefix}:requests") == 0
    finally:
        await client.aclose()


# --- authentication ---

AUTHENTICATED_ROUTES = [
    ("POST", EXECUTE, b"{}"),
    ("GET", "/executions/" + "0" * 64, None),
    ("POST", "/modules", ADD_WAT.encode()),
    ("GET", "/modules", None),
    ("GET", f"/modules/{cid_of(b'x')}", None),
    ("GET", f"/modules/{cid_of(b'x')}/wasm", None),
    ("DELETE", f"/modules/{cid_of(b'x')}", None),
    ("PUT", "/names/calculator/latest", b'{"cid": "nope"}'),
    ("GET", "/names/calculator", None),
]
BAD_CREDENTIALS = [
    {},
    {"X-API-Key": ""},
    {"X-API-Key": "not-a-key"},
    {"X-API-Key": ALICE_KEY.upper()},
    {"Authorization": "Bearer not-a-jwt"},
    {"user_id": "alice", "session_id": "s-1"},
]


@pytest.mark.parametrize(("method", "path", "body"), AUTHENTICATED_ROUTES)
@pytest.mark.parametrize("credentials", BAD_CREDENTIALS)
async def test_missing_or_bad_credentials_are_401_everywhere(
        anonymous: httpx.AsyncClient, method: str, path: str, body: bytes | None,
        credentials: dict[str, str]) -> None:
    response = await anonymous.request(method, path, content=body, headers=credentials)
    assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/intent/execute-wasm/health"])
async def test_health_answers_without_credentials(
        anonymous: httpx.AsyncClient, path: str) -> None:
    response = await anonymous.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]


async def test_another_principals_execution_is_404_like_an_unknown_one(
        http: httpx.AsyncClient, bob: httpx.AsyncClient, add_cid: str) -> None:
    accepted = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2]}, headers=ASYNC)
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["request_id"]
    unknown_id = secrets.token_hex(32)
    assert (await http.get(f"/executions/{request_id}")).status_code == 200

    correlation = {"X-Request-Id": "same-correlation-id"}
    theirs = await bob.get(f"/executions/{request_id}", headers=correlation)
    unknown = await bob.get(f"/executions/{unknown_id}", headers=correlation)
    assert_problem(theirs, 404, "not-found")
    assert_problem(unknown, 404, "not-found")
    assert theirs.text.replace(request_id, "ID") == unknown.text.replace(unknown_id, "ID")
    assert theirs.headers.keys() == unknown.headers.keys()


async def test_client_user_id_and_session_id_headers_do_not_change_identity(
        http: httpx.AsyncClient, bob: httpx.AsyncClient, add_cid: str,
        settings: Settings) -> None:
    assert settings.redis_url is not None
    body = {"cid": add_cid, "inputs": [1, 2], "idempotency_key": "k-1"}
    spoofed = await bob.post(EXECUTE, json=body,
                             headers={**ASYNC, "user_id": "alice", "session_id": "alice-session",
                                      "X-User-Id": "alice"})
    assert spoofed.status_code == 202, spoofed.text
    request_id = spoofed.json()["request_id"]
    assert request_id == request_id_for("bob", "k-1")
    assert (await bob.get(f"/executions/{request_id}")).status_code == 200
    assert_problem(await http.get(f"/executions/{request_id}"), 404, "not-found")

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        entries = await client.xrange(f"{settings.prefix}:requests")
    finally:
        await client.aclose()
    published = [msgspec.json.decode(fields[b"data"]) for _, fields in entries]
    assert [(p["request_id"], p["user_id"]) for p in published] == [(request_id, "bob")]
    assert published[0]["session_id"] != "alice-session"


# --- X-Request-Id ---


async def test_every_response_carries_x_request_id(
        http: httpx.AsyncClient, anonymous: httpx.AsyncClient, add_cid: str) -> None:
    responses = [
        await anonymous.get("/healthz"),
        await anonymous.get("/modules"),
        await http.get("/modules"),
        await http.get("/no/such/route"),
        await http.post(EXECUTE, json={"cid": "nope"}),
        await http.post(EXECUTE, json={"cid": cid_of(b"x")}),
        await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2]}, headers=ASYNC),
        await http.post(EXECUTE, content=b"x" * (MIB + 1)),
    ]
    assert [r.status_code for r in responses] == [200, 401, 200, 404, 400, 404, 202, 413]
    assert all(r.headers.get("x-request-id") for r in responses)
    assert len({r.headers["x-request-id"] for r in responses}) == len(responses)


async def test_problem_carries_the_correlation_id(http: httpx.AsyncClient) -> None:
    response = await http.post(EXECUTE, json={"cid": "nope"})
    assert response.json()["request_id"] == response.headers["x-request-id"]


# --- request ids and idempotency keys ---


async def test_same_request_twice_gets_the_same_request_id(
        http: httpx.AsyncClient, add_cid: str) -> None:
    body = {"cid": add_cid, "inputs": [1, 2]}
    first = await http.post(EXECUTE, json=body, headers=ASYNC)
    second = await http.post(EXECUTE, json=body, headers=ASYNC)
    assert (first.status_code, second.status_code) == (202, 202)
    request_id = first.json()["request_id"]
    assert len(request_id) == 64 and int(request_id, 16) >= 0
    assert second.json()["request_id"] == request_id
    assert second.headers["idempotent-replayed"] == "true"
    assert first.headers["location"] == f"/executions/{request_id}"


async def test_different_inputs_get_different_request_ids(
        http: httpx.AsyncClient, add_cid: str) -> None:
    first = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2]}, headers=ASYNC)
    second = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [2, 1]}, headers=ASYNC)
    assert first.json()["request_id"] != second.json()["request_id"]
    assert "idempotent-replayed" not in second.headers


async def test_explicit_key_request_id_is_sha256_of_principal_and_key(
        http: httpx.AsyncClient, add_cid: str) -> None:
    in_body = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                             "idempotency_key": "order-42"}, headers=ASYNC)
    in_header = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2]},
                                headers={**ASYNC, "Idempotency-Key": "order-42"})
    both = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                          "idempotency_key": "order-42"},
                           headers={**ASYNC, "Idempotency-Key": "order-42"})
    expected = request_id_for("alice", "order-42")
    assert [r.status_code for r in (in_body, in_header, both)] == [202, 202, 202]
    assert [r.json()["request_id"] for r in (in_body, in_header, both)] == [expected] * 3


async def test_same_key_for_another_principal_is_another_request_id(
        http: httpx.AsyncClient, bob: httpx.AsyncClient, add_cid: str) -> None:
    body = {"cid": add_cid, "inputs": [1, 2], "idempotency_key": "shared-key"}
    alices = await http.post(EXECUTE, json=body, headers=ASYNC)
    bobs = await bob.post(EXECUTE, json=body, headers=ASYNC)
    assert (alices.status_code, bobs.status_code) == (202, 202)
    assert alices.json()["request_id"] == request_id_for("alice", "shared-key")
    assert bobs.json()["request_id"] == request_id_for("bob", "shared-key")
    assert "idempotent-replayed" not in bobs.headers


async def test_same_key_with_a_different_request_is_422(
        http: httpx.AsyncClient, add_cid: str) -> None:
    first = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                           "idempotency_key": "once"}, headers=ASYNC)
    assert first.status_code == 202, first.text
    reused = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 3],
                                            "idempotency_key": "once"}, headers=ASYNC)
    assert_problem(reused, 422, "idempotency-key-reuse")
    reused_sync = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                                 "policy": {"max_gas": 1000},
                                                 "idempotency_key": "once"})
    assert_problem(reused_sync, 422, "idempotency-key-reuse")


async def test_same_key_with_a_different_request_after_completion_is_422(
        http: httpx.AsyncClient, executor: Executor, add_cid: str) -> None:
    first = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [1, 2],
                                           "idempotency_key": "done"})
    assert first.status_code == 200, first.text
    assert first.json()["output"] == 3
    reused = await http.post(EXECUTE, json={"cid": add_cid, "inputs": [5, 5],
                                            "idempotency_key": "done"})
    assert_problem(reused, 422, "idempotency-key-reuse")
