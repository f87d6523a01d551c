"""The wasmtime sandbox: one Engine per process, a fresh Store per execution, hard limits.

Limits map onto wasmtime's own mechanisms:
- gas is fuel (`Store.set_fuel`), exhausted -> trap OUT_OF_FUEL -> `out_of_gas`;
- time is an epoch deadline; a ticker thread advances the epoch by one tick per `TICK_S` (1 ms)
  of wall time while any call runs (every 1 ms while a run is stepped, 10 at a time every 10 ms
  otherwise), and sleeps while none does -> `timeout`;
- memory is the Store limiter -> `memory_limit`. Multi-memory is off, so a module has one
  linear memory at most and `max_memory` is all it gets. Tables are capped apart, at
  `max_table_elements` in all: a module's tables share it equally (the limiter caps each table,
  not their sum);
- the wasm stack is `max_stack`, capped by `Config.max_wasm_stack` -> `stack_overflow`. That
  is an Engine's setting, so there is an Engine per stack size (`max_stack` rounded down to a
  power of two, and the ceiling itself: a few at most), each module compiled once, on the
  ceiling's Engine, and copied into another Engine (`Module.deserialize`, a fraction of a
  compile) the first time a run asks for its stack size. What is compiled may be kept on disk
  and loaded by the next executor instead of compiled again (`prepare`, executor.diskcache).

A trap's error carries its frames (`StackFrame`), innermost first, their offsets counted in the
module as uploaded rather than in the copy the sandbox compiles (executor.binary).

WASI modules get their inputs as JSON on stdin (when run as commands), the `env` and `args` of
their environment (relay.environments), and nothing else: no preopened directories, no network.
Their output and sleeps go through executor.wasi, which bounds them; a WASI run always has a
`LiveControl` (one is made when the caller gives none), which its sleeps need.

An execution run with a `LiveControl` (executor.control) hands its Store's epoch deadline to
it: pause, resume, cancel and `max_time` in running time are enforced there. Executions without
one keep the plain epoch deadline and pay nothing for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import msgspec
import wasmtime
from wasmtime import _bindings as _ffi
from wasmtime._extern import wrap_extern as _wrap_extern
from wasmtime._func import enter_wasm as _enter_wasm

from executor import wasi
from executor.binary import export_state
from executor.control import TIMEOUT_MESSAGE, LiveControl
from executor.diskcache import DiskModules, engine_fingerprint
from relay.blobs import decode_output
from relay.modules import WASI_MODULE
from relay.schemas import (
    MAX_FRAMES,
    EffectivePolicy,
    ErrorCode,
    ErrorInfo,
    RunEnvironment,
    StackFrame,
)
from relay.settings import MAX_STACK_BYTES
from relay.wasmtypes import read_uleb, sections

log = logging.getLogger("relay.executor.sandbox")

# One epoch tick per TICK_S of wall time: deadlines are counted in ticks. Live control checks a
# stepped run at every tick (a step's precision) and other runs every tenth
# (executor.control.CHECK_TICKS). While no run is stepped, the ticker wakes every BATCH_TICKS
# ticks and advances them all at once: 100 wake-ups a second, not 1000 (a wake-up costs about
# 15 µs of CPU under the interpreter lock), and deadlines are as precise as they always were.
TICK_S = 0.001
BATCH_TICKS = 10
# An inline call ends by its tenth tick: within 10 ms (the next batch).
INLINE_TICKS = 10
# A ticker this many ticks behind (the process stalled) drops them rather than catching up in
# a burst.
MAX_TICK_LAG = 50
# The gas a call may use on the event loop's own thread before it is moved to a worker thread.
# A hop to a thread and back costs more than most calls (hundreds of µs on a busy 2-core host);
# this much gas takes about 0.1 ms, so the loop is never held up for long.
INLINE_GAS = 250_000
MAX_WASM_STACK_BYTES = 1024 * 1024
PAGE_BYTES = 65536
MAX_TABLE_ELEMENTS = 100_000
_TABLE_SECTION = 4
STDERR_IN_MESSAGE_BYTES = 1000

_TRAP_CODES: dict[wasmtime.TrapCode, ErrorCode] = {
    wasmtime.TrapCode.OUT_OF_FUEL: "out_of_gas",
    wasmtime.TrapCode.INTERRUPT: "timeout",
    wasmtime.TrapCode.STACK_OVERFLOW: "stack_overflow",
}
_TRAP_MESSAGES = {
    "out_of_gas": "the module used all of its gas ({max_gas})",
    "timeout": TIMEOUT_MESSAGE,
    "stack_overflow": "the module overflowed its stack (max_stack {max_stack} bytes)",
}
SHUTDOWN_MESSAGE = "the executor is shutting down"
CLOSED_MESSAGE = "the sandbox is closed"


ENGINE_CONFIG: dict[str, Any] = {
    "consume_fuel": True,
    "epoch_interruption": True,
    # The limiter caps each memory, not their sum: one memory, and `max_memory` holds.
    "wasm_multi_memory": False,
}
"""Every `wasmtime.Config` setting an Engine is made with, but its stack (`engine_config`):
the one place they are set, so the disk cache's fingerprint (executor.diskcache) covers them
all."""


def engine_config(stack: int) -> dict[str, Any]:
    """The Config settings of the Engine whose wasm stack is `stack` bytes."""
    return {**ENGINE_CONFIG, "max_wasm_stack": stack}


class Outcome(NamedTuple):
    output: Any
    gas_used: int
    duration_ms: float
    error: ErrorInfo | None


class LargeOutput(NamedTuple):
    """The output of a WASI command whose stdout is over the inline limit: the bytes as written,
    in place in the run's buffer (the worker stores them as a blob, relay.blobs, rather than
    decoding them)."""

    data: memoryview


class Prepared(NamedTuple):
    """A compiled module linked against what Relay provides, ready to instantiate."""

    module: wasmtime.Module
    instance_pre: wasmtime.InstancePre
    uses_wasi: bool
    tables: int
    """How many tables it defines: they share the table cap."""
    engine: wasmtime.Engine
    """The Engine it is compiled for, whose `max_wasm_stack` its runs have."""
    signatures: dict[str, Signature | None]
    """Each exported function's signature, read once here (see `_call_export`); None for one
    that has other than numbers among its types."""
    offset_shift: int = 0
    """Bytes the compiled copy has before its code that the uploaded module has not."""
    stacks: dict[int, Prepared] | None = None
    """The same module for each stack size it has run with, shared by all of them."""
    from_disk: bool = False
    """Loaded from the disk cache (executor.diskcache) rather than compiled."""


class Refused(Exception):
    """Raised by `StateHooks` to end a run with `error` (its state could not be restored or
    kept)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


