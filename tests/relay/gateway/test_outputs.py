"""Large outputs: over RELAY_INLINE_OUTPUT_BYTES an output is a blob (`output_ref`), read at
`GET /executions/{id}/output` with Range, ETag and If-None-Match; small ones stay inline."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from executor.progress import FLUSH_IN_FLIGHT, OUTPUT_CHUNK_BYTES
from executor.worker import Executor
from relay import connection
from relay.blobs import CHUNK_BYTES
from relay.gateway.app import create_app
from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import (
    ALICE_KEY,
    BOB_KEY,
    FIXTURES,
    Processes,
    assert_problem,
    cid_of,
    client_for,
    event_entries,
    upload,
    wait_for,
    with_settings,
)

EXECUTE = "/intent/execute-wasm"
EFBIG = 22
V1_FIELDS = {"success", "request_id", "cid", "output", "gas_used", "duration", "executed_at",
             "error"}

# `_start` writes N bytes to stdout in 64 KiB writes, byte i of each write being i % 251; a
# write that fails ends the run with its errno as the exit status.
WRITER_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $i i32) (local $left i32) (local $n i32) (local $errno i32)
    (block $filled (loop $fill
      (br_if $filled (i32.ge_u (local.get $i) (i32.const 65536)))
      (i32.store8 (i32.add (i32.const 1024) (local.get $i))
                  (i32.rem_u (local.get $i) (i32.const 251)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $fill)))
    (local.set $left (i32.const %d))
    (block $done (loop $again
      (br_if $done (i32.eqz (local.get $left)))
      (local.set $n (select (local.get $left) (i32.const 65536)
                            (i32.lt_u (local.get $left) (i32.const 65536))))
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (local.get $n))
      (local.set $errno (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (if (local.get $errno) (then (call $exit (local.get $errno))))
      (local.set $left (i32.sub (local.get $left) (i32.load (i32.const 8))))
      (br $again)))))"""
# A function of three results: its output is a JSON array.
TRIPLE_WAT = """(module (func (export "main") (param i64) (result i64 i64 i64)
  local.get 0 local.get 0 local.get 0))"""
SPIN_WAT = """(module (func (export "main") (loop br 0)))"""
PATTERN = bytes(i % 251 for i in range(65536))


def written(size: int) -> bytes:
    """What WRITER_WAT % size writes."""
    whole, rest = divmod(size, 65536)
    return PATTERN * whole + PATTERN[:rest]


@contextlib.asynccontextmanager
async def relay(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient,
                                                           httpx.AsyncClient]]:
    """A gateway and an executor under `settings`: alice's and bob's clients."""
    assert settings.redis_url is not None
    application = create_app(settings)
    client = connection.connect(settings.redis_url)
    worker = Executor(settings, client, name="outputs-executor", read_block_ms=100)
    task = asyncio.create_task(worker.run())
    try:
        async with application.router.lifespan_context(application), \
                client_for(application, ALICE_KEY) as alice, \
                client_for(application, BOB_KEY) as bob:
            yield alice, bob
    finally:
        worker.stop()
        worker.cancel_running()
        await asyncio.wait_for(task, 10)
        await client.aclose()


@pytest.fixture
async def clients(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient,
                                                             httpx.AsyncClient]]:
    async with relay(settings) as both:
        yield both


async def run(http: httpx.AsyncClient, cid: str, inputs: list[Any] | None = None,
              **extra: Any) -> httpx.Response:
    response = await http.post(EXECUTE, json={"cid": cid, "inputs": inputs or [], **extra})
    assert response.status_code == 200, response.text
    return response


async def blob_keys(settings: Settings, cid: str) -> list[bytes]:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        return sorted([key async for key in client.scan_iter(
            match=f"{Keys(settings.prefix).blob(cid)}*")])
    finally:
        await client.aclose()


