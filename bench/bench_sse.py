#!/usr/bin/env python3
"""Benchmark SSE fan-out: N subscribers of one principal on ONE gateway process.

For each N (default 1,000 then 5,000), on a fresh `relay gateway` process:
- the gateway starts against an embedded Redis (or `REDIS_URL`, then under a unique
  `RELAY_STREAM_PREFIX` whose keys are deleted at the end), with `RELAY_API_KEYS=bench:<key>`,
  `RELAY_ACCESS_LOG=0`, `RELAY_LOG_LEVEL=WARNING`;
- one warm-up subscriber connects, gets one event and leaves (lazy imports, first allocations),
  then the gateway's RSS is read: the RSS with 0 subscribers;
- N subscribers connect to `GET /intent/execute-wasm/events` (header `X-API-Key`, all the
  principal `bench`), from client processes of at most `--per-client` connections each
  (`sse_client.c`, or asyncio Protocols on uvloop with `--client python`; no HTTP library:
  the client must not be the bottleneck); a subscriber counts as connected once it has its
  `retry:` line. Then the RSS again;
- a publisher XADDs `execution_progress` entries (`user` = `bench`) to `<prefix>:events` at a
  steady `--rate`, for `--warmup` s, then for the measured `--duration` s, then waits `--drain`
  s. Each entry's JSON carries `seq` and `sent_ns` (time.time_ns() just before its XADD); a
  client stamps every event with its wall clock when its bytes arrive: latency = receipt −
  sent_ns (one machine, one clock). Every subscriber should get every event;
- the run prints, for each N: p50/p99/max latency, events received against expected per
  subscriber (drops), connections the server closed, errors, the gateway's RSS (0 subscribers,
  all connected, after the load) and memory per subscriber, and the CPU of the gateway, the
  client processes, Redis and the publisher during the measured window;
- then (unless `--no-reference`) the same subscribers and publisher against `bare_fanout.py`,
  the least a Python process can do to fan the events out (XREAD, then one send() per
  socket), and the gateway's p50, p99 and CPU beside its, as ratios.

Target (a 2-core machine): 5,000 subscribers, p99 <= 100 ms, <= 20 KiB per subscriber (RSS
all connected − RSS with 0 subscribers, over N), and every subscriber connected and got every
measured event with none closed by the server.

`--profile S` then keeps publishing for S more seconds at the largest N while py-spy samples
the gateway, and prints where its busy time goes.

Run from the project root:  .venv/bin/python bench/bench_sse.py [--subscribers 1000,5000]
Exit status: 0 when every target is met, 2 when one is not, 1 on error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import json
import math
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from common import (
    ROOT,
    Child,
    Deadline,
    arm_deadline,
    begin_cleanup,
    clean_env,
    cpu_seconds,
    end_cleanup,
    free_port,
    http_json,
    pick_python,
    rss_kib,
    short_path,
    start_child,
    stop_children,
    wait_until,
)

SSE_PATH = "/intent/execute-wasm/events"
PRINCIPAL = "bench"
PY_SPY_RATE = 100  # samples per second

TARGET_SUBSCRIBERS = 5000
TARGET_P99_MS = 100.0
TARGET_KIB_PER_SUBSCRIBER = 20.0
TARGET_CORES = 2

SEQ_FIELD = b'"seq":'
SENT_FIELD = b'"sent_ns":'
LAST_CHUNK = b"0\r\n\r\n"  # the end of a chunked response
CONNECT_TIMEOUT_S = 30.0


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to at least `needed` (up to the hard limit; children
    inherit it). Returns the (soft, hard) limits in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- the client process (run as `bench_sse.py _client ...`) ---


class Shared:
    """What every connection of a client process writes to."""

    __slots__ = ("closed_at", "end", "first", "latencies", "stopping", "stride", "total")

    def __init__(self, first: int, end: int, stride: int) -> None:
        self.first = first
        self.end = end
        self.stride = stride
        self.stopping = False
        self.total = 0
        """Events received, measured or not."""
        self.closed_at: list[int] = []
        """time.time_ns() of every stream the server ended."""
        self.latencies = array.array("q")
        """Receipt − sent_ns, in µs, of measured events (of every `stride`-th subscriber)."""


class SseConnection(asyncio.Protocol):
    """One subscriber: an HTTP/1.1 GET, then a line-level scan for `"seq":` and `"sent_ns":`
    (chunked-encoding size lines, `id:`, pings and `retry:` are lines it skips)."""

    def __init__(self, shared: Shared, index: int, request: bytes,
                 ready: asyncio.Future[None]) -> None:
        self.shared = shared
        self.record = index % shared.stride == 0
        self.request = request
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.head = b""  # until the `retry:` line
        self.buffer = b""  # an incomplete last line
        self.received = 0  # measured events
        self.others = 0  # warm-up and profiling events
        self.duplicates = 0
        self.parse_errors = 0
        self.last_seq = -1
        self.error = ""
        self.closed_by_server = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self.ready.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                self._fail("HTTP " + self.head[9:12].decode(errors="replace"))
                return
            at = self.head.find(b"retry:", end)
            if at < 0:
                return
            line_end = self.head.find(b"\n", at)
            if line_end < 0:
                return
            data = self.head[line_end + 1:]
            self.head = b""
            self.ready.set_result(None)
            if not data:
                return
        buf = self.buffer + data if self.buffer else data
        cut = buf.rfind(b"\n") + 1
        self.buffer = buf[cut:]
        if buf.startswith(LAST_CHUNK) or b"\n" + LAST_CHUNK in buf:
            # The response ended (the connection may stay open for keep-alive): the server
            # ended the stream, e.g. dropped this subscriber for falling behind.
            self.ended_by_server()
        shared = self.shared
        i = buf.find(SEQ_FIELD, 0, cut)
        while i >= 0:
            try:
                j = buf.index(b",", i)
                seq = int(buf[i + 6:j])
                k = buf.index(SENT_FIELD, j)
                e = buf.index(b"}", k)
                sent_ns = int(buf[k + 10:e])
            except ValueError:
                self.parse_errors += 1
                break
            shared.total += 1
            if seq <= self.last_seq:
                self.duplicates += 1
            else:
                self.last_seq = seq
                if shared.first <= seq < shared.end:
                    self.received += 1
                    if self.record:
                        shared.latencies.append((now - sent_ns) // 1000)
                else:
                    self.others += 1
            i = buf.find(SEQ_FIELD, e, cut)

    def _fail(self, reason: str) -> None:
        self.error = self.error or reason
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.abort()

    def ended_by_server(self) -> None:
        if not self.shared.stopping and not self.closed_by_server:
            self.closed_by_server = True
            self.shared.closed_at.append(time.time_ns())
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self._fail(f"closed before `retry:` ({exc!r})")
        else:
            self.ended_by_server()


async def _client_main(args: argparse.Namespace) -> tuple[array.array[int], dict[str, Any]]:
    loop = asyncio.get_running_loop()
    shared = Shared(args.first_seq, args.first_seq + args.measured, args.stride)
    request = (f"GET {SSE_PATH} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
               f"X-API-Key: {args.key}\r\nAccept: text/event-stream\r\n\r\n").encode()
    connections: list[SseConnection] = []
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def open_one(index: int) -> None:
        async with gate:
            ready: asyncio.Future[None] = loop.create_future()
            connection = SseConnection(shared, index, request, ready)
            connections.append(connection)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await loop.create_connection(lambda: connection, args.host, args.port)
                    await ready
            except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
                connection.error = connection.error or f"{type(exc).__name__}: {exc}"
                if connection.transport is not None:
                    connection.transport.abort()

    started = time.monotonic()
    await asyncio.gather(*(open_one(args.index_offset + i) for i in range(args.count)))
    failed = [c for c in connections if c.error]
    print("READY " + json.dumps({
        "connected": len(connections) - len(failed), "failed": len(failed),
        "errors": collections.Counter(c.error for c in failed).most_common(5),
        "seconds": round(time.monotonic() - started, 2)}), flush=True)

    live = [c for c in connections if not c.error]

    def snapshot() -> dict[str, Any]:
        return {
            "received": sorted(collections.Counter(c.received for c in live).items()),
            "others": sum(c.others for c in live),
            "duplicates": sum(c.duplicates for c in live),
            "parse_errors": sum(c.parse_errors for c in live),
            "closed_by_server": sum(c.closed_by_server for c in live),
            "closed_at": list(shared.closed_at),
            "samples": len(shared.latencies)}

    # MARK: reply with the events received so far, and keep a snapshot of the counts (the
    # result reports the last one). STOP, or EOF if the parent died: close and report.
    result: dict[str, Any] | None = None
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "MARK":
        result = snapshot()
        print("MARK " + json.dumps({"total": shared.total}), flush=True)
    shared.stopping = True
    for connection in live:
        if connection.transport is not None:
            connection.transport.close()
    result = result or snapshot()
    await asyncio.sleep(0.2)  # let the FINs go out
    return shared.latencies[:result["samples"]], result


def run_client(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_sse.py _client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--index-offset", type=int, default=0)
    parser.add_argument("--first-seq", type=int, required=True)
    parser.add_argument("--measured", type=int, required=True)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--connect-concurrency", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    raise_nofile(args.count + 256)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        import uvloop
    except ImportError:
        latencies, result = asyncio.run(_client_main(args))
    else:
        latencies, result = uvloop.run(_client_main(args))
    with open(args.out, "wb") as out:
        latencies.tofile(out)
    print("RESULT " + json.dumps(result), flush=True)


# --- processes ---


def wait_healthy(child: Child, port: int, timeout_s: float) -> None:
    wait_until(lambda: http_json("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200,
               child, "/healthz", timeout_s)


# --- the publisher ---


class Publisher:
    """XADDs `execution_progress` entries of one execution, `seq` numbered from 0."""

    def __init__(self, client: Any, stream: str) -> None:
        self.client = client
        self.stream = stream
        self.request_id = secrets.token_hex(32)
        self.seq = 0
        self.gas_used = 0
        self.max_late_ms = 0.0

    def xadd(self) -> None:
        self.gas_used += 12_345
        now = time.time()
        timestamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                     + f".{int(now % 1 * 1000):03d}Z")
        sent_ns = time.time_ns()
        # `seq` then `sent_ns` last: the clients' scan relies on this order.
        data = (f'{{"type":"execution_progress","request_id":"{self.request_id}",'
                f'"progress":{self.seq % 101},"gas_used":{self.gas_used},'
                f'"timestamp":"{timestamp}","seq":{self.seq},"sent_ns":{sent_ns}}}')
        self.client.xadd(self.stream, {"data": data, "user": PRINCIPAL},
                         maxlen=10_000, approximate=True)
        self.seq += 1

    def run(self, count: int, rate: float, watch: list[Child]) -> float:
        """`count` entries at `rate` a second on a fixed schedule; returns the seconds taken.
        Raises if a process of `watch` exits meanwhile."""
        interval = 1.0 / rate
        started = time.monotonic()
        for i in range(count):
            due = started + i * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                self.max_late_ms = max(self.max_late_ms, -delay * 1000)
            self.xadd()
            if i % max(1, int(rate)) == 0:
                for child in watch:
                    if not child.alive():
                        raise RuntimeError(f"{child.name} exited ({child.process.returncode}) "
                                           f"under load; its log ends:\n{child.log_tail()}")
        return time.monotonic() - started


def warm_gateway(port: int, key: str, publisher: Publisher) -> None:
    """One subscriber that gets one event and leaves, so one-time costs (lazy imports, first
    allocations) are not counted per subscriber."""
    request = (f"GET {SSE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {key}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        seen = b""
        while b"retry:" not in seen:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"warm-up subscriber: the stream closed: {seen[:500]!r}")
            seen += chunk
        if not seen.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"warm-up subscriber: {seen[:500]!r}")
        marker = f'"seq":{publisher.seq},'.encode()
        publisher.xadd()
        while marker not in seen:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("warm-up subscriber: the stream closed before the event")
            seen += chunk


# --- profiling ---

_IDLE = ("epoll_wait", "epoll_pwait", "uv__io_poll", "select (selectors.py", "_worker (",
         "Condition.wait", "Event.wait", "pthread_cond_wait", "pthread_cond_timedwait",
         "do_futex_wait")


def _short(frame: str) -> tuple[str, bool]:
    """`function (short/path.py)` without the line number, and whether it is Python."""
    frame = frame.strip()
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if where.rsplit(":", 1)[-1].isdigit() else where
    python = path.endswith(".py") or path.startswith("<frozen")
    path = short_path(path)
    if not python:
        path = path.split("/")[-1].split(".so")[0]
    return f"{name} ({path})", python


def summarize_profile(path: Path, top: int) -> list[str]:
    """Where the sampled process's busy time goes: by file of the deepest Python frame, by
    leaf frame, and by function anywhere on the stack (inclusive)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ["  (no profile written)"]
    kinds: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        raw = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not raw:
            continue
        if any(marker in f for f in raw[-6:] for marker in _IDLE):
            kinds["idle"] += count
            continue
        kinds["busy"] += count
        frames = [_short(f) for f in raw]
        python = [name for name, is_python in frames if is_python]
        leaf, leaf_python = frames[-1]
        caller = python[-1] if python else "?"
        leaves[leaf if leaf_python else f"{leaf} <- {caller}"] += count
        for name in set(python):
            inclusive[name] += count
        files[caller.rpartition("(")[2].rstrip(")") if python else "native"] += count
    total, busy = sum(kinds.values()), kinds["busy"]
    if not busy:
        return ["  (no busy samples)"]
    out = [f"  {total} samples at {PY_SPY_RATE} Hz: busy {busy / total:.0%} "
           f"(running or runnable), idle {kinds['idle'] / total:.0%}. Shares of busy:"]
    out.append("  by file of the deepest Python frame:")
    out += [f"    {n / busy:5.1%}  {name}" for name, n in files.most_common(top)]
    out.append("  leaf frames:")
    out += [f"    {n / busy:5.1%}  {name}" for name, n in leaves.most_common(top)]
    out.append("  functions, inclusive (those on under 90% of busy stacks):")
    ranked = [(name, n) for name, n in inclusive.most_common() if n < 0.9 * busy]
    out += [f"    {n / busy:5.1%}  {name}" for name, n in ranked[:top * 2]]
    return out


