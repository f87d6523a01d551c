"""Fixtures: a real Redis (embedded, or `REDIS_URL`), a fresh key prefix per test, the real app.

Every test gets its own `RELAY_STREAM_PREFIX`, so tests never see each other's keys, and its
keys are deleted afterwards (never FLUSHALL: the server may not be ours).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import redis
import redis.asyncio as aioredis
import uvloop

from executor.worker import Executor
from relay import connection
from relay.connection import EmbeddedRedis
from relay.gateway.app import create_app
from relay.keys import Keys
from relay.settings import Settings, load

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
ALICE_KEY = "alice-secret-key"
BOB_KEY = "bob-secret-key"
API_KEYS = (("alice", ALICE_KEY), ("bob", BOB_KEY))

ADD_WAT = """(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.add))"""


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, Any]:
    """Async tests run on asyncio's event loop; those marked `both_loops` on uvloop's too."""
    if item.get_closest_marker("both_loops"):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.start()
    server.stop()


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    # A rate limit no test reaches unless it sets its own (tests/relay/pipeline/test_ratelimit.py).
    # No disk cache of compiled modules (it would be ./.relay/modules) unless a test gives one
    # (tests/executor/test_warm.py).
    yield load({}, redis_url=redis_url, prefix=prefix, api_keys=API_KEYS, sync_wait_ms=15_000,
               executor_concurrency=2, rate_limit=1_000_000, access_log=False,
               module_cache_bytes=0)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(settings, **changes)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """alice's client to the in-process gateway."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay",
                                 headers={"X-API-Key": ALICE_KEY}, timeout=30) as client:
        yield client


@contextlib.asynccontextmanager
async def running(settings: Settings, name: str) -> AsyncIterator[Executor]:
    """An executor named `name` serving in this event loop (its wasm runs on its own threads)
    until the block ends; what it still runs then is cancelled."""
    assert settings.redis_url is not None
    client = connection.connect(settings.redis_url)
    worker = Executor(settings, client, name=name, read_block_ms=100)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        worker.cancel_running()  # a test that failed midway may leave an endless module running
        await asyncio.wait_for(task, 10)
        await client.aclose()


@pytest.fixture
async def executor(settings: Settings) -> AsyncIterator[Executor]:
    """An executor running in this event loop (`running`)."""
    async with running(settings, "test-executor") as worker:
        yield worker


def client_for(app: Any, key: str | None) -> httpx.AsyncClient:
    """A client to the in-process app with `key` as its API key (None: no credentials)."""
    headers = {"X-API-Key": key} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://relay",
                             headers=headers, timeout=30)


@pytest.fixture
async def bob(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """bob's client to the same gateway as `http`."""
    async with client_for(app, BOB_KEY) as client:
        yield client


def cid_of(data: bytes) -> str:
    """CIDv1, codec raw (0x55), sha2-256 (0x12, 32 bytes), base32 lowercase ("b"), built by hand
    rather than with the library the code uses."""
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status and slug; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


async def upload(http: httpx.AsyncClient, module: str | bytes, **params: str) -> dict[str, Any]:
    body = module.encode() if isinstance(module, str) else module
    response = await http.post("/modules", content=body, params=params)
    assert response.status_code in (200, 201), response.text
    result: dict[str, Any] = response.json()
    return result


async def wait_for(condition: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """Poll an async or sync condition until it is truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


# --- real processes over real sockets ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    assert settings.redis_url is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(REDIS_URL=settings.redis_url, RELAY_STREAM_PREFIX=settings.prefix,
               RELAY_API_KEYS=",".join(f"{p}:{k}" for p, k in API_KEYS),
               RELAY_EXECUTOR_CONCURRENCY="2", RELAY_LOG_LEVEL="WARNING",
               RELAY_RATE_LIMIT="1000000", RELAY_MODULE_CACHE_BYTES="0")
    env.update(extra)
    return env


class Processes:
    """Starts `relay` subcommands as real processes and stops them all at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-m", "relay", *args],
                                   env=process_env(self.settings, **env), cwd=ROOT)
        self.running.append(process)
        return process

    def gateway(self, **env: str) -> str:
        """Start a gateway process; returns its base URL once it answers."""
        port = free_port()
        self.start("gateway", "--port", str(port), **env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the gateway process did not come up")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.running:
            process.terminate()
        for process in self.running:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def processes(settings: Settings) -> Iterator[Processes]:
    procs = Processes(settings)
    yield procs
    procs.stop()


def raw_exchange(url: str, head: bytes, body_start: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a request head and only the start of its body; read the whole response.

    The socket's timeout makes the test fail if the server waits for the rest of the body.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + body_start)
        return read_response(sock)


def read_response(sock: socket.socket, *, head_only: bool = False,
                  ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from `sock`: its status, headers and body (to its Content-Length;
    none with `head_only`, for HEAD)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection without answering"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    length = 0 if head_only else int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-response"
        body += chunk
    return int(status_line.split()[1]), headers, body


async def event_entries(settings: Settings) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the events stream (`relay:events` under the test's prefix), oldest first."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(
            Keys(settings.prefix).events)
    finally:
        await client.aclose()
    return entries


class Served:
    """The in-process app behind a real socket (uvicorn in this event loop): streaming over
    real HTTP, while the test can still look inside the gateway."""

    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway


@contextlib.asynccontextmanager
async def serve(settings: Settings, http: str = "auto",
                port: int | None = None) -> AsyncIterator[Served]:
    """The app served by uvicorn in this loop, with the HTTP implementation `http` (auto:
    httptools, which `relay gateway` runs; or h11), on `port` (default: a free one; pass the
    port of one that ended to restart a gateway where its clients reconnect)."""
    import uvicorn

    application = create_app(settings)
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on", http=http,
                                           timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve())
    await wait_for(lambda: server.started, timeout_s=10, interval_s=0.01)
    try:
        yield Served(application, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Served]:
    async with serve(settings) as served:
        yield served
