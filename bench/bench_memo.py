#!/usr/bin/env python3
"""Benchmark a memo hit against an execution of the same request and an idempotent replay.

One `relay dev` (its own embedded Redis in a fresh data directory) with the rate limiter off
and no access log. Its calculator's `add(2, 3)`, sync, at c=1, over one keep-alive connection,
--requests of each kind after --warmup, the kinds interleaved request by request (so drift on a
shared machine hits them alike):

- `execution`: a new execution every time (a unique `idempotency_key`, no `memoize`);
- `memo hit`: `"memoize": true` with a unique `idempotency_key`, answered from the one stored
  run (each checked: `cached: true`);
- `replay`: the same `idempotency_key` again (`Idempotent-Replayed: true`).

Prints p50, p90 and p99 of each, and the hit's p50 over the replay's (target: a hit costs no
more than an idempotent replay; printed, not enforced).

Run from the project root:  .venv/bin/python bench/bench_memo.py [--requests 2000]
Runs with the project's virtualenv (httpx).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import (
    Child,
    Deadline,
    arm_deadline,
    begin_cleanup,
    clean_env,
    end_cleanup,
    pick_python,
    shutdown_redis,
    start_relay_dev,
    wait_relay_ready,
)

RELAY_ENV = {"RELAY_RATE_LIMIT": "0", "RELAY_ACCESS_LOG": "0"}
REQUEST = {"cid": "glyph://calculator@quantum", "entrypoint": "add", "inputs": [2, 3]}


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run(client: httpx.Client, requests: int, warmup: int) -> dict[str, list[float]]:
    """Latencies (ms) of each kind, interleaved; the first `warmup` of each are dropped."""
    produced = client.post("/intent/execute-wasm", json={**REQUEST, "memoize": True,
                                                          "idempotency_key": "producer"})
    assert produced.status_code == 200 and produced.json()["cached"] is False, produced.text
    times: dict[str, list[float]] = {"execution": [], "memo hit": [], "replay": []}
    for n in range(requests + warmup):
        bodies = {
            "execution": {**REQUEST, "idempotency_key": f"run-{n}"},
            "memo hit": {**REQUEST, "memoize": True, "idempotency_key": f"hit-{n}"},
            "replay": {**REQUEST, "memoize": True, "idempotency_key": "producer"},
        }
        for kind, body in bodies.items():
            started = time.perf_counter()
            response = client.post("/intent/execute-wasm", json=body)
            elapsed = (time.perf_counter() - started) * 1000
            assert response.status_code == 200, response.text
            if kind == "memo hit":
                assert response.json()["cached"] is True, response.text
            if kind == "replay":
                assert response.headers.get("idempotent-replayed") == "true"
            if n >= warmup:
                times[kind].append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="of each kind")
    parser.add_argument("--warmup", type=int, default=200, help="of each kind, not counted")
    parser.add_argument("--python", help="interpreter for relay (default: .venv/bin/python)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    arm_deadline(120 + (args.requests + args.warmup) * 3 * 0.05)
    work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-memo-"))
    data_dir = work_dir / "data"
    children: list[Child] = []
    try:
        env = {**clean_env(), "RELAY_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        child, key, port = start_relay_dev("relay", pick_python(args.python), env, data_dir,
                                           "bench", RELAY_ENV, work_dir, children)
        url = f"http://127.0.0.1:{port}"
        wait_relay_ready(child, url)
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as client:
            times = run(client, args.requests, args.warmup)
        print(f"relay dev on {url}; {args.requests} sync requests of each kind at c=1, "
              "interleaved, one keep-alive connection")
        for kind, samples in times.items():
            print(f"  {kind:<10} p50 {percentile(samples, 50):6.2f} ms  p90 "
                  f"{percentile(samples, 90):6.2f} ms  p99 {percentile(samples, 99):6.2f} ms  "
                  f"mean {statistics.fmean(samples):6.2f} ms")
        hit, replay = percentile(times["memo hit"], 50), percentile(times["replay"], 50)
        execution = percentile(times["execution"], 50)
        print(f"memo hit p50 / replay p50: {hit / replay:.2f} (target <= 1.0); "
              f"/ execution p50: {hit / execution:.2f}")
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except (Deadline, RuntimeError, AssertionError, httpx.HTTPError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        begin_cleanup(children)
        shutdown_redis(data_dir / "redis" / "redis.sock")
        end_cleanup(work_dir, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
