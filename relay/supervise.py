"""Long-running loops that must not die unnoticed: each runs as a task that is restarted, after a
backoff, whenever it fails, and shows as down while it waits to be restarted.

Core: it knows nothing of the gateway or the executor, which each keep one `Supervisor` for their
background loops and report `down` in their health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

CANCEL_AGAIN_S = 0.05


class Supervisor:
    def __init__(self, logger_name: str = "relay.supervise", *, min_backoff_s: float = 0.1,
                 max_backoff_s: float = 10.0) -> None:
        """Raises ValueError unless 0 < min_backoff_s <= max_backoff_s (seconds)."""
        if not 0 < min_backoff_s <= max_backoff_s:
            raise ValueError("need 0 < min_backoff_s <= max_backoff_s")
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self._log = logging.getLogger(logger_name)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: set[str] = set()

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run `loop()` as a task named `name`, in the running event loop. If it raises
        (anything but CancelledError), log the exception, mark it down, and call `loop()` again
        after a backoff (doubling from min to max; back to min once a run lasted longer than
        max_backoff_s). If it returns it is finished: not restarted, not down.

        Raises ValueError if a loop of that name is still supervised."""
        if name in self._tasks:
            raise ValueError(f"a loop named {name!r} is already supervised")
        task = asyncio.create_task(self._supervise(name, loop), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda _: self._forget(name, task))

    @property
    def down(self) -> list[str]:
        """Names of the loops that failed and are waiting to be restarted, sorted."""
        return sorted(self._down)

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Cancel every loop and wait for them, at most `timeout_s` seconds: redis-py can swallow
        a cancellation that lands while it connects (redis-py #2028, #2551), and such a task
        ends only once its client is closed."""
        tasks = list(self._tasks.values())
        deadline = time.monotonic() + timeout_s
        while tasks and time.monotonic() < deadline:
            # Cancelled again until done: Python 3.11 loses a cancellation that lands as an
            # `asyncio.timeout` around the loop's wait expires (the loop then goes on).
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=min(CANCEL_AGAIN_S, deadline - time.monotonic()))
            tasks = [task for task in tasks if not task.done()]

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await loop()
                return
            except Exception:
                if time.monotonic() - started > self.max_backoff_s:
                    failures = 0  # it had recovered: this is a new failure
                backoff_s = min(self.min_backoff_s * 2**failures, self.max_backoff_s)
                failures += 1
                self._log.exception("%s failed; restarting it in %.1f s", name, backoff_s)
            self._down.add(name)
            try:
                await asyncio.sleep(backoff_s)
            finally:
                self._down.discard(name)

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
