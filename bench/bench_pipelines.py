#!/usr/bin/env python3
"""Benchmark a pipeline against the same executions submitted independently, on one `relay dev`.

One `relay dev` (gateway + one executor process, its own embedded Redis in a fresh data
directory) with the rate limiter off and no access log. One module, `add(a, b)`. Then, each
--rounds times (medians reported), in alternating order:

- `independent`: 1,000 `POST /intent/execute-wasm` of `add(i, 1)` (unique idempotency keys),
  sync, --width at a time: the wall time until the last answered;
- `pipeline`: one `POST /pipelines` of 1,000 nodes, --width wide and 1000/width deep (node
  (d, w) adds 1 to node (d-1, w)'s output), `max_concurrency` = --width: the wall time from the
  POST until `GET /pipelines` says it completed (polled every 10 ms), and the check that every
  last-layer node's output is its depth.

Reported: both wall times, their ratio (target <= 1.3), their difference per node, the
gateway's CPU time per node of each (the `relay dev` process, which runs the scheduler; its
executor is a process of its own), and the scheduling overhead per node (target <= 1 ms):
for each node with a reference, the time from
its reference's completion (the `wasm_exec_completed` entry of the node it refers to) to its
own `execution_queued`, read from the events stream in Redis (when Redis appended each entry:
its id, in whole milliseconds), p50, p99 and mean. The pipeline's nodes wait for each other (a
chain of depth 1000/width per column), the independent executions do not, so the ratio counts
the dependencies' cost too.

Run from the project root:  .venv/bin/python bench/bench_pipelines.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from common import (
    Child,
    begin_cleanup,
    clean_env,
    cpu_seconds,
    end_cleanup,
    pick_python,
    shutdown_redis,
    start_relay_dev,
    wait_relay_ready,
)

ADD_WAT = """(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.add))"""
RELAY_ENV = {"RELAY_RATE_LIMIT": "0", "RELAY_ACCESS_LOG": "0", "RELAY_LOG_LEVEL": "WARNING"}
EVENTS = "relay:events"
"""The events stream under `relay dev`'s default RELAY_STREAM_PREFIX."""


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def independent(http: httpx.AsyncClient, cid: str, nodes: int, width: int) -> float:
    semaphore = asyncio.Semaphore(width)
    tag = secrets.token_hex(4)

    async def one(i: int) -> None:
        async with semaphore:
            response = await http.post("/intent/execute-wasm", json={
                "cid": cid, "inputs": [i, 1], "idempotency_key": f"{tag}-{i}"})
            assert response.status_code == 200 and response.json()["success"], response.text

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(nodes)))
    return time.perf_counter() - started


async def pipeline(http: httpx.AsyncClient, events: aioredis.Redis, cid: str, nodes: int,
                   width: int) -> tuple[float, list[float]]:
    """The wall time, and each referring node's wait (ms) from its reference's completion to
    its own `execution_queued`."""
    depth = nodes // width
    body: dict[str, Any] = {"max_concurrency": width, "nodes": []}
    for d in range(depth):
        for w in range(width):
            inputs: list[Any] = [0, 1] if d == 0 else [{"$ref": f"n{d - 1}_{w}"}, 1]
            body["nodes"].append({"id": f"n{d}_{w}", "cid": cid, "inputs": inputs,
                                  "memoize": False})  # runs, every round
    since = f"{int(time.time() * 1000) - 1}-0"  # the stream's ids are Redis's clock, in ms
    started = time.perf_counter()
    response = await http.post("/pipelines", json=body)
    assert response.status_code == 202, response.text
    pipeline_id = response.json()["pipeline_id"]
    while True:
        page = (await http.get("/pipelines", params={"limit": 5})).json()
        status = next(p["status"] for p in page["items"] if p["pipeline_id"] == pipeline_id)
        if status != "running":
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    view = (await http.get(f"/pipelines/{pipeline_id}")).json()
    assert view["status"] == "completed", view["progress"]
    assert all(view["nodes"][f"n{depth - 1}_{w}"]["output"] == depth for w in range(width))
    node_of = {state["request_id"]: name for name, state in view["nodes"].items()}
    completed: dict[str, int] = {}
    queued: dict[str, int] = {}
    for entry_id, fields in await events.xrange(EVENTS, min=since):
        data = fields[b"data"]
        if pipeline_id.encode() not in data:
            continue
        event = json.loads(data)
        name = node_of.get(event.get("request_id", ""))
        if name is None:
            continue
        appended_ms = int(entry_id.split(b"-")[0])
        if event["type"] == "wasm_exec_completed":
            completed[name] = appended_ms
        elif event["type"] == "execution_queued":
            queued[name] = appended_ms
    waits = [float(queued[f"n{d}_{w}"] - completed[f"n{d - 1}_{w}"])
             for d in range(1, depth) for w in range(width)]
    return elapsed, waits


