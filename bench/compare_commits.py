#!/usr/bin/env python3
"""Compare two commits with `bench_execute.py`: c=1 p50 and c=16 req/s, before and after.

Each revision is checked out with `git worktree add --detach` in a temp dir. Every round runs
this checkout's `bench_execute.py` once per revision (`--only relay-core,relay --rounds 1
--root WORKTREE`), alternating the order (A B, B A, ...), so both see the machine in the same
states. The children use the same virtualenv; `--root` puts the worktree's code first on their
import path and checks that they imported relay from it. The measuring code (wrk or the asyncio
client, CPU and Redis counters) is the same for both: only relay differs.

It prints, per target and revision, the median over rounds and every round's figure, the ratio
after/before of the medians and the median of the per-round ratios (each round measures the two
revisions one right after the other), and whether both stay within `--tolerance` (5 %).
The worktrees and the temp dir are removed at the end, also on error and Ctrl-C.

Run from the project root:  .venv/bin/python bench/compare_commits.py [e082bef [HEAD]]
The stdlib is enough for this file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import raise_interrupt

BENCH = Path(__file__).resolve().parent / "bench_execute.py"
ROOT = BENCH.parent.parent

# (concurrency, metric, label, higher is better): the two figures the comparison is about.
CHECKED = ((1, "p50_ms", "c=1 p50 ms", False), (16, "rps", "c=16 req/s", True))
# Shown, not checked: where a difference would come from.
SHOWN = ((1, "rps", "c=1 req/s", True), (16, "p50_ms", "c=16 p50 ms", False),
         (16, "cpu:gateway", "c=16 gateway CPU µs/req", False),
         (16, "cpu:executor", "c=16 executor CPU µs/req", False))


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", nargs="?", default="e082bef", help="default e082bef")
    parser.add_argument("after", nargs="?", default="HEAD", help="default HEAD")
    parser.add_argument("--rounds", type=int, default=3, help="default 3")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of measured load per point (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="default 2")
    parser.add_argument("--targets", default="relay-core,relay",
                        help="bench_execute.py targets (default relay-core,relay)")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--python", default=None,
                        help="interpreter for the children (default: .venv/bin/python)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="default 0.05 (5 %%)")
    return parser.parse_args(argv)


def run_bench(worktree: Path, out: Path, log: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One bench_execute.py run against `worktree`; returns its JSON. Its output goes to `log`
    (printed if it fails)."""
    argv = [sys.executable, str(BENCH), "--only", args.targets, "--root", str(worktree),
            "--concurrency", "1,16", "--rounds", "1", "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--client", args.client, "--json", str(out)]
    if args.python:
        argv += ["--python", args.python]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait()
        except BaseException:
            # bench_execute.py stops what it started on SIGINT; then it is waited for.
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
            raise
    # 2: a target of bench_execute.py's own issues was missed; the figures still count.
    if returncode not in (0, 2) or not out.exists():
        raise RuntimeError(f"bench_execute.py failed ({returncode}) on {worktree}:\n"
                           f"{log.read_text(errors='replace')[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    if Path(result["root"]).resolve() != worktree.resolve():
        raise RuntimeError(f"bench_execute.py ran relay from {result['root']}, not {worktree}")
    return result


def value(point: dict[str, Any], metric: str) -> float:
    if metric.startswith("cpu:"):
        return float(point["cpu_us_per_request"].get(metric[4:], 0.0))
    return float(point[metric])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="relay-compare-"))
    worktrees: list[Path] = []
    try:
        revisions = []  # (label, sha, subject)
        for label, rev in (("before", args.before), ("after", args.after)):
            sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
            revisions.append((label, sha, git("log", "-1", "--format=%s", sha)[:70]))
        for label, sha, subject in revisions:
            worktree = work_dir / label
            git("worktree", "add", "--detach", str(worktree), sha)
            worktrees.append(worktree)
            print(f"{label:<6} {sha[:10]} {subject}")
        # figures[label][(target, concurrency)] = one JSON point per round
        figures: dict[str, dict[tuple[str, int], list[dict[str, Any]]]] = {
            label: {} for label, *_ in revisions}
        client = ""
        started = time.monotonic()
        for round_index in range(args.rounds):
            order = revisions if round_index % 2 == 0 else revisions[::-1]
            for label, *_ in order:
                out = work_dir / f"{label}-{round_index}.json"
                result = run_bench(work_dir / label, out, work_dir / f"{label}-{round_index}.log",
                                   args)
                client = result["client"]
                for point in result["points"]:
                    figures[label].setdefault((point["target"], point["concurrency"]),
                                              []).append(point)
                summary = "  ".join(
                    f"{p['target']} c={p['concurrency']} {p['rps']:.0f} req/s "
                    f"p50 {p['p50_ms']:.2f} ms" for p in result["points"])
                errors = sum(p["errors"] for p in result["points"])
                print(f"round {round_index + 1} {label:<6} {summary}  errors {errors}  "
                      f"[{time.monotonic() - started:.0f} s]", flush=True)

        before, after = revisions[0][0], revisions[1][0]
        print(f"\nbench_execute.py, sync POST /intent/execute-wasm; client {client}; "
              f"{args.duration:g} s per point after {args.warmup:g} s warm-up; {args.rounds} "
              f"rounds alternated; medians over rounds; ratio = after/before of the medians, "
              "paired = median of the per-round ratios")
        header = (f"{'target':<10} {'figure':<25} {'before':>9} {'after':>9} {'ratio':>7} "
                  f"{'paired':>7}  {'':<6} every round: before | after")
        print(header)
        print("-" * (len(header) + 20))
        within = True
        targets = sorted({t for t, _ in figures[before]}, key=args.targets.split(",").index)
        for target in targets:
            for concurrency, metric, name, higher_better in (*CHECKED, *SHOWN):
                a = [value(p, metric) for p in figures[before].get((target, concurrency), [])]
                b = [value(p, metric) for p in figures[after].get((target, concurrency), [])]
                if not a or not b:
                    continue
                ratio = statistics.median(b) / statistics.median(a)
                paired = statistics.median(y / x for x, y in zip(a, b, strict=True))
                verdict = ""
                if (concurrency, metric, name, higher_better) in CHECKED:
                    ok = (ratio >= 1 - args.tolerance if higher_better
                          else ratio <= 1 + args.tolerance)
                    within = within and ok
                    verdict = "ok" if ok else "WORSE"
                digits = 2 if metric == "p50_ms" else 0
                rounds = (" ".join(f"{x:.{digits}f}" for x in a) + " | "
                          + " ".join(f"{y:.{digits}f}" for y in b))
                print(f"{target:<10} {name:<25} {statistics.median(a):>9.{digits}f} "
                      f"{statistics.median(b):>9.{digits}f} {ratio:>7.3f} {paired:>7.3f}  "
                      f"{verdict:<6} {rounds}")
        errors = sum(p["errors"] for per in figures.values() for points in per.values()
                     for p in points)
        print(f"\n{'within' if within else 'NOT within'} {args.tolerance:.0%} on c=16 req/s and "
              f"c=1 p50 (ratio of medians); errors: {errors}")
        return 0 if within and errors == 0 else 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for worktree in worktrees:
            with contextlib.suppress(RuntimeError):
                git("worktree", "remove", "--force", str(worktree))
        shutil.rmtree(work_dir, ignore_errors=True)
        with contextlib.suppress(RuntimeError):
            git("worktree", "prune")


if __name__ == "__main__":
    sys.exit(main())
