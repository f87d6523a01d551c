#!/usr/bin/env python3
"""Benchmark session calls against stateless executes of the same function, on one `relay dev`.

One `relay dev` (gateway + one executor process; its own embedded Redis in a fresh data
directory, or `REDIS_URL` under a fresh `RELAY_STREAM_PREFIX` whose keys are deleted at the end)
with the rate limiter off and no access log, like bench_execute.py's `relay-core`. One module,
whose `bump(page)` adds 1 to an i64 at the start of memory page `page` and to a counter in a
global: one page of state changed per call. Then, each point loaded with sync requests by an
asyncio HTTP/1.1 keep-alive client for --duration seconds after --warmup, the order of the
points alternating every round (--rounds N reports medians):

- `stateless`: `POST /intent/execute-wasm` of `bump(0)` (a unique idempotency key each);
- `session 64 KiB`: `POST /sessions/{id}/calls` of `bump(0)` on a session holding the module's
  one page; at c=16, 16 sessions with one caller each (a session runs one call at a time);
- `session 16 MiB`: c=1 only, on a session grown to 256 pages (each half pseudo-random, half
  zeros, as heaps roughly are), `bump(n mod 256)`: a different page changed by every call.

Per point: req/s, p50, p99, errors, CPU µs per request of the gateway, the executor and the
embedded Redis, and
bytes Redis received per request (INFO `total_net_input_bytes`: every command of every client,
events included; on a shared REDIS_URL server others' traffic counts too). Then, by reading the
session's manifests before and after each of --sample calls on the 16 MiB session: the pages a
call wrote, their stored (compressed) bytes and the new manifest's bytes. Then, if
`POST /sessions/{id}/snapshots` exists (skipped with a message otherwise): the time to snapshot
the 16 MiB session and the bytes it added to Redis (INFO `used_memory`; the state is shared),
and the time from `POST /snapshots/{id}/restore` with 64 branches until all 64 branches have
accepted a call, and until all 64 have answered one.

Targets (printed, not enforced: this is a measurement): session c=1 and c=16 p50 <= 1.5x
stateless p50; the 16 MiB session's p50 <= the 64 KiB session's + 3 ms; restore of 64 branches
until all accept calls <= 100 ms.

Run from the project root:  .venv/bin/python bench/bench_sessions.py [--duration 5]
Runs with the project's virtualenv (redis-py and relay.keys, for reading the stored state).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
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
    find_pids,
    http_json,
    kill_leftover,
    pick_python,
    shutdown_redis,
    start_relay_dev,
    wait_relay_ready,
)

sys.path.insert(0, str(ROOT))
from relay.keys import Keys

PAGE = 65536
BIG_PAGES = 256  # 16 MiB
BRANCHES = 64
MODULE_WAT = """(module
  (memory 1)
  (global $calls (mut i64) (i64.const 0))
  ;; One page changed: 1 added to the i64 at the start of page `page`. Returns the calls so far.
  (func (export "bump") (param $page i32) (result i64) (local $at i32)
    (local.set $at (i32.mul (local.get $page) (i32.const 65536)))
    (i64.store (local.get $at) (i64.add (i64.load (local.get $at)) (i64.const 1)))
    (global.set $calls (i64.add (global.get $calls) (i64.const 1)))
    (global.get $calls))
  ;; Grows memory to `pages` pages and fills the first half of each with xorshift64 output.
  (func (export "fill") (param $pages i32) (result i32) (local $x i64) (local $at i32)
    (drop (memory.grow (i32.sub (local.get $pages) (memory.size))))
    (local.set $x (i64.const 0x2545F4914F6CDD1D))
    (block $done (loop $more
      (br_if $done (i32.ge_u (local.get $at) (i32.mul (memory.size) (i32.const 65536))))
      (if (i32.eqz (i32.and (local.get $at) (i32.const 32768))) (then
        (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 13))))
        (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 7))))
        (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 17))))
        (i64.store (local.get $at) (local.get $x))))
      (local.set $at (i32.add (local.get $at) (i32.const 8)))
      (br $more)))
    (memory.size)))"""

STATELESS, SMALL, BIG = "stateless", "session 64 KiB", "session 16 MiB"
TARGET_SESSION_P50_RATIO = 1.5
TARGET_BIG_P50_EXTRA_MS = 3.0
TARGET_RESTORE_ACCEPT_MS = 100.0
RELAY_ENV = {"RELAY_RATE_LIMIT": "0", "RELAY_ACCESS_LOG": "0"}


# --- Redis and HTTP helpers ---


class Store:
    """What the bench reads of Redis: INFO figures and the stored states."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def info(self, field_name: str, section: str) -> int:
        return int(self.client.info(section)[field_name])

    def net_in(self) -> int:
        return self.info("total_net_input_bytes", "stats")

    def state_cid(self, session_id: str) -> str:
        raw = self.client.hget(self.keys.session(session_id), "state_cid")
        return raw.decode() if raw else ""

    def manifest(self, state_cid: str) -> dict[str, Any]:
        raw = self.client.hget(self.keys.state(state_cid), "manifest")
        if raw is None:
            raise RuntimeError(f"state {state_cid} is not stored")
        manifest: dict[str, Any] = json.loads(raw)
        return manifest

    def manifest_bytes(self, state_cid: str) -> int:
        return int(self.client.hstrlen(self.keys.state(state_cid), "manifest"))

    def page_bytes(self, hashes: list[str]) -> int:
        """Stored (compressed) bytes of these pages."""
        pipe = self.client.pipeline(transaction=False)
        for sha in hashes:
            pipe.strlen(self.keys.page(sha))
        return sum(pipe.execute())

    def delete_prefix(self) -> None:
        batch = list(self.client.scan_iter(match=f"{self.keys.prefix}:*", count=1000))
        for start in range(0, len(batch), 1000):
            self.client.delete(*batch[start:start + 1000])