async def test_a_small_output_stays_inline_with_the_v1_body(clients: Any) -> None:
    alice, _ = clients
    summer = await upload(alice, (FIXTURES / "json_sum.wasm").read_bytes())
    response = await run(alice, summer["cid"], [1, 2, 39])
    body = response.json()
    assert set(body) == V1_FIELDS and body["output"] == {"sum": 42, "count": 3}
    assert b"output_ref" not in response.content
    state = (await alice.get(f"/executions/{body['request_id']}")).json()
    assert "output_ref" not in state
    # Its output is also at /output, as the JSON it is.
    output = await alice.get(f"/executions/{body['request_id']}/output")
    assert output.status_code == 200
    assert output.headers["content-type"] == "application/json"
    assert msgspec.json.decode(output.content) == {"sum": 42, "count": 3}
    assert output.headers["etag"] == f'"{cid_of(output.content)}"'
    assert output.headers["content-length"] == str(len(output.content))


async def test_a_large_output_is_a_blob_read_back_exactly(clients: Any,
                                                          settings: Settings) -> None:
    alice, bob = clients
    size = 2 * CHUNK_BYTES + 12345  # three chunks, the last one short
    expected = written(size)
    writer = await upload(alice, WRITER_WAT % size)
    response = await run(alice, writer["cid"])
    body = response.json()
    assert body["success"] is True, body
    assert body["output"] is None
    ref = {"cid": cid_of(expected), "size": size, "content_type": "application/octet-stream"}
    assert body["output_ref"] == ref
    request_id = body["request_id"]
    assert (await alice.get(f"/executions/{request_id}")).json()["output_ref"] == ref

    output = await alice.get(f"/executions/{request_id}/output")
    assert output.status_code == 200
    assert output.content == expected
    assert output.headers["content-type"] == "application/octet-stream"
    assert output.headers["content-length"] == str(size)
    assert output.headers["etag"] == f'"{ref["cid"]}"'
    assert output.headers["accept-ranges"] == "bytes"
    head = await alice.head(f"/executions/{request_id}/output")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(size)
    assert head.headers["etag"] == output.headers["etag"]
    # Stored in chunks of at most 1 MiB, beside the blob's hash.
    keys = await blob_keys(settings, ref["cid"])
    assert len(keys) == 4

    # Another principal does not see it.
    assert_problem(await bob.get(f"/executions/{request_id}/output"), 404, "not-found")
    # The same output again is the same blob.
    again = (await run(alice, writer["cid"], idempotency_key="again")).json()
    assert again["output_ref"] == ref and again["request_id"] != request_id
    assert await blob_keys(settings, ref["cid"]) == keys


async def test_ranges_and_etags(clients: Any) -> None:
    alice, _ = clients
    size = CHUNK_BYTES + 100_000
    expected = written(size)
    writer = await upload(alice, WRITER_WAT % size)
    request_id = (await run(alice, writer["cid"])).json()["request_id"]
    url = f"/executions/{request_id}/output"
    etag = f'"{cid_of(expected)}"'

    async def part(range_: str, **headers: str) -> httpx.Response:
        return await alice.get(url, headers={"Range": range_, **headers})

    # Across the chunk boundary.
    start, end = CHUNK_BYTES - 10, CHUNK_BYTES + 20
    across = await part(f"bytes={start}-{end}")
    assert across.status_code == 206
    assert across.content == expected[start:end + 1]
    assert across.headers["content-range"] == f"bytes {start}-{end}/{size}"
    assert across.headers["content-length"] == str(end + 1 - start)
    assert across.headers["etag"] == etag
    suffix = await part("bytes=-10")
    assert suffix.status_code == 206 and suffix.content == expected[-10:]
    open_ended = await part(f"bytes={size - 5}-")
    assert open_ended.status_code == 206 and open_ended.content == expected[-5:]
    beyond = await part(f"bytes=0-{size * 2}")  # clipped to what there is
    assert beyond.status_code == 206 and beyond.content == expected
    assert beyond.headers["content-range"] == f"bytes 0-{size - 1}/{size}"
    unsatisfiable = await part(f"bytes={size}-")
    assert_problem(unsatisfiable, 416, "range-not-satisfiable")
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"
    # Ignored, so all of it: several ranges, another unit, a stale If-Range.
    for ignored in (await part("bytes=0-1,5-6"), await part("items=0-1"),
                    await part("bytes=0-1", **{"If-Range": '"bafkother"'})):
        assert ignored.status_code == 200 and ignored.content == expected
    assert (await part("bytes=0-1", **{"If-Range": etag})).content == expected[:2]

    # If-None-Match with its ETag: 304, no body.
    for match in (etag, f'W/{etag}', f'"x", {etag}', "*"):
        same = await alice.get(url, headers={"If-None-Match": match})
        assert same.status_code == 304 and same.content == b""
        assert same.headers["etag"] == etag
    changed = await alice.get(url, headers={"If-None-Match": '"bafkother"'})
    assert changed.status_code == 200 and changed.content == expected