class StateHooks(Protocol):
    """A session call's state, on the wasm thread: restored into the fresh instance before the
    call (unless it runs in an instance that holds it already), captured once it returned
    successfully. Either may raise Refused."""

    @property
    def resident(self) -> Resident | None:
        """An instance, and its store, that holds the call's starting state already."""

    def restore(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None: ...

    def capture(self, store: wasmtime.Store, instance: wasmtime.Instance) -> None: ...


class Resident(Protocol):
    @property
    def store(self) -> wasmtime.Store: ...

    @property
    def instance(self) -> wasmtime.Instance: ...


class LinkError(ValueError):
    """The module cannot run here: invalid, or it imports something Relay does not provide."""


class _Linked(NamedTuple):
    engine: wasmtime.Engine
    linker: wasmtime.Linker


class Sandbox:
    def __init__(self, *, max_table_elements: int = MAX_TABLE_ELEMENTS,
                 max_stack_bytes: int = MAX_WASM_STACK_BYTES) -> None:
        """`max_table_elements`: table elements an execution may hold, all tables together.
        `max_stack_bytes`: the most wasm stack a run gets, whatever its `max_stack` (at most
        MAX_STACK_BYTES; ValueError otherwise)."""
        if not 0 < max_stack_bytes <= MAX_STACK_BYTES:
            raise ValueError(f"max_stack_bytes must be 1 to {MAX_STACK_BYTES}")
        self.max_table_elements = max_table_elements
        self.max_stack_bytes = max_stack_bytes
        self._engines: dict[int, _Linked] = {}
        """By `max_wasm_stack`: made on demand, kept for the sandbox's life (a few at most)."""
        self._ticked: tuple[wasmtime.Engine, ...] = ()
        """Every Engine, for the ticker: replaced whole when one is added."""
        self._engines_lock = threading.Lock()
        """Held while an Engine or a module's copy for one is made (never by the ticker)."""
        self.engine = self._linked(max_stack_bytes).engine
        """The ceiling's Engine, where modules are compiled."""
        self.fingerprint = engine_fingerprint(engine_config(max_stack_bytes))
        """What code compiled on `engine` depends on (executor.diskcache)."""
        self.compilations = 0
        """Modules compiled by `prepare` (not loaded from the disk cache): read by tests."""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._controls: set[LiveControl] = set()
        self._calls = 0
        """Calls under way (`_call`): the epoch ticks while there is one."""
        self._begun = 0
        """Calls begun so far: the ticker stays awake while they keep coming (see `_tick`)."""
        self._calls_changed = threading.Condition(threading.Lock())
        """Notified when a call begins while the ticker is idle, when a step begins, and on
        close."""
        self._ticker_idle = False
        self.ticker_wakes = 0
        """Times a call began while the ticker was idle, waking it: read by tests."""
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Refuse new runs and cancel every controlled one, paused or running, waking it: a
        paused run blocks its thread, which would hang the interpreter's exit. Does not wait;
        the epoch keeps ticking until the last call has returned."""
        self._stop.set()
        with self._lock:
            controls = list(self._controls)
        for control in controls:
            control.cancel(SHUTDOWN_MESSAGE)
        with self._calls_changed:
            self._calls_changed.notify()  # an idle ticker ends now

    def _tick(self) -> None:
        """Advance the epoch by one tick per TICK_S of wall time while any call is under way,
        counted from when the first began (a late wake-up advances the ticks it missed, so N
        ticks are N * TICK_S, which deadlines count on). It wakes at every tick while a run is
        stepped, else every BATCH_TICKS; once a pass finds no call under way and none begun
        since the one before, it waits for one, so an idle executor spends nothing on ticks.
        (Calls a few µs long, inline, find no call under way at almost every pass: going idle
        then had each batch of them wake the ticker, a thread switch and a fight for the GIL.)
        After `close()`, ticking goes on while calls remain (controlled runs see their cancel at
        a tick), then ends."""
        origin: float | None = None
        done = 0
        seen = 0
        while True:
            with self._calls_changed:
                if not self._calls and (self._begun == seen or self._stop.is_set()):
                    if self._stop.is_set():
                        return
                    self._ticker_idle = True
                    self._calls_changed.wait()
                    self._ticker_idle = False
                    origin = None
                    continue
                seen = self._begun
                if origin is None:
                    origin, done = time.perf_counter(), 0
                every = 1 if self._stepping() else BATCH_TICKS
                wake_at = origin + (done // every + 1) * every * TICK_S
                delay = wake_at - time.perf_counter()
                if delay > 0:
                    self._calls_changed.wait(delay)  # a step beginning wakes it early
            due = int((time.perf_counter() - origin) / TICK_S)
            if due - done > MAX_TICK_LAG:
                done = due - 1
            engines = self._ticked
            while done < due:
                for engine in engines:
                    engine.increment_epoch()
                done += 1

    def _stepping(self) -> bool:
        with self._lock:
            return any(control.stepping for control in self._controls)

    def _step_began(self) -> None:
        """A controlled run's step began: tick every millisecond from now on."""
        with self._calls_changed:
            self._calls_changed.notify()

    @contextlib.contextmanager
    def _ticking(self) -> Iterator[None]:
        """Count a call as under way while in the block, waking an idle ticker. (Not
        the Stores' lifetimes: a trap leaves its Store in a reference cycle, alive until the
        garbage collector runs, which an idle process may not do for long.)"""
        with self._calls_changed:
            self._calls += 1
            self._begun += 1
            # Only an idle ticker is woken: one waiting for its next batch is not (inline calls
            # begin and end one after another, each would wake it).
            if self._ticker_idle:
                self.ticker_wakes += 1
                self._calls_changed.notify()
        try:
            yield
        finally:
            with self._calls_changed:
                self._calls -= 1

    def _linked(self, stack: int) -> _Linked:
        """The Engine whose wasm stack is `stack` bytes, and its Linker (made on first use)."""
        linked = self._engines.get(stack)
        if linked is not None:
            return linked
        with self._engines_lock:
            linked = self._engines.get(stack)
            if linked is None:
                config = wasmtime.Config()
                for name, value in engine_config(stack).items():
                    setattr(config, name, value)
                engine = wasmtime.Engine(config)
                linker = wasmtime.Linker(engine)
                linker.define_wasi()
                wasi.shadow(linker)
                linked = self._engines[stack] = _Linked(engine, linker)
                self._ticked = (*self._ticked, engine)
        return linked

    def stack_of(self, max_stack: int) -> int:
        """The wasm stack a run asking for `max_stack` bytes gets: the sandbox's ceiling at or
        above it, else `max_stack` rounded down to a power of two (never more than asked, from a
        few Engines)."""
        if max_stack >= self.max_stack_bytes:
            return self.max_stack_bytes
        return 1 << (max(max_stack, 1).bit_length() - 1)

    def _for_stack(self, prepared: Prepared, max_stack: int) -> Prepared:
        """`prepared` on the Engine of `max_stack`'s stack size: copied there from the compiled
        code once (deserializing takes a fraction of compiling; no Engine setting it depends
        on differs), then kept with it."""
        stack = self.stack_of(max_stack)
        stacks = prepared.stacks
        assert stacks is not None, "made by prepare()"
        found = stacks.get(stack)
        if found is not None:
            return found
        linked = self._linked(stack)
        with self._engines_lock:
            found = stacks.get(stack)
            if found is None:
                module = wasmtime.Module.deserialize(linked.engine, prepared.module.serialize())
                found = stacks[stack] = prepared._replace(
                    module=module, instance_pre=linked.linker.instantiate_pre(module),
                    engine=linked.engine)
        return found

    def prepare(self, wasm: bytes, *, disk: DiskModules | None = None,
                cid: str = "") -> Prepared:
        """Compile and link a module (slow: call it off the event loop). Raises LinkError.

        With `disk` (whose fingerprint must be this sandbox's), the module `cid` is loaded
        from it when it was compiled before, and kept there once compiled and linked."""
        compiled = export_state(wasm)
        module = disk.load(cid, compiled, self.engine) if disk is not None else None
        from_disk = module is not None
        if module is None:
            try:
                module = wasmtime.Module(self.engine, compiled)
            except wasmtime.WasmtimeError as exc:
                raise LinkError(f"invalid WebAssembly: {_reason(str(exc))}") from None
            with self._lock:
                self.compilations += 1
        unknown = [
            f"{imp.module}.{imp.name}" for imp in module.imports if imp.module != WASI_MODULE
        ]
        if unknown:
            raise LinkError(f"imports Relay does not provide: {', '.join(unknown[:5])}")
        try:
            instance_pre = self._linked(self.max_stack_bytes).linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise LinkError(f"cannot link the module: {exc}") from None
        uses_wasi = any(imp.module == WASI_MODULE for imp in module.imports)
        signatures = {export.name: _signature(export.type) for export in module.exports
                      if isinstance(export.type, wasmtime.FuncType)}
        # executor.binary only adds to the export section, which comes before the code: every
        # instruction moved by the same count of bytes.
        prepared = Prepared(module, instance_pre, uses_wasi, _table_count(wasm), self.engine,
                            signatures, len(compiled) - len(wasm), {}, from_disk)
        assert prepared.stacks is not None
        prepared.stacks[self.max_stack_bytes] = prepared
        if disk is not None and not from_disk:
            disk.store(cid, compiled, module.serialize())
        return prepared

    def run(self, prepared: Prepared, entrypoint: str, inputs: list[Any],
            policy: EffectivePolicy, *, command: bool, max_output_bytes: int,
            control: LiveControl | None = None, state: StateHooks | None = None,
            inline_output_bytes: int | None = None,
            environment: RunEnvironment | None = None) -> Outcome:
        """Run one execution to its end under `policy`. Blocking: call it off the event loop,
        in a thread that may block for as long as the run is paused (up to max_pause_ms).

        `command`: run a WASI command (`inputs` as JSON on stdin, stdout as the output);
        otherwise call `entrypoint` with `inputs` as its arguments. `control`: see LiveControl
        (raises RuntimeError if this wasmtime's C API does not match what it relies on).
        `state`: a session call's (restored after instantiation, captured after success).
        `inline_output_bytes`: a command's stdout longer than this is not decoded: the output is
        a LargeOutput (None: always decoded).
        `environment`: a WASI module's `env` and `args` come from it (None: none).
        After `close()` every run ends at once with `cancelled`.
        """
        prepared = self._for_stack(prepared, policy.max_stack)
        if control is None and prepared.uses_wasi:
            control = LiveControl(max_pause_ms=1)  # never paused: its sleeps need one
        if control is not None:
            return self._run_controlled(prepared, entrypoint, inputs, policy, command=command,
                                        max_output_bytes=max_output_bytes, control=control,
                                        state=state, inline_output_bytes=inline_output_bytes,
                                        environment=environment)
        if self._stop.is_set():
            return Outcome(None, 0, 0.0, ErrorInfo("cancelled", CLOSED_MESSAGE))
        store = self._new_store(policy, prepared)
        store.set_epoch_deadline(math.ceil(policy.max_time / 1000 / TICK_S) + 1)
        return self._call(store, prepared, entrypoint, inputs, policy, state=state)

    def try_inline(self, prepared: Prepared, entrypoint: str, inputs: list[Any],
                   policy: EffectivePolicy) -> Outcome | None:
        """Run a plain call (no WASI) right here if it ends within `INLINE_GAS` and
        `INLINE_TICKS` epoch ticks; None if it would not, and then it must be run again, from
        the start, by `run` in a thread. The first attempt leaves no trace: such a call has no
        imports, so it touches nothing outside its own fresh Store, and runs the same way
        again."""
        if prepared.uses_wasi or self._stop.is_set():
            return None
        prepared = self._for_stack(prepared, policy.max_stack)
        budget = min(policy.max_gas, INLINE_GAS)
        inline_policy = msgspec.structs.replace(policy, max_gas=budget)
        store = self._new_store(inline_policy, prepared)
        # Bulk memory instructions cost one unit of gas whatever their size: the epoch deadline
        # bounds what a hostile call holds the loop for (10 ms, plus the one instruction under
        # way: tens of ms for a fill of a 64 MiB memory).
        store.set_epoch_deadline(INLINE_TICKS)
        outcome = self._call(store, prepared, entrypoint, inputs, inline_policy)
        code = outcome.error.code if outcome.error else None
        if code == "timeout" or (code == "out_of_gas" and budget < policy.max_gas):
            return None
        return outcome

    def _run_controlled(self, prepared: Prepared, entrypoint: str, inputs: list[Any],
                        policy: EffectivePolicy, *, command: bool, max_output_bytes: int,
                        control: LiveControl, state: StateHooks | None,
                        inline_output_bytes: int | None,
                        environment: RunEnvironment | None) -> Outcome:
        if control.state != "pending":
            raise ValueError("a LiveControl serves one execution only")
        with self._lock:
            if self._stop.is_set():
                control.cancel(CLOSED_MESSAGE)
                control.begin(policy)
                return Outcome(*control.finish(None, None, policy.max_gas))
            self._controls.add(control)
        try:
            if state is not None and state.resident is not None:
                store = self._limit(state.resident.store, policy, prepared)
            else:
                store = self._new_store(policy, prepared)
            control.attach(store, on_step=self._step_began)
            if not prepared.uses_wasi:
                return self._call(store, prepared, entrypoint, inputs, policy, control, state)
            return self._run_wasi(store, prepared, entrypoint, inputs, policy,
                                  command=command, max_output_bytes=max_output_bytes,
                                  control=control, state=state,
                                  inline_output_bytes=inline_output_bytes,
                                  environment=environment)
        finally:
            with self._lock:
                self._controls.discard(control)
            control.detach()

    def _new_store(self, policy: EffectivePolicy, prepared: Prepared) -> wasmtime.Store:
        """A fresh Store holding the policy's gas and memory limits and the table cap (its
        epoch deadline is the caller's to set)."""
        return self._limit(wasmtime.Store(prepared.engine), policy, prepared)

    def _limit(self, store: wasmtime.Store, policy: EffectivePolicy,
               prepared: Prepared) -> wasmtime.Store:
        """`store` with the policy's gas and memory limits and the table cap (a fresh one, or a
        session's resident one: each call sets its own)."""
        store.set_fuel(policy.max_gas)
        store.set_limits(memory_size=policy.max_memory,
                         table_elements=self.max_table_elements // max(prepared.tables, 1))
        return store

    def _run_wasi(self, store: wasmtime.Store, prepared: Prepared, entrypoint: str,
                  inputs: list[Any], policy: EffectivePolicy, *, command: bool,
                  max_output_bytes: int, control: LiveControl,
                  state: StateHooks | None, inline_output_bytes: int | None,
                  environment: RunEnvironment | None) -> Outcome:
        output = wasi.Output(max_output_bytes)
        control.output = output
        config = wasmtime.WasiConfig()  # no stdout or stderr: the shadowed fd_write takes them
        wasi.set_stdin(config, msgspec.json.encode(inputs) if command else b"")
        if environment is not None:
            config.env = environment.env.items()
            config.argv = environment.args
        store.set_wasi(config)
        host = wasi.Host(output, control)
        with wasi.running(host):
            outcome = self._call(store, prepared, entrypoint, [] if command else inputs,
                                 policy, control, state)
        if outcome.error is None and command:
            stdout = output.view("stdout")
            if inline_output_bytes is not None and len(stdout) > inline_output_bytes:
                return outcome._replace(output=LargeOutput(stdout))
            stdout.release()
            return outcome._replace(output=decode_output(output.read("stdout")))
        if outcome.error is not None and outcome.error.code == "exit_nonzero":
            tail = output.read("stderr", 0, STDERR_IN_MESSAGE_BYTES).decode(
                "utf-8", "replace").strip()
            if tail:
                message = f"{outcome.error.message}: {tail}"
                return outcome._replace(error=ErrorInfo("exit_nonzero", message))
        return outcome

    def _call(self, store: wasmtime.Store, prepared: Prepared, entrypoint: str,
              inputs: list[Any], policy: EffectivePolicy,
              control: LiveControl | None = None, state: StateHooks | None = None) -> Outcome:
        """Instantiate and call: the one place wasm runs, so the epoch ticks while any call
        is under way here (and only then)."""
        with self._ticking():
            return self._instantiate_and_call(store, prepared, entrypoint, inputs, policy,
                                              control, state)

    def _instantiate_and_call(self, store: wasmtime.Store, prepared: Prepared,
                              entrypoint: str, inputs: list[Any], policy: EffectivePolicy,
                              control: LiveControl | None,
                              state: StateHooks | None) -> Outcome:
        if control is not None and not control.begin(policy):
            return Outcome(*control.finish(None, None, policy.max_gas))
        started = time.perf_counter()
        output: Any = None
        error: ErrorInfo | None = None
        instance = None
        try:
            if state is not None and state.resident is not None:
                instance = state.resident.instance
            else:
                instance = prepared.instance_pre.instantiate(store)
                if state is not None:
                    state.restore(store, instance)
            output = _call_export(store, _export(store, instance, entrypoint),
                                  prepared.signatures[entrypoint], inputs)
            if state is not None:
                state.capture(store, instance)
        except Refused as exc:
            output, error = None, exc.error
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                error = ErrorInfo("exit_nonzero", f"exit status {exc.code}")
        except wasmtime.Trap as exc:
            if control is not None:  # the budget includes the gas added on resume
                policy = msgspec.structs.replace(policy, max_gas=control.gas_limit)
            error = _trap_error(exc, policy, store, instance)
            error.frames = _frames(exc, prepared.offset_shift) or msgspec.UNSET
        except wasmtime.WasmtimeError as exc:
            stopped = control.stop_of(exc) if control is not None else None
            error = stopped if stopped is not None else _instantiation_error(exc, policy)
        duration_ms = (time.perf_counter() - started) * 1000
        gas_left = store.get_fuel()
        if control is not None:
            return Outcome(*control.finish(output, error, gas_left))
        return Outcome(output, policy.max_gas - gas_left, round(duration_ms, 3), error)


class Signature(NamedTuple):
    """An exported function's parameter and result types, as the fields of wasmtime's value
    union that hold them ("i32", "i64", "f32", "f64")."""

    params: tuple[str, ...]
    results: tuple[str, ...]


_KINDS = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}
"""wasmtime's value kinds (WASMTIME_I32...) by type."""


def _signature(func_type: wasmtime.FuncType) -> Signature | None:
    params = tuple(str(kind) for kind in func_type.params)
    results = tuple(str(kind) for kind in func_type.results)
    if not all(kind in _KINDS for kind in params + results):
        return None
    return Signature(params, results)


def _call_export(store: wasmtime.Store, func: wasmtime.Func, signature: Signature | None,
                 inputs: list[Any]) -> Any:
    """Call `func` with `inputs` (the gateway checked their count and ranges against the
    stored signature; floats are made floats); its result, or its results as a list (None for
    none), as `Func.__call__` answers. With the signature read once per module, this is
    wasmtime-py's own call (its `Func.__call__`) without reading the function's type from the
    store at each call and wrapping every value: 5 µs a call rather than 27. The version is
    pinned in pyproject.toml."""
    if signature is None:  # not numbers only (the gateway refuses such inputs)
        return func(store, *inputs)
    params = (_ffi.wasmtime_val_t * len(signature.params))()
    for slot, kind, value in zip(params, signature.params, inputs, strict=True):
        slot.kind = _KINDS[kind]
        setattr(slot.of, kind, float(value) if kind[0] == "f" else value)
    results = (_ffi.wasmtime_val_t * len(signature.results))()
    with _enter_wasm(store) as trap:
        error = _ffi.wasmtime_func_call(store._context(), ctypes.byref(func._func), params,
                                        len(params), results, len(results), trap)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
    values = [getattr(slot.of, kind) for slot, kind in zip(results, signature.results,
                                                            strict=True)]
    return values[0] if len(values) == 1 else values or None


def _export(store: wasmtime.Store, instance: wasmtime.Instance, name: str) -> wasmtime.Func:
    """The instance's exported function `name`, looked up alone: `Instance.exports` wraps
    every export of the module at each call (7 % of a trivial run). This is wasmtime-py's own
    lookup (its `Caller.get`) on an instance; the version is pinned in pyproject.toml."""
    encoded = name.encode()
    item = _ffi.wasmtime_extern_t()
    if not _ffi.wasmtime_instance_export_get(store._context(), ctypes.byref(instance._instance),
                                             ctypes.create_string_buffer(encoded),
                                             len(encoded), ctypes.byref(item)):
        raise KeyError(name)
    func = _wrap_extern(item)
    assert isinstance(func, wasmtime.Func)
    return func


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


# What wasmtime reports for an offset it does not know (u64::MAX).
_NO_OFFSET = 2**64 - 1


def _frames(trap: wasmtime.Trap, offset_shift: int) -> list[StackFrame]:
    """Where `trap` happened, innermost first, at most MAX_FRAMES (wasmtime itself keeps
    fewer: 20 in wasmtime 50), each offset counted in the module as uploaded."""
    return [StackFrame(frame.func_index, frame.func_name,
                       None if frame.module_offset == _NO_OFFSET
                       else frame.module_offset - offset_shift)
            for frame in trap.frames[:MAX_FRAMES]]


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
    if message.startswith("table minimum size"):
        return ErrorInfo("memory_limit",
                         f"the module's tables need more elements than Relay allows "
                         f"(RELAY_MAX_TABLE_ELEMENTS, shared by all of a module's tables): "
                         f"{message.splitlines()[0]}")
    if "memory" in message and ("limit" in message or "exceed" in message):
        return ErrorInfo("memory_limit",
                         f"the module needs more memory than its limit ({policy.max_memory} "
                         f"bytes): {message.splitlines()[0]}")
    return ErrorInfo("trap", message.splitlines()[0] if message else "instantiation failed")


def _table_count(wasm: bytes) -> int:
    """How many tables a valid module defines: the count that opens its table section. (Its
    imports are WASI's functions or it does not link, so it imports none.)"""
    for section, _, start, _ in sections(wasm):
        if section == _TABLE_SECTION:
            return read_uleb(wasm, start)[0]
    return 0
