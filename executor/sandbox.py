"""The wasmtime sandbox: one Engine per process, a fresh Store per execution, hard limits.

Limits map onto wasmtime's own mechanisms:
- gas is fuel (`Store.set_fuel`), exhausted -> trap OUT_OF_FUEL -> `out_of_gas`;
- time is an epoch deadline; a ticker thread advances the epoch every `TICK_S` -> `timeout`;
- memory is the Store limiter (linear memories and tables) -> `memory_limit`;
- the wasm stack is capped by `Config.max_wasm_stack` -> `stack_overflow`.

WASI command modules get their inputs as JSON on stdin and nothing else: no preopened
directories, no environment, no arguments, no network.

Live control (pause, resume, cancel, progress) of an execution run with a `LiveControl` goes
through wasmtime's epoch deadline callback (C API, reached with ctypes: wasmtime-py has no
wrapper). The callback runs on the wasm thread at every tick, at function entries and loop
back-edges: it reads progress, blocks there to pause the module in place, and returns an error to
end it. Once it is installed wasmtime no longer traps at the deadline, so the callback enforces
`max_time` itself, counting running time only. Executions without a control keep the plain
epoch deadline and pay nothing for any of this.
"""

from __future__ import annotations

import ctypes
import logging
import math
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec
import wasmtime
from wasmtime import _bindings

from executor.binary import export_memory
from relay.modules import WASI_MODULE
from relay.schemas import EffectivePolicy, ErrorCode, ErrorInfo

log = logging.getLogger("relay.executor.sandbox")

TICK_S = 0.01
# The gas a call may use on the event loop's own thread before it is moved to a worker thread.
# A hop to a thread and back costs more than most calls (hundreds of µs on a busy 2-core host);
# this much gas takes about 0.1 ms, so the loop is never held up for long.
INLINE_GAS = 250_000
MAX_WASM_STACK_BYTES = 1024 * 1024
PAGE_BYTES = 65536
TABLE_ELEMENT_BYTES = 8
_TMP_ROOT = "/dev/shm" if Path("/dev/shm").is_dir() else None
_I64_MAX = 2**63 - 1

_TRAP_CODES: dict[wasmtime.TrapCode, ErrorCode] = {
    wasmtime.TrapCode.OUT_OF_FUEL: "out_of_gas",
    wasmtime.TrapCode.INTERRUPT: "timeout",
    wasmtime.TrapCode.STACK_OVERFLOW: "stack_overflow",
}
_TRAP_MESSAGES = {
    "out_of_gas": "the module used all of its gas ({max_gas})",
    "timeout": "the module ran past its time limit ({max_time} ms)",
    "stack_overflow": "the module overflowed its stack",
}
CANCELLED_MESSAGE = "the execution was cancelled"
SHUTDOWN_MESSAGE = "the executor is shutting down"
CLOSED_MESSAGE = "the sandbox is closed"
# Ends the text of the error the epoch callback returns (it surfaces as a WasmtimeError, not a
# Trap): tells the callback's stop from any other error.
_STOP_MARKER = "relay-live-control-stop:"


class Outcome(NamedTuple):
    output: Any
    gas_used: int
    duration_ms: float
    error: ErrorInfo | None


class Prepared(NamedTuple):
    """A compiled module linked against what Relay provides, ready to instantiate."""

    module: wasmtime.Module
    instance_pre: wasmtime.InstancePre
    uses_wasi: bool


class LinkError(ValueError):
    """The module cannot run here: invalid, or it imports something Relay does not provide."""


ControlState = Literal["pending", "running", "paused", "finished"]


