#!/usr/bin/env python3
"""One Redis round trip, the execute path's way (relay.redislink) against redis-py's.

Against an embedded Redis (a redis-server of its own on a unix socket, as `relay dev` runs),
one caller at a time, sequential EVALSHA of a one-command script, on uvloop (the loop `relay`
runs on); then 16 callers at once. Prints wall time and this process's CPU per call for:
- `redis-py`: `client.evalsha(...)` on the pooled client `relay.connection.connect` makes;
- `redis-py pipeline`: the same in a one-command pipeline (how relay.bus sent its scripts);
- `link`: `RedisLink.execute(...)`;
and the ratios. Rounds alternate the order.

Run from the project root:  .venv/bin/python bench/bench_link.py [--calls 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import uvloop
from common import ROOT

sys.path.insert(0, str(ROOT))

from relay.connection import EmbeddedRedis, connect
from relay.redislink import RedisLink

SCRIPT = "return redis.call('INCR', KEYS[1])"


async def measure(call: Callable[[], Awaitable[object]], calls: int,
                  concurrency: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per call."""
    for _ in range(200):
        await call()

    async def caller() -> None:
        for _ in range(calls // concurrency):
            await call()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    done = calls // concurrency * concurrency
    return ((time.perf_counter() - wall) / done * 1e6,
            (time.process_time() - cpu) / done * 1e6)


async def main(args: argparse.Namespace) -> None:
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="bench-link-"))
    url = server.start()
    try:
        client = connect(url)
        sha = await client.script_load(SCRIPT)
        link = RedisLink.of(client)

        async def pooled() -> object:
            return await client.evalsha(sha, 1, "bench")

        async def pipelined() -> object:
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(sha, 1, "bench")
            return await pipe.execute()

        async def linked() -> object:
            return await link.execute("EVALSHA", sha, 1, "bench")

        ways = {"redis-py": pooled, "redis-py pipeline": pipelined, "link": linked}
        for concurrency in (1, 16):
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
            for round_ in range(args.rounds):
                order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
                for name in order:
                    figures[name].append(await measure(ways[name], args.calls, concurrency))
            print(f"EVALSHA, {concurrency} caller(s) at once, median of {args.rounds} rounds "
                  f"of {args.calls} calls:")
            medians = {name: (statistics.median(w for w, _ in runs),
                              statistics.median(c for _, c in runs))
                       for name, runs in figures.items()}
            for name, (wall, cpu) in medians.items():
                print(f"  {name:18} {wall:7.1f} µs wall  {cpu:7.1f} µs CPU per call")
            for name in ("redis-py", "redis-py pipeline"):
                print(f"  link / {name}: wall {medians['link'][0] / medians[name][0]:.2f}x, "
                      f"CPU {medians['link'][1] / medians[name][1]:.2f}x")
        await link.aclose()
        await client.aclose()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
