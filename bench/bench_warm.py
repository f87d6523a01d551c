#!/usr/bin/env python3
"""Benchmark the first execution after an executor restart, without and with the disk cache of
compiled modules (issue 19, warm starts).

One embedded Redis and one `relay gateway` for the whole run; the modules uploaded once:

- `big`: a generated module of --functions functions (compiling it takes seconds);
- `json_sum`: the C-compiled WASI command of /work/shared/fixtures (about 110 KB);
- `add`: a one-instruction module.

Then --rounds rounds, each restarting a `relay executor` process once per mode, the order of
the modes alternating:

- `cold`: RELAY_MODULE_CACHE_BYTES=0 (no disk cache: every module is compiled on first use);
- `warm`: RELAY_MODULE_CACHE_DIR in the temp dir, filled once by an executor run before the
  rounds (so a restarted executor loads every module from disk).

Each restarted executor is waited for until its heartbeat is in Redis (it reads the bus then),
then each module is executed twice, sync (unique idempotency keys): the first execution's
latency is the figure (it includes the compile or the load), the second's shows what an
execution costs with the module in memory. The executor's own count of compiled and loaded
modules (`relay_module_compilations_total` on the gateway's /metrics) is checked: cold compiles
every module each round, warm none.

Prints, per module, the median first-execution latency cold and warm side by side, their ratio,
and the median second execution. Exit status 0, or 1 on error (130 on Ctrl-C).

Run from the project root:  .venv/bin/python bench/bench_warm.py [--rounds 5] [--functions 3000]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    Child,
    Deadline,
    arm_deadline,
    begin_cleanup,
    clean_env,
    end_cleanup,
    free_port,
    pick_python,
    start_executor,
    start_gateway,
)

sys.path.insert(0, str(ROOT))  # this checkout's relay, for the embedded Redis and wat2wasm

import httpx
import redis
import wasmtime

from relay.connection import EmbeddedRedis
from relay.keys import Keys

FIXTURES = ROOT.parent / "shared" / "fixtures"
PREFIX = "bench-warm"
EXECUTORS = Keys(PREFIX).executors
MODES = ("cold", "warm")


def big_module(functions: int) -> bytes:
    body = " ".join(f"local.get 0 i32.const {i} i32.mul local.get 1 i32.xor i32.add"
                    for i in range(16))
    funcs = "\n".join(f"(func $f{i} (param i32 i32) (result i32) local.get 0 {body})"
                      for i in range(functions))
    return bytes(wasmtime.wat2wasm(f"""(module {funcs}
      (func (export "main") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))"""))


def modules(functions: int) -> dict[str, tuple[bytes, dict[str, Any], Any]]:
    """name: (wasm, the request's fields but `cid`, the output expected)."""
    found = {"big": (big_module(functions), {"entrypoint": "main", "inputs": [2, 3]}, 5)}
    json_sum = FIXTURES / "json_sum.wasm"
    if json_sum.exists():
        found["json_sum"] = (json_sum.read_bytes(), {"inputs": [1, 2, 3]},
                             {"sum": 6, "count": 3})
    add = b'(module (func (export "main") (param i32 i32) (result i32) ' \
          b'local.get 0 local.get 1 i32.add))'
    found["add"] = (bytes(wasmtime.wat2wasm(add.decode())), {"inputs": [2, 3]}, 5)
    return found


def execute(client: httpx.Client, cid: str, fields: dict[str, Any], expected: Any) -> float:
    """One sync execution; its latency in ms."""
    body = {"cid": cid, **fields, "idempotency_key": secrets.token_hex(8)}
    started = time.perf_counter()
    response = client.post("/intent/execute-wasm", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    result = response.json()
    if response.status_code != 200 or not result.get("success") or result["output"] != expected:
        raise RuntimeError(f"execution of {cid} failed: {response.status_code} {response.text}")
    return elapsed


def compilations(client: httpx.Client) -> dict[str, int]:
    text = client.get("/metrics").text
    counts = {}
    for source in ("compiled", "disk"):
        line = f'relay_module_compilations_total{{source="{source}"}} '
        found = [row for row in text.splitlines() if row.startswith(line)]
        counts[source] = int(found[0].removeprefix(line)) if found else 0
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--functions", type=int, default=3000,
                        help="functions of the generated module `big`")
    parser.add_argument("--python", help="interpreter for the children (default: .venv's)")
    parser.add_argument("--max-time", type=float, default=900, help="whole run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    arm_deadline(args.max_time)
    python = pick_python(args.python)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    children: list[Child] = []
    embedded = EmbeddedRedis(work_dir / "redis")
    try:
        redis_url = embedded.start()
        key = secrets.token_urlsafe(24)
        port = free_port()
        base = {**clean_env(), "REDIS_URL": redis_url, "RELAY_STREAM_PREFIX": PREFIX,
                "RELAY_API_KEYS": f"bench:{key}", "RELAY_RATE_LIMIT": "0",
                "RELAY_ACCESS_LOG": "0", "RELAY_LOG_FORMAT": "text",
                "RELAY_MAX_MODULE_BYTES": str(64 << 20), "RELAY_DATA_DIR": str(work_dir)}
        _, client = start_gateway(python, port, base, work_dir, children, key, timeout_s=120)
        heartbeats = redis.Redis.from_url(redis_url)
        uploaded: dict[str, tuple[str, dict[str, Any], Any, int]] = {}
        for name, (wasm, fields, expected) in modules(args.functions).items():
            response = client.post("/modules", content=wasm)
            if response.status_code not in (200, 201):
                raise RuntimeError(f"upload of {name}: {response.status_code} {response.text}")
            uploaded[name] = (response.json()["cid"], fields, expected, len(wasm))
        envs = {
            "cold": {**base, "RELAY_MODULE_CACHE_BYTES": "0"},
            "warm": {**base, "RELAY_MODULE_CACHE_DIR": str(work_dir / "modules")},
        }
        # Fill the disk cache once: the warm rounds all find every module there.
        primer = start_executor("primer", python, envs["warm"], work_dir, children, heartbeats,
                                EXECUTORS)
        for cid, fields, expected, _ in uploaded.values():
            execute(client, cid, fields, expected)
        primer.stop()
        children.remove(primer)
        cache_bytes = sum(p.stat().st_size for p in (work_dir / "modules").glob("*.cwasm"))

        first: dict[tuple[str, str], list[float]] = {}
        again: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                before = compilations(client)
                child = start_executor(f"{mode}-{round_}", python, envs[mode], work_dir,
                                       children, heartbeats, EXECUTORS)
                for name, (cid, fields, expected, _) in uploaded.items():
                    first.setdefault((name, mode), []).append(
                        execute(client, cid, fields, expected))
                    again.setdefault((name, mode), []).append(
                        execute(client, cid, fields, expected))
                child.stop()  # flushes its metrics on the way out
                children.remove(child)
                after = compilations(client)
                made = {source: after[source] - before[source] for source in after}
                wanted = ({"compiled": len(uploaded), "disk": 0} if mode == "cold"
                          else {"compiled": 0, "disk": len(uploaded)})
                if made != wanted:
                    raise RuntimeError(f"round {round_} {mode}: modules made ready {made}, "
                                       f"expected {wanted}")
            print(f"round {round_ + 1}/{args.rounds}: "
                  + ", ".join(f"{name} {first[(name, 'cold')][-1]:.1f}/"
                              f"{first[(name, 'warm')][-1]:.1f} ms"
                              for name in uploaded), flush=True)

        print(f"\nFirst execution after an executor restart, median of {args.rounds} rounds "
              f"(cold: compiled; warm: loaded from RELAY_MODULE_CACHE_DIR, {cache_bytes:,} "
              f"bytes for {len(uploaded)} modules)\n")
        print("| module | wasm bytes | cold first | warm first | cold / warm | "
              "second execution (cold / warm) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (_, _, _, size) in uploaded.items():
            cold = statistics.median(first[(name, "cold")])
            warm = statistics.median(first[(name, "warm")])
            second = (statistics.median(again[(name, "cold")]),
                      statistics.median(again[(name, "warm")]))
            print(f"| {name} | {size:,} | {cold:.1f} ms | {warm:.1f} ms | {cold / warm:.1f}× | "
                  f"{second[0]:.1f} / {second[1]:.1f} ms |")
        return 0
    except (Deadline, RuntimeError) as exc:
        print(f"bench_warm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        begin_cleanup(children)
        embedded.stop()
        end_cleanup(work_dir, args.keep)


if __name__ == "__main__":
    sys.exit(main())