@dataclass
class Relay:
    url: str
    headers: dict[str, str]
    pids: dict[str, int]
    store: Store

    def post(self, path: str, body: Any, timeout: float = 60.0,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return http_json("POST", self.url + path, body, {**self.headers, **(headers or {})},
                         timeout=timeout)

    def ok(self, path: str, body: Any, status: int = 200) -> dict[str, Any]:
        got, answer = self.post(path, body)
        if got != status or not isinstance(answer, dict) or answer.get("success") is False:
            raise RuntimeError(f"POST {path} {body}: {got} {answer!r}")
        return answer

    def upload(self, wat: str) -> str:
        request = urllib.request.Request(self.url + "/modules", data=wat.encode(),
                                         method="POST", headers=self.headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            cid: str = json.loads(response.read())["cid"]
            return cid

    def session(self, cid: str) -> str:
        got, answer = self.post("/sessions", {"cid": cid})
        if got != 201:
            raise RuntimeError(f"POST /sessions: {got} {answer!r}")
        session_id: str = answer["session_id"]
        return session_id


# --- load ---


Request = Callable[[int, int], tuple[str, bytes]]
"""(connection, its request number) -> (path, JSON body)."""


@dataclass
class Result:
    point: str
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    cpu_us: dict[str, float] = field(default_factory=dict)
    redis_in_bytes: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def _load(url: str, headers: dict[str, str], request: Request, concurrency: int,
                seconds: float) -> tuple[list[float], int, float]:
    """One keep-alive connection a caller, one request in flight each, for `seconds`. Returns
    the latencies (s), the errors (not 200, `success` not true, socket errors) and the time."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"Host: {host}:{port}\r\nContent-Type: application/json\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()))
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def caller(conn: int) -> None:
        nonlocal errors
        writer: asyncio.StreamWriter | None = None
        n = 0
        while time.perf_counter() < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                path, body = request(conn, n)
                n += 1
                started = time.perf_counter()
                writer.write(f"POST {path} HTTP/1.1\r\n{head}Content-Length: {len(body)}"
                             f"\r\n\r\n".encode() + body)
                response_head = await reader.readuntil(b"\r\n\r\n")
                found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", response_head)
                payload = await reader.readexactly(int(found.group(1))) if found else b""
                latencies.append(time.perf_counter() - started)
                if response_head[9:12] != b"200" or b'"success":true' not in payload:
                    errors += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                errors += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def load(url: str, headers: dict[str, str], request: Request, concurrency: int,
         seconds: float) -> tuple[list[float], int, float]:
    try:
        import uvloop

        return uvloop.run(_load(url, headers, request, concurrency, seconds))
    except ImportError:
        return asyncio.run(_load(url, headers, request, concurrency, seconds))


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def measure(relay: Relay, point: str, concurrency: int, request: Request, seconds: float,
            warmup: float) -> Result:
    if warmup > 0:
        load(relay.url, relay.headers, request, concurrency, warmup)
    net_before = relay.store.net_in()
    cpu_before = {name: cpu_ticks(pid) for name, pid in relay.pids.items()}
    latencies, errors, elapsed = load(relay.url, relay.headers, request, concurrency, seconds)
    cpu_after = {name: cpu_ticks(pid) for name, pid in relay.pids.items()}
    net_after = relay.store.net_in()
    latencies.sort()
    result = Result(point, concurrency, len(latencies), elapsed,
                    percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000, errors)
    if result.requests:
        for name in relay.pids:
            used_s = (cpu_after[name] - cpu_before[name]) / CLK_TCK
            result.cpu_us[name] = used_s / result.requests * 1e6
        result.redis_in_bytes = (net_after - net_before) / result.requests
    return result


def median_result(results: list[Result]) -> Result:
    first = results[0]
    merged = Result(first.point, first.concurrency,
                    requests=sum(r.requests for r in results),
                    seconds=sum(r.seconds for r in results),
                    p50_ms=statistics.median(r.p50_ms for r in results),
                    p99_ms=statistics.median(r.p99_ms for r in results),
                    errors=sum(r.errors for r in results),
                    redis_in_bytes=statistics.median(r.redis_in_bytes for r in results))
    merged.cpu_us = {name: statistics.median(r.cpu_us.get(name, 0.0) for r in results)
                     for name in first.cpu_us}
    return merged


# --- the points ---


class Workload:
    """The module, its sessions and the request bodies of every point."""

    def __init__(self, relay: Relay, concurrencies: list[int]) -> None:
        self.relay = relay
        self.cid = relay.upload(MODULE_WAT)
        self.run_id = secrets.token_hex(6)
        # One 64 KiB session per caller at the highest concurrency; each called once, so it
        # holds a committed state (not the module's fresh one) before it is measured.
        self.small = [relay.session(self.cid) for _ in range(max(concurrencies))]
        for session_id in self.small:
            relay.ok(f"/sessions/{session_id}/calls", {"entrypoint": "bump", "inputs": [0]})
        self.big = relay.session(self.cid)
        grown = relay.ok(f"/sessions/{self.big}/calls",
                         {"entrypoint": "fill", "inputs": [BIG_PAGES]})
        if grown["output"] != BIG_PAGES:
            raise RuntimeError(f"fill({BIG_PAGES}) answered {grown!r}")
        got, view = http_json("GET", f"{relay.url}/sessions/{self.big}", None, relay.headers)
        if got != 200 or view["state_size"] != BIG_PAGES * PAGE:
            raise RuntimeError(f"the 16 MiB session: {got} {view!r}")
        relay.ok("/intent/execute-wasm", {
            "cid": self.cid, "entrypoint": "bump", "inputs": [0],
            "idempotency_key": f"verify-{self.run_id}"})

    def stateless(self, conn: int, n: int) -> tuple[str, bytes]:
        return "/intent/execute-wasm", json.dumps({
            "cid": self.cid, "entrypoint": "bump", "inputs": [0],
            "idempotency_key": f"{self.run_id}-{conn}-{n}-{secrets.token_hex(4)}"}).encode()

    def small_call(self, conn: int, n: int) -> tuple[str, bytes]:
        return (f"/sessions/{self.small[conn]}/calls",
                b'{"entrypoint":"bump","inputs":[0]}')

    def big_call(self, conn: int, n: int) -> tuple[str, bytes]:
        return (f"/sessions/{self.big}/calls",
                f'{{"entrypoint":"bump","inputs":[{n % BIG_PAGES}]}}'.encode())

    def points(self, concurrency: int) -> list[tuple[str, Request]]:
        found: list[tuple[str, Request]] = [(STATELESS, self.stateless),
                                            (SMALL, self.small_call)]
        if concurrency == 1:
            found.append((BIG, self.big_call))
        return found


def writes_per_call(workload: Workload, calls: int) -> dict[str, float]:
    """Medians over `calls` sequential calls on the 16 MiB session, each changing another page:
    pages written (not stored before), their stored bytes, the new manifest's bytes."""
    relay, store = workload.relay, workload.relay.store
    pages, page_bytes, manifest_bytes = [], [], []
    for n in range(calls):
        before = store.manifest(store.state_cid(workload.big))
        result = relay.ok(f"/sessions/{workload.big}/calls",
                          {"entrypoint": "bump", "inputs": [(n * 37) % BIG_PAGES]})
        after_cid = result["state_cid"]
        after = store.manifest(after_cid)
        new = sorted({sha for sha in after["pages"] if sha} - set(before["pages"]))
        pages.append(len(new))
        page_bytes.append(store.page_bytes(new))
        manifest_bytes.append(store.manifest_bytes(after_cid))
    return {"pages": statistics.median(pages), "page_bytes": statistics.median(page_bytes),
            "manifest_bytes": statistics.median(manifest_bytes)}


def stored_bytes(store: Store, state_cid: str) -> tuple[int, int]:
    """Pages (distinct, non-zero) and stored bytes (pages + manifest) of a state."""
    hashes = sorted({sha for sha in store.manifest(state_cid)["pages"] if sha})
    return len(hashes), store.page_bytes(hashes) + store.manifest_bytes(state_cid)


def snapshots(workload: Workload, rounds: int) -> dict[str, Any] | None:
    """Snapshot the 16 MiB session, restore 64 branches, call each; None when the snapshot
    routes do not exist."""
    relay, store = workload.relay, workload.relay.store
    probe, _ = relay.post(f"/sessions/{workload.big}/snapshots", {})
    if probe in (404, 405):
        return None
    if probe != 201:
        raise RuntimeError(f"POST /sessions/{{id}}/snapshots answered {probe}")
    # The calls so far, in the state every snapshot below holds.
    counted = relay.ok(f"/sessions/{workload.big}/calls",
                       {"entrypoint": "bump", "inputs": [0]})["output"]
    snapshot_ms: list[float] = []
    added: list[int] = []
    snapshot: dict[str, Any] = {}
    for _ in range(max(rounds, 3)):
        memory_before = store.info("used_memory", "memory")
        started = time.perf_counter()
        got, snapshot = relay.post(f"/sessions/{workload.big}/snapshots", {"label": "bench"})
        snapshot_ms.append((time.perf_counter() - started) * 1000)
        if got != 201:
            raise RuntimeError(f"snapshot: {got} {snapshot!r}")
        added.append(store.info("used_memory", "memory") - memory_before)
    pages, state_bytes = stored_bytes(store, snapshot["state_cid"])
    restore_ms, accept_ms, answer_ms = [], [], []
    for _ in range(max(rounds, 3)):
        restored, accepted = restore_branches(relay, snapshot["snapshot_id"], counted, False)
        restore_ms.append(restored)
        accept_ms.append(accepted)
        answer_ms.append(restore_branches(relay, snapshot["snapshot_id"], counted, True)[1])
    return {"snapshot_ms": statistics.median(snapshot_ms),
            "snapshot_added_bytes": statistics.median(added),
            "size": snapshot["size"], "pages": pages, "state_bytes": state_bytes,
            "restore_ms": statistics.median(restore_ms),
            "accept_ms": statistics.median(accept_ms),
            "answer_ms": statistics.median(answer_ms), "rounds": len(restore_ms)}


def restore_branches(relay: Relay, snapshot_id: str, counted: int, sync: bool,
                     ) -> tuple[float, float]:
    """Restore 64 branches, then call `bump(0)` on every one at once (async: until each has
    accepted its call, 202; sync: until each has answered, 200). Returns ms from the restore
    request until its answer, and until the last branch accepted or answered. Checks that each
    branch started from the snapshot (its first call gives the snapshot's count + 1)."""
    call = {"entrypoint": "bump", "inputs": [0]}

    async def run() -> tuple[float, float]:
        limits = httpx.Limits(max_connections=BRANCHES + 1, max_keepalive_connections=BRANCHES)
        async with httpx.AsyncClient(base_url=relay.url, headers=relay.headers, timeout=120,
                                     limits=limits) as http:
            # Every connection open before the clock starts: what is measured is the server.
            await asyncio.gather(*(http.get("/healthz") for _ in range(BRANCHES)))
            started = time.perf_counter()
            restored = await http.post(f"/snapshots/{snapshot_id}/restore",
                                       json={"branch_count": BRANCHES})
            restored_at = time.perf_counter()
            if restored.status_code != 201 or len(restored.json()["items"]) != BRANCHES:
                raise RuntimeError(f"restore: {restored.status_code} {restored.text}")
            branches = [item["session_id"] for item in restored.json()["items"]]
            headers = {} if sync else {"Prefer": "respond-async"}
            answers = await asyncio.gather(*(http.post(f"/sessions/{b}/calls", json=call,
                                                       headers=headers) for b in branches))
            done_at = time.perf_counter()
            status = 200 if sync else 202
            if any(answer.status_code != status for answer in answers):
                raise RuntimeError(f"calls on branches: {[a.status_code for a in answers]}")
            # Each branch's next call answers once the one before it ran: its output says
            # both ran from the snapshot's state.
            expected = counted + 1 if sync else counted + 2
            outputs = [answer.json()["output"] for answer in answers] if sync else [
                (await http.post(f"/sessions/{b}/calls", json=call)).json()["output"]
                for b in branches]
            if outputs != [expected] * BRANCHES:
                raise RuntimeError(f"branches gave {collections.Counter(outputs)}, not "
                                   f"{expected} each")
        return (restored_at - started) * 1000, (done_at - started) * 1000

    return asyncio.run(run())


# --- report ---


def print_report(results: dict[tuple[str, int], Result], concurrencies: list[int],
                 writes: dict[str, float], snaps: dict[str, Any] | None) -> None:
    print(f"\n{'point':<16} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'gateway µs':>10} {'executor µs':>11} {'redis µs':>8} {'Redis in B/req':>14}")
    for concurrency in concurrencies:
        for point in (STATELESS, SMALL, BIG):
            r = results.get((point, concurrency))
            if r is None:
                continue
            print(f"{point:<16} {concurrency:>3} {r.rps:>8,.0f} {r.p50_ms:>8.2f} "
                  f"{r.p99_ms:>8.2f} {r.errors:>6} {r.cpu_us.get('gateway', 0):>10,.0f} "
                  f"{r.cpu_us.get('executor', 0):>11,.0f} {r.cpu_us.get('redis', 0):>8,.0f} "
                  f"{r.redis_in_bytes:>14,.0f}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("\nSession call against stateless execute of the same function (warm):")
    for concurrency in concurrencies:
        session, stateless = results[(SMALL, concurrency)], results[(STATELESS, concurrency)]
        ratio = session.p50_ms / stateless.p50_ms if stateless.p50_ms else float("inf")
        throughput = session.rps / stateless.rps if stateless.rps else 0.0
        print(f"  c={concurrency:<3} p50 {session.p50_ms:.2f} vs {stateless.p50_ms:.2f} ms = "
              f"{ratio:.2f}x (target <= {TARGET_SESSION_P50_RATIO}x: "
              f"{verdict(ratio <= TARGET_SESSION_P50_RATIO)}); req/s {session.rps:,.0f} vs "
              f"{stateless.rps:,.0f} = {throughput:.2f}x; Redis in "
              f"{session.redis_in_bytes:,.0f} vs {stateless.redis_in_bytes:,.0f} B/req")
    big, small = results.get((BIG, 1)), results.get((SMALL, 1))
    if big and small:
        extra = big.p50_ms - small.p50_ms
        print(f"\n16 MiB session, one page changed a call, against the 64 KiB session (c=1):\n"
              f"  p50 {big.p50_ms:.2f} vs {small.p50_ms:.2f} ms = {extra:+.2f} ms "
              f"({big.p50_ms / small.p50_ms:.2f}x; target <= +{TARGET_BIG_P50_EXTRA_MS} ms: "
              f"{verdict(extra <= TARGET_BIG_P50_EXTRA_MS)}); executor CPU "
              f"{big.cpu_us.get('executor', 0):,.0f} vs {small.cpu_us.get('executor', 0):,.0f} "
              f"µs/call; Redis in {big.redis_in_bytes:,.0f} vs {small.redis_in_bytes:,.0f} "
              f"B/call")
        print(f"  state written a call (median of sampled calls): {writes['pages']:g} page(s), "
              f"{writes['page_bytes']:,.0f} B compressed + manifest "
              f"{writes['manifest_bytes']:,.0f} B = "
              f"{writes['page_bytes'] + writes['manifest_bytes']:,.0f} B "
              f"(the whole state is {BIG_PAGES * PAGE:,} B)")
    if snaps is None:
        print("\nSnapshots: skipped, POST /sessions/{id}/snapshots does not exist (404/405) in "
              "this build")
        return
    print(f"\nSnapshot of the 16 MiB session (median of {snaps['rounds']}): "
          f"{snaps['snapshot_ms']:.2f} ms; Redis memory added {snaps['snapshot_added_bytes']:,.0f}"
          f" B (the state is shared: {snaps['pages']} pages, {snaps['state_bytes']:,} B stored "
          f"for {snaps['size']:,} B of memory, "
          f"{snaps['state_bytes'] / max(snaps['size'], 1):.1%})")
    print(f"Restore with {BRANCHES} branches (median of {snaps['rounds']}): answered in "
          f"{snaps['restore_ms']:.1f} ms; all {BRANCHES} accepted a call "
          f"{snaps['accept_ms']:.1f} ms after the request (target <= "
          f"{TARGET_RESTORE_ACCEPT_MS:.0f} ms: "
          f"{verdict(snaps['accept_ms'] <= TARGET_RESTORE_ACCEPT_MS)}); all {BRANCHES} answered "
          f"their call {snaps['answer_ms']:.1f} ms after")


# --- main ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds of measured load per point (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unmeasured load before each point (default 1)")
    parser.add_argument("--concurrency", default="1,16",
                        help="comma-separated caller counts (default 1,16; 1 is needed for the "
                             "16 MiB comparison)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every point, alternating their order; report medians")
    parser.add_argument("--sample", type=int, default=20,
                        help="calls on the 16 MiB session whose writes are read back")
    parser.add_argument("--python", default=None,
                        help="interpreter for relay (default: .venv/bin/python)")
    parser.add_argument("--max-time", type=float, default=None,
                        help="hard bound on the whole run in seconds (default: computed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    points = sum(3 if c == 1 else 2 for c in args.concurrency) * args.rounds
    arm_deadline(args.max_time or 180 + points * (args.warmup + args.duration + 5))
    python = pick_python(args.python)
    work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-sessions-"))
    children: list[Child] = []
    data_dir = work_dir / "data"
    store: Store | None = None
    redis_pid: int | None = None
    try:
        env = clean_env()
        env.update(RELAY_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        prefix = f"bench-sessions-{secrets.token_hex(4)}"
        extra = {**RELAY_ENV, "RELAY_STREAM_PREFIX": prefix}
        redis_url = os.environ.get("REDIS_URL")
        if redis_url:
            extra["REDIS_URL"] = redis_url
        child, key, port = start_relay_dev("relay", python, env, data_dir, "bench", extra,
                                           work_dir, children)
        url = f"http://127.0.0.1:{port}"
        wait_relay_ready(child, url)
        client = (redis.Redis.from_url(redis_url) if redis_url else
                  redis.Redis(unix_socket_path=str(data_dir / "redis" / "redis.sock")))
        store = Store(client, Keys(prefix))
        pids = {"gateway": child.pid, **find_pids(child.pid)}  # + "redis" when embedded
        redis_pid = pids.get("redis")
        relay = Relay(url, {"X-API-Key": key}, pids, store)
        print(f"relay dev on {url} (pids {pids}); Redis "
              f"{redis_url or 'embedded'}, prefix {prefix}; python {python}")
        workload = Workload(relay, args.concurrency)
        print(f"module {workload.cid}; {len(workload.small)} sessions of 64 KiB, one of "
              f"{BIG_PAGES * PAGE // (1 << 20)} MiB; client: python asyncio, keep-alive")

        rounds: dict[tuple[str, int], list[Result]] = collections.defaultdict(list)
        for round_index in range(args.rounds):
            for concurrency in args.concurrency:
                order = workload.points(concurrency)
                for point, request in order if round_index % 2 == 0 else reversed(order):
                    result = measure(relay, point, concurrency, request, args.duration,
                                     args.warmup)
                    rounds[(point, concurrency)].append(result)
                    print(f"  {point:<16} c={concurrency:<3} {result.rps:8,.0f} req/s  p50 "
                          f"{result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  errors "
                          f"{result.errors}", flush=True)
        results = {point: median_result(rs) for point, rs in rounds.items()}
        writes = writes_per_call(workload, args.sample)
        snaps = snapshots(workload, args.rounds)
        print_report(results, args.concurrency, writes, snaps)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except (Deadline, RuntimeError, redis.RedisError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        if store is not None and os.environ.get("REDIS_URL"):
            store.delete_prefix()  # a shared server: only what this run wrote
        begin_cleanup(children)
        shutdown_redis(data_dir / "redis" / "redis.sock")
        if redis_pid is not None:
            kill_leftover(redis_pid, "redis", grace_s=3.0)
        end_cleanup(work_dir, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
