"""GET /openapi.json: a valid OpenAPI 3.1 document that describes exactly what the app does.

Every real response below is checked against the document: its status must be documented for
its operation, its media type too, its body must validate against the documented schema and it
must carry the documented required headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import wasmtime
from openapi_spec_validator import validate as validate_openapi
from starlette.routing import Route, WebSocketRoute

from executor.worker import Executor
from relay.gateway.app import ROUTES, create_app
from relay.openapi import document, document_bytes
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    assert_problem,
    cid_of,
    client_for,
    upload,
    with_settings,
)

TRAP_WAT = '(module (func (export "main") unreachable))'
EXAMPLE_PATH_PARAMETERS = {"request_id": "0" * 64, "cid": cid_of(b"nothing stored"),
                           "name": "nobody", "tag": "latest",
                           "budget_id": "bud_" + "0" * 24, "session_id": "ses_" + "0" * 24,
                           "snapshot_id": "snp_" + "0" * 24, "pipeline_id": "0" * 32,
                           "environment": "nowhere", "batch_id": "bat_" + "0" * 24,
                           "asset": "swagger-ui.css", "file": "console.css"}


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """`node`, or what its local `$ref` points at."""
    ref = node.get("$ref")
    if ref is None:
        return node
    found: Any = document()
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return dict(found)


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """Validates against `schema`, its `#/components/...` references resolved in the document."""
    return jsonschema.Draft202012Validator({**schema, "components": document()["components"]})


def media_type(value: str) -> str:
    """A media type with its parameters but without `charset`, spaces normalised."""
    parts = [part.strip() for part in value.split(";")]
    return ";".join(part for part in parts if part and not part.startswith("charset="))


def assert_documented(response: httpx.Response, path: str) -> Any:
    """The response is one the document describes for its operation at `path` (a template).
    Returns the decoded JSON body (or the raw body of other media types)."""
    method = response.request.method.lower()
    operation = document()["paths"][path][method]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, (
        f"{method.upper()} {path}: undocumented {response.status_code} {response.text}")
    for name, header in documented.get("headers", {}).items():
        header = resolve(header)
        value = response.headers.get(name)
        assert value is not None or not header.get("required"), f"{name} missing"
        if value is not None:
            decoded = int(value) if header["schema"].get("type") == "integer" else value
            validator(header["schema"]).validate(decoded)
    content = documented.get("content")
    if content is None:
        assert not response.content
        return None
    documented_types = {media_type(key): value for key, value in content.items()}
    actual = media_type(response.headers["content-type"])
    assert actual in documented_types, f"{actual} not in {list(content)}"
    if not actual.endswith("json"):
        return response.content
    body = response.json()
    errors = [error.message for error in
              validator(documented_types[actual]["schema"]).iter_errors(body)]
    assert not errors, f"{method.upper()} {path} {response.status_code}: {errors} in {body}"
    return body


def request_schema(path: str, method: str) -> dict[str, Any]:
    schema: dict[str, Any] = (
        document()["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"])
    return schema


# --- the document itself ---


def test_the_document_is_valid_openapi_3_1() -> None:
    validate_openapi(document())
    assert document()["openapi"] == "3.1.0"
    assert json.loads(document_bytes()) == document()


def test_it_documents_exactly_the_routes_the_app_has() -> None:
    routed = set()
    for route in ROUTES:
        # OpenAPI has no WebSocket operations; anything else (a Mount, say) needs a decision.
        assert isinstance(route, Route | WebSocketRoute), route
        if isinstance(route, Route):
            routed |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
    documented = {(method, path) for method, path, _ in operations()}
    assert documented == routed


def test_every_error_response_is_a_problem() -> None:
    for method, path, operation in operations():
        for status, response in operation["responses"].items():
            if int(status) >= 400 and path != "/intent/execute-wasm/health":
                assert list(response["content"]) == ["application/problem+json"], (method, path)
                schema = response["content"]["application/problem+json"]["schema"]
                assert schema["allOf"] == [{"$ref": "#/components/schemas/Problem"}]


async def test_operations_ask_for_credentials_exactly_when_the_document_says(app: Any) -> None:
    async with client_for(app, None) as anonymous:
        for method, path, operation in operations():
            url = path.format(**EXAMPLE_PATH_PARAMETERS)
            response = await anonymous.request(method, url)
            if operation.get("security") == []:
                assert response.status_code != 401, (method, path)
            else:
                assert_problem(response, 401, "unauthenticated")
                assert_documented(response, path)


async def test_the_app_serves_the_document(http: httpx.AsyncClient) -> None:
    response = await http.get("/openapi.json")
    assert response.content == document_bytes()
    assert_documented(response, "/openapi.json")


# --- real responses against the document ---


async def test_execute_responses_are_documented(http: httpx.AsyncClient,
                                                executor: Executor) -> None:
    module = await upload(http, ADD_WAT)
    execute = "/intent/execute-wasm"

    done = await http.post(execute, json={"cid": module["cid"], "inputs": [1, 2]})
    assert assert_documented(done, execute)["output"] == 3
    pattern = resolve(document()["components"]["parameters"]["request_id"])["schema"]["pattern"]
    assert re.fullmatch(pattern, done.json()["request_id"])

    keyed = {"cid": module["cid"], "inputs": [2, 2], "idempotency_key": "k"}
    await http.post(execute, json=keyed)
    replayed = await http.post(execute, json=keyed)
    assert replayed.headers["idempotent-replayed"] == "true"
    assert_documented(replayed, execute)
    reused = await http.post(execute, json={**keyed, "inputs": [3, 3]})
    assert_problem(reused, 422, "idempotency-key-reuse")
    assert_documented(reused, execute)

    trap = await upload(http, TRAP_WAT)
    trapped = await http.post(execute, json={"cid": trap["cid"]})
    assert assert_documented(trapped, execute)["error"]["code"] == "trap"

    queued = await http.post(execute, json={"cid": module["cid"], "inputs": [5, 5]},
                             headers={"Prefer": "respond-async"})
    assert queued.status_code == 202
    body = assert_documented(queued, execute)
    assert queued.headers["location"] == body["links"]["self"]
    execution = "/executions/{request_id}"
    seen = await http.get(body["links"]["self"])
    assert_documented(seen, execution)
    assert seen.json()["status"] in ("queued", "running", "completed")
    finished = await http.get(f"/executions/{done.json()['request_id']}")
    assert assert_documented(finished, execution)["status"] == "completed"
    assert_documented(await http.get("/executions/" + "0" * 64), execution)


async def test_execute_refusals_are_documented(http: httpx.AsyncClient) -> None:
    module = await upload(http, ADD_WAT)
    execute = "/intent/execute-wasm"
    wrong_type = await http.post(execute, json={"cid": module["cid"], "inputs": [1, "two"]})
    assert assert_problem(wrong_type, 400, "invalid-request")["errors"][0]["pointer"] == "/inputs/1"
    assert_documented(wrong_type, execute)
    missing = await http.post(execute, json={"cid": cid_of(b"not stored")})
    assert_problem(missing, 404, "not-found")
    assert_documented(missing, execute)
    too_big = await http.post(execute, content=b" " * (1024 * 1024 + 1))
    assert_problem(too_big, 413, "payload-too-large")
    assert_documented(too_big, execute)


async def test_a_rate_limited_refusal_is_documented(settings: Settings) -> None:
    application = create_app(with_settings(settings, rate_limit=1))
    async with application.router.lifespan_context(application), \
            client_for(application, ALICE_KEY) as alice:
        first = await alice.post("/intent/execute-wasm", content=b"{}")
        assert_documented(first, "/intent/execute-wasm")
        limited = await alice.post("/intent/execute-wasm", content=b"{}")
        assert_problem(limited, 429, "rate-limited")
        assert_documented(limited, "/intent/execute-wasm")


async def test_module_and_name_responses_are_documented(http: httpx.AsyncClient,
                                                        bob: httpx.AsyncClient) -> None:
    created = await http.post("/modules", content=ADD_WAT.encode(),
                              headers={"Content-Type": "text/plain"}, params={"name": "adder"})
    assert created.status_code == 201
    cid = assert_documented(created, "/modules")["cid"]
    again = await http.post("/modules", content=bytes(wasmtime.wat2wasm(ADD_WAT)),
                            headers={"Content-Type": "application/wasm"})
    assert again.status_code == 200
    assert_documented(again, "/modules")
    assert_documented(await http.post("/modules", content=b"not wasm"), "/modules")
    assert_documented(await bob.post("/modules", content=ADD_WAT.encode(),
                                     params={"name": "adder"}), "/modules")

    assert_documented(await http.get("/modules", params={"limit": 1}), "/modules")
    maximum = resolve(document()["components"]["parameters"]["limit"])["schema"]["maximum"]
    assert (await http.get("/modules", params={"limit": maximum})).status_code == 200
    over = await http.get("/modules", params={"limit": maximum + 1})
    assert_problem(over, 400, "invalid-request")
    assert_documented(over, "/modules")

    assert_documented(await http.get(f"/modules/{cid}"), "/modules/{cid}")
    assert_documented(await http.get("/modules/not-a-cid"), "/modules/{cid}")
    assert_documented(await http.get(f"/modules/{cid_of(b'none')}"), "/modules/{cid}")
    wasm = await http.get(f"/modules/{cid}/wasm")
    assert assert_documented(wasm, "/modules/{cid}/wasm") == wasm.content

    bind = "/names/{name}/{tag}"
    assert_documented(await http.put("/names/adder/v1", json={"cid": cid}), bind)
    assert_documented(await http.put("/names/adder/v2", json={"cid": cid_of(b"x")}), bind)
    assert_documented(await http.put("/names/Adder/v1", json={"cid": cid}), bind)
    assert_documented(await bob.put("/names/adder/v3", json={"cid": cid}), bind)
    tags = await http.get("/names/adder")
    assert assert_documented(tags, "/names/{name}")["tags"] == {"latest": cid, "v1": cid}
    assert_documented(await http.get("/names/nobody"), "/names/{name}")

    assert_documented(await bob.delete(f"/modules/{cid}"), "/modules/{cid}")
    named = await http.delete(f"/modules/{cid}")
    assert_problem(named, 409, "conflict")  # adder@latest and adder@v1 point at it
    assert_documented(named, "/modules/{cid}")
    other = (await upload(http, '(module (func (export "main")))'))["cid"]
    for tag in ("latest", "v1"):
        assert (await http.put(f"/names/adder/{tag}", json={"cid": other})).status_code == 200
    deleted = await http.delete(f"/modules/{cid}")
    assert deleted.status_code == 204
    assert_documented(deleted, "/modules/{cid}")
    assert_documented(await http.delete(f"/modules/{cid}"), "/modules/{cid}")


async def test_health_and_metrics_responses_are_documented(http: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/intent/execute-wasm/health", "/metrics"):
        response = await http.get(path)
        assert response.status_code == 200, path
        assert_documented(response, path)


# --- request bodies: the schema refuses what the server refuses ---


@pytest.fixture
async def adder(http: httpx.AsyncClient) -> AsyncIterator[str]:
    yield (await upload(http, ADD_WAT))["cid"]


async def test_the_execute_schema_refuses_unknown_fields_like_the_server(
        http: httpx.AsyncClient, adder: str) -> None:
    schema = validator(request_schema("/intent/execute-wasm", "post"))
    good = {"cid": adder, "inputs": [1, 2], "policy": {"max_gas": 1000}}
    schema.validate(good)
    accepted = await http.post("/intent/execute-wasm", json=good,
                               headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202, accepted.text
    refused = (
        ({**good, "bogus": 1}, "/bogus"),
        ({**good, "policy": {"max_fuel": 1}}, "/policy/max_fuel"),
        ({**good, "policy": {"max_gas": 0}}, "/policy/max_gas"),
        ({**good, "entrypoint": ""}, "/entrypoint"),
        ({"inputs": [1, 2]}, "/cid"),
    )
    for body, pointer in refused:
        assert not schema.is_valid(body), body
        response = await http.post("/intent/execute-wasm", json=body)
        problem = assert_problem(response, 400, "invalid-request")
        assert problem["errors"][0]["pointer"] == pointer


async def test_the_name_binding_schema_refuses_unknown_fields_like_the_server(
        http: httpx.AsyncClient, adder: str) -> None:
    schema = validator(request_schema("/names/{name}/{tag}", "put"))
    schema.validate({"cid": adder})
    assert (await http.put("/names/adder/v1", json={"cid": adder})).status_code == 200
    assert not schema.is_valid({"cid": adder, "owner": "bob"})
    refused = await http.put("/names/adder/v1", json={"cid": adder, "owner": "bob"})
    assert_problem(refused, 400, "invalid-request")


# --- examples: every operation has them, and they are what their schemas describe ---


def every_operation() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The paths' operations, then the webhooks' (the requests Relay sends)."""
    yield from operations()
    for name, item in document()["webhooks"].items():
        for method, operation in item.items():
            yield method.upper(), name, operation