def py_spy_binary() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


# --- one point ---


@dataclass
class Point:
    subscribers: int
    clients: int
    connected: int = 0
    connect_failed: int = 0
    connect_errors: list[Any] = field(default_factory=list)
    connect_s: float = 0.0
    expected: int = 0
    received: collections.Counter[int] = field(default_factory=collections.Counter)
    duplicates: int = 0
    parse_errors: int = 0
    closed_by_server: int = 0
    closed_at_s: list[float] = field(default_factory=list)
    """When the server ended each closed stream, in s from the measured window's start."""
    samples: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    rss0_kib: int = 0
    rss_connected_kib: int = 0
    rss_after_kib: int = 0
    window_s: float = 0.0
    delivered: int = 0
    """Events (any) the clients received during the measured window."""
    cpu: dict[str, float] = field(default_factory=dict)
    """Share of one core during the measured window, by process."""
    client_cpu: list[float] = field(default_factory=list)
    publisher_late_ms: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    """1-minute load average before connecting and at the end of the measured window."""
    profile: list[str] = field(default_factory=list)

    @property
    def kib_per_subscriber(self) -> float:
        n = self.connected or self.subscribers
        return (self.rss_connected_kib - self.rss0_kib) / n if n else 0.0

    @property
    def kib_per_subscriber_after(self) -> float:
        n = self.connected or self.subscribers
        return (self.rss_after_kib - self.rss0_kib) / n if n else 0.0

    @property
    def missing(self) -> int:
        """Measured events not received, over all connected subscribers."""
        return sum((self.expected - got) * n for got, n in self.received.items()
                   if got < self.expected)

    @property
    def short_subscribers(self) -> int:
        return sum(n for got, n in self.received.items() if got < self.expected)

    @property
    def errors(self) -> int:
        return self.connect_failed + self.duplicates + self.parse_errors


