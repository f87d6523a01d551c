#!/usr/bin/env python3
"""Fuzz a running `relay dev` from its own OpenAPI document: many examples per operation.

The same as tests/system/test_fuzz.py (the same checks, seed modules and generation hooks,
imported from it), at a larger scale and over a real socket:
- starts `relay dev` in its own process group, on its own fresh data directory (so its own
  embedded Redis), port and random API key, with a rate limit it never reaches
  (RELAY_RATE_LIMIT=1000000000: the limiter runs, so the RateLimit headers the document
  promises are there), session and snapshot quotas it never reaches (RELAY_MAX_SESSIONS,
  RELAY_MAX_SNAPSHOTS=1000000: restores make up to 64 sessions each) and no access log
  (RELAY_ACCESS_LOG=0);
- runs the schemathesis CLI against `GET /openapi.json` (phases examples, coverage and fuzzing,
  `--max-examples` per operation, 1,000 by default; the event stream gets a tenth of that, each
  read for 0.3 s) with this file as its hooks file (SCHEMATHESIS_HOOKS): the server is seeded
  (modules, an execution, a session, a snapshot, a budget, a pipeline; made again when a
  fuzzed request deletes, closes, cancels or uses up the last one, and a budget a fuzzed
  request made tight is made generous again, so executes keep working), the generators lean
  towards the seeds, and every response is counted;
- prints schemathesis's report (every distinct failure with a curl to reproduce it), then the
  responses per operation by status class. What it finds belongs in the FOUND of
  tests/system/test_fuzz.py.

Bounded: past `--max-time` seconds the run is interrupted (schemathesis still prints what it
found), and everything it started is stopped, also on error and Ctrl-C.
Exit status: 0 when nothing failed, 2 when schemathesis found failures, 1 on error, 130 on Ctrl-C.

Run from the project root:  .venv/bin/python bench/fuzz.py [--max-examples 1000]
Needs schemathesis in the virtualenv (the project's `test` extra).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
HOOKS_MODULE = "_schemathesis_hooks"  # the name schemathesis loads a hooks file under
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance,unsupported_method,"
          "allow_header_conformance,ignored_auth,problem_json")
EVENTS_READ_S = 0.3
CANCEL_READ_S = 8.0
"""A pipeline's DELETE answers once its running nodes have ended, or after 5 s (202)."""


# --- inside the schemathesis process (this file as its hooks file) ---


def install_in_schemathesis() -> None:
    """Seed the server, make the generators lean towards the seeds, count every response."""
    # Building a schemathesis config loads the hooks file again, from inside this function.
    if os.environ.get("RELAY_FUZZ_INSTALLED"):
        return
    os.environ["RELAY_FUZZ_INSTALLED"] = "1"
    sys.path.insert(0, str(ROOT))
    import requests
    import schemathesis

    from tests.system.test_fuzz import (  # + problem_json
        SEEDS,
        install_hooks,
        keep_seeds,
        name_seeds_in_coverage,
        seed,
    )

    url, key = os.environ["RELAY_FUZZ_URL"], os.environ["RELAY_FUZZ_KEY"]

    class Session(requests.Session):
        def request(self, method: str | bytes, path: str | bytes,  # type: ignore[override]
                    *args: Any, **kwargs: Any) -> requests.Response:
            return super().request(method, url + str(path), *args, **kwargs)

    with Session() as session:
        session.headers["X-API-Key"] = key
        seed(session)
    install_hooks(schemathesis)
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    lock = threading.Lock()

    @schemathesis.hook
    def before_call(context: schemathesis.HookContext, case: schemathesis.Case,
                    **kwargs: Any) -> None:
        with lock:
            name_seeds_in_coverage(case)

    @schemathesis.hook
    def after_call(context: schemathesis.HookContext, case: schemathesis.Case,
                   response: schemathesis.Response) -> None:
        with lock:
            statuses[(case.operation.label, response.status_code)] += 1
            SEEDS.record(case, response)
            if SEEDS.wanting():  # a seed is gone, or a budget would refuse executions
                with Session() as again:
                    again.headers["X-API-Key"] = key
                    keep_seeds(again)

    def dump() -> None:
        with lock:
            rows = [[label, status, count] for (label, status), count in statuses.items()]
        Path(os.environ["RELAY_FUZZ_STATS"]).write_text(json.dumps(rows))

    atexit.register(dump)


