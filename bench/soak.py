#!/usr/bin/env python3
"""Soak `relay dev` at half its capacity for minutes: errors, latency and memory over time.

One run:
- starts `relay dev` in its own process group, on its own fresh data directory (so its own
  embedded Redis), port and random API key, with the rate limiter and the access log off
  (RELAY_RATE_LIMIT=0, RELAY_ACCESS_LOG=0), and Redis's working set bounded so that it is
  reached within the first minute (idempotency TTL 30 s, streams kept to 20,000 entries: with
  the defaults, 300 s and 100,000, Redis grows by design for the first minutes of any load);
- measures its capacity: sync executes of `glyph://calculator@quantum`, a unique idempotency
  key each, 16 connections in a closed loop for `--capacity-seconds` (after a 2 s warm-up);
- then, for `--minutes`, sends executes at `--load` (0.5) of that rate, open loop (each request
  leaves at its scheduled time whatever the others do; latency counts from that time): a mix of
  sync executes (200 with the right output) and async ones (`Prefer: respond-async`, 202, then
  their terminal event must reach the SSE subscriber within a minute), while `--subscribers`
  event streams follow all of the key's events (reconnecting with Last-Event-ID if dropped);
- prints every minute: throughput, errors (non-2xx, timeouts, connection errors, wrong results,
  async executions whose end never showed), p50/p99 latency, SSE events, and the RSS of the
  gateway, the executor and the embedded redis-server (VmRSS from /proc/PID/status);
- at the end, each process's RSS growth after warm-up (end of minute 1 to the end) against the
  target: no errors, RSS growth under 5 % after warm-up.

It stops everything it started (process group, embedded Redis, temp directory), also on error
and Ctrl-C, and bounds its own run time. Exit status: 0 when the target is met, 2 when it is not,
1 on error, 130 on Ctrl-C.

Run from the project root:  .venv/bin/python bench/soak.py [--minutes 10]
The stdlib is enough for this file (bench_execute.py's helpers run the processes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import resource
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common  # this directory's helpers: processes, waits, cleanup

ROOT = Path(__file__).resolve().parent.parent
CID = "glyph://calculator@quantum"
EXECUTE_PATH = "/intent/execute-wasm"
EVENTS_PATH = "/intent/execute-wasm/events"
TARGET_RSS_GROWTH = 0.05
REQUEST_TIMEOUT_S = 35.0  # the sync wait (30 s) and some
ASYNC_DEADLINE_S = 60.0  # an async execution's end must show on the event stream by then
SOAK_ENV = {
    "RELAY_RATE_LIMIT": "0", "RELAY_ACCESS_LOG": "0", "RELAY_LOG_LEVEL": "WARNING",
    "RELAY_IDEMPOTENCY_TTL": "30000", "RELAY_EVENTS_RETENTION": "20000",
    "RELAY_REQUESTS_RETENTION": "20000",
}
PROCESSES = ("gateway", "executor", "redis")


# --- a small HTTP/1.1 keep-alive client on raw asyncio streams ---


class HttpError(Exception):
    """The connection failed, or the response did not parse."""


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


class Http:
    """Keep-alive connections to one server, at most `max_connections`, reused most recently
    used first; a request on a reused connection that the server closed meanwhile is sent once
    more on a fresh one (every execute carries an idempotency key, so that is safe)."""

    def __init__(self, host: str, port: int, headers: dict[str, str],
                 max_connections: int) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(max_connections)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: str = "") -> tuple[int, bytes]:
        """(status, body). Raises HttpError, TimeoutError."""
        async with self.slots:
            for attempt in range(2):
                reused = bool(self.idle) and attempt == 0
                if reused:
                    reader, writer = self.idle.pop()
                else:
                    try:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                    except OSError as exc:
                        raise HttpError(f"connect: {exc}") from None
                try:
                    writer.write(
                        f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        f"{self.head}{headers}Content-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = _CONTENT_LENGTH.search(head)
                    payload = await reader.readexactly(int(length.group(1))) if length else b""
                    status = int(head[9:12])
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ValueError) as exc:
                    writer.close()
                    if reused and attempt == 0:
                        continue  # the server had closed it while idle
                    raise HttpError(f"{type(exc).__name__}: {exc}") from None
                except BaseException:  # a timeout or cancellation mid-response: unusable
                    writer.close()
                    raise
                if b"connection: close" in head.lower():
                    writer.close()
                else:
                    self.idle.append((reader, writer))
                return status, payload
        raise AssertionError("unreachable")

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


# --- the load ---


def dechunk(raw: bytes) -> tuple[bytes, bytes, bool]:
    """HTTP/1.1 chunked transfer coding: (the data of the complete chunks at the start of
    `raw`, the rest, whether the last chunk was among them)."""
    data: list[bytes] = []
    position = 0
    while True:
        line_end = raw.find(b"\r\n", position)
        if line_end < 0:
            break
        size = int(raw[position:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(data), b"", True
        end = line_end + 2 + size
        if len(raw) < end + 2:
            break
        data.append(raw[line_end + 2:end])
        position = end + 2
    return b"".join(data), raw[position:], False


@dataclass
class Window:
    """What completed within one window of time."""

    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    events: int = 0
    reconnects: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


class Load:
    """Execute requests (sync and async) and event stream subscribers, counted in windows."""

    def __init__(self, http: Http, url_host: str, port: int, key: str) -> None:
        self.http = http
        self.host, self.port, self.key = url_host, port, key
        self.prefix = "soak-" + secrets.token_hex(6)
        self.sequence = 0
        self.window = Window()
        self.pending: dict[str, float] = {}
        """Async executions accepted, not yet seen ending on the stream: request id -> when."""
        self.finished: dict[str, float] = {}
        """Ends seen on the stream of executions not pending (yet): request id -> when."""
        self.subscribed = 0
        self.samples: dict[str, str] = {}
        """The first message of each kind of error, for the report."""

    def body(self) -> tuple[bytes, int]:
        self.sequence += 1
        a, b = random.randint(-1000, 1000), random.randint(-1000, 1000)
        return (f'{{"cid":"{CID}","inputs":[{a},{b}],'
                f'"idempotency_key":"{self.prefix}-{self.sequence}"}}').encode(), a + b

    async def execute(self, scheduled: float, run_async: bool) -> None:
        """One execute; latency from `scheduled` (perf_counter) to the response."""
        body, expected = self.body()
        error = ""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, payload = await self.http.request(
                    "POST", EXECUTE_PATH, body, "Prefer: respond-async\r\n" if run_async else "")
        except TimeoutError:
            error = "timeout"
        except HttpError as exc:
            error = "connection"
            self.samples.setdefault(error, str(exc))
        else:
            if run_async:
                if status != 202:
                    error = f"{status}"
                else:
                    request_id = json.loads(payload)["request_id"]
                    if self.finished.pop(request_id, None) is None:
                        self.pending[request_id] = time.perf_counter()
            elif status != 200:
                error = f"{status}" if status != 202 else "202 (sync not done in 30 s)"
            else:
                answer = json.loads(payload)
                if answer.get("success") is not True or answer.get("output") != expected:
                    error = "wrong result"
        window = self.window
        window.latencies.append(time.perf_counter() - scheduled)
        if error:
            window.errors[error] += 1
        else:
            window.ok += 1

    async def closed_loop(self, connections: int, seconds: float) -> Window:
        """`connections` sync executes at a time for `seconds`: the capacity."""
        self.window = Window()
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await self.execute(time.perf_counter(), run_async=False)

        await asyncio.gather(*(worker() for _ in range(connections)))
        window, self.window = self.window, Window()
        return window

    async def open_loop(self, rate: float, seconds: float, async_share: float,
                        on_tick: Callable[[float], Awaitable[None]], max_in_flight: int) -> None:
        """`rate` executes a second for `seconds`, each at its scheduled time; `on_tick(t)` is
        awaited every minute (t: seconds since the start)."""
        start = time.perf_counter()
        in_flight: set[asyncio.Task[None]] = set()
        sent = 0
        next_tick = 60.0
        while True:
            now = time.perf_counter()
            if now - start >= next_tick:
                await on_tick(next_tick)
                next_tick += 60.0
            if now - start >= seconds:
                break
            due = min(int((now - start) * rate) + 1, int(seconds * rate)) - sent
            for _ in range(due):
                sent += 1
                scheduled = start + (sent - 1) / rate
                if len(in_flight) >= max_in_flight:
                    self.window.errors["client overloaded"] += 1
                    continue
                task = asyncio.create_task(
                    self.execute(scheduled, random.random() < async_share))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            wake = min(start + sent / rate, start + next_tick)
            await asyncio.sleep(max(0.0, wake - time.perf_counter()))
        if in_flight:  # the last requests belong to the last minute
            await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT_S + 5)

    def expire_async(self, older_than_s: float) -> None:
        """Async executions whose end has not shown on the stream within `older_than_s`."""
        cutoff = time.perf_counter() - older_than_s
        lost = [request_id for request_id, at in self.pending.items() if at < cutoff]
        for request_id in lost:
            del self.pending[request_id]
        if lost:
            self.window.errors["async end not seen"] += len(lost)

    async def subscribe(self, index: int, stop: asyncio.Event) -> None:
        """Follow the key's events until `stop`; subscriber 0 also matches async ends."""
        last_id = ""
        while not stop.is_set():
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
                writer.write(f"GET {EVENTS_PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                             f"X-API-Key: {self.key}\r\nAccept: text/event-stream\r\n{resume}"
                             "\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if int(head[9:12]) != 200:
                    raise HttpError(f"event stream answered {head[:12]!r}")
                chunked = b"transfer-encoding: chunked" in head.lower()
                self.subscribed += 1
                raw = lines = b""
                ended = False
                while not stop.is_set():
                    block = await reader.read(262144)
                    if not block:
                        break
                    if chunked:
                        raw += block
                        block, raw, ended = dechunk(raw)
                    lines += block
                    cut = lines.rfind(b"\n") + 1
                    complete, lines = lines[:cut], lines[cut:]
                    self.window.events += complete.count(b"data:")
                    last = (b"\n" + complete).rfind(b"\nid:")  # where its "id:" starts
                    if last >= 0:
                        line_end = complete.index(b"\n", last)
                        last_id = complete[last + 3:line_end].strip().decode()
                    if index == 0 and (b'"execution_complete"' in complete
                                       or b'"execution_error"' in complete):
                        for line in complete.split(b"\n"):
                            if line.startswith(b"data:") and (b'"execution_complete"' in line
                                                              or b'"execution_error"' in line):
                                self.ended(json.loads(line[5:]))
                    if chunked and ended:
                        break
                self.samples.setdefault("sse reconnect", "the server ended the stream")
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    HttpError) as exc:
                self.samples.setdefault("sse reconnect", f"{type(exc).__name__}: {exc}")
            finally:
                if writer is not None:
                    writer.close()
            if not stop.is_set():
                self.window.reconnects += 1
                await asyncio.sleep(0.2)

    def ended(self, event: dict[str, Any]) -> None:
        request_id = event.get("request_id")
        if not isinstance(request_id, str):
            return
        if self.pending.pop(request_id, None) is None:
            # A sync execution, or an async one whose 202 is still on its way: kept a while.
            now = time.perf_counter()
            self.finished[request_id] = now
            if len(self.finished) > 50_000:
                self.finished = {k: at for k, at in self.finished.items() if at > now - 10}
        if event.get("type") == "execution_error":
            self.window.errors["execution_error event"] += 1


