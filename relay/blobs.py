"""Output blobs: outputs too large to answer inline, stored in Redis by content, in chunks.

An output over RELAY_INLINE_OUTPUT_BYTES is not part of the result: the executor stores its
bytes as a blob named by their CID (CIDv1, raw, sha2-256: relay.cid.compute) before it settles
the execution, and the result carries an `output_ref` instead. Redis holds (relay.keys):
- `blob:<cid>:<i>`: chunk i, CHUNK_BYTES of it (the last one shorter): no single huge value,
  and a reader holds one chunk at a time;
- `blob:<cid>`: hash {size, chunks}, written after the chunks: a blob whose hash exists is whole.

Everything is written with the execution record's TTL. The settle script takes the reference
(blob_hold in lua/blobs.lib.lua: every key of the blob then lives at least as long as the
record), so a blob whose settle never came just expires, and executions with the same output
share one blob, kept as long as the longest-lived of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.bus import Script
from relay.cid import compute
from relay.keys import Keys

CHUNK_BYTES = 1 << 20
WRITE_BATCH_CHUNKS = 8
"""Chunks sent per pipeline: what the client buffers at once stays a few MiB."""
THREAD_BYTES = 1 << 20
"""Hashing more than this goes to a thread (hashlib lets go of the GIL), off the event loop."""

_HOLD = Script.named("blob_hold", libs=("blobs",))


def decode_output(data: bytes) -> Any:
    """An output's value from its bytes: JSON when it parses, else text (a WASI command's
    stdout is answered so inline, and a function's result is JSON)."""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")


class BlobGone(LookupError):
    """The blob is not (or no longer wholly) in Redis: it expired."""


class BlobStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def put(self, data: bytes | bytearray | memoryview, ttl_ms: int) -> str:
        """Store `data` as a blob living at least `ttl_ms` (unless it is stored already: then it
        is only kept that long); returns its CID. `data` is read in place, a chunk at a time,
        never copied whole. Raises redis.RedisError."""
        view = memoryview(data)
        whole: Any = view  # compute hashes any buffer, in place
        cid = (await asyncio.to_thread(compute, whole) if len(view) > THREAD_BYTES
               else compute(whole))
        if await _HOLD.run(self.client, [], [self.keys.prefix, cid, ttl_ms]):
            return cid
        chunks = max(1, -(-len(view) // CHUNK_BYTES))
        for first in range(0, chunks, WRITE_BATCH_CHUNKS):
            pipe = self.client.pipeline(transaction=False)
            for index in range(first, min(first + WRITE_BATCH_CHUNKS, chunks)):
                part = view[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES]
                pipe.set(self.keys.blob_chunk(cid, index), part, px=ttl_ms)
            await pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.blob(cid), mapping={"size": len(view), "chunks": chunks})
        pipe.pexpire(self.keys.blob(cid), ttl_ms)
        await pipe.execute()
        return cid

    async def size(self, cid: str) -> int | None:
        """The blob's size in bytes; None when it is not stored (or not whole yet)."""
        size = await self.client.hget(self.keys.blob(cid), "size")
        return None if size is None else int(size)

    async def read(self, cid: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the blob, a chunk (at most CHUNK_BYTES) at a time. Raises
        BlobGone when a chunk is missing (the blob expired while it was read)."""
        for index in range(start // CHUNK_BYTES, -(-end // CHUNK_BYTES)):
            base = index * CHUNK_BYTES
            low, high = max(start, base) - base, min(end, base + CHUNK_BYTES) - base
            part = await self.client.getrange(self.keys.blob_chunk(cid, index), low, high - 1)
            if len(part) != high - low:
                raise BlobGone(f"the blob {cid} expired")
            yield part