def closed(node: Any) -> Any:
    """`node` with every object schema closed to the properties it names: the response types
    accept unknown fields (for clients' sake), an example must not have any (a misspelling)."""
    if isinstance(node, list):
        return [closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    found = {key: closed(value) for key, value in node.items()}
    if "properties" in found and "additionalProperties" not in found:
        found["additionalProperties"] = False
    return found


def examples_of(operation: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(where, schema, example) of every example of the operation's bodies and responses."""
    parts = [("request", operation.get("requestBody", {})),
             *operation["responses"].items()]
    for part, described in parts:
        for kind, media in described.get("content", {}).items():
            if "example" in media:
                yield f"{part} {kind}", media["schema"], media["example"]
            for name, example in media.get("examples", {}).items():
                yield f"{part} {kind} {name}", media["schema"], example["value"]


def test_every_operation_has_an_example_of_its_body_and_its_success() -> None:
    for method, path, operation in every_operation():
        if "requestBody" in operation:
            assert any("example" in media or "examples" in media
                       for media in operation["requestBody"]["content"].values()), (method, path)
        successes = [response for status, response in sorted(operation["responses"].items())
                     if status.startswith("2") and "content" in response]
        if successes:  # not where success has no body (204, or a webhook's 2XX)
            main = successes[0]["content"]
            assert any("example" in media or "examples" in media for media in main.values()), (
                method, path)


def test_every_example_validates_against_its_schema() -> None:
    components = closed(document()["components"])
    count = 0
    for method, path, operation in every_operation():
        for where, schema, example in examples_of(operation):
            check = jsonschema.Draft202012Validator({**closed(schema), "components": components})
            errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
                      for error in check.iter_errors(example)]
            assert not errors, f"{method} {path} {where}: {errors}"
            count += 1
    assert count >= len(list(operations()))  # not vacuous: about one and a half each