# --- processes and memory ---


def rss_mib(pid: int) -> float | None:
    try:
        return common.rss_kib(pid) / 1024
    except (OSError, ValueError, IndexError, RuntimeError):
        return None


def redis_used_mib(socket_path: Path) -> float | None:
    """Redis's `used_memory` (its data, without allocator fragmentation), through its socket."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(socket_path))
            sock.sendall(b"INFO memory\r\n")
            reply = b""
            while b"used_memory:" not in reply or not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    found = re.search(rb"used_memory:(\d+)", reply)
    return int(found.group(1)) / 2**20 if found else None


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) used so far by each process, and by this client."""
    used = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used["client"] = usage.ru_utime + usage.ru_stime
    return used


@dataclass
class Minute:
    minute: int
    window: Window
    seconds: float
    rss: dict[str, float | None]
    redis_used: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)
    """Share of one core each process (and this client) used in the minute."""


def print_minute_header() -> None:
    print(f"{'min':>3} {'req/s':>7} {'requests':>9} {'errors':>6} {'p50 ms':>7} {'p99 ms':>8} "
          f"{'sse ev/s':>8} {'reconn':>6}  "
          + " ".join(f"{name + ' MiB':>12}" for name in PROCESSES) + "  (redis data MiB)  "
          "CPU % of a core: gateway/executor/redis/client", flush=True)


