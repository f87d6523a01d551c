"""An internal service consuming Relay's bus: every finished execution, exactly as Relay saw it.

It reads `relay:events` in its own consumer group (so it gets every entry once, whatever the
gateways and executors do, and resumes where it stopped after a restart), handles the
`wasm_exec_completed` entries, and acknowledges each entry once handled.

    REDIS_URL=redis://localhost:6379/0 python examples/bus_consumer.py [--group billing]

Run several copies with the same group to share the work; another group gets its own copy of
every entry.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket

import redis.asyncio as aioredis
from redis.exceptions import ResponseError


async def consume(url: str, prefix: str, group: str, consumer: str, *, burst: bool) -> int:
    """Handle entries until interrupted (or, with `burst`, until none is left); returns how many
    `wasm_exec_completed` entries were handled."""
    client = aioredis.Redis.from_url(url)
    stream = f"{prefix}:events"
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    handled = 0
    # First whatever this consumer was given before a crash and never acknowledged, then new.
    cursor = "0"
    try:
        while True:
            reply = await client.xreadgroup(group, consumer, {stream: cursor}, count=100,
                                            block=None if cursor == "0" else 1000)
            entries = reply[0][1] if reply else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            if not entries and burst:
                return handled
            for entry_id, fields in entries:
                event = json.loads(fields[b"data"])
                if event["type"] == "wasm_exec_completed":
                    handle(event)
                    handled += 1
                await client.xack(stream, group, entry_id)
    finally:
        await client.aclose()


def handle(event: dict[str, object]) -> None:
    """Your logic here: bill the gas, index the output, notify someone..."""
    outcome = "ok" if event["success"] else f"error {event['error']}"
    print(f"{event['request_id'][:12]}… by {event['user_id']}: {outcome}, "  # type: ignore[index]
          f"gas {event['gas_used']}, output {json.dumps(event['output'])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", default="example-consumer")
    parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--burst", action="store_true", help="stop when nothing is left")
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    prefix = os.environ.get("RELAY_STREAM_PREFIX", "relay")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(consume(url, prefix, args.group, args.consumer, burst=args.burst))


if __name__ == "__main__":
    main()
