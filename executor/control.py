"""Live control of one execution: pause, resume, step, cancel, and what it has used so far.

A `LiveControl` is a state machine shared by the caller's threads and the wasm thread: requests
come from anywhere, and the wasm thread acts on them at its next check, an epoch tick (see
executor.epoch), where it also reads the fuel used, enforces `max_time` in running time, blocks
to pause the module in place, and ends the run when asked to. A WASI module sleeping in a host
call is served the same way, at once rather than at a tick (`sleep`). The sandbox drives it
through `attach`, `begin`, `finish` and `detach`.

Stepping: while a step is in force (the run's `step_gas` from its start, or a `step(gas)`), the
run is checked at every tick (`STEP_CHECK_TICKS`) and pauses, reason `step`, at the first check
that sees it has used the step's gas; otherwise every `CHECK_TICKS`, which costs what it did
before there were steps. Fuel is read where wasm code leaves it, at calls and returns: a step
ends at the first check after the call or return that crossed its gas, so a call-free loop never
ends one (it runs until it ends, or until `max_time`).
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import wasmtime

from executor import epoch, wasi
from relay.schemas import EffectivePolicy, ErrorInfo, PauseReason

log = logging.getLogger("relay.executor.control")

CANCELLED_MESSAGE = "the execution was cancelled"
TIMEOUT_MESSAGE = "the module ran past its time limit ({max_time} ms)"
_I64_MAX = 2**63 - 1
# Epoch ticks (executor.sandbox.TICK_S, 1 ms) between two checks of a running module: while a
# step is in force every tick, so a step overshoots its gas by at most about a millisecond of
# running; otherwise every tenth, so pause, cancel and `max_time` are noticed within 10 ms, and
# runs that are not stepped pay for no more callbacks than that.
STEP_CHECK_TICKS = 1
CHECK_TICKS = 10

ControlState = Literal["pending", "running", "paused", "finished"]


class NoPlace(Exception):
    """A pause refused: the executor holds as many paused runs as it may (`PausePlaces`)."""


class PausePlaces:
    """How many runs one executor may hold paused at once (RELAY_EXECUTOR_MAX_PAUSED). A paused
    run holds its thread and its Store: unbounded, a principal pausing and resuming forever would
    hold them all. A run holds a place from the moment its pause is accepted (or its step pause
    begins) until it runs again or ends. Thread-safe: taken on the loop (pause requests) and on
    wasm threads (step pauses)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._holders: set[LiveControl] = set()

    @property
    def held(self) -> int:
        return len(self._holders)

    def take(self, holder: LiveControl) -> bool:
        """Take a place for `holder` (True if it holds one already); False when none is free."""
        with self._lock:
            if holder in self._holders:
                return True
            if len(self._holders) >= self.limit:
                return False
            self._holders.add(holder)
            return True

    def give_back(self, holder: LiveControl) -> None:
        with self._lock:
            self._holders.discard(holder)


