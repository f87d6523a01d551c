"""Modules and glyph names: upload (binary and WAT), metadata, CIDs, listing, deletion, naming."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import wasmtime
from multiformats import CID, multihash

from executor.worker import Executor
from relay.gateway.app import create_app
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    FIXTURES,
    Processes,
    assert_problem,
    cid_of,
    raw_exchange,
    upload,
    with_settings,
)

WASM = {"Content-Type": "application/wasm"}
WAT = {"Content-Type": "text/plain"}
SMALL_LIMIT_BYTES = 512

SIGNATURES_WAT = """(module
  (import "env" "log" (func (param i32)))
  (import "env" "memory" (memory 1))
  (import "env" "table" (table 1 funcref))
  (import "env" "base" (global i32))
  (func (export "pair") (param i64 f32) (result f64 i32) f64.const 0 i32.const 0)
  (func (export "nothing")))"""


def const_wat(value: int) -> str:
    """A distinct module per value: `main` returns it."""
    return f'(module (func (export "main") (result i32) i32.const {value}))'


def binary(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def cid_v0(cid: str) -> str:
    return str(CID("base58btc", 0, "dag-pb", CID.decode(cid).digest))


@pytest.fixture
async def small(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """alice's client to a gateway whose module limit is SMALL_LIMIT_BYTES."""
    application = create_app(with_settings(settings, max_module_bytes=SMALL_LIMIT_BYTES))
    transport = httpx.ASGITransport(app=application)
    async with (
        application.router.lifespan_context(application),
        httpx.AsyncClient(transport=transport, base_url="http://relay",
                          headers={"X-API-Key": ALICE_KEY}, timeout=30) as client,
    ):
        yield client


# --- upload ---


async def test_binary_then_wat_of_one_module_share_a_cid_201_then_200(
        http: httpx.AsyncClient) -> None:
    wasm = binary(ADD_WAT)
    first = await http.post("/modules", content=wasm, headers=WASM)
    second = await http.post("/modules", content=ADD_WAT.encode(), headers=WAT)
    assert first.status_code == 201, first.text
    assert second.status_code == 200, second.text
    assert first.json()["cid"] == second.json()["cid"]
    assert first.json()["size"] == second.json()["size"] == len(wasm)


async def test_wat_upload_reports_the_binary_size(http: httpx.AsyncClient) -> None:
    response = await http.post("/modules", content=ADD_WAT.encode(), headers=WAT)
    assert response.status_code == 201, response.text
    assert response.json()["size"] == len(binary(ADD_WAT))
    assert response.json()["size"] != len(ADD_WAT.encode())


async def test_cid_is_cidv1_raw_sha256_base32_of_the_binary(http: httpx.AsyncClient) -> None:
    wasm = binary(ADD_WAT)
    cid = (await upload(http, ADD_WAT))["cid"]
    assert cid == cid_of(wasm)
    assert cid == str(CID("base32", 1, "raw",
                          multihash.wrap(hashlib.sha256(wasm).digest(), "sha2-256")))
    parsed = CID.decode(cid)
    assert (parsed.version, parsed.codec.name, parsed.hashfun.name) == (1, "raw", "sha2-256")
    assert parsed.raw_digest == hashlib.sha256(wasm).digest()


async def test_metadata_lists_function_exports_and_imports(http: httpx.AsyncClient) -> None:
    info = await upload(http, SIGNATURES_WAT)
    assert info["exports"] == [
        {"name": "pair", "params": ["i64", "f32"], "results": ["f64", "i32"]},
        {"name": "nothing", "params": [], "results": []},
    ]
    assert info["imports"] == [
        {"module": "env", "name": "log", "kind": "func"},
        {"module": "env", "name": "memory", "kind": "memory"},
        {"module": "env", "name": "table", "kind": "table"},
        {"module": "env", "name": "base", "kind": "global"},
    ]
    assert info["wasi"] is False


async def test_plain_module_is_not_wasi(http: httpx.AsyncClient) -> None:
    info = await upload(http, ADD_WAT)
    assert info["wasi"] is False
    assert info["imports"] == []
    assert info["exports"] == [{"name": "main", "params": ["i32", "i32"], "results": ["i32"]}]


async def test_wasi_command_module_is_wasi(http: httpx.AsyncClient) -> None:
    wasm = (FIXTURES / "json_sum.wasm").read_bytes()
    info = await upload(http, wasm)
    assert info["wasi"] is True
    assert info["cid"] == cid_of(wasm)
    assert info["size"] == len(wasm)
    assert any(e["name"] == "_start" for e in info["exports"])
    assert {i["module"] for i in info["imports"]} == {"wasi_snapshot_preview1"}


