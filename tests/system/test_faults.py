"""Fault tests: real gateway and executor processes on a real Redis server this module owns.

The server runs on a free TCP port with AOF (`appendfsync always`), so a test may stop, kill and
restart it (same port, same directory: the data comes back) without touching anyone else's
Redis. Each test asserts what a caller or a bus consumer sees, waits on conditions with
deadlines, and prints what it measured (run with `-s` to see the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from relay.bus import Bus
from relay.connection import server_binary
from relay.keys import Keys
from relay.schemas import ExecuteResponse, ExecutionStarted, decode_requested, now_iso
from relay.settings import Settings, load
from tests.conftest import (
    ALICE_KEY,
    API_KEYS,
    FIXTURES,
    ROOT,
    Processes,
    assert_problem,
    free_port,
    process_env,
    running,
    upload,
    wait_for,
)
from tests.relay.gateway.test_execute import run

FIB_WAT = (ROOT / "relay" / "examples" / "fib.wat").read_text()
CALCULATOR_WAT = (ROOT / "relay" / "examples" / "calculator.wat").read_text()
FIB_40 = 102_334_155
LONG = {"max_gas": 10**11, "max_time": 60_000}
ASYNC = {"Prefer": "respond-async"}
LEASE = {"RELAY_LEASE": "1500"}
TERMINAL = ("execution_complete", "execution_error")
MIB = 1024 * 1024

LOOP_WAT = '(module (func (export "main") (loop br 0)))'
RECURSE_WAT = '(module (func $f (export "main") (result i32) call $f))'
# Grows its memory a page at a time and touches every new page, until a grow is refused; then
# traps. Its memory is not exported (nothing requires it to be): the limit is still the reason.
MEMORY_BOMB_WAT = """(module (memory 1)
  (func (export "main") (local $page i32)
    (loop $more
      (local.set $page (memory.grow (i32.const 1)))
      (if (i32.eq (local.get $page) (i32.const -1)) (then unreachable))
      (i32.store (i32.mul (local.get $page) (i32.const 65536)) (i32.const 1))
      (br $more))))"""


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


# --- the Redis server this module owns ---


def redis_binary() -> str:
    try:
        return server_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc))


class RedisServer:
    """A redis-server process on 127.0.0.1:`port` with its AOF in `directory`.

    `stop()` and `start()` may be called any number of times: a restart uses the same port and
    directory, so the AOF brings every acknowledged write back.
    """

    def __init__(self, directory: Path, fsync: str = "always") -> None:
        self.binary = redis_binary()
        self.fsync = fsync
        """`appendfsync`: `always`, or `everysec` (what `relay dev`'s embedded Redis uses)."""
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> float:
        """Start the server and wait until it answers (AOF loaded); returns the seconds taken."""
        assert self.process is None, "already running"
        began = time.monotonic()
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", self.fsync, "--dir", str(self.dir),
             "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() - began > timeout_s:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"redis-server did not start; its log ends:\n{log}")
            time.sleep(0.005)
        return time.monotonic() - began

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown; SIGKILL: a crash of the process. Either way nothing
        acknowledged is lost: Redis writes the AOF before it replies, whatever `appendfsync`
        says (which only bounds what a crash of the whole host loses)."""
        if self.process is None:
            return
        self.process.send_signal(signum)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def ping(self) -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False


@pytest.fixture
def redis_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", getattr(request, "param", "always"))
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    """conftest's `settings`, pointed at this module's own server (thrown away afterwards, so
    the default key prefix is fine and nothing needs cleaning)."""
    return load({}, redis_url=redis_server.url, prefix="relay", api_keys=API_KEYS,
                executor_concurrency=2, access_log=False)


class Cluster(Processes):
    """conftest's `Processes`, each process logging to a file of its own (the outage tests make
    them loud), and stopped with SIGKILL at the end."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        super().__init__(settings)
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        path = self.logs / f"{len(self.running)}-{args[0]}.log"
        with path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "relay", *args],
                                       env=process_env(self.settings, **env), cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.running.append(process)
        return process

    def errors_logged(self) -> list[Path]:
        return [path for path in sorted(self.logs.iterdir())
                if '"level":"error"' in path.read_text(errors="replace")]

    def stop(self) -> None:
        # The server is thrown away and some processes may be stopped (SIGSTOP) or busy with an
        # endless module: no drain to wait for.
        for process in self.running:
            if process.poll() is None:
                process.kill()
        for process in self.running:
            process.wait(10)