async def test_no_output_before_the_end_nor_after_a_failure(clients: Any) -> None:
    alice, _ = clients
    spin = await upload(alice, SPIN_WAT)
    accepted = await alice.post(EXECUTE, json={"cid": spin["cid"], "policy": {"max_time": 60000}},
                                headers={"Prefer": "respond-async"})
    request_id = accepted.json()["request_id"]
    url = f"/executions/{request_id}/output"
    assert_problem(await alice.get(url), 409, "conflict")
    assert (await alice.delete(f"/executions/{request_id}")).status_code in (200, 202)

    async def cancelled() -> bool:
        state = (await alice.get(f"/executions/{request_id}")).json()
        return bool(state["status"] == "cancelled")

    await wait_for(cancelled)
    assert_problem(await alice.get(url), 404, "not-found")
    assert_problem(await alice.get("/executions/nosuchexecution/output"), 404, "not-found")


async def test_a_function_result_over_the_limit_is_a_json_blob(settings: Settings) -> None:
    async with relay(with_settings(settings, inline_output_bytes=16)) as (alice, _):
        triple = await upload(alice, TRIPLE_WAT)
        body = (await run(alice, triple["cid"], [2**62])).json()
        data = msgspec.json.encode([2**62] * 3)
        assert body["output"] is None
        assert body["output_ref"] == {"cid": cid_of(data), "size": len(data),
                                      "content_type": "application/json"}
        output = await alice.get(f"/executions/{body['request_id']}/output")
        assert output.content == data
        assert output.headers["content-type"] == "application/json"
        # Under the limit, it is inline as before.
        small = (await run(alice, triple["cid"], [1])).json()
        assert small["output"] == [1, 1, 1] and "output_ref" not in small


async def test_the_blob_expires_with_the_record(settings: Settings) -> None:
    ttl_ms = 1500
    short = with_settings(settings, idempotency_ttl_ms=ttl_ms, inline_output_bytes=1000)
    async with relay(short) as (alice, _):
        writer = await upload(alice, WRITER_WAT % 5000)
        body = (await run(alice, writer["cid"])).json()
        cid = body["output_ref"]["cid"]
        url = f"/executions/{body['request_id']}/output"
        assert (await alice.get(url)).content == written(5000)
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            keys = Keys(settings.prefix)
            record_ttl = await client.pttl(keys.execution(body["request_id"]))
            for key in await blob_keys(settings, cid):
                assert 0 < await client.pttl(key) <= ttl_ms
                assert abs(await client.pttl(key) - record_ttl) < 200
        finally:
            await client.aclose()

        async def gone() -> bool:
            return not await blob_keys(settings, cid)

        await wait_for(gone, timeout_s=5)
        assert_problem(await alice.get(url), 404, "not-found")


