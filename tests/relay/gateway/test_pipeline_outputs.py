"""A pipeline reference to a large output: passed to a WASI command by reference (the executor
reads the blob into its stdin), resolved here for a pointer or a function's parameter."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.blobs import CHUNK_BYTES
from relay.keys import Keys
from relay.scheduler import READ_BLOB_BYTES
from relay.settings import Settings
from tests.conftest import ADD_WAT, upload, with_settings
from tests.relay.gateway.test_outputs import TRIPLE_WAT, WRITER_WAT, relay, written
from tests.relay.gateway.test_pipelines import _finished, _post

# `_start` copies stdin to stdout, 64 KiB at a time.
ECHO_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $n i32)
    (loop $again
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i32.load (i32.const 8)))
      (if (local.get $n) (then
        (i32.store (i32.const 4) (local.get $n))
        (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
        (br $again))))))"""


async def _output(http: Any, view: dict[str, Any], node: str) -> bytes:
    response = await http.get(f"/executions/{view['nodes'][node]['request_id']}/output")
    assert response.status_code == 200, response.text
    content: bytes = response.content
    return content


async def _requested(settings: Settings, request_id: str) -> dict[str, Any]:
    """The request the executor was sent, as it is on the bus."""
    decoder = msgspec.json.Decoder()
    redis = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        for _, fields in await redis.xrange(Keys(settings.prefix).requests):
            request: dict[str, Any] = decoder.decode(fields[b"data"])
            if request["request_id"] == request_id:
                return request
    finally:
        await redis.aclose()
    raise AssertionError(f"no request {request_id} on the bus")


async def test_a_large_json_output_is_passed_by_reference(settings: Settings) -> None:
    numbers = list(range(20_000))  # ~110 KB of JSON, over the 64 KiB inline limit
    async with relay(settings) as (alice, _):
        echo = (await upload(alice, ECHO_WAT))["cid"]
        pipeline_id = await _post(alice, {"nodes": [
            {"id": "a", "cid": echo, "inputs": [{"$literal": numbers}]},
            {"id": "b", "cid": echo, "inputs": ["head", {"$ref": "a"}]},
            {"id": "c", "cid": echo, "inputs": [{"$ref": "a", "pointer": "/0/19999"}]},
        ]})
        view = await _finished(alice, pipeline_id)
        assert view["status"] == "completed", view
        a_bytes = await _output(alice, view, "a")
        assert json.loads(a_bytes) == [numbers]
        ref = view["nodes"]["a"]["output_ref"]
        assert view["nodes"]["a"]["output"] is None and ref["size"] == len(a_bytes)
        # b read a's bytes as they are, in place of its second input.
        assert view["nodes"]["b"]["output"] is None
        assert json.loads(await _output(alice, view, "b")) == ["head", [numbers]]
        # The gateway sent a reference, not the bytes.
        request = await _requested(settings, view["nodes"]["b"]["request_id"])
        assert request["inputs"] == ["head", None]
        assert request["input_refs"] == [{"index": 1, "cid": ref["cid"], "size": ref["size"]}]
        # A pointer into it is resolved to its value.
        assert view["nodes"]["c"]["output"] == [19999]


async def test_a_large_text_output_is_given_as_a_string(settings: Settings) -> None:
    size = CHUNK_BYTES + 1000  # two chunks, not JSON
    async with relay(settings) as (alice, _):
        writer = (await upload(alice, WRITER_WAT % size))["cid"]
        echo = (await upload(alice, ECHO_WAT))["cid"]
        pipeline_id = await _post(alice, {"nodes": [
            {"id": "w", "cid": writer, "inputs": []},
            {"id": "e", "cid": echo, "inputs": [{"$ref": "w"}]},
            {"id": "p", "cid": echo, "inputs": [{"$ref": "w", "pointer": "/0"}]},
        ]})
        view = await _finished(alice, pipeline_id)
        assert view["nodes"]["e"]["status"] == "completed", view
        expected = written(size).decode("utf-8", "replace")
        assert json.loads(await _output(alice, view, "e")) == [expected]
        # Resolving it here would read more than READ_BLOB_BYTES: refused, not retried.
        assert size > READ_BLOB_BYTES
        problem = view["nodes"]["p"]
        assert problem["status"] == "failed" and problem["attempts"] == 1
        assert problem["error"]["code"] == "invalid_input"
        assert f"reads at most {READ_BLOB_BYTES} bytes" in problem["error"]["message"]
        assert view["status"] == "failed"


async def test_a_function_takes_a_value_from_a_small_blob(settings: Settings) -> None:
    async with relay(with_settings(settings, inline_output_bytes=16)) as (alice, _):
        triple = (await upload(alice, TRIPLE_WAT))["cid"]
        add = (await upload(alice, ADD_WAT))["cid"]
        pipeline_id = await _post(alice, {"nodes": [
            {"id": "t", "cid": triple, "inputs": [2**40]},
            {"id": "sum", "cid": add, "inputs": [{"$ref": "t", "pointer": "/2"}, 1]},
            {"id": "whole", "cid": add, "inputs": [{"$ref": "t"}, 1]},
        ]})
        view = await _finished(alice, pipeline_id)
        assert view["nodes"]["t"]["output_ref"]["content_type"] == "application/json"
        # ADD_WAT takes i32s: 2**40 does not fit, and neither does a whole array.
        for node in ("sum", "whole"):
            assert view["nodes"][node]["error"]["code"] == "invalid_input", view
        assert "input 0" in view["nodes"]["whole"]["error"]["message"]


async def test_inputs_by_reference_are_capped_in_total(settings: Settings) -> None:
    size = 600_000
    capped = with_settings(settings, max_output_bytes=1_000_000)
    async with relay(capped) as (alice, _):
        writer = (await upload(alice, WRITER_WAT % size))["cid"]
        small = (await upload(alice, WRITER_WAT % 10))["cid"]  # it ignores its stdin
        pipeline_id = await _post(alice, {"nodes": [
            {"id": "w", "cid": writer, "inputs": []},
            {"id": "one", "cid": small, "inputs": [{"$ref": "w"}]},
            {"id": "two", "cid": small, "inputs": [{"$ref": "w"}, {"$ref": "w"}]},
        ]})
        view = await _finished(alice, pipeline_id)
        assert view["nodes"]["one"]["status"] == "completed", view
        error = view["nodes"]["two"]["error"]
        assert error["code"] == "invalid_input"
        assert f"add up to {2 * size} bytes, over the 1000000" in error["message"]
