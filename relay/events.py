"""One reader of `relay:events` per gateway process, fanning events out to whoever waits.

Sync callers register a waiter for their request id before the request is published, so the
terminal event cannot slip past them; the reader wakes them. No per-request polling.
"""

from __future__ import annotations

import asyncio
import logging

import redis
import redis.asyncio as aioredis

from relay.keys import Keys
from relay.schemas import decode_head

log = logging.getLogger("relay.events")

READ_BLOCK_MS = 1000
READ_COUNT = 1000
COMPLETED_PREFIX = b'{"type":"wasm_exec_completed"'


class EventFanIn:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._waiters: dict[str, list[asyncio.Future[bytes]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self, last_id: bytes) -> None:
        """Follow the stream from `last_id` (exclusive)."""
        self._task = asyncio.create_task(self._follow(last_id), name="relay-events")

    async def stop(self) -> None:
        """Stop following. Call before closing the client."""
        if self._task is None:
            return
        self._stopped = True
        self._task.cancel()
        # redis-py can swallow a cancellation that lands while it connects (redis-py #2028,
        # #2551): the task then finishes only when the client's close drops its connection.
        await asyncio.wait({self._task}, timeout=1.0)

    def completion(self, request_id: str) -> asyncio.Future[bytes]:
        """A future resolved with the `wasm_exec_completed` entry of `request_id`.

        Release it with `release` whatever happens, or it stays registered.
        """
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        return future

    def release(self, request_id: str, future: asyncio.Future[bytes] | None) -> None:
        if future is None:
            return
        waiters = self._waiters.get(request_id)
        if waiters is not None and future in waiters:
            waiters.remove(future)
            if not waiters:
                del self._waiters[request_id]

    async def _follow(self, last_id: bytes) -> None:
        stream = self.keys.events
        while not self._stopped:
            try:
                reply = await self.client.xread({stream: last_id}, count=READ_COUNT,
                                                block=READ_BLOCK_MS)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._stopped:
                    return
                log.warning("cannot read %s, retrying: %s", stream, exc)
                await asyncio.sleep(0.2)
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    self._dispatch(fields[b"data"])

    def _dispatch(self, data: bytes) -> None:
        # Relay encodes the tag first, so most events are skipped without being decoded.
        if not data.startswith(COMPLETED_PREFIX):
            return
        head = decode_head(data)
        for future in self._waiters.pop(head.request_id, ()):
            if not future.done():
                future.set_result(data)
