"""Coalescing concurrent calls into one Redis pipeline.

A round trip to Redis costs far more client CPU than the command itself, so calls that arrive
while a batch is in flight go out together in the next one. There is no timer: a lone caller
is sent at once and pays no delay; under load, batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    def __init__(self, send: Callable[[list[Item]], Awaitable[list[Result | Exception]]],
                 max_batch: int = 256) -> None:
        """`send` takes a batch and returns one result, or the exception it met, per item."""
        self._send = send
        self._max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await self._send([item for item, _ in batch])
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flusher = None
            for _, future in self._pending:  # only left behind if we were cancelled
                future.cancel()
            self._pending.clear()