async def measure(url: str, key: str, redis_socket: Path, gateway_pid: int, rounds: int,
                  nodes: int, width: int) -> None:
    events = aioredis.Redis(unix_socket_path=str(redis_socket))
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=120,
                                 limits=httpx.Limits(max_connections=width + 4)) as http:
        cid = (await http.post("/modules", content=ADD_WAT.encode())).json()["cid"]
        await independent(http, cid, 100, width)  # warm-up: compiled module, connections
        results: dict[str, list[float]] = {"independent": [], "pipeline": []}
        cpu: dict[str, list[float]] = {"independent": [], "pipeline": []}
        waits: list[float] = []
        for round_ in range(rounds):
            order = ["independent", "pipeline"] if round_ % 2 == 0 else ["pipeline",
                                                                          "independent"]
            for name in order:
                cpu_before = cpu_seconds(gateway_pid)
                if name == "independent":
                    results[name].append(await independent(http, cid, nodes, width))
                else:
                    elapsed, round_waits = await pipeline(http, events, cid, nodes, width)
                    results[name].append(elapsed)
                    waits += round_waits
                cpu[name].append(cpu_seconds(gateway_pid) - cpu_before)
                print(f"round {round_ + 1} {name}: {results[name][-1]:.2f} s, gateway CPU "
                      f"{cpu[name][-1]:.2f} s", flush=True)
        alone = statistics.median(results["independent"])
        graph = statistics.median(results["pipeline"])
        print(f"\n{nodes} nodes, width {width}, depth {nodes // width}, median of {rounds}:")
        print(f"  independent executions  {alone:.2f} s  ({1000 * alone / nodes:.2f} ms each)")
        print(f"  pipeline                {graph:.2f} s  ({1000 * graph / nodes:.2f} ms a node)")
        print(f"  ratio                   {graph / alone:.2f}x   (target <= 1.3)")
        print(f"  wall difference a node  {1000 * (graph - alone) / nodes:.2f} ms")
        cpu_alone = 1000 * statistics.median(cpu["independent"]) / nodes
        cpu_graph = 1000 * statistics.median(cpu["pipeline"]) / nodes
        print(f"  gateway CPU a node      independent {cpu_alone:.2f} ms, pipeline "
              f"{cpu_graph:.2f} ms")
        print(f"  scheduling overhead     p50 {percentile(waits, 50):.0f} ms, p99 "
              f"{percentile(waits, 99):.0f} ms, mean {statistics.fmean(waits):.2f} ms "
              f"(target <= 1 ms; {len(waits)} nodes' reference completion to their "
              "execution_queued, in whole ms)")
    await events.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--python", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-pipelines-"))
    children: list[Child] = []
    try:
        child, key, port = start_relay_dev("relay-dev", pick_python(args.python), clean_env(),
                                           work_dir / "data", "bench", RELAY_ENV, work_dir,
                                           children)
        url = f"http://127.0.0.1:{port}"
        wait_relay_ready(child, url)
        asyncio.run(measure(url, key, work_dir / "data" / "redis" / "redis.sock", child.pid,
                            args.rounds, args.nodes, args.width))
    finally:
        begin_cleanup(children)
        shutdown_redis(work_dir / "data" / "redis" / "redis.sock")
        end_cleanup(work_dir, args.keep)


if __name__ == "__main__":
    main()
