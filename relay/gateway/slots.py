"""Open event streams per principal, counted across every gateway (`RELAY_MAX_STREAMS`).

Cluster-wide rather than per process: a principal behind a load balancer reaches every
gateway, so a per-process cap would let it hold N × the cap on N gateways, and what it may hold
would change with the deployment's size.

Each open stream is a member of the sorted set `relay:streams:<principal>`, scored by when its
lease ends (Redis time). A gateway renews the leases of its open streams every LEASE_MS / 3, so
the places of a gateway that died come back within LEASE_MS; a stream that closes gives its
place back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets

import redis
import redis.asyncio as aioredis

from relay.bus import Script
from relay.errors import TooManyStreams
from relay.keys import Keys

LEASE_MS = 30_000
_OPEN = Script.named("open_stream")


class StreamSlots:
    def __init__(self, client: aioredis.Redis, keys: Keys, max_streams: int) -> None:
        self.client = client
        self.keys = keys
        self.max_streams = max_streams
        self._open = client.register_script(_OPEN.source)
        self._held: dict[str, set[str]] = {}
        """principal -> ids of its streams open on this gateway, whose leases it renews."""
        self._name = secrets.token_hex(6)  # this process's stream ids apart from its peers'
        self._ids = itertools.count()

    async def acquire(self, principal: str) -> str:
        """Take one of `principal`'s places; returns the stream's id, for `release`.

        Raises TooManyStreams (429) when it holds RELAY_MAX_STREAMS streams already."""
        stream = f"{self._name}-{next(self._ids)}"
        taken = await self._open(keys=[self.keys.streams(principal)],
                                 args=[stream, self.max_streams, LEASE_MS])
        if not taken:
            raise TooManyStreams(
                f"you have {self.max_streams} event streams open already (SSE and WebSocket "
                "together, on every gateway); close one first")
        self._held.setdefault(principal, set()).add(stream)
        return stream

    async def release(self, principal: str, stream: str) -> None:
        """Give the place back (at once; should Redis fail, when its lease ends)."""
        held = self._held.get(principal)
        if held is not None:
            held.discard(stream)
            if not held:
                del self._held[principal]
        with contextlib.suppress(redis.RedisError):
            await self.client.zrem(self.keys.streams(principal), stream)

    @property
    def held(self) -> int:
        """Streams open on this gateway that hold a place."""
        return sum(len(streams) for streams in self._held.values())

    async def renew(self) -> None:
        """Renew this gateway's leases until cancelled: one pipeline every LEASE_MS / 3 (run by
        the gateway's supervisor)."""
        while True:
            await asyncio.sleep(LEASE_MS / 3 / 1000)
            if not self._held:
                continue
            seconds, micros = await self.client.time()
            until = seconds * 1000 + micros // 1000 + LEASE_MS
            pipe = self.client.pipeline(transaction=False)
            for principal, streams in self._held.items():
                key = self.keys.streams(principal)
                # XX: a stream that closed while this ran is not brought back.
                pipe.zadd(key, dict.fromkeys(streams, until), xx=True)
                pipe.pexpire(key, LEASE_MS)
            await pipe.execute()