def print_minute(row: Minute) -> None:
    w = row.window
    rss = " ".join(f"{value:12.1f}" if value is not None else f"{'gone':>12}"
                   for value in (row.rss.get(name) for name in PROCESSES))
    data = f"  ({row.redis_used:.1f})" if row.redis_used is not None else ""
    cpu = "/".join(f"{row.cpu.get(name, 0.0):.0%}".removesuffix("%")
                   for name in (*PROCESSES, "client"))
    print(f"{row.minute:>3} {len(w.latencies) / row.seconds:7.1f} {len(w.latencies):>9,} "
          f"{w.error_count:>6} {w.percentile(50):7.2f} {w.percentile(99):8.2f} "
          f"{w.events / row.seconds:8.0f} {w.reconnects:>6}  {rss}{data}  {cpu}", flush=True)
    if w.errors:
        print(f"    errors: {dict(w.errors)}", flush=True)


def report(rows: list[Minute], capacity: float, rate: float, samples: dict[str, str]) -> bool:
    """The growth after warm-up and the verdict; True when the target is met."""
    errors = collections.Counter[str]()
    for row in rows:
        errors.update(row.window.errors)
    total = sum(len(row.window.latencies) for row in rows)
    latencies = Window(latencies=[x for row in rows for x in row.window.latencies])
    print(f"\ncapacity {capacity:,.0f} req/s; soak at {rate:,.0f} req/s for {len(rows)} min: "
          f"{total:,} requests, p50 {latencies.percentile(50):.2f} ms, "
          f"p99 {latencies.percentile(99):.2f} ms")
    verdicts: list[bool] = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        mark = "PASS" if ok else ("n/a " if ok is None else "FAIL")
        print(f"  [{mark}] {label}: {detail}")
        if ok is not None:
            verdicts.append(ok)

    check("no errors", not errors, f"{sum(errors.values())} errors"
          + (f" {dict(errors)}" if errors else ""))
    for kind, message in samples.items():
        print(f"         first {kind}: {message}")
    if len(rows) < 2:
        check("RSS growth after warm-up", None, "needs --minutes 2 or more")
    else:
        for name in PROCESSES:
            start, end = rows[0].rss.get(name), rows[-1].rss.get(name)
            if start is None or end is None:
                check(f"{name} RSS growth < {TARGET_RSS_GROWTH:.0%} after warm-up", False,
                      "the process is gone")
                continue
            growth = (end - start) / start
            peak = max(r.rss.get(name) or 0.0 for r in rows[1:])
            check(f"{name} RSS growth < {TARGET_RSS_GROWTH:.0%} after warm-up",
                  growth < TARGET_RSS_GROWTH,
                  f"{start:.1f} -> {end:.1f} MiB ({growth:+.1%}; peak {peak:.1f} MiB; "
                  f"minute 1 -> {len(rows)})")
        first, last = rows[0].redis_used, rows[-1].redis_used
        if first and last:  # tells a leak (data) from allocator fragmentation (RSS only)
            print(f"         redis data (used_memory): {first:.1f} -> {last:.1f} MiB "
                  f"({(last - first) / first:+.1%})")
    return all(verdicts)


