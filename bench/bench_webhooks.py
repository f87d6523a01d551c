#!/usr/bin/env python3
"""Benchmark webhook deliveries, and what callbacks cost execute, on one `relay dev`.

One `relay dev` (gateway with its deliverer + one executor process, its own embedded Redis in
a fresh data directory), the rate limiter off, no access log, http and loopback targets
allowed. A receiver in this process (a bare asyncio HTTP/1.1 server answering 204 to every
POST) notes when each delivery arrives. Then, each --rounds times (medians reported), in
alternating order:

- `plain`: --count sync `POST /intent/execute-wasm` of `add(i, 1)` (unique idempotency keys),
  --width at a time: executes per second until the last is answered;
- `callbacks`: the same with `callback_url` (the default events: the terminal one): executes
  per second as above, then the wait until the receiver has all --count deliveries;
  deliveries per second from the first execute sent to the last delivery received.

Then once: --count executes with callbacks while the receiver holds its answers, and the rate
at which the backlog is delivered once it answers again (deliveries alone, nothing else
running).

Reported: both execute rates, their ratio (target: callbacks at most 10 % slower), the
gateway's CPU time per execute of each (the `relay dev` process, which runs the deliverer; its
executor is a process of its own), and the delivery rate.

Run from the project root:  .venv/bin/python bench/bench_webhooks.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from common import (
    Child,
    begin_cleanup,
    clean_env,
    cpu_seconds,
    end_cleanup,
    pick_python,
    start_relay_dev,
    wait_relay_ready,
)

ADD_WAT = """(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.add))"""
RELAY_ENV = {"RELAY_RATE_LIMIT": "0", "RELAY_ACCESS_LOG": "0", "RELAY_LOG_LEVEL": "WARNING",
             "RELAY_WEBHOOK_ALLOW_HTTP": "1", "RELAY_WEBHOOK_ALLOW_PRIVATE": "1"}


class Receiver:
    """A minimal HTTP/1.1 server: reads each request (headers, Content-Length body), answers
    204, keeps the connection; notes arrival times."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.ids: set[str] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.answering = asyncio.Event()
        """Cleared: requests are read but not answered (deliveries pile up behind them)."""
        self.answering.set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"webhook-id":
                        self.ids.add(value.strip().decode())
                await reader.readexactly(length)
                await self.answering.wait()
                self.arrivals.append(time.perf_counter())
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


def client(url: str, key: str, width: int) -> httpx.AsyncClient:
    # A fresh one for each run: the gateway closes connections idle for 5 s (uvicorn's
    # keep-alive), which waiting for deliveries between runs would leave in a shared pool.
    return httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=120,
                             limits=httpx.Limits(max_connections=width + 4))


async def executes(url: str, key: str, cid: str, count: int, width: int,
                   callback: str | None) -> float:
    semaphore = asyncio.Semaphore(width)
    tag = secrets.token_hex(4)
    extra = {"callback_url": callback} if callback else {}

    async with client(url, key, width) as http:
        async def one(i: int) -> None:
            body = {"cid": cid, "inputs": [i, 1], "idempotency_key": f"{tag}-{i}", **extra}
            async with semaphore:
                try:
                    response = await http.post("/intent/execute-wasm", json=body)
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    # A kept-alive connection the gateway closed as it was reused (uvicorn's
                    # 5 s keep-alive): sent again, the same key, so it runs once.
                    response = await http.post("/intent/execute-wasm", json=body)
                assert response.status_code == 200 and response.json()["success"], (
                    response.text)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - started


async def measure(url: str, key: str, gateway_pid: int, rounds: int, count: int,
                  width: int) -> None:
    receiver = Receiver()
    await receiver.start()
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    async with client(url, key, width) as http:
        cid = (await http.post("/modules", content=ADD_WAT.encode())).json()["cid"]
    await executes(url, key, cid, 100, width, hook)  # warm-up: module, connections, secret
    await wait_deliveries(receiver, 100)
    rates: dict[str, list[float]] = {"plain": [], "callbacks": []}
    cpu: dict[str, list[float]] = {"plain": [], "callbacks": []}
    delivery_rates: list[float] = []
    for round_ in range(rounds):
        order = ["plain", "callbacks"] if round_ % 2 == 0 else ["callbacks", "plain"]
        for name in order:
            before = len(receiver.arrivals)
            cpu_before = cpu_seconds(gateway_pid)
            started = time.perf_counter()
            elapsed = await executes(url, key, cid, count, width,
                                     hook if name == "callbacks" else None)
            rates[name].append(count / elapsed)
            line = f"round {round_ + 1} {name}: {count / elapsed:.0f} executes/s"
            if name == "callbacks":
                await wait_deliveries(receiver, before + count)
                last = receiver.arrivals[before + count - 1]
                delivery_rates.append(count / (last - started))
                line += (f", all delivered {last - started:.2f} s after the first execute "
                         f"({delivery_rates[-1]:.0f} deliveries/s)")
            cpu[name].append((cpu_seconds(gateway_pid) - cpu_before) / count * 1e6)
            line += f"; gateway CPU {cpu[name][-1]:.0f} µs an execute"
            print(line, flush=True)
    # The backlog: deliveries held while the executes run, then sent with nothing else to do.
    receiver.answering.clear()
    before = len(receiver.arrivals)
    await executes(url, key, cid, count, width, hook)
    await asyncio.sleep(1.0)  # every delivery queued (the deliverer reads every 100 ms)
    released = time.perf_counter()
    receiver.answering.set()
    await wait_deliveries(receiver, before + count)
    drain = count / (receiver.arrivals[-1] - released)
    plain = statistics.median(rates["plain"])
    hooked = statistics.median(rates["callbacks"])
    print(f"\n{count} executes, {width} at a time, median of {rounds}:")
    print(f"  without callbacks  {plain:.0f} executes/s")
    print(f"  with callbacks     {hooked:.0f} executes/s  ({100 * (1 - hooked / plain):.1f} % "
          "slower; target <= 10 %)")
    print(f"  gateway CPU        {statistics.median(cpu['plain']):.0f} µs an execute without, "
          f"{statistics.median(cpu['callbacks']):.0f} µs with its delivery")
    print(f"  deliveries         {statistics.median(delivery_rates):.0f} /s  "
          f"(every one received: {len(receiver.ids)} distinct webhook-ids)")
    print(f"  backlog of {count}   {drain:.0f} deliveries/s (sent after the executes, the "
          "gateway otherwise idle)")
    assert receiver.server is not None
    receiver.server.close()


async def wait_deliveries(receiver: Receiver, total: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(receiver.arrivals) < total:
        assert time.monotonic() < deadline, "deliveries missing"
        await asyncio.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--python", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    children: list[Child] = []
    try:
        child, key, port = start_relay_dev("relay-dev", pick_python(args.python), clean_env(),
                                           work_dir / "data", "bench", RELAY_ENV, work_dir,
                                           children)
        url = f"http://127.0.0.1:{port}"
        wait_relay_ready(child, url)
        asyncio.run(measure(url, key, child.pid, args.rounds, args.count, args.width))
    finally:
        begin_cleanup(children)
        end_cleanup(work_dir, args.keep)


if __name__ == "__main__":
    main()