class LiveControl:
    """Live control of one execution: pause, resume, cancel, progress. One per execution.

    Every public method and property may be called from any thread. The module notices a
    request at its next check (within 10 ms; 1 ms while stepping) while it runs wasm code, and
    at once while it sleeps in a WASI `poll_oneoff` (`sleep`); the other host calls return
    within microseconds.

    `max_pause_ms`: a pause longer than this ends the execution with `cancelled` (step pauses
    included).
    `on_event`: called on the wasm thread (never the caller's) with "paused" once the module has
    actually stopped (`pause_reason` and `gas_used` then say why and where) and "resumed" when
    it continues; it must be quick and thread-safe (the worker hands it to its loop with
    `call_soon_threadsafe`). Its exceptions are logged, never raised into wasmtime.
    `step_gas`: pause (reason `step`) once the run has used this much gas.
    `places`: the executor's paused places, shared by its runs; None: unbounded.
    """

    output: wasi.Output | None
    """For a WASI module, what it writes to stdout and stderr: set before the module starts,
    and kept after the run until `release()`, so a reader tailing it can read its end."""

    def __init__(self, *, max_pause_ms: int,
                 on_event: Callable[[str], None] | None = None, step_gas: int | None = None,
                 places: PausePlaces | None = None) -> None:
        if max_pause_ms <= 0:
            raise ValueError("max_pause_ms must be positive")
        if step_gas is not None and step_gas < 1:
            raise ValueError("step_gas must be at least 1")
        self.max_pause_ms = max_pause_ms
        self.output = None
        self._on_event = on_event
        self._places = places
        self._on_step: Callable[[], None] | None = None
        self._cond = threading.Condition(threading.Lock())
        self._state: ControlState = "pending"
        # Requests from any thread, read by the wasm thread (under `_cond` when acted upon).
        self._pause_requested = False
        self._resume_requested = False
        self._cancel_message: str | None = None
        self._grant = 0
        self._step_until: int | None = step_gas
        """While a step is in force: the gas used at which it ends (a pause, reason `step`)."""
        self._pause_reason: PauseReason | None = None
        # Written by the wasm thread only.
        self._gas_used = 0
        self._gas_limit = 0
        self._max_time_s = math.inf
        self._started = 0.0
        self._ended = 0.0
        self._paused_s = 0.0
        self._paused_at: float | None = None
        self._stop: ErrorInfo | None = None
        self._tick_key: int | None = None
        self._reserve = 0
        self._fuel = ctypes.c_uint64(0)

    # --- Any thread. ---

    def pause(self) -> bool:
        """Ask the module to stop in place; False when it is not running (paused or being
        paused, cancelled, finished). Also accepted before it starts ("pending"): it then stops
        at its first tick. A module that ends before its next tick ends without pausing.
        Raises NoPlace when every paused place of the executor is taken."""
        with self._cond:
            if (self._state in ("pending", "running") and not self._pause_requested
                    and self._cancel_message is None):
                if self._places is not None and not self._places.take(self):
                    raise NoPlace(f"its executor holds {self._places.held} paused executions "
                                  "already, its limit; resume or cancel one first")
                self._pause_requested = True
                self._cond.notify_all()  # a module sleeping in a host call pauses at once
                return True
            return False

    def step(self, gas: int) -> bool:
        """Let a paused module run until it has used at least `gas` more (it then pauses again,
        reason `step`) or ends. False when it is not paused. Raises ValueError (gas < 1)."""
        if gas < 1:
            raise ValueError("a step's gas must be at least 1")
        with self._cond:
            if (self._cancel_message is not None or self._state != "paused"
                    or self._resume_requested):
                return False
            self._resume_requested = True
            self._state = "running"
            self._step_until = self._gas_used + gas
            self._cond.notify_all()
        self._give_back_place()  # running again (the wasm thread wakes up shortly)
        if self._on_step is not None:
            self._on_step()
        return True

    def resume(self, additional_gas: int = 0) -> bool:
        """Let a paused module continue to its end, its gas budget raised by `additional_gas`
        (>= 0), with no more step pauses. False when it is not paused. A resume that overtakes
        a pause not yet in effect withdraws it (no events), and the gas is added at the next
        tick. Raises ValueError."""
        if additional_gas < 0:
            raise ValueError("additional_gas must not be negative")
        with self._cond:
            if self._cancel_message is not None:
                return False
            if self._state == "paused" and not self._resume_requested:
                self._resume_requested = True
                self._state = "running"
                self._grant += additional_gas
                self._step_until = None
                self._cond.notify_all()
                self._give_back_place()
                return True
            if self._pause_requested:
                self._pause_requested = False
                self._grant += additional_gas
                self._step_until = None
                self._give_back_place()
                return True
            return False

    def cancel(self, message: str = CANCELLED_MESSAGE) -> bool:
        """End the execution with `cancelled` (and `message`), paused or not; False once it has
        finished. When it returns True the outcome is `cancelled`, even if the module ended
        meanwhile."""
        with self._cond:
            if self._state == "finished":
                return False
            if self._cancel_message is None:
                self._cancel_message = message
            self._pause_requested = False
            self._cond.notify_all()
            return True

    @property
    def state(self) -> ControlState:
        return self._state

    @property
    def pausing(self) -> bool:
        """Paused, or asked to pause and not yet stopped: it holds (or will hold) its thread
        without running (the executor caps how many may: RELAY_EXECUTOR_MAX_PAUSED)."""
        return self._state == "paused" or self._pause_requested

    @property
    def pause_reason(self) -> PauseReason | None:
        """Why the module last paused: `request` (pause) or `step` (a step used its gas)."""
        return self._pause_reason

    @property
    def stepping(self) -> bool:
        """A step is in force: the run pauses once it has used the step's gas."""
        return self._step_until is not None

    @property
    def gas_used(self) -> int:
        """Gas used as last seen at a tick (exact once finished); never decreases. Fuel is read
        from where wasm code leaves it at calls and returns, so a call-free loop shows none."""
        return self._gas_used

    @property
    def gas_limit(self) -> int:
        """The gas budget: the policy's `max_gas` plus every `additional_gas` added so far."""
        return self._gas_limit

    @property
    def running_ms(self) -> float:
        """Wall-clock ms spent running (instantiation included), paused time excluded."""
        with self._cond:
            if self._state == "pending":
                return 0.0
            end = self._ended if self._state == "finished" else time.perf_counter()
            paused = self._paused_s
            if self._paused_at is not None:
                paused += end - self._paused_at
            return max(end - self._started - paused, 0.0) * 1000

    def release(self) -> None:
        """Let go of `output` (call it once the output has been read) and of any paused place
        (a run that never started keeps none)."""
        self.output = None
        self._give_back_place()

    # --- The sandbox's side, on the wasm thread (the one running `Sandbox.run`). ---

    def attach(self, store: wasmtime.Store,
               on_step: Callable[[], None] | None = None) -> None:
        """Take over `store`'s epoch deadline (from its next tick); `detach()` once the run has
        returned. `on_step` is called (from any thread) when a step begins, so that ticks come
        every millisecond. Raises RuntimeError if this wasmtime's C API is not the one relied
        on."""
        self._on_step = on_step
        self._tick_key = epoch.install(store, self._tick, self._ticks_to_next)
        if self._step_until is not None and on_step is not None:
            on_step()  # the first step, from the start

    def detach(self) -> None:
        if self._tick_key is not None:
            epoch.uninstall(self._tick_key)
            self._tick_key = None

    def begin(self, policy: EffectivePolicy) -> bool:
        """Start counting; False if cancelled before the start."""
        with self._cond:
            self._gas_limit = policy.max_gas
            self._reserve = max(policy.max_gas - _I64_MAX, 0)
            self._max_time_s = policy.max_time / 1000
            self._started = time.perf_counter()
            if self._cancel_message is not None:
                self._state = "finished"
                self._ended = self._started
                return False
            self._state = "running"
            return True

    def finish(self, output: Any, error: ErrorInfo | None,
               fuel_left: int) -> tuple[Any, int, float, ErrorInfo | None]:
        """Stop counting; (output, gas used, running ms, error), as the sandbox's Outcome."""
        now = time.perf_counter()
        with self._cond:
            # A cancel accepted before this point wins, even over a module that just ended:
            # `cancel()` returning True always means a `cancelled` outcome.
            if self._cancel_message is not None:
                output, error = None, ErrorInfo("cancelled", self._cancel_message)
            # Above i64::MAX the fuel still holds what `_add_gas` put there: the module has
            # not yet written its own figure back, so the last one seen is the best known.
            if fuel_left < _I64_MAX:
                self._gas_used = max(self._gas_used, self._gas_limit - fuel_left)
            self._ended = now
            self._paused_at = None
            self._state = "finished"
            self._step_until = None
            self._cond.notify_all()
            duration_ms = max(now - self._started - self._paused_s, 0.0) * 1000
            gas_used = self._gas_used
        self._give_back_place()
        return output, gas_used, round(duration_ms, 3), error

    def stop_of(self, exc: wasmtime.WasmtimeError) -> ErrorInfo | None:
        """The error this control ended the run with, if `exc` is that end (timeout, cancel,
        or internal, at a tick or in a host call); None for any other error."""
        ended = epoch.is_stop(exc) or wasi.is_stop(exc)
        return self._stop if self._stop is not None and ended else None

    def sleep(self, seconds: float, context: Any) -> ErrorInfo | None:
        """Inside a host call, on the wasm thread (`context` its Store's): let `seconds` of
        running time pass, acting meanwhile on cancel, pause and `max_time` as a tick would,
        but at once. None once the time has passed; else the error to end the run with
        (`end_in_call` it).

        A pause stops the module in place, inside the call: paused time does not count as
        sleep, so once resumed it sleeps what was left, as its running time says it should.
        """
        left = seconds
        while True:
            stop = self._check(context)
            if stop is not None or left <= 0:
                return stop
            with self._cond:
                if self._cancel_message is None and not self._pause_requested:
                    began = time.perf_counter()
                    running = began - self._started - self._paused_s
                    self._cond.wait(max(min(left, self._max_time_s - running), 0.0))
                    left -= time.perf_counter() - began

    def end_in_call(self, error: ErrorInfo) -> None:
        """A host call ends the run with `error` (its trap is then told apart by `stop_of`)."""
        self._stop = error

    def _tick(self, context: Any) -> int:
        """At every epoch tick: 0 to continue, or an owned wasmtime_error_t* to stop. Never
        raises: an exception escaping a ctypes callback crashes the process."""
        try:
            return self._act(context)
        except BaseException as exc:
            self._stop = ErrorInfo("internal", f"live control failed: {exc!r}")
            log.exception("live control failed")
            return epoch.stop_error("internal")

    def _ticks_to_next(self) -> int:
        return STEP_CHECK_TICKS if self._step_until is not None else CHECK_TICKS

    def _act(self, context: Any) -> int:
        stop = self._check(context)
        if stop is None:
            return 0
        self._stop = stop
        return epoch.stop_error(stop.code)

    def _check(self, context: Any) -> ErrorInfo | None:
        """What a tick does: note the fuel used; the error to end the run with, if any;
        block while paused."""
        fuel = epoch.read_fuel(context, self._fuel)
        if fuel is not None and fuel < _I64_MAX:
            used = self._gas_limit - fuel
            if used > self._gas_used:
                self._gas_used = used
        if self._cancel_message is not None:
            return ErrorInfo("cancelled", self._cancel_message)
        if time.perf_counter() - self._started - self._paused_s >= self._max_time_s:
            return ErrorInfo("timeout", TIMEOUT_MESSAGE.format(
                max_time=round(self._max_time_s * 1000)))
        step_done = self._step_until is not None and self._gas_used >= self._step_until
        if self._pause_requested or self._grant or step_done:
            return self._pause_point(context, step_done)
        return None

    def _pause_point(self, context: Any, step_done: bool) -> ErrorInfo | None:
        with self._cond:
            # A step that ends while every paused place of the executor is taken does not
            # pause: the run goes on, as it would without the step, and pauses at the first
            # check after a place frees (or ends). Refusing the pause keeps the executor's
            # threads for runs that do work; ending the run would lose it over a cap its
            # owner may not control; `gas_used` at the pause says how far past the step it went.
            step_pauses = step_done and (self._places is None or self._places.take(self))
            if not self._pause_requested and not step_pauses:
                # A resume withdrew the pause, or the step waits for a place: only gas to add.
                grant, self._grant = self._grant, 0
                self._add_gas(context, grant)
                return None
            self._pause_reason = "request" if self._pause_requested else "step"
            self._pause_requested = False
            self._step_until = None
            self._state = "paused"
            self._paused_at = paused_at = time.perf_counter()
        self._emit("paused")
        with self._cond:
            deadline = paused_at + self.max_pause_ms / 1000
            while not self._resume_requested and self._cancel_message is None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    self._cancel_message = (f"paused longer than the pause limit "
                                            f"({self.max_pause_ms} ms)")
                    break
                self._cond.wait(remaining)
            self._paused_s += time.perf_counter() - paused_at
            self._paused_at = None
            self._resume_requested = False
            self._state = "running"
            grant, self._grant = self._grant, 0
            cancel = self._cancel_message
        self._give_back_place()
        if cancel is not None:
            return ErrorInfo("cancelled", cancel)
        self._add_gas(context, grant)
        self._emit("resumed")
        return None

    def _add_gas(self, context: Any, gas: int) -> None:
        """Raise the budget of the running module by `gas`.

        Running code keeps its fuel in a register and writes it back at calls and returns, so a
        plain `set_fuel` here is overwritten. wasmtime injects at most i64::MAX into the code and
        keeps the rest in a reserve it refills from when the code runs dry; the reserve is never
        overwritten. So the fuel is set to i64::MAX + reserve, reserve = what is still reserved
        plus `gas`. What is still reserved: reading above i64::MAX, the code has not written
        back since the last grant (reading - i64::MAX); otherwise the code refilled from the
        reserve exactly when the reading (reserve + fuel left in the code) is at most the
        reserve, since a fuel check (with a refill when dry) always precedes a tick.
        Pinned by tests/executor/test_sandbox_control.py against an uncontrolled run's exact budget.
        """
        if gas <= 0:
            return
        fuel = epoch.read_fuel(context, self._fuel)
        if fuel is None:
            raise RuntimeError("cannot read the fuel of a running module")
        if fuel >= _I64_MAX:
            reserve = fuel - _I64_MAX
        elif fuel > self._reserve:
            reserve = self._reserve
        else:
            reserve = 0
        epoch.set_fuel(context, _I64_MAX + reserve + gas)
        self._reserve = reserve + gas
        self._gas_limit += gas

    def _give_back_place(self) -> None:
        if self._places is not None:
            self._places.give_back(self)

    def _emit(self, event: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event(%r) failed", event)