class LiveControl:
    """Live control of one execution: pause, resume, cancel, progress. One per execution.

    Every public method and property may be called from any thread. The module only notices a
    request at its next epoch tick (`TICK_S`, 10 ms) while it runs wasm code: a pause or cancel
    asked for while it sits in a host call (a WASI write) takes effect when it returns to wasm.

    `max_pause_ms`: a pause longer than this ends the execution with `cancelled`.
    `on_event`: called on the wasm thread (never the caller's) with "paused" once the module has
    actually stopped and "resumed" when it continues; it must be quick and thread-safe (the
    worker hands it to its loop with `call_soon_threadsafe`). Its exceptions are logged, never
    raised into wasmtime.
    """

    stdout_path: Path | None
    """For a WASI module, the file its stdout goes to: set (after `stderr_path`, both files
    existing) before the module starts, and kept after the run until `release()`, so a reader
    tailing it can read its end."""
    stderr_path: Path | None

    def __init__(self, *, max_pause_ms: int,
                 on_event: Callable[[str], None] | None = None) -> None:
        if max_pause_ms <= 0:
            raise ValueError("max_pause_ms must be positive")
        self.max_pause_ms = max_pause_ms
        self.stdout_path = None
        self.stderr_path = None
        self._on_event = on_event
        self._cond = threading.Condition(threading.Lock())
        self._state: ControlState = "pending"
        # Requests from any thread, read by the wasm thread (under `_cond` when acted upon).
        self._pause_requested = False
        self._resume_requested = False
        self._cancel_message: str | None = None
        self._grant = 0
        # Written by the wasm thread only.
        self._gas_used = 0
        self._gas_limit = 0
        self._max_time_s = math.inf
        self._started = 0.0
        self._ended = 0.0
        self._paused_s = 0.0
        self._paused_at: float | None = None
        self._stop: ErrorInfo | None = None
        self._reserve = 0
        self._fuel = ctypes.c_uint64(0)
        self._output_cleanup: weakref.finalize[Any, Any] | None = None

    # --- Any thread. ---

    def pause(self) -> bool:
        """Ask the module to stop in place; False when it is not running (paused or being
        paused, cancelled, finished). Also accepted before it starts ("pending"): it then stops
        at its first tick. A module that ends before its next tick ends without pausing."""
        with self._cond:
            if (self._state in ("pending", "running") and not self._pause_requested
                    and self._cancel_message is None):
                self._pause_requested = True
                return True
            return False

    def resume(self, additional_gas: int = 0) -> bool:
        """Let a paused module continue, its gas budget raised by `additional_gas` (>= 0).
        False when it is not paused. A resume that overtakes a pause not yet in effect withdraws
        it (no events), and the gas is added at the next tick. Raises ValueError."""
        if additional_gas < 0:
            raise ValueError("additional_gas must not be negative")
        with self._cond:
            if self._cancel_message is not None:
                return False
            if self._state == "paused" and not self._resume_requested:
                self._resume_requested = True
                self._state = "running"
                self._grant += additional_gas
                self._cond.notify_all()
                return True
            if self._pause_requested:
                self._pause_requested = False
                self._grant += additional_gas
                return True
            return False

    def cancel(self) -> bool:
        """End the execution with `cancelled`, paused or not; False once it has finished.
        When it returns True the Outcome is `cancelled`, even if the module ended meanwhile."""
        return self._cancel(CANCELLED_MESSAGE)

    @property
    def state(self) -> ControlState:
        return self._state

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
        """Delete the files behind `stdout_path` and `stderr_path` (call it once the output has
        been read; a control that is garbage collected, or the interpreter's exit, does it too)."""
        if self._output_cleanup is not None:
            self._output_cleanup()

    def _cancel(self, message: str) -> bool:
        with self._cond:
            if self._state == "finished":
                return False
            if self._cancel_message is None:
                self._cancel_message = message
            self._pause_requested = False
            self._cond.notify_all()
            return True

    # --- The wasm thread (the one running `Sandbox.run`). ---

    def _begin(self, policy: EffectivePolicy) -> bool:
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

    def _adopt_output(self, directory: str) -> None:
        self._output_cleanup = weakref.finalize(self, shutil.rmtree, directory,
                                                ignore_errors=True)

    def _finish(self, output: Any, error: ErrorInfo | None, fuel_left: int) -> Outcome:
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
            self._cond.notify_all()
            duration_ms = max(now - self._started - self._paused_s, 0.0) * 1000
            return Outcome(output, self._gas_used, round(duration_ms, 3), error)

    def _tick(self, context: Any) -> int:
        """The epoch callback's body: 0 to continue, or an owned wasmtime_error_t* to stop."""
        fuel = self._read_fuel(context)
        if fuel is not None and fuel < _I64_MAX:
            used = self._gas_limit - fuel
            if used > self._gas_used:
                self._gas_used = used
        if self._cancel_message is not None:
            return self._stop_with("cancelled", self._cancel_message)
        if time.perf_counter() - self._started - self._paused_s >= self._max_time_s:
            return self._stop_with("timeout", _TRAP_MESSAGES["timeout"].format(
                max_time=round(self._max_time_s * 1000)))
        if self._pause_requested or self._grant:
            return self._pause_point(context)
        return 0

    def _pause_point(self, context: Any) -> int:
        with self._cond:
            if not self._pause_requested:  # a resume withdrew the pause: only gas to add
                grant, self._grant = self._grant, 0
                self._add_gas(context, grant)
                return 0
            self._pause_requested = False
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
        if cancel is not None:
            return self._stop_with("cancelled", cancel)
        self._add_gas(context, grant)
        self._emit("resumed")
        return 0

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
        Pinned by tests/test_sandbox_control.py against an uncontrolled run's exact budget.
        """
        if gas <= 0:
            return
        fuel = self._read_fuel(context)
        if fuel is None:
            raise RuntimeError("cannot read the fuel of a running module")
        if fuel >= _I64_MAX:
            reserve = fuel - _I64_MAX
        elif fuel > self._reserve:
            reserve = self._reserve
        else:
            reserve = 0
        error = _BINDING.set_fuel(context, _I64_MAX + reserve + gas)
        if error:
            _BINDING.error_delete(error)
            raise RuntimeError("cannot set the fuel of a running module")
        self._reserve = reserve + gas
        self._gas_limit += gas

    def _read_fuel(self, context: Any) -> int | None:
        error = _BINDING.get_fuel(context, ctypes.byref(self._fuel))
        if error:
            _BINDING.error_delete(error)
            return None
        return self._fuel.value

    def _stop_with(self, code: ErrorCode, message: str) -> int:
        self._stop = ErrorInfo(code, message)
        return _new_error(_STOP_MARKER + code)

    def _emit(self, event: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event(%r) failed", event)


class Sandbox:
    def __init__(self) -> None:
        config = wasmtime.Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        config.max_wasm_stack = MAX_WASM_STACK_BYTES
        self.engine = wasmtime.Engine(config)
        self._linker = wasmtime.Linker(self.engine)
        self._linker.define_wasi()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._controls: set[LiveControl] = set()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Refuse new runs and cancel every controlled one, paused or running, waking it: a
        paused run blocks its thread, which would hang the interpreter's exit. Does not wait;
        the epoch keeps ticking until the last controlled run has returned."""
        self._stop.set()
        with self._lock:
            controls = list(self._controls)
        for control in controls:
            control._cancel(SHUTDOWN_MESSAGE)

    def _tick(self) -> None:
        # After `close()`, ticking goes on while controlled runs remain: they see their cancel
        # at a tick.
        while True:
            if self._stop.wait(TICK_S):
                with self._lock:
                    if not self._controls:
                        return
                time.sleep(TICK_S)
            self.engine.increment_epoch()

    def prepare(self, wasm: bytes) -> Prepared:
        """Compile and link a module (slow: call it off the event loop). Raises LinkError."""
        try:
            module = wasmtime.Module(self.engine, export_memory(wasm))
        except wasmtime.WasmtimeError as exc:
            raise LinkError(f"invalid WebAssembly: {exc}") from None
        unknown = [
            f"{imp.module}.{imp.name}" for imp in module.imports if imp.module != WASI_MODULE
        ]
        if unknown:
            raise LinkError(f"imports Relay does not provide: {', '.join(unknown[:5])}")
        try:
            instance_pre = self._linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise LinkError(f"cannot link the module: {exc}") from None
        uses_wasi = any(imp.module == WASI_MODULE for imp in module.imports)
        return Prepared(module, instance_pre, uses_wasi)

    def run(self, prepared: Prepared, entrypoint: str, inputs: list[Any],
            policy: EffectivePolicy, *, command: bool, max_output_bytes: int,
            control: LiveControl | None = None) -> Outcome:
        """Run one execution to its end under `policy`. Blocking: call it off the event loop,
        in a thread that may block for as long as the run is paused (up to max_pause_ms).

        `command`: run a WASI command (`inputs` as JSON on stdin, stdout as the output);
        otherwise call `entrypoint` with `inputs` as its arguments. `control`: see LiveControl
        (raises RuntimeError if this wasmtime's C API does not match what it relies on).
        After `close()` every run ends at once with `cancelled`.
        """
        if control is not None:
            return self._run_controlled(prepared, entrypoint, inputs, policy, command=command,
                                        max_output_bytes=max_output_bytes, control=control)
        if self._stop.is_set():
            return Outcome(None, 0, 0.0, ErrorInfo("cancelled", CLOSED_MESSAGE))
        store = wasmtime.Store(self.engine)
        store.set_fuel(policy.max_gas)
        store.set_limits(memory_size=policy.max_memory,
                         table_elements=max(policy.max_memory // TABLE_ELEMENT_BYTES, 1))
        store.set_epoch_deadline(math.ceil(policy.max_time / 1000 / TICK_S) + 1)
        if not prepared.uses_wasi:
            return self._call(store, prepared, entrypoint, inputs, policy)
        with tempfile.TemporaryDirectory(dir=_TMP_ROOT, prefix="relay-") as tmp:
            return self._run_wasi(store, prepared, entrypoint, inputs, policy, Path(tmp),
                                  command=command, max_output_bytes=max_output_bytes,
                                  control=None)

    def try_inline(self, prepared: Prepared, entrypoint: str, inputs: list[Any],
                   policy: EffectivePolicy) -> Outcome | None:
        """Run a plain call (no WASI) right here if it ends within `INLINE_GAS` and the current
        epoch tick; None if it would not, and then it must be run again, from the start, by
        `run` in a thread. The first attempt leaves no trace: such a call has no imports, so it
        touches nothing outside its own fresh Store, and runs the same way again."""
        if prepared.uses_wasi or self._stop.is_set():
            return None
        budget = min(policy.max_gas, INLINE_GAS)
        store = wasmtime.Store(self.engine)
        store.set_fuel(budget)
        store.set_limits(memory_size=policy.max_memory,
                         table_elements=max(policy.max_memory // TABLE_ELEMENT_BYTES, 1))
        # Bulk memory instructions cost one unit of gas whatever their size: the next epoch
        # tick bounds what a hostile call holds the loop for (TICK_S, plus the one instruction
        # under way: tens of ms for a fill of a 64 MiB memory).
        store.set_epoch_deadline(1)
        outcome = self._call(store, prepared, entrypoint, inputs,
                             msgspec.structs.replace(policy, max_gas=budget))
        code = outcome.error.code if outcome.error else None
        if code == "timeout" or (code == "out_of_gas" and budget < policy.max_gas):
            return None
        return outcome

    def _run_controlled(self, prepared: Prepared, entrypoint: str, inputs: list[Any],
                        policy: EffectivePolicy, *, command: bool, max_output_bytes: int,
                        control: LiveControl) -> Outcome:
        if control.state != "pending":
            raise ValueError("a LiveControl serves one execution only")
        with self._lock:
            if self._stop.is_set():
                control._cancel(CLOSED_MESSAGE)
                control._begin(policy)
                return control._finish(None, None, policy.max_gas)
            self._controls.add(control)
        try:
            store = wasmtime.Store(self.engine)
            store.set_fuel(policy.max_gas)
            store.set_limits(memory_size=policy.max_memory,
                             table_elements=max(policy.max_memory // TABLE_ELEMENT_BYTES, 1))
            _install_callback(store, control)
            if not prepared.uses_wasi:
                return self._call(store, prepared, entrypoint, inputs, policy, control)
            # The output outlives the run, so a reader tailing it can read its end (`release()`).
            tmp = tempfile.mkdtemp(dir=_TMP_ROOT, prefix="relay-")
            control._adopt_output(tmp)
            return self._run_wasi(store, prepared, entrypoint, inputs, policy, Path(tmp),
                                  command=command, max_output_bytes=max_output_bytes,
                                  control=control)
        finally:
            with self._lock:
                self._controls.discard(control)
            _CONTROLS.pop(id(control), None)

    def _run_wasi(self, store: wasmtime.Store, prepared: Prepared, entrypoint: str,
                  inputs: list[Any], policy: EffectivePolicy, tmp: Path, *, command: bool,
                  max_output_bytes: int, control: LiveControl | None) -> Outcome:
        stdout, stderr = tmp / "stdout", tmp / "stderr"
        stdin = tmp / "stdin"
        stdin.write_bytes(msgspec.json.encode(inputs) if command else b"")
        if control is not None:  # stdout last: once it is set, both files exist
            stdout.touch()
            stderr.touch()
            control.stderr_path = stderr
            control.stdout_path = stdout
        wasi = wasmtime.WasiConfig()
        wasi.stdin_file = str(stdin)
        wasi.stdout_file = str(stdout)
        wasi.stderr_file = str(stderr)
        store.set_wasi(wasi)
        outcome = self._call(store, prepared, entrypoint, [] if command else inputs, policy,
                             control)
        if outcome.error is None and command:
            output = _decode_stdout(_read_capped(stdout, max_output_bytes))
            return outcome._replace(output=output)
        if outcome.error is not None and outcome.error.code == "exit_nonzero":
            tail = _read_capped(stderr, 1000).decode("utf-8", "replace").strip()
            if tail:
                message = f"{outcome.error.message}: {tail}"
                return outcome._replace(error=ErrorInfo("exit_nonzero", message))
        return outcome

    def _call(self, store: wasmtime.Store, prepared: Prepared, entrypoint: str,
              inputs: list[Any], policy: EffectivePolicy,
              control: LiveControl | None = None) -> Outcome:
        if control is not None and not control._begin(policy):
            return control._finish(None, None, policy.max_gas)
        started = time.perf_counter()
        output: Any = None
        error: ErrorInfo | None = None
        instance = None
        try:
            instance = prepared.instance_pre.instantiate(store)
            func = instance.exports(store)[entrypoint]
            assert isinstance(func, wasmtime.Func)
            output = func(store, *_arguments(func.type(store), inputs))
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                error = ErrorInfo("exit_nonzero", f"exit status {exc.code}")
        except wasmtime.Trap as exc:
            if control is not None:  # the budget includes the gas added on resume
                policy = msgspec.structs.replace(policy, max_gas=control.gas_limit)
            error = _trap_error(exc, policy, store, instance)
        except wasmtime.WasmtimeError as exc:
            if control is not None and control._stop is not None and _STOP_MARKER in str(exc):
                error = control._stop  # the epoch callback ended it: timeout, cancel, internal
            else:
                error = _instantiation_error(exc, policy)
        duration_ms = (time.perf_counter() - started) * 1000
        gas_left = store.get_fuel()
        if control is not None:
            return control._finish(output, error, gas_left)
        return Outcome(output, policy.max_gas - gas_left, round(duration_ms, 3), error)


# --- The epoch deadline callback, through wasmtime's private ctypes bindings. ---


class _Binding(NamedTuple):
    install: Any
    callback_type: Any
    finalizer_type: Any
    get_fuel: Any
    set_fuel: Any
    error_new: Any
    error_delete: Any


def _load_binding() -> _Binding:
    """The C functions live control calls, checked against the signatures it was written for
    (wasmtime 50's `wasmtime/store.h` and `error.h`). Raises RuntimeError naming what differs."""
    b: Any = _bindings
    try:
        install = b._wasmtime_store_epoch_deadline_callback
        get_fuel = b._wasmtime_context_get_fuel
        set_fuel = b._wasmtime_context_set_fuel
        error_new = b._wasmtime_error_new
        error_delete = b._wasmtime_error_delete
        context_p = ctypes.POINTER(b.wasmtime_context_t)
        store_p = ctypes.POINTER(b.wasmtime_store_t)
        error_p = ctypes.POINTER(b.wasmtime_error_t)
    except AttributeError as exc:
        raise RuntimeError(f"wasmtime._bindings lacks {exc.name}: live control needs it") from None
    argtypes = list(install.argtypes)
    callback_type = argtypes[1] if len(argtypes) == 4 else None
    finalizer_type = argtypes[3] if len(argtypes) == 4 else None
    checks = {
        "wasmtime_store_epoch_deadline_callback": (
            install.restype is None and len(install.argtypes) == 4
            and install.argtypes[0] is store_p and install.argtypes[2] is ctypes.c_void_p),
        "its callback type": (
            _is_function_type(callback_type, (ctypes.c_size_t, ctypes.c_void_p), (
                context_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                ctypes.POINTER(ctypes.c_uint8)))
            and b.wasmtime_update_deadline_kind_t is ctypes.c_uint8),
        "its finalizer type": _is_function_type(finalizer_type, (None,), (ctypes.c_void_p,)),
        "wasmtime_context_get_fuel": (
            get_fuel.restype is error_p
            and list(get_fuel.argtypes) == [context_p, ctypes.POINTER(ctypes.c_uint64)]),
        "wasmtime_context_set_fuel": (
            set_fuel.restype is error_p and list(set_fuel.argtypes) == [context_p,
                                                                        ctypes.c_uint64]),
        "wasmtime_error_new": (
            error_new.restype is error_p
            and list(error_new.argtypes) == [ctypes.POINTER(ctypes.c_char)]),
        "wasmtime_error_delete": list(error_delete.argtypes) == [error_p],
    }
    changed = [name for name, ok in checks.items() if not ok]
    if changed:
        raise RuntimeError(f"wasmtime._bindings changed ({', '.join(changed)}): live control "
                           f"was written for wasmtime 50's C API")
    return _Binding(install, callback_type, finalizer_type, get_fuel, set_fuel, error_new,
                    error_delete)


def _is_function_type(kind: Any, restypes: tuple[Any, ...], argtypes: tuple[Any, ...]) -> bool:
    """Whether `kind` is a C function pointer type (CFUNCTYPE, cdecl) of this signature."""
    reference: Any = ctypes.CFUNCTYPE(None)
    return (isinstance(kind, type) and issubclass(kind, reference.__base__)
            and getattr(kind, "_flags_", None) == reference._flags_
            and getattr(kind, "_restype_", ()) in restypes
            and tuple(getattr(kind, "_argtypes_", ())) == argtypes)


def check_binding() -> None:
    """Raise RuntimeError if live control cannot work with the installed wasmtime."""
    if _BINDING_ERROR is not None:
        raise RuntimeError(_BINDING_ERROR)


def _new_error(text: str) -> int:
    """An owned wasmtime_error_t*, as the address the callback returns."""
    pointer = _BINDING.error_new(text.encode())
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


# The running controls by `id()`, the `data` wasmtime hands back to the callback: a key looked
# up here, never dereferenced, so a stale one finds nothing instead of freed memory.
_CONTROLS: dict[int, LiveControl] = {}


def _epoch_callback(context: Any, data: int | None, delta: Any, kind: Any) -> int:
    # An exception escaping a ctypes callback crashes the process: catch everything, and set
    # the out-parameters first (a delta of 0 would call back again at once, forever).
    try:
        delta[0] = 1
        kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
        control = _CONTROLS.get(data or 0)
        if control is None:
            return 0
        try:
            return control._tick(context)
        except BaseException as exc:
            control._stop = ErrorInfo("internal", f"live control failed: {exc!r}")
            log.exception("live control failed")
            return _new_error(_STOP_MARKER + "internal")
    except BaseException:
        return 0


def _install_callback(store: wasmtime.Store, control: LiveControl) -> None:
    check_binding()
    # No finalizer: the callback and `_CONTROLS` are module-level and outlive every Store, and
    # the entry is removed when the run returns (the callback never runs after that).
    _CONTROLS[id(control)] = control
    _BINDING.install(store.ptr(), _CALLBACK, id(control), _NO_FINALIZER)
    store.set_epoch_deadline(1)


_BINDING_ERROR: str | None = None
try:
    _BINDING = _load_binding()
    _CALLBACK = _BINDING.callback_type(_epoch_callback)
    _NO_FINALIZER = ctypes.cast(0, _BINDING.finalizer_type)
except RuntimeError as exc:  # live control refuses to run; everything else still works
    _BINDING_ERROR = str(exc)


def _arguments(func_type: wasmtime.FuncType, inputs: list[Any]) -> list[Any]:
    # The gateway checked counts and ranges against the stored signature; floats need floats.
    return [float(value) if str(kind) in ("f32", "f64") else value
            for kind, value in zip(func_type.params, inputs, strict=True)]


def _trap_error(trap: wasmtime.Trap, policy: EffectivePolicy, store: wasmtime.Store,
                instance: wasmtime.Instance | None) -> ErrorInfo:
    code = _TRAP_CODES.get(trap.trap_code) if trap.trap_code is not None else None
    if code is not None:
        return ErrorInfo(code, _TRAP_MESSAGES[code].format(**msgspec.structs.asdict(policy)))
    if instance is not None and _memory_at_limit(store, instance, policy.max_memory):
        # A refused memory.grow returns -1 and most code then aborts (unreachable): when the
        # module traps with its memory at the cap, the cap is the reason.
        return ErrorInfo("memory_limit",
                         f"the module reached its memory limit ({policy.max_memory} bytes) "
                         f"and trapped: {_reason(trap.message)}")
    return ErrorInfo("trap", _reason(trap.message))


def _reason(message: str) -> str:
    """wasmtime's trap text ends with the reason after a backtrace; keep the reason."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("wasm trap: ") if lines else "trap"


def _memory_at_limit(store: wasmtime.Store, instance: wasmtime.Instance, limit: int) -> bool:
    for export in instance.exports(store).values():
        if isinstance(export, wasmtime.Memory) and export.data_len(store) + PAGE_BYTES > limit:
            return True
    return False


def _instantiation_error(exc: wasmtime.WasmtimeError, policy: EffectivePolicy) -> ErrorInfo:
    message = str(exc)
    if "memory" in message and ("limit" in message or "exceed" in message):
        return ErrorInfo("memory_limit",
                         f"the module needs more memory than its limit ({policy.max_memory} "
                         f"bytes): {message.splitlines()[0]}")
    return ErrorInfo("trap", message.splitlines()[0] if message else "instantiation failed")


def _read_capped(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read(limit)
    except FileNotFoundError:
        return b""


def _decode_stdout(data: bytes) -> Any:
    """stdout as JSON when it parses, else as text."""
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")
