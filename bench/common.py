"""What the bench scripts share: child processes, waits, /proc readers, signals and cleanup.

Imported as `common` from the script's own directory (a script run as
`python bench/<script>.py` has `bench/` first on sys.path).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- signals ---


class Deadline(Exception):
    """The whole run went over --max-time."""


def raise_deadline(signum: int, frame: Any) -> None:
    raise Deadline("the benchmark ran over --max-time")


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def arm_deadline(budget_s: float) -> None:
    """SIGALRM after `budget_s` raises Deadline; SIGTERM raises KeyboardInterrupt."""
    signal.signal(signal.SIGALRM, raise_deadline)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.alarm(max(1, int(budget_s)))


def begin_cleanup(children: list[Child], timeout_s: float = 15.0) -> None:
    """No more alarm, no Ctrl-C (a second one must not skip cleanup); stop the children, the
    last started first."""
    signal.alarm(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_children(children, timeout_s)


def stop_children(children: list[Child], timeout_s: float = 15.0) -> None:
    for child in reversed(children):
        child.stop(timeout_s)


def end_cleanup(work_dir: Path, keep: bool) -> None:
    """Keep or remove the temp dir; Ctrl-C raises KeyboardInterrupt again."""
    if keep:
        print(f"kept {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --- processes ---


def pick_python(given: str | None) -> str:
    """`given`, else the project's .venv interpreter, else this one."""
    python = given or str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).exists():
        python = sys.executable
    return python


def clean_env() -> dict[str, str]:
    """This environment without REDIS_URL and RELAY_*: the defaults, but for what is set."""
    return {k: v for k, v in os.environ.items()
            if k != "REDIS_URL" and not k.startswith("RELAY_")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not gone in `timeout_s`."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        # Whatever is left of the group (an executor whose parent died first, ...).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the log (which the access log can make large)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - chars))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def count_in_log(self, needle: bytes) -> int:
        try:
            return self.log_path.read_bytes().count(needle)
        except OSError:
            return 0

    def expect(self, word: str, deadline: float, watch: list[Child]) -> dict[str, Any]:
        """The JSON after the next `word` line on its stdout; raises if it exits, if a process
        of `watch` exits, or at `deadline` (monotonic)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{self.name}: no {word} line in time; its log ends:\n"
                                   f"{self.log_tail()}")
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                for other in watch:
                    if not other.alive():
                        raise RuntimeError(f"{other.name} exited ({other.process.returncode});"
                                           f" its log ends:\n{other.log_tail()}") from None
                continue
            if line is None:
                self.process.wait(timeout=5)
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}) before "
                                   f"{word}; its log ends:\n{self.log_tail()}")
            if line.startswith(word + " "):
                parsed: dict[str, Any] = json.loads(line[len(word) + 1:])
                return parsed

    def send_line(self, line: str) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.write(line.encode() + b"\n")
                self.process.stdin.flush()


def start_child(name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                children: list[Child], talk: bool = False) -> Child:
    """`argv` in its own process group (stderr, and stdout unless `talk`, to
    `log_dir/name.log`); it goes into `children` at once, so cleanup stops it whatever
    happens next. With `talk`, stdin is a pipe and stdout lines arrive in `child.lines`."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.PIPE if talk else subprocess.DEVNULL,
            stdout=subprocess.PIPE if talk else log, stderr=log if talk else subprocess.STDOUT,
            start_new_session=True)
    child = Child(name, process, log_path)
    children.append(child)
    if talk:
        def pump() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                child.lines.put(raw.decode(errors="replace").rstrip("\n"))
            child.lines.put(None)

        threading.Thread(target=pump, daemon=True, name=f"{name}-stdout").start()
    return child


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_until(check: Callable[[], Any], child: Child, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited ({child.process.returncode}) before {what}; "
                               f"its log ends:\n{child.log_tail()}")
        try:
            if check():
                return
        except (OSError, ValueError) as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{child.name}: no {what} within {timeout_s:.0f} s ({last_error}); "
                       f"its log ends:\n{child.log_tail()}")


def start_gateway(python: str, port: int, env: dict[str, str], log_dir: Path,
                  children: list[Child], api_key: str,
                  timeout_s: float = 60.0) -> tuple[Child, Any]:
    """A `relay gateway` process on `port`, and an httpx.Client to it sending `api_key`, once
    it answers /healthz. (httpx is imported here: the rest of this file needs the stdlib only.)"""
    import httpx

    gateway = start_child("gateway", [python, "-m", "relay", "gateway", "--port", str(port)],
                          env, log_dir, children)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": api_key},
                          timeout=timeout_s)

    def healthy() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, gateway, "/healthz", 60)
    return gateway, client


