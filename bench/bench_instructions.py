#!/usr/bin/env python3
"""Instructions per sync execute, process by process, counted by valgrind's callgrind: a
measure of CPU cost that a shared, noisy machine does not move, for comparing two checkouts.

`relay dev` (the `relay` target of bench_execute.py: rate limiter counting, access log on) runs
under callgrind, its executor and embedded Redis too (`--gateway-only`: only the gateway; the
others run natively and keep their pace). For each checkout in turn, every round: a warm-up
load, then the instructions of 5 s with no load (timers, heartbeats: subtracted at that rate),
then `--seconds` of wrk at `--concurrency`, every request with a unique idempotency key.
Counters are zeroed and dumped with `callgrind_control`. It prints, per checkout and process,
thousands of instructions per request, net of the idle rate: every round and the median, and
B/A when two checkouts are given.

Callgrind runs a process some 50 times slower, so the processes' balance and their batches are
not those of a native run: read the figures as what a request costs each process, to compare
checkouts, not as a forecast of throughput (bench_execute.py measures that).

Run from the project root (valgrind installed; wrk too, else the asyncio client):
  .venv/bin/python bench/bench_instructions.py                       # this checkout
  git worktree add --detach /tmp/before HEAD~1
  .venv/bin/python bench/bench_instructions.py --root-a /tmp/before  # A = before, B = this one
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_execute import Loader, Target, root_env, start_relay, verify, wait_relay
from common import ROOT, Child, begin_cleanup, clean_env, end_cleanup, pick_python, shutdown_redis

PROCESSES = ("gateway", "redis", "executor")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root-a", type=Path, default=None,
                        help="checkout A (default: this one; with --root-b, B is this one)")
    parser.add_argument("--root-b", type=Path, default=None, help="checkout B")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=12.0, help="load counted per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gateway-only", action="store_true",
                        help="only the gateway under callgrind")
    parser.add_argument("--python", default=None, help="interpreter (default .venv/bin/python)")
    return parser.parse_args(argv)


def wrapper(directory: Path, python: str, gateway_only: bool) -> Path:
    """An executable that runs `python` under callgrind (with its children, unless
    `gateway_only`), one output file per process in `directory`."""
    children = "no" if gateway_only else "yes"
    script = directory / "python-under-callgrind"
    script.write_text(
        "#!/bin/sh\n"
        f"exec valgrind --tool=callgrind --trace-children={children} --dump-instr=no "
        f"--callgrind-out-file={directory}/callgrind.%p {python} \"$@\"\n")
    script.chmod(0o755)
    return script


def counted(target: Target, names: tuple[str, ...], directory: Path,
            work: Callable[[], Any]) -> tuple[dict[str, int], float, Any]:
    """Instructions each of `names` runs while `work()` does, the seconds it took, and what it
    returned."""
    pids = {name: target.pids[name] for name in names}
    for pid in pids.values():
        subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True)
    began = time.monotonic()
    returned = work()
    elapsed = time.monotonic() - began
    counts = {}
    for name, pid in pids.items():
        before = set(directory.glob(f"callgrind.{pid}*"))
        subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
        dumps = sorted(set(directory.glob(f"callgrind.{pid}*")) - before, key=os.path.getmtime)
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump for {name} (pid {pid})")
        found = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(errors="replace"),
                          re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no instruction count in {dumps[-1]}")
        counts[name] = int(found.group(1))
    return counts, elapsed, returned


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 1
    roots = [args.root_a or ROOT] + ([args.root_b or ROOT] if args.root_b or args.root_a else [])
    labels = "AB"[:len(roots)]
    names = ("gateway",) if args.gateway_only else PROCESSES
    python = pick_python(args.python)
    work_dir = Path(tempfile.mkdtemp(prefix="relay-instructions-"))
    children: list[Child] = []
    targets: dict[str, tuple[Target, Path]] = {}
    figures: dict[str, dict[str, list[float]]] = {label: {n: [] for n in names}
                                                  for label in labels}
    try:
        for label, root in zip(labels, roots, strict=True):
            directory = work_dir / label
            directory.mkdir()
            env = {k: v for k, v in clean_env().items() if k != "PYTHONDONTWRITEBYTECODE"}
            env.update(RELAY_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
            env.update(root_env(python, Path(root).resolve()))
            child, data_dir, key, port = start_relay(
                "relay", str(wrapper(directory, python, args.gateway_only)), env, directory,
                children)
            targets[label] = (wait_relay(child, port, data_dir, key), directory)
            verify(targets[label][0])
            print(f"{label}: relay from {root} (pids {targets[label][0].pids})", flush=True)
        loader = Loader("auto", work_dir)
        for round_index in range(args.rounds):
            order = labels if round_index % 2 == 0 else labels[::-1]
            for label in order:
                target, directory = targets[label]
                loader.load(target, args.concurrency, 3)  # warm-up
                idle, idle_s, _ = counted(target, names, directory,
                                          functools.partial(time.sleep, 5))
                load, load_s, result = counted(target, names, directory, functools.partial(
                    loader.load, target, args.concurrency, args.seconds))
                requests = result["requests"]
                parts = []
                for name in names:
                    net = (load[name] - idle[name] / idle_s * load_s) / requests / 1000
                    figures[label][name].append(net)
                    parts.append(f"{name} {net:,.0f}k")
                print(f"  {label} round {round_index + 1}: {requests} requests; instructions "
                      f"a request: {', '.join(parts)}", flush=True)
        print(f"\nthousands of instructions per sync execute, net of idle, c={args.concurrency}"
              f" (median of {args.rounds} rounds):")
        for label in labels:
            medians = {n: statistics.median(v) for n, v in figures[label].items()}
            print(f"  {label}: " + ", ".join(f"{n} {m:,.0f}k" for n, m in medians.items())
                  + f"; total {sum(medians.values()):,.0f}k")
        if len(labels) == 2:
            print("  B/A: " + ", ".join(
                f"{n} {statistics.median(figures['B'][n]) / statistics.median(figures['A'][n]):.3f}"
                for n in names))
    except KeyboardInterrupt:
        return 130
    finally:
        begin_cleanup(children)
        for _, directory in targets.values():
            shutdown_redis(directory / "relay-data" / "redis" / "redis.sock")
        end_cleanup(work_dir, False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
