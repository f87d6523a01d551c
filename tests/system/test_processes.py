"""Gateway and executors as separate real processes on one Redis, over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx
import redis

from relay import relay_version
from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import (
    ALICE_KEY,
    ROOT,
    Processes,
    free_port,
    process_env,
    upload,
    wait_for,
)


def client_for(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, headers={"X-API-Key": ALICE_KEY}, timeout=30)


async def test_gateway_and_executor_processes_serve_a_sync_execute(
        processes: Processes) -> None:
    async with client_for(processes.gateway()) as http:
        processes.start("executor")
        module = await upload(http, (ROOT / "relay" / "examples" / "calculator.wat").read_text())
        response = await http.post("/intent/execute-wasm",
                                   json={"cid": module["cid"], "inputs": [5, 3]})
        assert response.status_code == 200, response.text
        assert response.json()["output"] == 8
        health = (await http.get("/intent/execute-wasm/health")).json()
        assert health["executors"] == 1
        assert health["status"] == "healthy"


async def test_two_executors_share_the_work(processes: Processes, settings: Settings) -> None:
    async with client_for(processes.gateway()) as http:
        for _ in range(2):
            processes.start("executor", RELAY_EXECUTOR_CONCURRENCY="1", RELAY_EXECUTOR_PREFETCH="0")

        async def both_alive() -> bool:
            health = (await http.get("/intent/execute-wasm/health")).json()
            return bool(health["executors"] == 2)

        await wait_for(both_alive, timeout_s=20)
        module = await upload(http, (ROOT / "relay" / "examples" / "fib.wat").read_text())
        request_ids = []
        for n in range(24):
            response = await http.post(
                "/intent/execute-wasm", headers={"Prefer": "respond-async"},
                json={"cid": module["cid"], "inputs": [27 + n % 3], "idempotency_key": f"k{n}"})
            assert response.status_code == 202, response.text
            request_ids.append(response.json()["request_id"])

        async def all_completed() -> bool:
            views = [(await http.get(f"/executions/{rid}")).json() for rid in request_ids]
            return all(view["status"] == "completed" for view in views)

        await wait_for(all_completed, timeout_s=30, interval_s=0.1)
    keys = Keys(settings.prefix)
    with redis.Redis.from_url(settings.redis_url or "") as client:
        events = [json.loads(fields[b"data"]) for _, fields in client.xrange(keys.events)]
    nodes = {e["executor_node"] for e in events if e["type"] == "execution_started"}
    assert len(nodes) == 2, f"one executor did all the work: {nodes}"
    terminal = [e for e in events if e["type"] in ("execution_complete", "execution_error")]
    assert sorted(e["request_id"] for e in terminal) == sorted(request_ids)


def test_relay_dev_runs_the_seed_and_sigterm_stops_everything_it_started(
        tmp_path: Path) -> None:
    """The README's one command, as a real process on its own embedded Redis: the seed execute
    answers 8; then SIGTERM (docker stop, systemd, Kubernetes) stops the gateway, its executor
    and the embedded Redis, not just the gateway."""
    port = free_port()
    socket_path = tmp_path / "data" / "redis" / "redis.sock"
    embedded = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1)
    children: list[int] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "REDIS_URL"}
    env.update(RELAY_DATA_DIR=str(tmp_path / "data"), RELAY_LOG_LEVEL="WARNING")
    dev = subprocess.Popen([sys.executable, "-m", "relay", "dev", "--port", str(port)],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True)
    try:
        assert dev.stdout is not None
        banner = _banner_from(dev.stdout)
        assert "Rate limit: 1000 executes per 60 s" in banner
        assert f"API reference: http://127.0.0.1:{port}/docs" in banner
        assert f"Console: http://127.0.0.1:{port}/console" in banner
        assert f"relay execute --url http://127.0.0.1:{port} glyph://calculator" in banner
        key = _dev_key_from(banner)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key},
                          timeout=30) as http:
            _wait_until(lambda: _serves(http), "the gateway to listen")
            seed = http.post("/intent/execute-wasm", json={
                "cid": "glyph://calculator@quantum", "inputs": [5, 3]})
        assert seed.status_code == 200 and seed.json()["output"] == 8
        assert seed.headers["RateLimit-Policy"] == '"default";q=1000;w=60'
        children += [int(pid) for pid in subprocess.run(
            ["pgrep", "-P", str(dev.pid)], capture_output=True, text=True).stdout.split()]
        assert children, "the executor runs as a child process"
        assert _answers(embedded)
        dev.send_signal(signal.SIGTERM)
        assert dev.wait(30) == -signal.SIGTERM
        _wait_until(lambda: not any(map(_alive, children)), "the executor to exit")
        _wait_until(lambda: not _answers(embedded), "the embedded Redis to stop")
    finally:  # whatever failed, leave nothing running
        if dev.poll() is None:
            dev.kill()
        for pid in filter(_alive, children):
            os.kill(pid, signal.SIGKILL)
        if _answers(embedded):
            with contextlib.suppress(redis.RedisError):
                embedded.shutdown(nosave=True)


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _banner_from(stdout: IO[str]) -> str:
    """What `relay dev` prints, up to its last example command."""
    lines = []
    for line in stdout:
        lines.append(line)
        if line.startswith("  relay execute"):
            return "".join(lines)
    raise AssertionError(f"relay dev printed no banner: {''.join(lines)}")


def _dev_key_from(banner: str) -> str:
    for line in banner.splitlines():
        if "API key" in line:
            return line.rsplit(": ", 1)[1].strip()
    raise AssertionError("relay dev printed no API key")


def test_a_second_relay_dev_on_a_busy_port_fails_before_saying_it_runs(tmp_path: Path) -> None:
    """The port is taken first: nothing is started, "running" is never printed, and the error
    names the port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RELAY_") and k != "REDIS_URL"}
        env.update(RELAY_DATA_DIR=str(tmp_path / "data"))
        second = subprocess.run([sys.executable, "-m", "relay", "dev", "--port", str(port)],
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert "running" not in second.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert "Traceback" not in second.stderr
    assert not (tmp_path / "data" / "redis").exists(), "no embedded Redis was started"


def test_relay_version_and_an_empty_key_list_say_so(settings: Settings) -> None:
    version = _relay(settings, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"relay {relay_version()}"
    listed = _relay(settings, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("no stored keys")
    created = _relay(settings, "keys", "create", "carol")
    assert created.returncode == 0, created.stderr
    listed = _relay(settings, "keys", "list")
    assert "carol" in listed.stdout and "no stored keys" not in listed.stdout


def _relay(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], env=process_env(settings),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def _serves(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is gone


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def test_an_idle_gateway_wakes_rarely(processes: Processes) -> None:
    """An idle gateway's timers (HTTP server, fan-in, pipeline timers, webhook reads,
    metrics) wake it about 60 times a second; a timer of 50 a second more (the webhook
    deliverer measuring its event loop's lag with nothing to deliver) took that to 105."""
    processes.gateway()
    [gateway] = processes.running
    time.sleep(1.0)  # start-up's own work done
    before, started = _wake_ups(gateway.pid), time.monotonic()
    time.sleep(3.0)
    rate = (_wake_ups(gateway.pid) - before) / (time.monotonic() - started)
    assert rate < 85, f"an idle gateway woke {rate:.0f} times a second"


def _wake_ups(pid: int) -> int:
    """Times the process's threads went to sleep and were woken (voluntary switches)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            total += int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return total