def start_executor(name: str, python: str, env: dict[str, str], log_dir: Path,
                   children: list[Child], heartbeats: Any, executors_key: str) -> Child:
    """A `relay executor` process, once its heartbeat is in the sorted set `executors_key`
    (relay.keys.Keys.executors), read with the redis-py client `heartbeats`: it reads the bus
    then."""
    child = start_child(name, [python, "-m", "relay", "executor"], env, log_dir, children)
    marker = f"-{child.pid}-"

    def beating() -> bool:
        return any(marker in member.decode()
                   for member, _ in heartbeats.zscan_iter(executors_key))

    wait_until(beating, child, "heartbeat", 60)
    return child


# --- relay dev ---


def start_relay_dev(name: str, python: str, base_env: dict[str, str], data_dir: Path,
                    principal: str, extra_env: dict[str, str], work_dir: Path,
                    children: list[Child]) -> tuple[Child, str, int]:
    """`relay dev` as child `name` on a free port, with `data_dir` as its data directory (so
    its own embedded Redis) and a fresh API key for `principal`. Returns the child, the key
    and the port."""
    key = f"{principal}_" + secrets.token_urlsafe(24)
    port = free_port()
    env = {**base_env, "RELAY_DATA_DIR": str(data_dir), "RELAY_API_KEYS": f"{principal}:{key}",
           **extra_env}
    child = start_child(name, [python, "-m", "relay", "dev", "--port", str(port)], env,
                        work_dir, children)
    return child, key, port


def wait_relay_ready(child: Child, url: str) -> dict[str, Any]:
    """Wait for /healthz, then for a live executor; returns the last executor health."""
    wait_until(lambda: http_json("GET", url + "/healthz")[0] == 200, child, "/healthz", 60)
    health: dict[str, Any] = {}

    def executor_live() -> bool:
        nonlocal health
        health = http_json("GET", url + "/intent/execute-wasm/health")[1] or {}
        return int(health.get("executors", 0)) >= 1

    wait_until(executor_live, child, "live executor", 60)
    return health


def shutdown_redis(socket_path: Path) -> None:
    """The embedded Redis runs in its own session: if the gateway could not stop it (killed),
    ask it to shut down through its unix socket."""
    if not socket_path.exists():
        return
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        sock.connect(str(socket_path))
        sock.sendall(b"SHUTDOWN NOSAVE\r\n")
        with contextlib.suppress(OSError):
            sock.recv(100)


def kill_leftover(pid: int, marker: str, grace_s: float) -> None:
    """SIGKILL `pid` if, after `grace_s`, it is still alive and still runs `marker` (not a
    reused pid)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return
        if marker not in cmdline or state == "Z":
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


# --- /proc readers ---


def cpu_ticks(pid: int | None) -> int:
    """utime + stime of a live process (all its threads) and of its children that ended, in
    clock ticks; 0 if gone. The children count: an embedded Redis forks one to rewrite its
    append-only file, every few seconds under load, and it costs as much as the work."""
    if pid is None:
        return 0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(field) for field in fields[11:15])  # utime stime cutime cstime


def host_ticks() -> tuple[int, int]:
    """(steal, total) clock ticks of the whole machine so far (/proc/stat's `cpu` line; (0, 0)
    where there is none). Steal is time the hypervisor ran other guests while this one had work
    for the CPU: on a shared host, what slows every process here at once."""
    try:
        fields = [int(field) for field in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def cpu_seconds(pid: int | None) -> float:
    """`cpu_ticks` in seconds."""
    return cpu_ticks(pid) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def find_pids(parent: int) -> dict[str, int]:
    """The children of `relay dev`: its executor and its embedded Redis."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) != parent:
            continue
        if "relay executor" in cmdline:
            found["executor"] = int(entry.name)
        elif "redis" in cmdline:
            found["redis"] = int(entry.name)
    return found


def short_path(path: str) -> str:
    """A profiled frame's file, shortened: relative to site-packages, the standard library or
    the project."""
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = path.split("/", 1)[-1]
            return path
    with contextlib.suppress(ValueError):
        path = str(Path(path).resolve().relative_to(ROOT))
    return path
