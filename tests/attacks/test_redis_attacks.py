"""Attacks through Redis (issue 13, items 7 and 10), each on a redis-server this module starts
for itself (never the shared one: these tests fill it up and stop it):

- 7: a principal fills Redis to its `maxmemory` (uploads, inputs, anything stored): callers must
  get 503 `unavailable` with Retry-After, not 500; health says `degraded`; what was accepted
  before is not lost; once memory is freed everything works again;
- 10: Redis stalls (SIGSTOP, not killed): execute and `GET /executions/{id}` answer 503 within
  about a second, and work again after SIGCONT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from executor.worker import Executor
from relay.connection import server_binary
from relay.settings import Settings, load
from tests.conftest import (
    ADD_WAT,
    API_KEYS,
    assert_problem,
    free_port,
    upload,
    wait_for,
)

EXECUTE = "/intent/execute-wasm"
HEALTH = "/intent/execute-wasm/health"
MAXMEMORY = "2mb"
FILLER = 64 * 1024
SPIN_WAT = """(module (func (export "main") (param $n i32) (result i32)
  (loop $again (local.set $n (i32.sub (local.get $n) (i32.const 1)))
    (br_if $again (i32.gt_s (local.get $n) (i32.const 0))))
  (local.get $n)))"""


class SmallRedis:
    """A redis-server on a free port with a 2 MB `maxmemory`, no eviction, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                                  retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError("redis-server did not start") from None
                time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    filled = 0

    def fill(self) -> int:
        """Write filler keys, smaller and smaller, until Redis refuses even a few bytes with
        OOM; returns how many it took. Called again, it fills what was freed since: Redis's
        used memory also moves by itself (client buffers shrink a moment after use)."""
        for size in (FILLER, 1024, 16):
            while True:
                try:
                    self.client.set(f"filler:{self.filled}", os.urandom(size))
                except redis.exceptions.OutOfMemoryError:
                    break
                self.filled += 1
        return self.filled

    def free(self) -> None:
        self.client.delete(*(f"filler:{n}" for n in range(self.filled + 1)))
        self.filled = 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        self.process.kill()
        self.process.wait(10)
        self.client.close()


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[SmallRedis]:
    server = SmallRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def settings(small_redis: SmallRedis) -> Settings:
    """conftest's `settings`, on this test's own server (so `app`, `http`, `bob` and `executor`
    all use it)."""
    return load({}, redis_url=small_redis.url, prefix="relay", api_keys=API_KEYS,
                sync_wait_ms=10_000, executor_concurrency=2, rate_limit=1_000_000,
                access_log=False)


async def timed(call: Any) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    response = await call
    return response, time.monotonic() - began


# --- 7. Redis full ---


async def test_a_full_redis_is_503_degraded_loses_nothing_and_recovers(
        small_redis: SmallRedis, http: httpx.AsyncClient, bob: httpx.AsyncClient,
        executor: Executor) -> None:
    adder = await upload(http, ADD_WAT)
    spinner = await upload(http, SPIN_WAT)
    # Accepted before Redis fills up, and still running while it is full.
    running = await http.post(EXECUTE, headers={"Prefer": "respond-async"}, json={
        "cid": spinner["cid"], "inputs": [150_000_000], "policy": {"max_gas": 10**10}})
    assert running.status_code == 202, running.text
    accepted = running.json()["request_id"]

    async def when_full(request: Any) -> httpx.Response:
        """`request(n)` sent with Redis full, topped up first each time (its used memory also
        falls by itself: a connection's buffers shrink after use), new work each try; answered
        otherwise than 503 only when every try found room freed again."""
        for attempt in range(5):
            await asyncio.to_thread(small_redis.fill)
            response: httpx.Response = await request(attempt)
            if response.status_code == 503:
                break
        return response

    refused = await when_full(lambda n: bob.post(EXECUTE, json={
        "cid": adder["cid"], "inputs": [1, 2], "idempotency_key": f"while-full-{n}"}))
    stored = await when_full(lambda n: bob.post(
        "/modules", content=f'(module (func (export "x{n}")))'.encode()))
    await asyncio.to_thread(small_redis.fill)
    health = await http.get(HEALTH)
    fillers = small_redis.filled
    print(f"\n[redis full] {fillers} fillers (64 KiB, 1 KiB, 16 B) to fill it; "
          f"execute {refused.status_code}, "
          f"upload {stored.status_code}, health {health.status_code} "
          f"{health.json().get('status')}")
    for response in (refused, stored):
        body = assert_problem(response, 503, "unavailable")
        assert int(response.headers["retry-after"]) >= 1, body
    assert health.status_code == 200 and health.json()["status"] == "degraded", health.text

    await asyncio.to_thread(small_redis.free)

    async def finished() -> dict[str, Any] | None:
        state: dict[str, Any] = (await http.get(f"/executions/{accepted}")).json()
        return state if state["status"] in ("completed", "failed") else None

    state = await wait_for(finished, timeout_s=20, interval_s=0.1)
    assert state["status"] == "completed" and state["output"] == 0, state.get("error")
    again = await bob.post(EXECUTE, json={"cid": adder["cid"], "inputs": [1, 2]})
    assert again.status_code == 200 and again.json()["output"] == 3, again.text
    assert (await http.get(HEALTH)).json()["status"] == "healthy"


# --- 10. Redis stalled ---


async def test_a_stalled_redis_is_503_within_a_second_then_recovers(
        small_redis: SmallRedis, http: httpx.AsyncClient, executor: Executor) -> None:
    adder = await upload(http, ADD_WAT)
    first = await http.post(EXECUTE, json={"cid": adder["cid"], "inputs": [2, 2]})
    assert first.status_code == 200 and first.json()["output"] == 4, first.text
    request_id = first.json()["request_id"]

    small_redis.process.send_signal(signal.SIGSTOP)
    try:
        execute, execute_s = await timed(
            http.post(EXECUTE, json={"cid": adder["cid"], "inputs": [3, 3]}))
        state, state_s = await timed(http.get(f"/executions/{request_id}"))
    finally:
        small_redis.process.send_signal(signal.SIGCONT)
    print(f"\n[redis stalled] execute {execute.status_code} in {execute_s * 1000:.0f} ms, "
          f"GET execution {state.status_code} in {state_s * 1000:.0f} ms")
    for response, took in ((execute, execute_s), (state, state_s)):
        assert_problem(response, 503, "unavailable")
        assert "retry-after" in response.headers
        assert took < 1.5, f"{response.request.url.path} took {took:.2f} s"

    async def recovered() -> bool:
        response = await http.post(EXECUTE, json={"cid": adder["cid"], "inputs": [5, 5]})
        return response.status_code == 200 and response.json()["output"] == 10

    await wait_for(recovered, timeout_s=10, interval_s=0.1)
    assert (await http.get(f"/executions/{request_id}")).json()["output"] == 4
