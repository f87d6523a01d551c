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

Reported: both wall times, their ratio (target <= 1.3), and the scheduling overhead per node,
(pipeline - independent) / nodes (target <= 1 ms). The pipeline's nodes wait for each other
(a chain of depth 1000/width per column), the independent executions do not, so the ratio
counts the dependencies' cost too.

Run from the project root:  .venv/bin/python bench/bench_pipelines.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import (
    Child,
    begin_cleanup,
    clean_env,
    end_cleanup,
    pick_python,
    start_relay_dev,
    wait_relay_ready,
)

ADD_WAT = """(module (func (export "main") (param i32 i32) (result i32)
  local.get 0 local.get 1 i32.add))"""
RELAY_ENV = {"RELAY_RATE_LIMIT": "0", "RELAY_ACCESS_LOG": "0", "RELAY_LOG_LEVEL": "WARNING"}


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


async def pipeline(http: httpx.AsyncClient, cid: str, nodes: int, width: int) -> float:
    depth = nodes // width
    body: dict[str, Any] = {"max_concurrency": width, "nodes": []}
    for d in range(depth):
        for w in range(width):
            inputs: list[Any] = [0, 1] if d == 0 else [{"$ref": f"n{d - 1}_{w}"}, 1]
            body["nodes"].append({"id": f"n{d}_{w}", "cid": cid, "inputs": inputs,
                                  "memoize": False})  # runs, every round
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
    return elapsed


async def measure(url: str, key: str, rounds: int, nodes: int, width: int) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=120,
                                 limits=httpx.Limits(max_connections=width + 4)) as http:
        cid = (await http.post("/modules", content=ADD_WAT.encode())).json()["cid"]
        await independent(http, cid, 100, width)  # warm-up: compiled module, connections
        results: dict[str, list[float]] = {"independent": [], "pipeline": []}
        for round_ in range(rounds):
            order = ["independent", "pipeline"] if round_ % 2 == 0 else ["pipeline",
                                                                          "independent"]
            for name in order:
                run = independent if name == "independent" else pipeline
                results[name].append(await run(http, cid, nodes, width))
                print(f"round {round_ + 1} {name}: {results[name][-1]:.2f} s", flush=True)
        alone = statistics.median(results["independent"])
        graph = statistics.median(results["pipeline"])
        print(f"\n{nodes} nodes, width {width}, depth {nodes // width}, median of {rounds}:")
        print(f"  independent executions  {alone:.2f} s  ({1000 * alone / nodes:.2f} ms each)")
        print(f"  pipeline                {graph:.2f} s  ({1000 * graph / nodes:.2f} ms a node)")
        print(f"  ratio                   {graph / alone:.2f}x   (target <= 1.3)")
        print(f"  overhead per node       {1000 * (graph - alone) / nodes:.2f} ms "
              "(target <= 1 ms)")


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
        asyncio.run(measure(url, key, args.rounds, args.nodes, args.width))
    finally:
        begin_cleanup(children)
        end_cleanup(work_dir, args.keep)


if __name__ == "__main__":
    main()