@pytest.mark.parametrize("body", [
    b"\xff\xfe not utf-8 and not wasm",
    b"this is not WAT",
    b"(module (func (export \"f\") (result i32) i64.const 1))",  # type error
    b"\0asm\x02\0\0\0",  # magic, but an unknown version
    b"",
])
async def test_not_a_module_is_400(http: httpx.AsyncClient, body: bytes) -> None:
    assert_problem(await http.post("/modules", content=body), 400, "invalid-request")
    assert (await http.get("/modules")).json()["modules"] == []


async def test_module_over_the_limit_is_413(small: httpx.AsyncClient) -> None:
    body = b"\0asm\x01\0\0\0" + b"\0" * SMALL_LIMIT_BYTES
    assert_problem(await small.post("/modules", content=body, headers=WASM),
                   413, "payload-too-large")
    assert (await small.get("/modules")).json()["modules"] == []


async def test_streamed_module_over_the_limit_is_413(small: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"\0" * (SMALL_LIMIT_BYTES // 2)

    response = await small.post("/modules", content=chunks(), headers=WASM)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload-too-large")


async def test_module_under_the_small_limit_is_stored(small: httpx.AsyncClient) -> None:
    response = await small.post("/modules", content=binary(ADD_WAT), headers=WASM)
    assert response.status_code == 201, response.text


def test_oversized_upload_is_refused_from_content_length_before_the_body(
        processes: Processes) -> None:
    url = processes.gateway(RELAY_MAX_MODULE_BYTES=str(SMALL_LIMIT_BYTES))
    head = (b"POST /modules HTTP/1.1\r\nHost: relay\r\n"
            b"X-API-Key: " + ALICE_KEY.encode() + b"\r\n"
            b"Content-Type: application/wasm\r\nContent-Length: 1000000000\r\n\r\n")
    status, headers, body = raw_exchange(url, head, b"\0asm\x01\0\0\0")
    assert status == 413
    assert headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["type"] == "/problems/payload-too-large"
    assert headers["x-request-id"]


# --- reading, listing, deleting ---


async def test_get_module_returns_its_metadata(http: httpx.AsyncClient) -> None:
    info = await upload(http, ADD_WAT)
    response = await http.get(f"/modules/{info['cid']}")
    assert response.status_code == 200, response.text
    assert response.json() == info


async def test_get_wasm_returns_the_exact_binary(http: httpx.AsyncClient) -> None:
    wasm = (FIXTURES / "json_sum.wasm").read_bytes()
    info = await upload(http, wasm)
    response = await http.get(f"/modules/{info['cid']}/wasm")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/wasm"
    assert response.content == wasm


async def test_get_wasm_of_a_wat_upload_returns_the_compiled_binary(
        http: httpx.AsyncClient) -> None:
    info = await upload(http, ADD_WAT)
    response = await http.get(f"/modules/{info['cid']}/wasm")
    assert response.content == binary(ADD_WAT)


async def test_cidv0_with_the_same_multihash_finds_the_module(http: httpx.AsyncClient) -> None:
    info = await upload(http, ADD_WAT)
    v0 = cid_v0(info["cid"])
    assert v0.startswith("Qm")
    response = await http.get(f"/modules/{v0}")
    assert response.status_code == 200, response.text
    assert response.json()["cid"] == info["cid"]
    assert (await http.get(f"/modules/{v0}/wasm")).content == binary(ADD_WAT)


@pytest.mark.parametrize(("base", "codec"), [
    ("base58btc", "raw"), ("base32upper", "raw"), ("base64", "raw"), ("base32", "dag-pb"),
])
async def test_cidv1_in_any_multibase_finds_the_module(
        http: httpx.AsyncClient, base: str, codec: str) -> None:
    info = await upload(http, ADD_WAT)
    other = str(CID(base, 1, codec, CID.decode(info["cid"]).digest))
    assert other != info["cid"]
    response = await http.get(f"/modules/{other}")
    assert response.status_code == 200, response.text
    assert response.json()["cid"] == info["cid"]


async def test_unknown_module_is_404(http: httpx.AsyncClient) -> None:
    cid = cid_of(b"never uploaded")
    assert_problem(await http.get(f"/modules/{cid}"), 404, "not-found")
    assert_problem(await http.get(f"/modules/{cid}/wasm"), 404, "not-found")


async def test_module_path_that_is_not_a_cid_is_400(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/modules/not-a-cid"), 400, "invalid-request")


async def test_list_pages_newest_first(http: httpx.AsyncClient) -> None:
    cids = [(await upload(http, const_wat(n)))["cid"] for n in range(3)]
    first = await http.get("/modules", params={"limit": 2})
    assert first.status_code == 200, first.text
    assert [m["cid"] for m in first.json()["modules"]] == [cids[2], cids[1]]
    cursor = first.json()["next_cursor"]
    assert isinstance(cursor, str)
    rest = await http.get("/modules", params={"limit": 2, "cursor": cursor})
    assert [m["cid"] for m in rest.json()["modules"]] == [cids[0]]
    assert rest.json()["next_cursor"] is None


async def test_list_without_limit_returns_everything_with_metadata(
        http: httpx.AsyncClient) -> None:
    infos = [await upload(http, const_wat(n)) for n in range(3)]
    body = (await http.get("/modules")).json()
    assert body["modules"] == infos[::-1]
    assert body["next_cursor"] is None


async def test_list_page_exactly_full_has_no_next_cursor(http: httpx.AsyncClient) -> None:
    for n in range(2):
        await upload(http, const_wat(n))
    body = (await http.get("/modules", params={"limit": 2})).json()
    assert len(body["modules"]) == 2
    assert body["next_cursor"] is None


@pytest.mark.parametrize("limit", ["0", "-1", "abc"])
async def test_list_with_a_bad_limit_is_400(http: httpx.AsyncClient, limit: str) -> None:
    assert_problem(await http.get("/modules", params={"limit": limit}), 400, "invalid-request")


async def test_delete_is_for_the_owner_only_then_404(
        http: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    assert_problem(await bob.delete(f"/modules/{cid}"), 403, "forbidden")
    assert (await http.get(f"/modules/{cid}")).status_code == 200

    deleted = await http.delete(f"/modules/{cid}")
    assert deleted.status_code == 204
    assert deleted.content == b""

    assert_problem(await http.get(f"/modules/{cid}"), 404, "not-found")
    assert_problem(await http.get(f"/modules/{cid}/wasm"), 404, "not-found")
    assert_problem(await http.delete(f"/modules/{cid}"), 404, "not-found")
    assert (await http.get("/modules")).json()["modules"] == []


async def test_deleted_module_can_be_uploaded_again(http: httpx.AsyncClient) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    assert (await http.delete(f"/modules/{cid}")).status_code == 204
    again = await http.post("/modules", content=ADD_WAT.encode(), headers=WAT)
    assert again.status_code == 201, again.text
    assert (await http.get(f"/modules/{cid}")).status_code == 200


# --- names ---


async def test_upload_with_name_and_tag_binds_it(http: httpx.AsyncClient) -> None:
    info = await upload(http, ADD_WAT, name="calculator", tag="quantum")
    response = await http.get("/names/calculator")
    assert response.status_code == 200, response.text
    assert response.json() == {"name": "calculator", "tags": {"quantum": info["cid"]}}


async def test_upload_with_name_only_binds_latest(http: httpx.AsyncClient) -> None:
    info = await upload(http, ADD_WAT, name="calculator")
    assert (await http.get("/names/calculator")).json()["tags"] == {"latest": info["cid"]}


async def test_put_name_binds_and_moves(http: httpx.AsyncClient) -> None:
    one = (await upload(http, const_wat(1)))["cid"]
    two = (await upload(http, const_wat(2)))["cid"]

    bound = await http.put("/names/answer/stable", json={"cid": one})
    assert bound.status_code == 200, bound.text
    await http.put("/names/answer/latest", json={"cid": one})
    assert (await http.get("/names/answer")).json()["tags"] == {"latest": one, "stable": one}

    moved = await http.put("/names/answer/latest", json={"cid": two})
    assert moved.status_code == 200, moved.text
    assert (await http.get("/names/answer")).json()["tags"] == {"latest": two, "stable": one}


async def test_put_name_with_a_cidv0_stores_the_cidv1(http: httpx.AsyncClient) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    response = await http.put("/names/calc/latest", json={"cid": cid_v0(cid)})
    assert response.status_code == 200, response.text
    assert (await http.get("/names/calc")).json()["tags"] == {"latest": cid}


async def test_put_name_to_an_unknown_cid_is_404(http: httpx.AsyncClient) -> None:
    response = await http.put("/names/calc/latest",
                              json={"cid": cid_of(b"never uploaded")})
    assert_problem(response, 404, "not-found")
    assert_problem(await http.get("/names/calc"), 404, "not-found")


async def test_put_name_with_a_body_that_is_not_a_cid_is_400(http: httpx.AsyncClient) -> None:
    body = assert_problem(await http.put("/names/calc/latest", json={"cid": "nope"}),
                          400, "invalid-request")
    assert [e["pointer"] for e in body["errors"]] == ["/cid"]


@pytest.mark.parametrize(("name", "tag"), [
    ("Calc", "latest"),
    ("-calc", "latest"),
    ("calc!", "latest"),
    ("a" * 65, "latest"),
    ("calc", "Latest"),
    ("calc", ".v1"),
])
async def test_put_name_that_breaks_the_pattern_is_400(
        http: httpx.AsyncClient, name: str, tag: str) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    assert_problem(await http.put(f"/names/{name}/{tag}", json={"cid": cid}),
                   400, "invalid-request")


async def test_longest_allowed_name_binds(http: httpx.AsyncClient) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    name = "a" + "b.c-d_" * 10 + "xyz"
    assert len(name) == 64
    assert (await http.put(f"/names/{name}/v1.0-rc_1", json={"cid": cid})).status_code == 200


async def test_upload_with_a_bad_name_is_400_and_stores_nothing(
        http: httpx.AsyncClient) -> None:
    response = await http.post("/modules", content=ADD_WAT.encode(), params={"name": "Bad Name"})
    assert_problem(response, 400, "invalid-request")
    assert (await http.get("/modules")).json()["modules"] == []


async def test_upload_under_another_principals_name_is_403_and_stores_nothing(
        http: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    mine = (await upload(http, const_wat(1), name="answer"))["cid"]
    response = await bob.post("/modules", content=const_wat(2).encode(), params={"name": "answer"})
    assert_problem(response, 403, "forbidden")
    assert [m["cid"] for m in (await http.get("/modules")).json()["modules"]] == [mine]
    assert (await http.get("/names/answer")).json()["tags"] == {"latest": mine}


async def test_another_principals_name_is_403(
        http: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    mine = (await upload(http, const_wat(1), name="answer"))["cid"]
    theirs = (await upload(bob, const_wat(2)))["cid"]
    assert_problem(await bob.put("/names/answer/latest", json={"cid": theirs}), 403, "forbidden")
    assert_problem(await bob.put("/names/answer/other", json={"cid": theirs}), 403, "forbidden")
    assert (await http.get("/names/answer")).json()["tags"] == {"latest": mine}


async def test_unknown_name_is_404(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/names/nobody"), 404, "not-found")


async def test_glyph_name_without_tag_runs_latest(
        http: httpx.AsyncClient, executor: Executor) -> None:
    one = (await upload(http, const_wat(1), name="answer"))["cid"]
    two = (await upload(http, const_wat(2)))["cid"]

    first = await http.post("/intent/execute-wasm", json={"cid": "glyph://answer"})
    assert first.status_code == 200, first.text
    assert (first.json()["output"], first.json()["cid"]) == (1, one)

    assert (await http.put("/names/answer/latest", json={"cid": two})).status_code == 200
    moved = await http.post("/intent/execute-wasm", json={"cid": "glyph://answer"})
    assert (moved.json()["output"], moved.json()["cid"]) == (2, two)
    tagged = await http.post("/intent/execute-wasm", json={"cid": "glyph://answer@latest"})
    assert (tagged.json()["output"], tagged.json()["cid"]) == (2, two)


async def test_execute_by_cidv0_answers_with_the_cidv1(
        http: httpx.AsyncClient, executor: Executor) -> None:
    cid = (await upload(http, ADD_WAT))["cid"]
    response = await http.post("/intent/execute-wasm",
                               json={"cid": cid_v0(cid), "inputs": [2, 3]})
    assert response.status_code == 200, response.text
    assert (response.json()["output"], response.json()["cid"]) == (5, cid)


# --- errors in general ---


async def test_unknown_route_is_a_404_problem(http: httpx.AsyncClient) -> None:
    assert_problem(await http.get("/no/such/route"), 404, "not-found")


async def test_wrong_method_is_a_405_problem(http: httpx.AsyncClient) -> None:
    assert_problem(await http.patch("/modules"), 405, "method-not-allowed")
