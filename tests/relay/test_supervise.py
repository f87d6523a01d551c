"""The supervisor of long-running loops, and the executor's loops under it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest
import redis.asyncio as aioredis

from executor.worker import Executor
from relay.keys import Keys
from relay.settings import Settings
from relay.supervise import Supervisor
from tests.conftest import upload, wait_for


class Failing:
    """A loop that raises on its first `failures` runs, then waits until cancelled; it records
    when each run started."""

    def __init__(self, failures: int, run_s: float = 0.0) -> None:
        self.failures = failures
        self.run_s = run_s
        self.starts: list[float] = []
        self.failed_at: list[float] = []

    async def __call__(self) -> None:
        self.starts.append(time.monotonic())
        if len(self.starts) <= self.failures:
            await asyncio.sleep(self.run_s)
            self.failed_at.append(time.monotonic())
            raise RuntimeError(f"failure {len(self.starts)}")
        await asyncio.Event().wait()


async def test_a_loop_that_raises_is_restarted_and_down_meanwhile(
        caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor("test.supervise", min_backoff_s=0.3, max_backoff_s=1.0)
    loop = Failing(failures=1)
    supervisor.start("worker", loop)
    try:
        await wait_for(lambda: supervisor.down == ["worker"], timeout_s=5, interval_s=0.005)
        assert len(loop.starts) == 1
        await wait_for(lambda: len(loop.starts) == 2, timeout_s=5, interval_s=0.005)
        assert supervisor.down == []
        assert loop.starts[1] - loop.failed_at[0] >= 0.29  # after the backoff, not before
    finally:
        await supervisor.stop()
    failures = [r for r in caplog.records if r.name == "test.supervise"]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "worker" in failures[0].getMessage()


async def test_the_backoff_doubles_up_to_its_ceiling() -> None:
    supervisor = Supervisor(min_backoff_s=0.05, max_backoff_s=0.2)
    loop = Failing(failures=5)
    supervisor.start("worker", loop)
    try:
        await wait_for(lambda: len(loop.starts) == 6, timeout_s=10, interval_s=0.005)
    finally:
        await supervisor.stop()
    waits = [start - failed for failed, start in zip(loop.failed_at, loop.starts[1:],
                                                       strict=True)]
    for waited, backoff in zip(waits, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
        # asyncio's timers are never early; the event loop may make them late.
        assert backoff - 0.005 <= waited < backoff + 0.1, waits


async def test_the_backoff_starts_over_after_a_long_run() -> None:
    """Three quick failures wait 0.05, 0.1 and 0.2 s; then a run that lasted longer than the
    ceiling fails: that is a new failure, and waits 0.05 s again, not 0.4."""
    supervisor = Supervisor(min_backoff_s=0.05, max_backoff_s=0.5)
    quick = Failing(failures=3)

    async def loop() -> None:
        if len(quick.starts) < 3:
            await quick()
        quick.starts.append(time.monotonic())
        if len(quick.starts) == 4:
            await asyncio.sleep(0.55)
            quick.failed_at.append(time.monotonic())
            raise RuntimeError("after a long run")
        await asyncio.Event().wait()

    supervisor.start("worker", loop)
    try:
        await wait_for(lambda: len(quick.starts) == 5, timeout_s=10, interval_s=0.005)
    finally:
        await supervisor.stop()
    assert quick.starts[4] - quick.failed_at[3] < 0.25


async def test_a_loop_that_returns_is_finished() -> None:
    supervisor = Supervisor(min_backoff_s=0.01)
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    supervisor.start("once", once)
    await wait_for(lambda: not any(t.get_name() == "once" for t in asyncio.all_tasks()),
                   timeout_s=5, interval_s=0.005)
    await asyncio.sleep(0.05)  # several backoffs: a restart would have happened by now
    assert runs == 1 and supervisor.down == []
    supervisor.start("once", once)  # finished: the name is free again
    await wait_for(lambda: runs == 2, timeout_s=5)
    await supervisor.stop()


async def test_stop_cancels_running_and_waiting_loops() -> None:
    supervisor = Supervisor(min_backoff_s=60, max_backoff_s=60)
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    supervisor.start("forever", forever)
    failing = Failing(failures=1)
    supervisor.start("failing", failing)
    await wait_for(lambda: supervisor.down == ["failing"], timeout_s=5)
    with pytest.raises(ValueError):
        supervisor.start("forever", forever)
    await asyncio.sleep(0)  # let `forever` start, so it is cancelled inside its wait
    await asyncio.wait_for(supervisor.stop(), 5)
    assert cancelled.is_set()
    assert supervisor.down == []
    assert not any(t.get_name() in ("forever", "failing") for t in asyncio.all_tasks())


async def test_stop_gives_up_on_a_loop_that_swallows_its_cancellation() -> None:
    supervisor = Supervisor()
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    supervisor.start("stubborn", stubborn)
    await asyncio.sleep(0)
    began = time.monotonic()
    await supervisor.stop(timeout_s=0.2)
    assert 0.19 <= time.monotonic() - began < 2
    release.set()
    await wait_for(lambda: not any(t.get_name() == "stubborn" for t in asyncio.all_tasks()),
                   timeout_s=5, interval_s=0.005)


async def test_stop_cancels_again_a_loop_that_lost_one_cancellation() -> None:
    """Python 3.11 loses a cancellation that lands as an `asyncio.timeout` expires: the loop
    goes round again. Stop cancels until it ends."""
    supervisor = Supervisor()
    swallowed = 0

    async def loses_the_first() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    supervisor.start("loses", loses_the_first)
    await asyncio.sleep(0)
    await supervisor.stop(timeout_s=5)
    assert swallowed == 1
    assert not any(t.get_name() == "loses" for t in asyncio.all_tasks())


# --- The executor's loops. ---

LOOP_WAT = '(module (func (export "main") (loop br 0)))'


async def test_a_killed_executor_loop_is_restarted(executor: Executor, settings: Settings,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is the only thing that kills a loop (each handles Redis errors itself): one is
    planted in the heartbeat, which stops beating until it is taken out and the loop restarted."""
    beat = executor.bus.heartbeat
    broken = True

    async def heartbeat(executor_node: str) -> None:
        if broken:
            raise RuntimeError("a bug in the heartbeat")
        await beat(executor_node)

    monkeypatch.setattr(executor.bus, "heartbeat", heartbeat)
    await wait_for(lambda: executor.supervisor.down == ["heartbeat"], timeout_s=10,
                   interval_s=0.005)
    broken = False
    fixed_ms = time.time() * 1000
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        async def beating() -> bool:
            score = await client.zscore(Keys(settings.prefix).executors, executor.name)
            return score is not None and score >= fixed_ms

        await wait_for(beating, timeout_s=10)
    finally:
        await client.aclose()
    assert executor.supervisor.down == []