async def test_the_output_cap_still_holds(clients: Any, settings: Settings) -> None:
    alice, _ = clients
    cap = settings.max_output_bytes
    assert cap == 64 * 1024 * 1024
    writer = await upload(alice, WRITER_WAT % (cap + 1))
    body = (await run(alice, writer["cid"])).json()
    assert body["error"] == {"code": "exit_nonzero", "message": f"exit status {EFBIG}"}, body
    assert "output_ref" not in body


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_32_mib_output_streams_from_a_gateway_in_bounded_memory(
        settings: Settings, executor: Executor, processes: Processes) -> None:
    size = 32 * 1024 * 1024
    url = await asyncio.to_thread(processes.gateway)  # not in the loop: the executor runs there
    gateway_pid = processes.running[-1].pid
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=60) as alice:
        writer = await upload(alice, WRITER_WAT % size)
        began = time.perf_counter()
        body = (await run(alice, writer["cid"])).json()
        ran_s = time.perf_counter() - began
        assert body["output_ref"]["size"] == size, body
        before = peak = rss_bytes(gateway_pid)
        digest = hashlib.sha256()
        began = time.perf_counter()
        async with alice.stream("GET", f"/executions/{body['request_id']}/output") as output:
            assert output.status_code == 200
            async for part in output.aiter_raw():
                digest.update(part)
                peak = max(peak, rss_bytes(gateway_pid))
        read_s = time.perf_counter() - began
        print(f"\n32 MiB output: run and store {ran_s * 1000:.0f} ms, read over HTTP "
              f"{read_s * 1000:.0f} ms ({size / read_s / 2**20:.0f} MiB/s); the gateway's RSS "
              f"{before / 2**20:.1f} MiB, grew {(peak - before) / 2**20:.1f} MiB while streaming")
        assert digest.digest() == hashlib.sha256(written(size)).digest()
        assert peak - before < 8 * 2**20
        tail = await alice.get(f"/executions/{body['request_id']}/output",
                               headers={"Range": f"bytes={size - 100}-"})
        assert tail.status_code == 206 and tail.content == written(size)[-100:]


async def test_a_memoized_large_output_keeps_its_blob_as_long_as_the_entry(
        settings: Settings) -> None:
    memo_ttl_ms = 60_000
    config = with_settings(settings, idempotency_ttl_ms=5_000, memo_ttl_ms=memo_ttl_ms)
    async with relay(config) as (alice, _):
        size = 100_000
        writer = await upload(alice, WRITER_WAT % size)
        first = (await run(alice, writer["cid"], memoize=True)).json()
        assert first["cached"] is False
        ref = first["output_ref"]
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            # Held as long as the memo entry, past the record's own TTL.
            for key in await blob_keys(settings, ref["cid"]):
                assert await client.pttl(key) > 5_000
            hit = (await run(alice, writer["cid"], memoize=True, idempotency_key="hit")).json()
            assert hit["cached"] is True and hit["output_ref"] == ref
            output = await alice.get(f"/executions/{hit['request_id']}/output")
            assert output.content == written(size)
            # A blob gone (expired) makes the entry a miss: it runs again and stores it again.
            await client.delete(*await blob_keys(settings, ref["cid"]))
            again = (await run(alice, writer["cid"], memoize=True,
                               idempotency_key="again")).json()
            assert again["cached"] is False and again["output_ref"] == ref
            output = await alice.get(f"/executions/{again['request_id']}/output")
            assert output.content == written(size)
        finally:
            await client.aclose()


async def test_the_last_output_is_published_a_bounded_number_of_events_at_a_time(
        clients: Any, settings: Settings) -> None:
    alice, _ = clients
    size = 8 * 1024 * 1024  # 512 chunks of execution_output, all written before the run ends
    writer = await upload(alice, WRITER_WAT % size)
    in_flight = 0
    done = False

    async def watch() -> None:
        nonlocal in_flight
        while not done:
            emits = [task for task in asyncio.all_tasks()
                     if task.get_coro().__qualname__ == "LiveRun._emit"]  # type: ignore[union-attr]
            in_flight = max(in_flight, len(emits))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        body = (await run(alice, writer["cid"])).json()
    finally:
        done = True
        await watcher
    assert body["output_ref"]["size"] == size
    print(f"\n{size >> 20} MiB of output: at most {in_flight} output events in flight")
    assert 0 < in_flight <= FLUSH_IN_FLIGHT + 2
    outputs = [entry for _, entry in await event_entries(settings)
               if b'"execution_output"' in entry[b"data"][:40]]
    assert len(outputs) == size // OUTPUT_CHUNK_BYTES  # every chunk, none lost