@dataclass
class Setup:
    python: str
    redis_url: str
    prefix: str
    redis_pid: int | None
    work_dir: Path
    base_env: dict[str, str]
    args: argparse.Namespace
    client: list[str]
    """The subscriber process's command, before its flags."""


def measure(setup: Setup, n: int, children: list[Child], profile_s: float,
            bare: bool = False) -> Point:
    """One point: N subscribers of a fresh gateway (of `bare_fanout.py` if `bare`)."""
    import redis

    args = setup.args
    clients = max(1, math.ceil(n / args.per_client))
    point = Point(n, clients, load=(os.getloadavg()[0], 0.0))
    key = "bench_" + secrets.token_urlsafe(24)
    port = free_port()
    env = {**setup.base_env, "REDIS_URL": setup.redis_url, "RELAY_STREAM_PREFIX": setup.prefix,
           "RELAY_API_KEYS": f"{PRINCIPAL}:{key}", "RELAY_ACCESS_LOG": "0",
           "RELAY_LOG_LEVEL": "WARNING", "RELAY_LOG_FORMAT": "text",
           "RELAY_DATA_DIR": str(setup.work_dir / "data")}
    server = ([setup.python, str(Path(__file__).with_name("bare_fanout.py")), "--port",
               str(port), "--redis-url", setup.redis_url, "--stream", f"{setup.prefix}:events"]
              if bare else [setup.python, "-m", "relay", "gateway", "--port", str(port)])
    gateway = start_child(f"{'bare' if bare else 'gateway'}-{n}", server, env, setup.work_dir,
                          children)
    mine = [gateway]
    publisher_client = redis.Redis.from_url(setup.redis_url, socket_timeout=5)
    try:
        wait_healthy(gateway, port, 60)
        publisher = Publisher(publisher_client, f"{setup.prefix}:events")
        warm_gateway(port, key, publisher)
        time.sleep(1.0)
        point.rss0_kib = rss_kib(gateway.pid)

        warmup_events = max(1, round(args.warmup * args.rate))
        point.expected = max(1, round(args.duration * args.rate))
        first_seq = publisher.seq + warmup_events
        stride = max(1, math.ceil(n * point.expected / args.max_samples))
        share = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
        outs = [setup.work_dir / f"latencies-{n}-{i}.bin" for i in range(clients)]
        client_children = []
        offset = 0
        for i, count in enumerate(share):
            argv = [*setup.client, "--port", str(port), "--key", key, "--count", str(count),
                    "--index-offset", str(offset), "--first-seq", str(first_seq),
                    "--measured", str(point.expected), "--stride", str(stride),
                    "--connect-concurrency", str(args.connect_concurrency), "--out", str(outs[i])]
            client_children.append(start_child(f"client-{n}-{i}", argv, setup.base_env,
                                               setup.work_dir, children, talk=True))
            offset += count
        mine += client_children
        connect_deadline = time.monotonic() + 60 + n / 50
        for child in client_children:
            ready = child.expect("READY", connect_deadline, [gateway])
            point.connected += ready["connected"]
            point.connect_failed += ready["failed"]
            point.connect_errors += ready["errors"]
            point.connect_s = max(point.connect_s, ready["seconds"])
        print(f"  N={n}: {point.connected} connected in {point.connect_s:.1f} s "
              f"({point.connect_failed} failed) from {clients} client process(es)", flush=True)
        time.sleep(1.0)
        point.rss_connected_kib = rss_kib(gateway.pid)

        publisher.run(warmup_events, args.rate, mine)
        pids = {"gateway": gateway.pid, "redis": setup.redis_pid}
        pids.update({c.name: c.pid for c in client_children})
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own_before = time.process_time()
        publisher.max_late_ms = 0.0
        window_start_ns = time.time_ns()
        total_before = mark(client_children)
        point.window_s = publisher.run(point.expected, args.rate, mine)
        point.delivered = mark(client_children) - total_before
        point.publisher_late_ms = publisher.max_late_ms
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        point.load = (point.load[0], os.getloadavg()[0])
        window = point.window_s or 1.0
        point.cpu = {"gateway": (after["gateway"] - before["gateway"]) / window}
        point.client_cpu = [(after[c.name] - before[c.name]) / window for c in client_children]
        if setup.redis_pid is not None:
            point.cpu["redis"] = (after["redis"] - before["redis"]) / window
        point.cpu["publisher"] = (time.process_time() - own_before) / window
        time.sleep(args.drain)
        point.rss_after_kib = rss_kib(gateway.pid)
        mark(client_children)  # the counts reported are those at the end of the drain

        if profile_s > 0:
            point.profile = profile_gateway(gateway, publisher, profile_s, args, mine)

        latencies = array.array("q")
        for child, out in zip(client_children, outs, strict=True):
            child.send_line("STOP")
            result = child.expect("RESULT", time.monotonic() + 60, [])
            point.received.update({int(got): count for got, count in result["received"]})
            point.duplicates += result["duplicates"]
            point.parse_errors += result["parse_errors"]
            point.closed_by_server += result["closed_by_server"]
            point.closed_at_s += [(t - window_start_ns) / 1e9 for t in result["closed_at"]]
            with out.open("rb") as samples:
                latencies.fromfile(samples, out.stat().st_size // latencies.itemsize)
        ordered = sorted(latencies)
        point.samples = len(ordered)
        if ordered:
            point.p50_ms = ordered[len(ordered) // 2] / 1000
            point.p99_ms = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] / 1000
            point.max_ms = ordered[-1] / 1000
        return point
    finally:
        publisher_client.close()
        stop_children(mine, 10.0)


def mark(clients: list[Child]) -> int:
    """Events the clients have received so far; each keeps a snapshot of its counts."""
    for child in clients:
        child.send_line("MARK")
    deadline = time.monotonic() + 30
    return sum(int(child.expect("MARK", deadline, [])["total"]) for child in clients)


def profile_gateway(gateway: Child, publisher: Publisher, seconds: float,
                    args: argparse.Namespace, watch: list[Child]) -> list[str]:
    """py-spy the gateway while the publisher goes on at the same rate for `seconds`."""
    py_spy = py_spy_binary()
    if py_spy is None:
        return ["  py-spy is not installed (.venv/bin/pip install py-spy); skipped"]
    out = gateway.log_path.with_suffix(".collapsed")
    argv = [py_spy, "record", "--pid", str(gateway.pid), "--duration",
            str(max(1, round(seconds))), "--rate", str(PY_SPY_RATE), "--format", "raw",
            "--output", str(out)]
    if not args.no_native:
        argv.append("--native")
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    try:
        publisher.run(max(1, round((seconds + 1) * args.rate)), args.rate, watch)
        recorder.wait(timeout=30)
    finally:
        if recorder.poll() is None:
            os.killpg(recorder.pid, signal.SIGKILL)
            recorder.wait()
    assert recorder.stderr is not None
    if recorder.returncode != 0:
        error = recorder.stderr.read().decode(errors="replace").strip()[-500:]
        return [f"  py-spy failed ({recorder.returncode}): {error}"]
    recorder.stderr.close()
    return summarize_profile(out, args.top)


# --- reporting ---


def print_report(points: list[Point], args: argparse.Namespace, redis_what: str) -> bool:
    print(f"\nSSE fan-out on one gateway process: {args.rate:g} events/s, {args.duration:g} s "
          f"measured after {args.warmup:g} s warm-up, {args.drain:g} s drain; one principal; "
          f"{redis_what}; cores: {os.cpu_count()}")
    header = (f"{'subs':>5} {'conn':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} "
              f"{'exp/sub':>7} {'min/sub':>7} {'short':>5} {'missing':>8} {'closed':>6} "
              f"{'errors':>6}")
    print(header)
    print("-" * len(header))
    for p in points:
        low = min(p.received) if p.received else 0
        print(f"{p.subscribers:>5} {p.connected:>5} {p.p50_ms:>7.1f} {p.p99_ms:>7.1f} "
              f"{p.max_ms:>8.1f} {p.expected:>7} {low:>7} {p.short_subscribers:>5} "
              f"{p.missing:>8} {p.closed_by_server:>6} {p.errors:>6}")
    print("(exp/sub: measured events published; min/sub: fewest any subscriber got; short: "
          "subscribers that got fewer;\n missing: events they lacked in all by the end of the "
          "drain, late or lost; closed: streams the server ended)")
    header = (f"{'subs':>5} {'RSS0 MiB':>8} {'conn MiB':>8} {'KiB/sub':>7} {'after MiB':>9} "
              f"{'KiB/sub':>7}   CPU during the window (share of one core)")
    print("\n" + header)
    print("-" * (len(header) + 20))
    for p in points:
        cpu = "  ".join(f"{name} {share:.0%}" for name, share in p.cpu.items())
        clients = "+".join(f"{share:.0%}" for share in p.client_cpu)
        print(f"{p.subscribers:>5} {p.rss0_kib / 1024:>8.1f} {p.rss_connected_kib / 1024:>8.1f} "
              f"{p.kib_per_subscriber:>7.1f} {p.rss_after_kib / 1024:>9.1f} "
              f"{p.kib_per_subscriber_after:>7.1f}   {cpu}  clients {clients}")
    print("(RSS0: gateway with 0 subscribers; conn: all connected, idle; after: after the load "
          "and drain; KiB/sub: (RSS − RSS0) / connected)")
    for p in points:
        notes = [f"N={p.subscribers}: {p.delivered / (p.window_s or 1):,.0f} events delivered/s "
                 f"during the window (published × subscribers: "
                 f"{args.rate * p.connected:,.0f}/s), {p.samples:,} latency samples, "
                 f"publisher at most "
                 f"{p.publisher_late_ms:.1f} ms behind schedule, load average "
                 f"{p.load[0]:.2f} before, {p.load[1]:.2f} at the end of the window"]
        if p.connect_errors:
            notes.append(f"connect errors: {p.connect_errors}")
        if p.closed_at_s:
            times = sorted(p.closed_at_s)
            before = sum(t < 0 for t in times)
            during = sum(0 <= t <= p.window_s for t in times)
            notes.append(f"streams ended by the server: {before} before the window, {during} "
                         f"during, {len(times) - before - during} after (first at "
                         f"{times[0]:+.1f} s, last at {times[-1]:+.1f} s from its start)")
        if p.duplicates or p.parse_errors:
            notes.append(f"{p.duplicates} duplicate or out-of-order events, {p.parse_errors} "
                         "unparsable")
        if any(share > 0.9 for share in p.client_cpu):
            notes.append("a client process was near a full core: latencies include its lag")
        print("  " + "; ".join(notes))
    for p in points:
        if p.profile:
            print(f"\nWhere the gateway spends its time at N={p.subscribers}, {args.rate:g} "
                  f"events/s (py-spy{'' if args.no_native else ' --native'}, sampling slows "
                  "it: compare shares):")
            print("\n".join(p.profile))

    verdicts: list[bool] = []

    def check(label: str, ok: bool | None, measured: str) -> None:
        if ok is None:
            print(f"  {label:<58} not measured")
            return
        verdicts.append(ok)
        print(f"  {label:<58} {measured:<20} {'PASS' if ok else 'FAIL'}")

    target = next((p for p in points if p.subscribers == TARGET_SUBSCRIBERS), None)
    cores = os.cpu_count() or 0
    print(f"\nTargets ({TARGET_SUBSCRIBERS:,} subscribers on one gateway process, a "
          f"{TARGET_CORES}-core machine{'' if cores == TARGET_CORES else f'; this one has {cores}'}"
          f", {args.rate:g} events/s):")
    check(f"p99 latency XADD -> client <= {TARGET_P99_MS:g} ms",
          target.p99_ms <= TARGET_P99_MS and target.samples > 0 if target else None,
          f"{target.p99_ms:.1f} ms" if target else "")
    check(f"gateway memory <= {TARGET_KIB_PER_SUBSCRIBER:g} KiB per subscriber",
          target.kib_per_subscriber <= TARGET_KIB_PER_SUBSCRIBER if target else None,
          f"{target.kib_per_subscriber:.1f} KiB" if target else "")
    check("all connected, every event received, none closed, no errors",
          (target.connected == TARGET_SUBSCRIBERS and target.missing == 0
           and target.closed_by_server == 0 and target.errors == 0) if target else None,
          f"{target.missing} missing, {target.closed_by_server} closed" if target else "")
    return all(verdicts)


def print_reference(points: list[Point], references: list[Point]) -> None:
    """The gateway beside the least a Python process can do to fan the same events out to the
    same subscribers (`bare_fanout.py`), measured right after it: ratios that the machine's
    speed and noise move far less than the latencies themselves."""
    if not references:
        return
    print("\nBeside the bare fan-out (bare_fanout.py: XREAD, then one send() per socket; the "
          "same subscribers and rate, right after):")
    header = (f"{'subs':>5} {'p50 ms':>7} {'bare':>7} {'p99 ms':>7} {'bare':>7} {'p99 ×':>6} "
              f"{'CPU':>5} {'bare':>5} {'CPU ×':>6} {'missing':>8}")
    print(header)
    print("-" * len(header))
    for p, bare in zip(points, references, strict=True):
        cpu, bare_cpu = p.cpu.get("gateway", 0), bare.cpu.get("gateway", 0)
        print(f"{p.subscribers:>5} {p.p50_ms:>7.1f} {bare.p50_ms:>7.1f} {p.p99_ms:>7.1f} "
              f"{bare.p99_ms:>7.1f} {p.p99_ms / (bare.p99_ms or 1):>6.2f} {cpu:>5.0%} "
              f"{bare_cpu:>5.0%} {cpu / (bare_cpu or 1):>6.2f} {bare.missing:>8}")
    print("(CPU: the gateway's, and the bare fan-out's, share of one core during the window; "
          "missing: events the bare fan-out's subscribers lacked)")


def print_floor(points: list[Point]) -> None:
    """The gateway's CPU per delivery beside the kernel's for one bare send() (write_floor.py),
    measured in the same run: a ratio that the machine's speed and noise move far less than
    the latencies."""
    from write_floor import send_floor_us

    print("\nGateway CPU per delivery, beside one bare send() to one of as many loopback "
          "sockets, measured now:")
    for p in points:
        if p.delivered:
            floor = send_floor_us(p.subscribers, max(20, 200_000 // p.subscribers))
            per = p.cpu.get("gateway", 0) * (p.window_s or 1) / p.delivered * 1e6
            print(f"  N={p.subscribers}: gateway {per:.2f} µs, send() {floor:.2f} µs: "
                  f"{per / floor:.2f}x the floor")


# --- main ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", default="1000,5000",
                        help="comma-separated subscriber counts (default 1000,5000)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="events appended per second (default 20)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="measured seconds per point (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of events before the measured ones (default 3)")
    parser.add_argument("--drain", type=float, default=3.0,
                        help="seconds to wait for late events after the last one (default 3)")
    parser.add_argument("--per-client", type=int, default=2500,
                        help="connections per client process at most (default 2500)")
    parser.add_argument("--client", choices=("c", "python"), default="c",
                        help="subscriber processes: c (sse_client.c, built with cc; the "
                             "default) or python (asyncio on uvloop)")
    parser.add_argument("--poll-ms", type=float, default=1.0,
                        help="the C client reads its streams every POLL_MS instead of sleeping "
                             "until the gateway's write wakes it (0: sleep; default 1)")
    parser.add_argument("--connect-concurrency", type=int, default=100,
                        help="connections a client process opens at once (default 100)")
    parser.add_argument("--max-samples", type=int, default=2_000_000,
                        help="latency samples kept per point at most: beyond, only every k-th "
                             "subscriber's (default 2,000,000)")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="at the largest N, py-spy the gateway for SECONDS more of events "
                             "and print its hot spots")
    parser.add_argument("--no-native", action="store_true",
                        help="py-spy without --native (no C frames)")
    parser.add_argument("--top", type=int, default=12, help="hot spots shown (default 12)")
    parser.add_argument("--python", default=None,
                        help="interpreter for the gateway and the clients "
                             "(default: .venv/bin/python)")
    parser.add_argument("--max-time", type=float, default=None,
                        help="hard bound on the whole run in seconds (default: computed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profiles)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the bare fan-out (bare_fanout.py) measured after the gateway "
                             "at each N")
    args = parser.parse_args(argv)
    if args.poll_ms < 0:
        parser.error("--poll-ms must be 0 or more")
    if args.rate <= 0 or args.duration <= 0 or args.per_client < 1:
        parser.error("--rate, --duration and --per-client must be positive")
    return args


def subscriber_command(args: argparse.Namespace, python: str,
                       work_dir: Path) -> tuple[list[str], str]:
    """The command of a subscriber process and what it is: the C client built into `work_dir`
    (the Python one when no compiler is found or the build fails), or the Python client."""
    python_client = [python, str(Path(__file__).resolve()), "_client"]
    if args.client == "python":
        return python_client, "python (asyncio on uvloop)"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return python_client, "python (no C compiler found for sse_client.c)"
    binary = work_dir / "sse_client"
    build = subprocess.run([compiler, "-O2", "-o", str(binary),
                            str(Path(__file__).with_name("sse_client.c"))],
                           capture_output=True, text=True, check=False)
    if build.returncode != 0:
        print(f"warning: building sse_client.c failed, using the Python client:\n"
              f"{build.stderr.strip()[-2000:]}", file=sys.stderr)
        return python_client, "python (sse_client.c did not build)"
    poll_us = round(args.poll_ms * 1000)
    return ([str(binary), "--poll-us", str(poll_us)],
            f"c (sse_client.c, reading every {args.poll_ms:g} ms)" if poll_us
            else "c (sse_client.c, woken by each write)")


def delete_keys(url: str, prefix: str) -> int:
    """Every key under `prefix:` (never FLUSHALL: the server may be shared)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
        return deleted
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.subscribers.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit("--subscribers: give positive counts, e.g. 1000,5000")
    per_point = 90 + args.warmup + args.duration + 2 * args.drain
    runs = 1 if args.no_reference else 2  # the gateway, then the bare fan-out, at each N
    budget = args.max_time or (60 + runs * sum(per_point + n / 25 for n in counts)
                               + (args.profile + 40 if args.profile else 0))
    python = pick_python(args.python)
    # The gateway holds one descriptor per subscriber, a client process one per connection:
    # raise the soft limit here; the children inherit it (the clients raise theirs again).
    soft, hard = raise_nofile(max(counts) + 1024)
    if soft != resource.RLIM_INFINITY and soft < max(counts) + 256:
        print(f"warning: RLIMIT_NOFILE is {soft} (hard {hard}): the gateway may run out of file "
              f"descriptors with {max(counts)} subscribers", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    arm_deadline(budget)

    work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-sse-"))
    children: list[Child] = []
    embedded = None
    external_url = os.environ.get("REDIS_URL") or None
    prefix = "bench-sse-" + secrets.token_hex(6)
    passed = False
    try:
        sys.path.insert(0, str(ROOT))
        from relay.connection import EmbeddedRedis

        if external_url:
            redis_url, redis_pid = external_url, None
            redis_what = f"REDIS_URL, prefix {prefix}"
        else:
            embedded = EmbeddedRedis(work_dir / "redis-data")
            redis_url = embedded.start()
            redis_pid = embedded.process.pid if embedded.process else None
            redis_what = "embedded Redis"
        base_env = clean_env()
        base_env["PYTHONUNBUFFERED"] = "1"
        client, client_what = subscriber_command(args, python, work_dir)
        setup = Setup(python, redis_url, prefix, redis_pid, work_dir, base_env, args, client)
        print(f"python {python}; subscribers: {client_what}; {redis_what}; "
              f"RLIMIT_NOFILE {soft}; time budget {budget:.0f} s; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        points, references = [], []
        for n in counts:
            profile_s = args.profile if args.profile and n == max(counts) else 0.0
            point = measure(setup, n, children, profile_s)
            points.append(point)
            print(f"  N={n}: p50 {point.p50_ms:.1f} ms  p99 {point.p99_ms:.1f} ms  "
                  f"{point.missing} missing  {point.closed_by_server} closed  "
                  f"{point.kib_per_subscriber:.1f} KiB/sub  gateway CPU "
                  f"{point.cpu.get('gateway', 0):.0%}", flush=True)
            if not args.no_reference:
                reference = measure(setup, n, children, 0.0, bare=True)
                references.append(reference)
                print(f"  N={n}, bare fan-out: p50 {reference.p50_ms:.1f} ms  p99 "
                      f"{reference.p99_ms:.1f} ms  {reference.missing} missing  CPU "
                      f"{reference.cpu.get('gateway', 0):.0%}", flush=True)
        passed = print_report(points, args, redis_what)
        print_reference(points, references)
        print_floor(points)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except (Deadline, RuntimeError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        begin_cleanup(children, 10.0)
        if embedded is not None:
            embedded.stop()
        elif external_url:
            with contextlib.suppress(Exception):
                delete_keys(external_url, prefix)
        end_cleanup(work_dir, args.keep)
    return 0 if passed else 2


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        run_client(sys.argv[2:])
    else:
        sys.exit(main())
