"""Progress of running executions: how often `execution_progress` comes, through a real executor
and Redis. The contract: at least every 250 ms of running time, at most 10 times a second."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from datetime import datetime
from typing import Any

import httpx

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import event_entries, upload, wait_for

# Endless, and calling a function in its loop: the fuel it used is visible at every tick.
CALLING_LOOP_WAT = """(module (func $step) (func (export "main") (loop (call $step) (br 0))))"""
LONG = {"max_gas": 10**12, "max_time": 60_000}
CONTRACT_MS = 250
# How late the event loop may run a timer on a busy machine. A reporter checking every 100 ms
# for 250 ms passed reports every 300 ms: beyond it.
SLACK_MS = 30


async def events_of(settings: Settings, request_id: str) -> list[dict[str, Any]]:
    events = [json.loads(fields[b"data"]) for _, fields in await event_entries(settings)]
    return [e for e in events if e["request_id"] == request_id]


def ms(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp() * 1000


async def start_endless(http: httpx.AsyncClient) -> str:
    module = await upload(http, CALLING_LOOP_WAT)
    response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                               json={"cid": module["cid"], "inputs": [], "policy": LONG})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


async def progress_count_reaches(settings: Settings, request_id: str, count: int) -> None:
    async def reached() -> bool:
        events = await events_of(settings, request_id)
        return sum(e["type"] == "execution_progress" for e in events) >= count

    await wait_for(reached, timeout_s=20, interval_s=0.05)


async def test_progress_comes_every_250_ms_of_running_at_most(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    request_id = await start_endless(http)
    await progress_count_reaches(settings, request_id, 10)
    assert (await http.delete(f"/executions/{request_id}")).json()["status"] == "cancelled"
    events = await events_of(settings, request_id)
    started = next(e for e in events if e["type"] == "execution_started")
    times = [ms(started)] + [ms(e) for e in events if e["type"] == "execution_progress"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # The first gap runs from the start, which includes instantiation: at most as long.
    assert all(100 <= gap <= CONTRACT_MS + SLACK_MS for gap in gaps[1:]), gaps
    assert gaps[0] <= CONTRACT_MS + SLACK_MS, gaps
    assert statistics.median(gaps) <= CONTRACT_MS, gaps
    gas = [e["gas_used"] for e in events if e["type"] == "execution_progress"]
    assert gas == sorted(gas) and len(set(gas)) == len(gas)


async def test_a_pause_does_not_stretch_the_running_time_between_reports(
        http: httpx.AsyncClient, executor: Executor, settings: Settings) -> None:
    """Paused between two reports, a run reports again once the rest of the interval has run:
    the running time between the report before the pause and the one after is within it."""
    request_id = await start_endless(http)
    await progress_count_reaches(settings, request_id, 2)
    # Pause late in an interval: a reporter that started a whole interval over on resume
    # would then report after 150 + 200 ms of running.
    last = [e for e in await events_of(settings, request_id)
            if e["type"] == "execution_progress"][-1]
    await asyncio.sleep(max(0.0, (ms(last) + 150) / 1000 - time.time()))
    assert (await http.post(f"/executions/{request_id}/pause")).json()["status"] == "paused"
    await asyncio.sleep(0.4)  # the pause, longer than an interval: what is being tested
    resumed = await http.post(f"/executions/{request_id}/resume")
    assert resumed.json()["status"] == "running", resumed.text
    await progress_count_reaches(settings, request_id, 5)
    assert (await http.delete(f"/executions/{request_id}")).json()["status"] == "cancelled"
    events = await events_of(settings, request_id)
    paused_at = ms(next(e for e in events if e["type"] == "execution_paused"))
    resumed_at = ms(next(e for e in events if e["type"] == "execution_resumed"))
    times = [ms(e) for e in events if e["type"] == "execution_progress"]
    for earlier, later in itertools.pairwise(times):
        pause = max(0.0, min(later, resumed_at) - max(earlier, paused_at))
        assert later - earlier - pause <= CONTRACT_MS + SLACK_MS, (earlier, later, pause)
