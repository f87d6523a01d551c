#!/usr/bin/env python3
"""What storing a session's state costs: 16 MiB of memory, half random (each page half random
bytes, half zeros, as real heaps roughly are), captured, stored in Redis and restored.

Prints, each the median of --rounds runs (no assertions: figures for the design):
- capture from scratch (every page new: SHA-256 of every page);
- capture after one page changed (xxh3 of every page, SHA-256 of one);
- restore from the local page cache, and from Redis (MGET + zstd decompress + write);
- save of the whole state and of the one-page change (compress + one round trip), and the
  bytes each wrote to Redis;
- zstd levels 1 to 3 on the whole state: compressed size and time.

Run:  .venv/bin/python bench/bench_state.py [--mib 16] [--rounds 7]
Uses the Redis at REDIS_URL (a fresh key prefix, deleted afterwards), else an embedded one (whose
AOF, as `relay dev` runs it, makes the whole-state save about three times slower).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasmtime
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.state import PAGE_BYTES, Baseline, Manifest, PageCache, capture, restore, state_cid
from relay import connection
from relay.connection import EmbeddedRedis
from relay.keys import Keys
from relay.states import StateStore

WAT = """(module
  (memory (export "__relay_memory") {pages})
  (global (export "__relay_global_0") (mut i64) (i64.const 0))
  (global (export "__relay_global_1") (mut f64) (f64.const 0))
  (func (export "touch") (param $at i32)
    local.get $at local.get $at i32.load i32.const 1 i32.add i32.store
    global.get 0 i64.const 1 i64.add global.set 0))"""


class Instances:
    def __init__(self, pages: int) -> None:
        self.engine = wasmtime.Engine()
        self.module = wasmtime.Module(self.engine, wasmtime.wat2wasm(WAT.format(pages=pages)))

    def fresh(self) -> tuple[wasmtime.Store, wasmtime.Instance]:
        store = wasmtime.Store(self.engine)
        return store, wasmtime.Instance(store, self.module, [])


def half_random(pages: int) -> bytes:
    half = PAGE_BYTES // 2
    return b"".join(os.urandom(half) + bytes(half) for _ in range(pages))


def median_ms(rounds: int, run: Callable[[], Any], setup: Callable[[], Any] | None = None,
              ) -> float:
    times = []
    for _ in range(rounds):
        argument = setup() if setup else None
        start = time.perf_counter()
        run() if setup is None else run(argument)  # type: ignore[call-arg]
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def amedian_ms(rounds: int, run: Callable[[], Any]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def drop(client: Any, keys: Keys) -> None:
    stored = [key async for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000)]
    if stored:
        await client.delete(*stored)


async def main(mib: int, rounds: int, redis_url: str) -> None:
    pages = mib * 1024 * 1024 // PAGE_BYTES
    instances = Instances(pages)
    memory = half_random(pages)

    def worked() -> tuple[wasmtime.Store, wasmtime.Instance]:
        store, instance = instances.fresh()
        mem = instance.exports(store)["__relay_memory"]
        assert isinstance(mem, wasmtime.Memory)
        mem.write(store, memory, 0)
        return store, instance

    store, instance = worked()
    manifest, new_pages = capture(store, instance, Baseline.fresh())
    assert len(new_pages) == pages
    scratch_ms = median_ms(rounds, lambda live: capture(*live, Baseline.fresh()), worked)

    def restored() -> tuple[wasmtime.Store, wasmtime.Instance, Baseline]:
        store, instance = instances.fresh()
        return store, instance, restore(store, instance, manifest, new_pages)

    def touched(live: tuple[wasmtime.Store, wasmtime.Instance, Baseline]) -> Any:
        store, instance, baseline = live
        touch = instance.exports(store)["touch"]
        assert isinstance(touch, wasmtime.Func)
        touch(store, 100 * PAGE_BYTES + 8)
        return store, instance, baseline

    def capture_one(live: tuple[wasmtime.Store, wasmtime.Instance, Baseline]) -> None:
        _, changed = capture(*live)
        assert len(changed) == 1

    one_page_ms = median_ms(rounds, capture_one, lambda: touched(restored()))
    changed_manifest, changed_pages = capture(*touched(restored()))

    cache = PageCache(capacity_bytes=2 * len(memory))
    cache.put_many(new_pages)

    def from_cache(live: tuple[wasmtime.Store, wasmtime.Instance]) -> None:
        found, missing = cache.get_many(manifest.pages)
        assert not missing
        restore(*live, manifest, found)

    cache_ms = median_ms(rounds, from_cache, instances.fresh)
    instantiate_ms = median_ms(rounds, instances.fresh)

    client = connection.connect(redis_url)
    keys = Keys(f"bench-state-{uuid.uuid4().hex[:8]}")
    manifest_bytes = manifest.encode()
    cid = state_cid(manifest_bytes)
    changed_bytes = changed_manifest.encode()
    changed_cid = state_cid(changed_bytes)
    save_whole, save_one = [], []
    try:
        for _ in range(rounds):
            await drop(client, keys)  # each round writes the whole state anew
            states = StateStore(client, keys, orphan_ttl_ms=600_000)
            start = time.perf_counter()
            whole_written = await states.save(manifest_bytes, cid, new_pages)
            save_whole.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            one_written = await states.save(changed_bytes, changed_cid, changed_pages)
            save_one.append((time.perf_counter() - start) * 1000)

        async def from_redis() -> None:
            fetched = await StateStore(client, keys, orphan_ttl_ms=1).pages(
                Manifest.decode(await states.manifest(cid) or b"").pages)
            restore(*instances.fresh(), manifest, fetched)

        redis_ms = await amedian_ms(rounds, from_redis)
        fetch_ms = await amedian_ms(rounds, lambda: StateStore(
            client, keys, orphan_ttl_ms=1).pages(manifest.pages))
    finally:
        await drop(client, keys)
        await client.aclose()
    save_whole_ms, save_one_ms = statistics.median(save_whole), statistics.median(save_one)

    print(f"state: {mib} MiB ({pages} pages), each page half random; median of {rounds}")
    print(f"capture from scratch (all pages new)     {scratch_ms:8.2f} ms")
    print(f"capture after one page changed           {one_page_ms:8.2f} ms")
    print(f"restore from the local page cache        {cache_ms:8.2f} ms"
          f"  (+ instantiate {instantiate_ms:.2f} ms)")
    print(f"restore from Redis (MGET+zstd+write)     {redis_ms:8.2f} ms"
          f"  (of which the fetch {fetch_ms:.2f} ms)")
    print(f"save whole state (zstd {states.level} + 1 round trip) {save_whole_ms:8.2f} ms, "
          f"{whole_written / 2**20:.2f} MiB written (of {len(memory) / 2**20:.0f} MiB)")
    print(f"save after one page changed              {save_one_ms:8.2f} ms, "
          f"{one_written} bytes written (page + manifest of {len(changed_bytes)} bytes)")
    raw_pages = [memory[at:at + PAGE_BYTES] for at in range(0, len(memory), PAGE_BYTES)]
    for level in (1, 2, 3):
        compressor = zstandard.ZstdCompressor(level=level)
        level_ms = median_ms(rounds, lambda c=compressor: [c.compress(p) for p in raw_pages])
        size = sum(len(compressor.compress(page)) for page in raw_pages)
        print(f"zstd level {level}: {size / 2**20:.3f} MiB in {level_ms:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL")
    if url:
        asyncio.run(main(args.mib, args.rounds, url))
    else:
        with tempfile.TemporaryDirectory() as directory:
            server = EmbeddedRedis(directory)
            try:
                asyncio.run(main(args.mib, args.rounds, server.start()))
            finally:
                server.stop()
