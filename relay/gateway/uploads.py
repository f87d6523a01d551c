"""Upload slots: how many module uploads one gateway reads and validates at once.

Each upload holds up to RELAY_MAX_MODULE_BYTES in memory (several copies) and a parser thread
while it is read and validated. An upload that finds every slot taken waits for one, briefly and
without reading its body (it stays in the socket), so a user uploading several modules at once
is served; past `WAIT_S`, or with too many already waiting, it is 503 with Retry-After, so a
flood of uploads holds nothing.

Parsing and validating run on threads of their own at a lower CPU priority (nice +10, where the
system allows it): when CPUs are short, the event loop, and so everyone else's requests, win.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from relay.errors import Unavailable

T = TypeVar("T")

WAIT_S = 5.0
WAITING_PER_SLOT = 4
BUSY_RETRY_S = 1
PARSER_NICENESS = 10


class UploadSlots:
    def __init__(self, total: int) -> None:
        self.total = total
        self._free = asyncio.Semaphore(total)
        self.waiting = 0
        self._parsers = ThreadPoolExecutor(total, "relay-upload", initializer=_yield_cpu)

    @property
    def free(self) -> int:
        """Slots not taken now."""
        return self._free._value  # asyncio.Semaphore keeps no public count

    @contextlib.asynccontextmanager
    async def take(self) -> AsyncIterator[None]:
        """Hold a slot for the block. Raises Unavailable (503) when none frees in time."""
        if self._free.locked() and self.waiting >= self.total * WAITING_PER_SLOT:
            raise _busy()
        self.waiting += 1
        try:
            async with asyncio.timeout(WAIT_S):
                await self._free.acquire()
        except TimeoutError:
            raise _busy() from None
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._free.release()

    async def run(self, work: Callable[[bytes], T], data: bytes) -> T:
        """`work(data)` on a parser thread."""
        return await asyncio.get_running_loop().run_in_executor(self._parsers, work, data)

    def close(self) -> None:
        self._parsers.shutdown(wait=False, cancel_futures=True)


def _busy() -> Unavailable:
    return Unavailable("too many uploads at once; retry shortly", retry_after_s=BUSY_RETRY_S)


def _yield_cpu() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not on every platform
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PARSER_NICENESS)