async def test_bad_control_messages_do_not_stop_the_control_loop(
        http: httpx.AsyncClient, executor: Executor, settings: Settings,
        caplog: pytest.LogCaptureFixture) -> None:
    module = await upload(http, LOOP_WAT)
    response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                               json={"cid": module["cid"], "inputs": [],
                                     "policy": {"max_gas": 10**11, "max_time": 60_000}})
    request_id = response.json()["request_id"]

    async def running() -> bool:
        return bool((await http.get(f"/executions/{request_id}")).json()["status"] == "running")

    await wait_for(running, timeout_s=10)
    client = aioredis.Redis.from_url(settings.redis_url or "")
    bad = [b"{not json", json.dumps({"request_id": request_id, "action": "resume",
                                     "additional_gas": -1}).encode(),
           json.dumps({"request_id": request_id, "action": "explode"}).encode()]
    try:
        for message in bad:
            assert await client.publish(Keys(settings.prefix).control, message) >= 1
    finally:
        await client.aclose()
    # Published after the bad ones on the same channel: the executor reads it after them.
    paused = await http.post(f"/executions/{request_id}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    skipped = [r for r in caplog.records
               if r.name == "relay.executor" and "skipping" in r.getMessage()]
    assert len(skipped) == len(bad)
    assert executor.supervisor.down == []
    assert (await http.delete(f"/executions/{request_id}")).json()["status"] == "cancelled"