@pytest.fixture
def processes(settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(settings, tmp_path / "logs")
    yield cluster
    cluster.stop()
    for path in cluster.errors_logged():
        print(f"\n[logs] errors logged in {path}")


class BusView:
    """What a bus consumer sees, read straight from Redis."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def events(self, request_id: str | None = None) -> list[dict[str, Any]]:
        entries = await self.client.xrange(self.keys.events)
        events = [json.loads(fields[b"data"]) for _, fields in entries]
        return [e for e in events if request_id is None or e["request_id"] == request_id]

    async def ended_at(self, request_id: str) -> float:
        """When Redis appended the terminal event of `request_id` (epoch seconds, from its entry
        id: the events' own `timestamp` of a terminal event is when the run began)."""
        for entry_id, fields in await self.client.xrange(self.keys.events):
            event = json.loads(fields[b"data"])
            if event["request_id"] == request_id and event["type"] in TERMINAL:
                return int(entry_id.split(b"-")[0]) / 1000
        raise AssertionError(f"no terminal event for {request_id}")

    async def of_type(self, kind: str, request_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in await self.events(request_id) if e["type"] == kind]

    async def pending(self) -> int:
        """Entries delivered and not acknowledged, on the three requests streams."""
        total = 0
        for priority in ("high", "normal", "low"):
            summary = await self.client.xpending(self.keys.requests_of(priority),
                                                 Keys.EXECUTOR_GROUP)
            total += int(summary["pending"])
        return total

    async def node_of(self, process: subprocess.Popen[bytes], timeout_s: float = 20) -> str:
        """The consumer name of an executor process, once it has started serving."""
        marker = f"-{process.pid}-"

        async def registered() -> str | None:
            assert process.poll() is None, "the executor process died"
            for member in await self.client.zrange(self.keys.executors, 0, -1):
                if marker in member.decode():
                    return str(member.decode())
            return None

        node: str = await wait_for(registered, timeout_s=timeout_s, interval_s=0.05)
        return node

    async def heartbeat_ms(self, node: str) -> float:
        return float(await self.client.zscore(self.keys.executors, node) or 0)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[BusView]:
    assert settings.redis_url is not None
    # Not `relay.connection.connect`: its retry policy does not work (see the blip test), and
    # this client must see through the restarts the tests cause.
    client = aioredis.Redis.from_url(
        settings.redis_url, retry=AsyncRetry(ExponentialBackoff(cap=0.25, base=0.02), 5),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    yield BusView(client, Keys(settings.prefix))
    await client.aclose()


def client_for(base: str, **kwargs: Any) -> httpx.AsyncClient:
    kwargs.setdefault("timeout", 60)
    return httpx.AsyncClient(base_url=base, headers={"X-API-Key": ALICE_KEY}, **kwargs)


async def submit(http: httpx.AsyncClient, cid: str, inputs: list[Any], **body: Any) -> str:
    response = await http.post("/intent/execute-wasm", headers=ASYNC,
                               json={"cid": cid, "inputs": inputs, **body})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


async def finished(http: httpx.AsyncClient, request_id: str,
                   timeout_s: float = 20) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        state: dict[str, Any] = (await http.get(f"/executions/{request_id}")).json()
        return state if state["status"] in ("completed", "failed", "cancelled") else None

    state: dict[str, Any] = await wait_for(done, timeout_s=timeout_s, interval_s=0.05)
    return state


async def started_by(bus: BusView, request_id: str | None = None,
                     timeout_s: float = 10) -> dict[str, Any]:
    """The first `execution_started` (of `request_id`), once it is on the stream."""
    async def first() -> dict[str, Any] | None:
        found = await bus.of_type("execution_started", request_id)
        return found[0] if found else None

    event: dict[str, Any] = await wait_for(first, timeout_s=timeout_s)
    return event


async def running_in_wasm(bus: BusView, request_id: str, node: str) -> None:
    """Wait for `node` to report progress on `request_id`: it is inside the module, not
    still starting."""
    async def progressing() -> bool:
        return bool(await bus.of_type("execution_progress", request_id))

    await wait_for(progressing, timeout_s=10)
    started = await bus.of_type("execution_started", request_id)
    assert started[-1]["executor_node"] == node


def assert_one_ending(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Exactly one terminal event and one `wasm_exec_completed`, and nothing after them."""
    kinds = [e["type"] for e in events]
    terminal = [e for e in events if e["type"] in TERMINAL]
    assert len(terminal) == 1, f"{len(terminal)} terminal events: {kinds}"
    assert kinds.count("wasm_exec_completed") == 1, kinds
    assert kinds[-2] in TERMINAL and kinds[-1] == "wasm_exec_completed", (
        f"events after the end: {kinds}")
    return terminal[0]


def assert_gas_never_decreases(events: list[dict[str, Any]]) -> list[int]:
    gas = [e["gas_used"] for e in events if e["type"] == "execution_progress"]
    assert gas == sorted(gas), f"progress gas_used went back: {gas}"
    return gas


# --- 1. an executor killed mid-run ---


@pytest.mark.parametrize("priority", ["normal", "high"])
async def test_sigkill_mid_run_a_peer_completes_it(processes: Cluster, bus: BusView,
                                                   priority: str) -> None:
    base = processes.gateway(RELAY_SYNC_WAIT="60000")
    pair = [processes.start("executor", **LEASE) for _ in range(2)]
    nodes = {await bus.node_of(process): process for process in pair}
    async with client_for(base) as http:
        module = await upload(http, FIB_WAT)
        call = asyncio.create_task(http.post(
            "/intent/execute-wasm", json={"cid": module["cid"], "inputs": [40], "policy": LONG,
                                          "priority": priority}))
        first = await started_by(bus)
        request_id, victim = first["request_id"], first["executor_node"]
        await running_in_wasm(bus, request_id, victim)
        nodes[victim].kill()
        killed = time.monotonic()

        async def taken_over() -> bool:
            return len(await bus.of_type("execution_started", request_id)) >= 2

        await wait_for(taken_over, timeout_s=15)
        takeover_s = time.monotonic() - killed
        response = await asyncio.wait_for(call, 30)
        recovery_s = time.monotonic() - killed
        print(f"\n[sigkill] {priority}: takeover {takeover_s:.2f} s, completed {recovery_s:.2f} s "
              "after the kill (lease 1.5 s)")
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["success"] is True and result["output"] == FIB_40
        assert result["request_id"] == request_id
        state = (await http.get(f"/executions/{request_id}")).json()
        assert state["status"] == "completed" and state["output"] == FIB_40
        assert state["priority"] == priority  # so it was on that priority's stream
    events = await bus.events(request_id)
    terminal = assert_one_ending(events)
    assert terminal["type"] == "execution_complete" and terminal["output"] == FIB_40
    started = [e["executor_node"] for e in events if e["type"] == "execution_started"]
    assert len(started) == 2 and started[0] == victim and started[1] != victim, started
    assert started[1] in nodes
    assert_gas_never_decreases(events)
    assert recovery_s < 10
    await wait_for(lambda: _no_pending(bus), timeout_s=5)


async def _no_pending(bus: BusView) -> bool:
    return await bus.pending() == 0


# --- 2. an executor stalled past its lease ---


async def test_sigstop_past_the_lease_then_sigcont_one_result(processes: Cluster,
                                                              bus: BusView) -> None:
    base = processes.gateway()
    pair = [processes.start("executor", **LEASE) for _ in range(2)]
    nodes = {await bus.node_of(process): process for process in pair}
    async with client_for(base) as http:
        module = await upload(http, FIB_WAT)
        request_id = await submit(http, module["cid"], [40], policy=LONG)
        victim = (await started_by(bus, request_id))["executor_node"]
        await running_in_wasm(bus, request_id, victim)
        stalled = nodes[victim]
        stalled.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            state = await finished(http, request_id, timeout_s=20)
            peer_done_s = time.monotonic() - stopped
        finally:
            stalled.send_signal(signal.SIGCONT)
        resumed_ms = time.time() * 1000
        # The stalled executor wakes with a run it no longer holds. Give it time to notice (its
        # leases are renewed every 0.5 s) and to finish or stop that run: wait until its
        # heartbeat shows it has been running for 2 s since SIGCONT.

        async def awake_long_enough() -> bool:
            return await bus.heartbeat_ms(victim) > resumed_ms + 2000

        await wait_for(awake_long_enough, timeout_s=10, interval_s=0.1)
        assert stalled.poll() is None, "the stalled executor died after SIGCONT"
        print(f"\n[sigstop] a peer finished the run {peer_done_s:.2f} s after SIGSTOP")
        assert state["status"] == "completed" and state["output"] == FIB_40
        after = (await http.get(f"/executions/{request_id}")).json()
        assert after == state, "the result changed after the stalled executor woke up"
    events = await bus.events(request_id)
    terminal = assert_one_ending(events)
    assert terminal["type"] == "execution_complete" and terminal["output"] == FIB_40
    started = [e["executor_node"] for e in events if e["type"] == "execution_started"]
    assert started[0] == victim and len(started) == 2 and started[1] != victim, started
    gas = assert_gas_never_decreases(events)
    print(f"[sigstop] {len(gas)} progress events, gas_used {gas[0]:,} .. {gas[-1]:,}")
    assert gas[-1] <= terminal["gas_used"]
    await wait_for(lambda: _no_pending(bus), timeout_s=5)


# --- 3. a crash after the result is written and before the acknowledgement ---


async def test_sigkill_right_after_results_runs_nothing_twice(processes: Cluster,
                                                               bus: BusView) -> None:
    """The settle script writes the result and acknowledges the entry atomically, so there is
    no instant between the two for a crash to land in. What can be hit is the neighbourhood:
    kill the executor the moment the first results appear, while more are running and
    settling, and check that what was finished is never run again."""
    base = processes.gateway()
    async with client_for(base) as http:
        module = await upload(http, FIB_WAT)
        # Queued before any executor runs, so the kill finds work in every stage.
        request_ids = [await submit(http, module["cid"], [30], idempotency_key=f"k{n}")
                       for n in range(40)]
        first = processes.start("executor", **LEASE)

        async def some_done() -> list[str]:
            return [e["request_id"] for e in await bus.of_type("execution_complete")]

        await wait_for(some_done, timeout_s=10, interval_s=0.001)
        first.kill()
        done_at_kill = set(await some_done())
        print(f"\n[kill after result] {len(done_at_kill)} of 40 finished at the kill")
        second = processes.start("executor", **LEASE)
        await bus.node_of(second)
        for request_id in request_ids:
            state = await finished(http, request_id, timeout_s=20)
            assert state["status"] == "completed" and state["output"] == fib(30), state
    assert done_at_kill < set(request_ids), "kill earlier: everything was done"
    for request_id in request_ids:
        events = await bus.events(request_id)
        assert_one_ending(events)
        started = [e for e in events if e["type"] == "execution_started"]
        if request_id in done_at_kill:
            assert len(started) == 1, f"a finished execution ran again: {events}"
    await wait_for(lambda: _no_pending(bus), timeout_s=5)


async def test_a_result_written_but_not_acknowledged_is_not_run_again(
        processes: Cluster, bus: BusView, settings: Settings) -> None:
    """The exact state a crash between the result write and the XACK would leave (a ghost
    consumer holds the entry, the result is stored), built by hand with the bus's own scripts;
    then a real executor reclaims the entry: it must acknowledge it and show nothing."""
    base = processes.gateway()
    async with client_for(base) as http:
        module = await upload(http, CALCULATOR_WAT)
        request_id = await submit(http, module["cid"], [2, 3])
        keys = Keys(settings.prefix)
        reply = await bus.client.xreadgroup(Keys.EXECUTOR_GROUP, "ghost",
                                            {keys.requests: ">"}, count=1)
        [(_, [(entry_id, fields)])] = reply
        request = decode_requested(fields[b"data"])
        ghost = Bus(bus.client, keys, events_retention=settings.events_retention,
                    requests_retention=settings.requests_retention)
        started = ExecutionStarted(request_id=request_id, executor_node="ghost",
                                   timestamp=now_iso())
        assert await ghost.start(started, request, entry_id, "ghost") == "started"
        response = ExecuteResponse(success=True, request_id=request_id, cid=request.cid,
                                   output=5, gas_used=4, duration=0.1, executed_at=now_iso(),
                                   error=None)
        # `_settle` without an entry id: the result write and terminal events, no XACK.
        assert await ghost._settle(request, response, settings.idempotency_ttl_ms)
        assert await bus.pending() == 1
        before = (await http.get(f"/executions/{request_id}")).json()
        processes.start("executor", **LEASE)
        acked = time.monotonic()
        await wait_for(lambda: _no_pending(bus), timeout_s=10)
        print(f"\n[unacked result] entry reclaimed and acknowledged in "
              f"{time.monotonic() - acked:.2f} s (including the executor's start)")
        assert (await http.get(f"/executions/{request_id}")).json() == before
    events = await bus.events(request_id)
    assert [e["type"] for e in events] == ["execution_queued", "execution_started",
                                           "execution_complete", "wasm_exec_completed"]
    assert events[1]["executor_node"] == "ghost"


# --- 4. Redis down and back under a stream of submissions ---


@pytest.mark.parametrize("redis_server", ["always", "everysec"], indirect=True)
async def test_redis_outage_under_submissions(processes: Cluster, bus: BusView,
                                              redis_server: RedisServer) -> None:
    base = processes.gateway()
    executor = processes.start("executor", **LEASE)
    await bus.node_of(executor)
    async with client_for(base, timeout=10) as http:
        module = await upload(http, CALCULATOR_WAT)
        outage: dict[str, float] = {}
        sent: list[tuple[int, float, float, httpx.Response]] = []
        readiness: list[tuple[float, float, int]] = []

        async def one(n: int) -> None:
            began = time.monotonic()
            response = await http.post(
                "/intent/execute-wasm", headers=ASYNC,
                json={"cid": module["cid"], "inputs": [n, 1000], "idempotency_key": f"s{n}"})
            sent.append((n, began, time.monotonic(), response))

        async def submissions() -> None:
            async with asyncio.TaskGroup() as group:
                for n in range(50):
                    group.create_task(one(n))
                    await asyncio.sleep(0.1)

        async def probe_readiness() -> None:
            while "up" not in outage or time.monotonic() < outage["up"] + 1:
                began = time.monotonic()
                status = (await http.get("/readyz")).status_code
                readiness.append((began, time.monotonic(), status))
                await asyncio.sleep(0.05)

        async def outage_in_the_middle() -> None:
            await asyncio.sleep(1.5)
            outage["down"] = time.monotonic()
            await asyncio.to_thread(redis_server.stop, signal.SIGKILL)
            await asyncio.sleep(1.5)
            outage["restart"] = time.monotonic()
            await asyncio.to_thread(redis_server.start)
            outage["up"] = time.monotonic()

        await asyncio.gather(submissions(), outage_in_the_middle(), probe_readiness())
        down, restart, up = outage["down"], outage["restart"], outage["up"]
        statuses = sorted({r.status_code for *_, r in sent})
        assert set(statuses) <= {202, 503}, f"statuses {statuses}"
        during = [(n, began, ended, r) for n, began, ended, r in sent
                  if began > down + 0.05 and ended < restart]
        assert len(during) >= 8, "too few submissions fell inside the outage"
        for _, _, _, response in during:
            assert_problem(response, 503, "unavailable")
            assert int(response.headers["retry-after"]) >= 1
        slowest = max(ended - began for _, began, ended, _ in during)
        ready_down = [status for began, ended, status in readiness
                      if began > down + 0.05 and ended < restart]
        assert ready_down and set(ready_down) == {503}, ready_down
        back = next(ended for _, ended, status in readiness if ended >= up and status == 200)
        assert readiness[-1][2] == 200
        accepted = {n: r.json()["request_id"] for n, _, _, r in sent if r.status_code == 202}
        print(f"\n[redis outage] down {restart - down:.2f} s (restart took {up - restart:.3f} s); "
              f"{len(during)} submissions during it, all 503, slowest answer {slowest * 1000:.0f} "
              f"ms; /readyz 200 {(back - up) * 1000:.0f} ms after Redis answered; "
              f"{len(accepted)} of 50 accepted")
        assert slowest < 1.0, f"a 503 took {slowest:.2f} s during the outage"
        recovered = time.monotonic()
        for n, request_id in accepted.items():
            state = await finished(http, request_id, timeout_s=20)
            assert state["status"] == "completed" and state["output"] == n + 1000, state
        print(f"[redis outage] every accepted execution completed, the last "
              f"{time.monotonic() - recovered:.2f} s after the checks began")
        fresh = await http.post("/intent/execute-wasm",
                                json={"cid": module["cid"], "inputs": [40, 2]})
        assert fresh.status_code == 200 and fresh.json()["output"] == 42
    assert all(process.poll() is None for process in processes.running), "a process died"
    for request_id in accepted.values():
        assert_one_ending(await bus.events(request_id))


async def test_a_redis_blip_is_absorbed(processes: Cluster, bus: BusView,
                                        redis_server: RedisServer) -> None:
    """A restart of a few milliseconds between two bursts of requests: the contract's 503 is
    for while Redis is unreachable; once it answers again, so must Relay
    (`relay.connection.connect` promises that a blip is absorbed by its retry policy)."""
    base = processes.gateway()
    executor = processes.start("executor", **LEASE)
    await bus.node_of(executor)
    async with client_for(base) as http:
        module = await upload(http, CALCULATOR_WAT)

        async def execute(n: int) -> tuple[httpx.Response, float]:
            began = time.monotonic()
            response = await http.post("/intent/execute-wasm",
                                       json={"cid": module["cid"], "inputs": [n, 100]})
            return response, time.monotonic() - began

        # Concurrent requests leave several connections in each process's pool.
        warm = await asyncio.gather(*(execute(n) for n in range(10)))
        assert all(response.status_code == 200 for response, _ in warm)
        # Not a wait for a condition: the scenario is Redis restarting while the pools hold
        # idle connections, as between two bursts.
        await asyncio.sleep(0.3)
        began = time.monotonic()
        redis_server.stop()
        redis_server.start()
        blip_s = time.monotonic() - began
        ready = await asyncio.gather(*(http.get("/readyz") for _ in range(10)))
        after = await asyncio.gather(*(execute(n) for n in range(10, 20)))
    slowest = max(took for _, took in after)
    print(f"\n[blip] Redis down {blip_s * 1000:.0f} ms; then /readyz "
          f"{sorted(r.status_code for r in ready)}, execute "
          f"{sorted(r.status_code for r, _ in after)}, slowest {slowest * 1000:.0f} ms")
    assert [r.status_code for r in ready] == [200] * 10, "503 after Redis was back"
    for n, (response, _) in enumerate(after, start=10):
        assert response.status_code == 200, response.text
        assert response.json()["output"] == n + 100
        started = await bus.of_type("execution_started", response.json()["request_id"])
        assert len(started) == 1, f"run {len(started)} times after the blip"
    assert slowest < 1.0, f"an execute after the blip took {slowest:.2f} s"


# --- 5. concurrent duplicates ---


async def test_a_thousand_concurrent_duplicates(processes: Cluster, bus: BusView) -> None:
    gateways = [processes.gateway(RELAY_RATE_LIMIT="0") for _ in range(2)]
    for process in [processes.start("executor", **LEASE) for _ in range(2)]:
        await bus.node_of(process)
    # One connection per caller, never reused: a reused keep-alive connection can race the
    # server closing it when idle (a client-side ReadError that says nothing about Relay).
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client_for(base, limits=limits))
                   for base in gateways]
        module = await upload(clients[0], FIB_WAT)
        # fib(40) runs ~2 s, as long as the burst takes to arrive: most callers join the
        # running execution (their body is built from its terminal event); the callers after
        # the burst get the stored result replayed. All must be the same bytes.
        body = {"cid": module["cid"], "inputs": [40], "policy": LONG,
                "idempotency_key": "the-one-key"}
        began, began_wall = time.monotonic(), time.time()
        responses = await asyncio.gather(*(
            clients[n % 2].post("/intent/execute-wasm", json=body) for n in range(1000)))
        took = time.monotonic() - began
        replays = [await client.post("/intent/execute-wasm", json=body) for client in clients]
    statuses = {r.status_code for r in responses}
    assert statuses == {200}, statuses
    bodies = {r.content for r in responses}
    replayed = sum(r.headers.get("idempotent-replayed") == "true" for r in responses)
    result = responses[0].json()
    events = await bus.events(result["request_id"])
    ended_at = await bus.ended_at(result["request_id"])
    print(f"\n[duplicates] 1000 answered in {took:.2f} s (the run ended "
          f"{ended_at - began_wall:.2f} s in); {len(bodies)} distinct bodies; "
          f"{1000 - replayed} without Idempotent-Replayed")
    assert len(bodies) == 1, f"{len(bodies)} different bodies: {sorted(bodies)[:3]}"
    assert result["output"] == FIB_40
    for replay in replays:
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
        assert replay.content in bodies, "a replay differs from what the callers got"
    kinds = [e["type"] for e in events]
    assert kinds.count("execution_queued") == 1
    assert kinds.count("execution_started") == 1, kinds
    assert_one_ending(events)
    assert replayed == 999, "every caller but the first must see Idempotent-Replayed: true"


# --- 6. hostile modules ---


async def test_hostile_modules_each_get_their_code_and_others_are_served(
        processes: Cluster, bus: BusView) -> None:
    base = processes.gateway()
    for process in [processes.start("executor") for _ in range(2)]:
        await bus.node_of(process)
    async with client_for(base) as http:
        adder = await upload(http, CALCULATOR_WAT)
        hostile = {
            "timeout": (await upload(http, LOOP_WAT),
                        {"max_time": 500, "max_gas": 10**12}),
            "memory_limit": (await upload(http, MEMORY_BOMB_WAT),
                             {"max_memory": 128 * MIB, "max_gas": 10**12}),
            "stack_overflow": (await upload(http, RECURSE_WAT), {"max_gas": 10**12}),
        }
        escape = await upload(http, (FIXTURES / "escape.wasm").read_bytes())
        garbage = os.urandom(16 * MIB)
        latencies: list[float] = []
        attack_over = asyncio.Event()

        for n in range(4):  # warm the compiled-module caches: measure interference only
            assert (await run(http, adder["cid"], [n, 1]))["output"] == n + 1

        async def attack() -> tuple[list[dict[str, Any]], dict[str, Any], list[httpx.Response]]:
            try:
                return await asyncio.gather(
                    asyncio.gather(*(run(http, module["cid"], [], **policy)
                                     for module, policy in hostile.values())),
                    run(http, escape["cid"], []),
                    asyncio.gather(
                        http.post("/modules", content=garbage),
                        http.post("/modules", content=b"\0asm\x01\0\0\0" + garbage[8:]),
                        http.post("/modules", content=garbage + b"!")))
            finally:
                attack_over.set()

        async def bystanders() -> None:
            n = 0
            while not attack_over.is_set() or n < 20:
                began = time.monotonic()
                result = await run(http, adder["cid"], [n, 7])
                latencies.append(time.monotonic() - began)
                assert result["success"] is True and result["output"] == n + 7, result
                n += 1

        (limits, escaped, uploads), _ = await asyncio.gather(attack(), bystanders())
    codes = {expected: result["error"] and result["error"]["code"]
             for expected, result in zip(hostile, limits, strict=True)}
    print(f"\n[hostile] {len(latencies)} additions meanwhile, slowest "
          f"{max(latencies) * 1000:.0f} ms, median "
          f"{sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms; codes {codes}; uploads "
          f"{[r.status_code for r in uploads]}")
    assert max(latencies) < 1.5, f"an addition took {max(latencies):.2f} s meanwhile"
    assert escaped["success"] is True, escaped
    assert escaped["output"] and set(escaped["output"].values()) == {False}, escaped["output"]
    assert_problem(uploads[0], 400, "invalid-request")
    assert_problem(uploads[1], 400, "invalid-request")
    assert_problem(uploads[2], 413, "payload-too-large")
    for expected, result in zip(hostile, limits, strict=True):
        assert result["success"] is False and result["output"] is None, result
        assert result["error"]["code"] == expected, result["error"]


# --- 7. graceful drain ---


async def test_sigterm_past_the_drain_grace_hands_the_run_back(processes: Cluster,
                                                               bus: BusView) -> None:
    base = processes.gateway()
    pair = [processes.start("executor", RELAY_DRAIN_GRACE="1000", **LEASE) for _ in range(2)]
    nodes = {await bus.node_of(process): process for process in pair}
    async with client_for(base) as http:
        module = await upload(http, FIB_WAT)
        # fib(44): over 4 s even on a fast machine, so well past the grace of 1 s.
        request_id = await submit(http, module["cid"], [44], policy=LONG)
        victim = (await started_by(bus, request_id))["executor_node"]
        await running_in_wasm(bus, request_id, victim)
        draining = nodes[victim]
        draining.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.to_thread(draining.wait, 10)
        exited_s = time.monotonic() - signalled
        state = await finished(http, request_id, timeout_s=60)  # the peer runs it all again
        done_s = time.monotonic() - signalled
    print(f"\n[drain 1 s] exited {exited_s:.2f} s after SIGTERM (code {draining.returncode}); "
          f"a peer completed the run {done_s:.2f} s after SIGTERM")
    assert exited_s < 1.0 + 2.5
    assert draining.returncode == 0
    assert state["status"] == "completed" and state["output"] == fib(44), state
    events = await bus.events(request_id)
    terminal = assert_one_ending(events)
    assert terminal["type"] == "execution_complete"
    started = [e["executor_node"] for e in events if e["type"] == "execution_started"]
    assert len(started) == 2 and started[0] == victim and started[1] != victim, started
    assert_gas_never_decreases(events)


async def test_sigterm_within_the_drain_grace_finishes_the_run(processes: Cluster,
                                                               bus: BusView) -> None:
    base = processes.gateway()
    pair = [processes.start("executor", RELAY_DRAIN_GRACE="30000", **LEASE) for _ in range(2)]
    nodes = {await bus.node_of(process): process for process in pair}
    async with client_for(base) as http:
        module = await upload(http, FIB_WAT)
        # fib(40): 0.6 s or more, so still running once progress shows it is in the module.
        request_id = await submit(http, module["cid"], [40], policy=LONG)
        victim = (await started_by(bus, request_id))["executor_node"]
        await running_in_wasm(bus, request_id, victim)
        draining = nodes[victim]
        draining.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        state = await finished(http, request_id, timeout_s=20)
        done_s = time.monotonic() - signalled
        await asyncio.to_thread(draining.wait, 10)
        exited_s = time.monotonic() - signalled
    print(f"\n[drain 30 s] the run completed {done_s:.2f} s and the executor exited "
          f"{exited_s:.2f} s after SIGTERM")
    assert draining.returncode == 0
    assert exited_s < done_s + 2.5
    assert state["status"] == "completed" and state["output"] == FIB_40, state
    events = await bus.events(request_id)
    assert_one_ending(events)
    started = [e["executor_node"] for e in events if e["type"] == "execution_started"]
    assert started == [victim], "the run was handed to a peer instead of finishing"


async def test_an_executor_told_to_stop_takes_no_new_work(processes: Cluster,
                                                          bus: BusView) -> None:
    """SIGTERM an idle executor, then submit: it must not start the new execution (the
    contract: "takes no new work"); a peer started afterwards runs it."""
    base = processes.gateway()
    stopping = processes.start("executor", RELAY_DRAIN_GRACE="30000", **LEASE)
    node = await bus.node_of(stopping)
    async with client_for(base) as http:
        module = await upload(http, CALCULATOR_WAT)
        stopping.send_signal(signal.SIGTERM)
        # No event says the signal was handled; its handler only sets a flag, so 0.2 s is
        # ample. The executor is then still inside its blocking read (up to 1 s).
        await asyncio.sleep(0.2)
        request_id = await submit(http, module["cid"], [20, 22])
        await asyncio.to_thread(stopping.wait, 10)
        peer = processes.start("executor", **LEASE)
        await bus.node_of(peer)
        state = await finished(http, request_id, timeout_s=15)
    assert state["status"] == "completed" and state["output"] == 42, state
    started = [e["executor_node"] for e in await bus.of_type("execution_started", request_id)]
    print(f"\n[no new work] the execution submitted after SIGTERM was started by "
          f"{'the stopping executor' if node in started else 'a peer'}")
    assert node not in started, "the executor took new work after SIGTERM"


async def test_an_executor_started_before_redis_waits_for_it_then_serves(
        processes: Cluster, redis_server: RedisServer, settings: Settings,
        caplog: pytest.LogCaptureFixture) -> None:
    """Started while Redis is down (a host booting, a pod beside its Redis), the executor
    retries until Redis answers rather than dying before it took any work."""
    redis_server.stop()
    async with running(settings, "early"):
        await wait_for(lambda: "cannot reach Redis to start" in caplog.text, timeout_s=10)
        redis_server.start()
        base = await asyncio.to_thread(processes.gateway)
        async with client_for(base, timeout=30) as http:
            module = await upload(http, CALCULATOR_WAT)
            body = await run(http, module["cid"], [2, 3])
    assert body["success"] is True and body["output"] == 5