# --- the driver ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=1000,
                        help="generated requests per operation in the fuzzing phase "
                             "(default 1000; the event stream gets a tenth)")
    parser.add_argument("--max-time", type=float, default=1800.0,
                        help="seconds of fuzzing before the run is interrupted (default 1800)")
    parser.add_argument("--workers", type=int, default=1,
                        help="operations fuzzed at once (default 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="schemathesis's random seed (default: a new one, printed)")
    parser.add_argument("--include-path-regex", default=None,
                        help="only the operations whose path matches (e.g. '^/modules')")
    parser.add_argument("--python", default=None,
                        help="interpreter for relay and schemathesis (default: .venv/bin/python)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, report)")
    return parser.parse_args(argv)


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def write_config(path: Path, key: str, args: argparse.Namespace, seed: int) -> None:
    events_examples = max(1, args.max_examples // 10)
    path.write_text(f"""\
seed = {seed}
request-timeout = 1.0
max-stream-events = 8
suppress-health-check = ["all"]

[auth.openapi.apiKey]
api_key = {toml_string(key)}

[generation]
mode = "all"
max-examples = {args.max_examples}
database = "none"
with-security-parameters = false

[[operations]]
include-operation-id = "events"
request-timeout = {EVENTS_READ_S}
generation.max-examples = {events_examples}

[[operations]]
include-operation-id = "cancelPipeline"
request-timeout = {CANCEL_READ_S}
""")


def junit_failures(report_dir: Path) -> int | None:
    """Operations with a failure or an error in schemathesis's JUnit report (None: no report)."""
    reports = sorted(report_dir.glob("junit-*.xml"))
    if not reports:
        return None
    try:
        root = ElementTree.parse(reports[-1]).getroot()
    except ElementTree.ParseError:
        return None
    return int(root.get("failures", 0)) + int(root.get("errors", 0))


def print_statuses(stats_path: Path) -> int:
    """The responses per operation by status class; returns how many there were."""
    try:
        rows = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        print("no response counts (the schemathesis process did not write them)")
        return 0
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for label, status, count in rows:
        table[label][f"{status // 100}xx"] += count
        table[label][str(status)] += count if status >= 500 else 0
    total = sum(count for _, _, count in rows)
    print(f"\nresponses per operation ({total:,} in all)")
    print(f"  {'operation':<44} {'total':>7} {'2xx':>7} {'4xx':>7} {'5xx':>5}")
    for label in sorted(table):
        counts = table[label]
        print(f"  {label:<44} {sum(counts[c] for c in ('2xx', '3xx', '4xx', '5xx')):>7} "
              f"{counts['2xx']:>7} {counts['4xx']:>7} {counts['5xx']:>5}")
    return int(total)


def main(argv: list[str] | None = None) -> int:
    import common  # this directory's helpers: processes, waits, cleanup

    args = parse_args(argv)
    python = common.pick_python(args.python)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    signal.signal(signal.SIGTERM, common.raise_interrupt)
    work_dir = Path(tempfile.mkdtemp(prefix="relay-fuzz-"))
    children: list[Any] = []
    redis_pid: int | None = None
    data_dir = work_dir / "relay-data"
    status = 1
    fuzzer: subprocess.Popen[bytes] | None = None
    try:
        base_env = common.clean_env()
        base_env.update(PYTHONUNBUFFERED="1")
        relay, key, port = common.start_relay_dev(
            "relay", python, base_env, data_dir, "fuzz",
            {"RELAY_RATE_LIMIT": "1000000000", "RELAY_MAX_SESSIONS": "1000000",
             "RELAY_MAX_SNAPSHOTS": "1000000", "RELAY_ACCESS_LOG": "0",
             "RELAY_LOG_LEVEL": "WARNING"}, work_dir, children)
        url = f"http://127.0.0.1:{port}"
        common.wait_relay_ready(relay, url)
        redis_pid = common.find_pids(relay.process.pid).get("redis")
        print(f"relay dev on {url} (pid {relay.process.pid}); seed {seed}; "
              f"--max-examples {args.max_examples}; --max-time {args.max_time:.0f} s", flush=True)

        config = work_dir / "schemathesis.toml"
        write_config(config, key, args, seed)
        stats = work_dir / "statuses.json"
        command = [python, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
                   "run", f"{url}/openapi.json", "--checks", CHECKS,
                   "--phases", "examples,coverage,fuzzing", "--continue-on-failure",
                   "--workers", str(args.workers), "--max-examples", str(args.max_examples),
                   "--report", "junit", "--report-dir", str(work_dir / "report")]
        if args.include_path_regex:
            command += ["--include-path-regex", args.include_path_regex]
        env = {**base_env, "SCHEMATHESIS_HOOKS": str(Path(__file__).resolve()),
               "RELAY_FUZZ_URL": url, "RELAY_FUZZ_KEY": key, "RELAY_FUZZ_STATS": str(stats),
               "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        fuzzer = subprocess.Popen(command, env=env, cwd=work_dir, stdin=subprocess.DEVNULL)
        interrupted = False
        try:
            code = fuzzer.wait(timeout=args.max_time)
        except subprocess.TimeoutExpired:
            interrupted = True
            print(f"\n--max-time {args.max_time:.0f} s reached: interrupting schemathesis",
                  flush=True)
            fuzzer.send_signal(signal.SIGINT)  # it stops and still reports what it found
            try:
                code = fuzzer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                fuzzer.kill()
                code = fuzzer.wait()
        elapsed = time.monotonic() - started
        total = print_statuses(stats)
        if relay.process.poll() is not None:
            raise RuntimeError(f"relay dev exited ({relay.process.returncode}) during the run; "
                               f"its log ends:\n{relay.log_tail()}")
        failures = junit_failures(work_dir / "report")
        print(f"\n{total:,} requests in {elapsed:.0f} s; schemathesis exit status {code}; "
              f"operations failing: {failures if failures is not None else '?'}"
              + ("; stopped at --max-time" if interrupted else ""))
        if failures is None or (code not in (0, 1) and not interrupted):
            print("error: schemathesis did not complete (above)", file=sys.stderr)
            status = 1
        elif failures or code == 1:
            print("FAIL: schemathesis found failures (above)")
            status = 2
        else:
            print("PASS: no failures")
            status = 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        status = 130
    except RuntimeError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        if fuzzer is not None and fuzzer.poll() is None:
            fuzzer.kill()
            fuzzer.wait()
        common.stop_children(children)
        common.shutdown_redis(data_dir / "redis" / "redis.sock")
        if redis_pid is not None:
            common.kill_leftover(redis_pid, "redis", grace_s=3.0)
        common.end_cleanup(work_dir, args.keep)
    return status


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == HOOKS_MODULE:
    install_in_schemathesis()
