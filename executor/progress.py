"""What a running execution tells the world while it runs: progress and its output.

A `LiveRun` ticks on the executor's event loop (no thread, no task of its own while idle): every
`PROGRESS_EVERY_MS` of *running* time it publishes `execution_progress` from the fuel the sandbox
saw used, and every 100 ms it publishes what a WASI module wrote to stdout/stderr since the last
tick as `execution_output`. Paused, it publishes no progress. Everything it published is flushed
before the run's terminal event.

`execution_started` is announced lazily: once the run has lasted `ANNOUNCE_AFTER_S`, or before
anything else it publishes. Most runs end sooner, and their settle script emits it right before
the terminal event: one round trip and one wake-up of every gateway fewer per execution. The
announcement also takes one of the principal's places (`max_active`); a run that gets none is
not run here (its entry is parked), so the worker announces before it gives a run a thread.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
from typing import Literal

from msgspec import UNSET

from executor.control import LiveControl, PausePlaces
from executor.wasi import Output
from relay.bus import Bus, Verdict
from relay.schemas import (
    BusMessage,
    ExecutionOutput,
    ExecutionPaused,
    ExecutionProgress,
    ExecutionResumed,
    ExecutionStarted,
    PauseReason,
    WasmExecRequested,
    now_iso,
)

log = logging.getLogger("relay.executor")

TICK_S = 0.1
ANNOUNCE_AFTER_S = 0.005
# The contract: progress at least every 250 ms of running time, at most 10 times a second. A
# timer is late by however long the event loop is busy: aiming at 200 leaves it 50 ms.
PROGRESS_EVERY_MS = 200.0
OUTPUT_CHUNK_BYTES = 16 * 1024
FLUSH_IN_FLIGHT = 64
"""Output chunks the final flush has in flight at once (1 MiB): a module that wrote 64 MiB just
before it ended is not held as 64 MiB of events (measured: +560 MiB of RSS) on top of its
output."""

Stream = Literal["stdout", "stderr"]


class _Tail:
    """Reads what a stream of a run's output gained since the last read, as text (split
    characters kept whole)."""

    def __init__(self, output: Output, stream: Stream, budget_bytes: int) -> None:
        self.output = output
        self.stream: Stream = stream
        self.budget_bytes = budget_bytes
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self, final: bool = False) -> str:
        if self.budget_bytes <= 0:
            return ""
        data = self.output.read(self.stream, self._offset,
                                min(OUTPUT_CHUNK_BYTES, self.budget_bytes))
        self._offset += len(data)
        self.budget_bytes -= len(data)
        return self._decoder.decode(data, final=final)


class LiveRun:
    def __init__(self, bus: Bus, request: WasmExecRequested, entry_id: bytes, *,
                 executor_node: str, max_pause_ms: int, max_output_bytes: int,
                 pause_places: PausePlaces | None = None) -> None:
        """`pause_places`: the executor's, shared by its runs (RELAY_EXECUTOR_MAX_PAUSED)."""
        self.bus = bus
        self.request = request
        self.entry_id = entry_id
        self.verdict: Verdict | None = None
        """The start script's, once announced."""
        self.started = ExecutionStarted(request_id=request.request_id,
                                        executor_node=executor_node, timestamp=now_iso(),
                                        session_id=request.session_id or UNSET,
                                        pipeline_id=request.pipeline_id or UNSET)
        self._announced: asyncio.Task[bool] | None = None
        self.control = LiveControl(max_pause_ms=max_pause_ms, on_event=self.on_event,
                                   step_gas=request.step_gas, places=pause_places)
        """Hand it to the sandbox's run; pause, resume, step and cancel it from the loop."""
        self._max_output_bytes = max_output_bytes
        self._tails: dict[Stream, _Tail] = {}
        self._pending: set[asyncio.Task[bool]] = set()
        self._last_progress_ms = 0.0
        self._last_gas = -1
        self._loop = asyncio.get_running_loop()
        self._closed = False
        # Output and progress are reported from when the run is announced: every run that
        # goes on while the loop turns (in a thread, or waiting) is; one inline on the loop
        # ends before any timer could fire, and its settle announces it.
        self._timer: asyncio.TimerHandle | None = None
        self._progress_timer: asyncio.TimerHandle | None = None
        self._announce_timer = self._loop.call_later(ANNOUNCE_AFTER_S, self.announce)

    @property
    def announced(self) -> bool:
        return self._announced is not None

    def announce(self) -> asyncio.Task[bool]:
        """Publish `execution_started` (once). The task's result says whether the execution is
        still ours to run: if not (finished or cancelled meanwhile, parked, or taken over; see
        `verdict`), the run is stopped."""
        if self._announced is None:
            self._announce_timer.cancel()
            self._announced = asyncio.create_task(self._start())
            self._announced.add_done_callback(self._on_announced)
            if not self._closed:
                self._timer = self._loop.call_later(TICK_S, self._tick)
                self._progress_timer = self._loop.call_later(PROGRESS_EVERY_MS / 1000,
                                                             self._progress_tick)
        return self._announced

    async def _start(self) -> bool:
        # The executor's node name is its consumer name in the group.
        self.verdict = await self.bus.start(self.started, self.request, self.entry_id,
                                            self.started.executor_node)
        return self.verdict == "started"

    def _on_announced(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None and not task.result():
            self.control.cancel()

    def on_event(self, kind: str) -> None:
        """The sandbox's callback, on the wasm thread: hand it to the loop, with why and where
        a pause stopped, read now (by the time the loop runs, the module may have gone on)."""
        reason = self.control.pause_reason or "request"
        self._loop.call_soon_threadsafe(self._state_changed, kind, reason,
                                        self.control.gas_used)

    def _state_changed(self, kind: str, reason: PauseReason = "request",
                       gas_used: int = 0) -> None:
        rid, now = self.request.request_id, now_iso()
        if kind == "paused":
            self._publish(ExecutionPaused(request_id=rid, timestamp=now, reason=reason,
                                          gas_used=gas_used), "paused")
        elif kind == "resumed":
            self._publish(ExecutionResumed(request_id=rid, timestamp=now), "running")
            if self._progress_timer is None and not self._closed:
                self._progress_tick()

    def _tick(self) -> None:
        try:
            self._output()
        except Exception:
            log.exception("output of %s", self.request.request_id)
        self._timer = self._loop.call_later(TICK_S, self._tick)

    def _progress_tick(self) -> None:
        """Report progress when `PROGRESS_EVERY_MS` of running time have passed since the last
        report, and come back when the next one is due: running time never passes faster than
        the wall clock, so waiting for what remains never overshoots. Paused, it stops; the
        `resumed` event starts it again."""
        self._progress_timer = None
        state = self.control.state
        if self._closed or state in ("paused", "finished"):
            return
        due_ms = PROGRESS_EVERY_MS - (self.control.running_ms - self._last_progress_ms)
        if state == "running" and due_ms <= 0:
            self._last_progress_ms = self.control.running_ms
            due_ms = PROGRESS_EVERY_MS
            try:
                self._progress()
            except Exception:
                log.exception("progress of %s", self.request.request_id)
        self._progress_timer = self._loop.call_later(due_ms / 1000, self._progress_tick)

    def _progress(self) -> None:
        gas_used = self.control.gas_used  # never decreases
        if gas_used == self._last_gas:
            return
        self._last_gas = gas_used
        # The budget grows with each `additional_gas` granted on resume.
        budget = self.control.gas_limit or self.request.policy.max_gas
        share = min(100.0, round(gas_used * 100 / max(budget, 1), 2))
        self._publish(ExecutionProgress(request_id=self.request.request_id, progress=share,
                                        gas_used=gas_used, timestamp=now_iso()))

    def _output(self) -> None:
        """At most one chunk a stream a tick: a bounded rate."""
        for stream, tail in self._output_tails():
            if text := tail.read():
                self._publish_output(stream, text)

    async def _flush_output(self) -> None:
        """Publish all the output not sent yet, FLUSH_IN_FLIGHT chunks at a time."""
        for stream, tail in self._output_tails():
            while text := tail.read(final=True):
                self._publish_output(stream, text)
                if len(self._pending) >= FLUSH_IN_FLIGHT:
                    await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)

    def _output_tails(self) -> list[tuple[Stream, _Tail]]:
        output = self.control.output
        if output is None:
            return []
        stream: Stream
        for stream in ("stdout", "stderr"):
            if stream not in self._tails:
                self._tails[stream] = _Tail(output, stream, self._max_output_bytes)
        return list(self._tails.items())

    def _publish_output(self, stream: Stream, text: str) -> None:
        self._publish(ExecutionOutput(request_id=self.request.request_id, stream=stream,
                                      data=text, timestamp=now_iso()))

    def _publish(self, event: BusMessage, status: str = "") -> None:
        # A session call's and a pipeline node's events carry their session or pipeline.
        if self.request.session_id is not None:
            event.session_id = self.request.session_id
        if self.request.pipeline_id is not None:
            event.pipeline_id = self.request.pipeline_id
        task = asyncio.create_task(self._emit(event, status))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _emit(self, event: BusMessage, status: str) -> bool:
        return await self.announce() and await self.bus.emit(self.request.request_id, event,
                                                               status)

    async def close(self) -> None:
        """Stop ticking, publish the output not yet sent, and wait for everything published:
        the terminal event must come after all of it."""
        self._closed = True
        self._announce_timer.cancel()
        for timer in (self._timer, self._progress_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._progress_timer = None
        with contextlib.suppress(Exception):
            await self._flush_output()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