# --- main ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10, help="minutes of load (default 10)")
    parser.add_argument("--load", type=float, default=0.5,
                        help="share of the measured capacity to soak at (default 0.5)")
    parser.add_argument("--rate", type=float, default=None,
                        help="req/s to soak at, instead of measuring the capacity")
    parser.add_argument("--capacity-seconds", type=float, default=10.0,
                        help="seconds of the capacity measurement (default 10)")
    parser.add_argument("--async-share", type=float, default=0.2,
                        help="share of async executes (default 0.2)")
    parser.add_argument("--subscribers", type=int, default=3,
                        help="event stream subscribers (default 3)")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="client connections at most (default 256)")
    parser.add_argument("--python", default=None,
                        help="interpreter for relay (default: .venv/bin/python)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (relay's log)")
    args = parser.parse_args(argv)
    if args.minutes < 1:
        parser.error("--minutes must be 1 or more")
    return args


async def run(args: argparse.Namespace, port: int, key: str, pids: dict[str, int],
              redis_socket: Path, alive: Callable[[], None],
              ) -> tuple[list[Minute], float, float, dict[str, str]]:
    """Measure the capacity, then soak; returns the minutes, the capacity, the rate and the
    first message of each kind of error."""
    http = Http("127.0.0.1", port, {"X-API-Key": key}, args.max_connections)
    load = Load(http, "127.0.0.1", port, key)
    capacity = 0.0
    if args.rate is None:
        await load.closed_loop(16, 2.0)  # warm-up: connections, caches, the first allocations
        measured = await load.closed_loop(16, args.capacity_seconds)
        capacity = len(measured.latencies) / args.capacity_seconds
        print(f"capacity: {capacity:,.0f} req/s (sync, 16 connections, "
              f"{args.capacity_seconds:.0f} s): p50 {measured.percentile(50):.2f} ms, "
              f"p99 {measured.percentile(99):.2f} ms, errors {measured.error_count}"
              + (f" {dict(measured.errors)}" if measured.errors else ""), flush=True)
        if measured.error_count or capacity <= 0:
            raise RuntimeError("the capacity measurement had errors: not soaking")
    rate = args.rate or capacity * args.load
    http.close()

    stop = asyncio.Event()
    subscribers = [asyncio.create_task(load.subscribe(i, stop)) for i in range(args.subscribers)]
    deadline = time.monotonic() + 10
    while load.subscribed < args.subscribers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {load.subscribed} of {args.subscribers} event streams "
                               "opened within 10 s")
        await asyncio.sleep(0.05)
    load.window = Window()
    print(f"soak: {rate:,.0f} req/s ({args.async_share:.0%} async), {args.subscribers} event "
          f"stream subscribers, {args.minutes} min; pids {pids}", flush=True)
    print_minute_header()
    rows: list[Minute] = []
    last = time.perf_counter()
    cpu_before = cpu_seconds(pids)

    async def close_minute(elapsed: float) -> None:
        nonlocal last, cpu_before
        load.expire_async(ASYNC_DEADLINE_S)
        now = time.perf_counter()
        cpu_now = cpu_seconds(pids)
        row = Minute(len(rows) + 1, load.window, now - last,
                     {name: rss_mib(pid) for name, pid in pids.items()},
                     redis_used_mib(redis_socket),
                     {name: (cpu_now[name] - cpu_before.get(name, 0.0)) / (now - last)
                      for name in cpu_now})
        cpu_before = cpu_now
        load.window, last = Window(), now
        rows.append(row)
        print_minute(row)
        alive()

    await load.open_loop(rate, args.minutes * 60.0, args.async_share, close_minute,
                         max_in_flight=4 * args.max_connections)
    # The last minute's stragglers, then the async ends still on their way.
    for _ in range(150):  # up to 15 s
        if not load.pending:
            break
        await asyncio.sleep(0.1)
    load.expire_async(0.0)
    if load.window.latencies or load.window.error_count:
        rows[-1].window.latencies += load.window.latencies
        rows[-1].window.errors.update(load.window.errors)
    stop.set()
    for task in subscribers:
        task.cancel()
    await asyncio.gather(*subscribers, return_exceptions=True)
    http.close()
    return rows, capacity, rate, load.samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = common.pick_python(args.python)
    budget = 180 + args.capacity_seconds + args.minutes * 60 + REQUEST_TIMEOUT_S
    common.arm_deadline(budget)
    work_dir = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    data_dir = work_dir / "relay-data"
    children: list[common.Child] = []
    pids: dict[str, int] = {}
    passed = False
    try:
        base_env = common.clean_env()
        base_env.update(PYTHONUNBUFFERED="1")
        relay, key, port = common.start_relay_dev("relay", python, base_env, data_dir, "soak",
                                                  SOAK_ENV, work_dir, children)
        url = f"http://127.0.0.1:{port}"
        common.wait_relay_ready(relay, url)
        pids = {"gateway": relay.process.pid, **common.find_pids(relay.process.pid)}
        missing = [name for name in PROCESSES if name not in pids]
        if missing:
            raise RuntimeError(f"could not find the {missing} process of relay dev: {pids}")
        print(f"relay dev on {url}; {' '.join(f'{k}={v}' for k, v in SOAK_ENV.items())}",
              flush=True)

        def alive() -> None:
            gone = [name for name, pid in pids.items() if rss_mib(pid) is None]
            if gone or relay.process.poll() is not None:
                raise RuntimeError(f"{gone or ['relay dev']} exited during the soak; relay's "
                                   f"log ends:\n{relay.log_tail()}")

        try:
            import uvloop
            runner: Callable[..., Any] = uvloop.run
        except ImportError:
            runner = asyncio.run
        rows, capacity, rate, samples = runner(
            run(args, port, key, pids, data_dir / "redis" / "redis.sock", alive))
        passed = report(rows, capacity, rate, samples)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except (common.Deadline, RuntimeError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        common.begin_cleanup(children)
        common.shutdown_redis(data_dir / "redis" / "redis.sock")
        if "redis" in pids:
            common.kill_leftover(pids["redis"], "redis", grace_s=3.0)
        common.end_cleanup(work_dir, args.keep)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 2


if __name__ == "__main__":
    sys.exit(main())
