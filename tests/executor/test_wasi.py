"""The bounded WASI calls (executor.wasi), on real wasmtime through the sandbox: `poll_oneoff`
against time limits, cancel and pause; `fd_write` against the output cap."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import wasmtime

from executor.control import LiveControl
from executor.sandbox import Outcome, Prepared, Sandbox
from executor.wasi import EBADF, EFAULT, EFBIG, EINVAL, Output
from relay.schemas import EffectivePolicy
from tests.attacks.test_sandbox_attacks import SLEEP_WAT, SLEPT
from tests.executor.test_sandbox_control import wait_until

# Calls straight through: `poll(in, out, n, nevents_at)`, `write(fd, iovs, n, nwritten_at)`,
# `clock(id)`, and the memory to set them up.
RAW_WAT = """(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "poll") (param i32 i32 i32 i32) (result i32)
    (call $poll (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
  (func (export "write") (param i32 i32 i32 i32) (result i32)
    (call $write (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
  (func (export "clock") (param i32) (result i64)
    (drop (call $clock (local.get 0) (i64.const 0) (i32.const 60000)))
    (i64.load (i32.const 60000))))"""
# `sleep_until(ms)`: an absolute monotonic sleep `ms` from now; returns how far past its
# deadline it woke, in µs (never negative when it slept long enough).
ABSOLUTE_WAT = """(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 512)))
    (i64.load (i32.const 512)))
  (func (export "sleep_until") (param $ms i32) (result i64) (local $deadline i64)
    (local.set $deadline (i64.add (call $now)
                                  (i64.mul (i64.extend_i32_u (local.get $ms))
                                           (i64.const 1000000))))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (local.get $deadline))
    (i32.store16 (i32.const 40) (i32.const 1))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
    (i64.div_s (i64.sub (call $now) (local.get $deadline)) (i64.const 1000))))"""
PAGE = 65536


def policy(max_time: int = 10_000) -> EffectivePolicy:
    return EffectivePolicy(max_memory=64 * 2**20, max_gas=10**12, max_time=max_time)


@pytest.fixture(scope="module")
def sleeper(sandbox: Sandbox) -> Prepared:
    return sandbox.prepare(wasmtime.wat2wasm(SLEEP_WAT))


class Raw:
    """One instance of RAW_WAT in its own Store, with the sandbox's linker and a host, so a
    test can set memory up and make one call at a time."""

    def __init__(self, sandbox: Sandbox, output_limit: int = 1000) -> None:
        from executor import wasi

        prepared = sandbox.prepare(wasmtime.wat2wasm(RAW_WAT))
        self.store = wasmtime.Store(sandbox.engine)
        self.store.set_fuel(10**9)
        self.store.set_epoch_deadline(10**9)
        self.store.set_wasi(wasmtime.WasiConfig())
        self.output = Output(output_limit)
        self.control = LiveControl(max_pause_ms=1000)
        self.control.begin(policy())
        self._host = wasi.running(wasi.Host(self.output, self.control))
        self._host.__enter__()
        instance = prepared.instance_pre.instantiate(self.store)
        self.exports = instance.exports(self.store)
        memory = self.exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory

    def close(self) -> None:
        self._host.__exit__(None, None, None)

    def call(self, name: str, *args: int) -> Any:
        func = self.exports[name]
        assert isinstance(func, wasmtime.Func)
        return func(self.store, *args)

    def put(self, at: int, data: bytes) -> None:
        self.memory.write(self.store, data, at)

    def get(self, at: int, length: int) -> bytes:
        return bytes(self.memory.read(self.store, at, at + length))


@pytest.fixture
def raw(sandbox: Sandbox) -> Iterator[Raw]:
    instance = Raw(sandbox)
    yield instance
    instance.close()


def iovec(at: int, data: bytes, raw: Raw, buffer: int = 1024) -> None:
    raw.put(buffer, data)
    raw.put(at, buffer.to_bytes(4, "little") + len(data).to_bytes(4, "little"))


def start(threads: ThreadPoolExecutor, sandbox: Sandbox, prepared: Prepared, ms: int,
          control: LiveControl, max_time: int = 10_000) -> Future[Outcome]:
    return threads.submit(sandbox.run, prepared, "sleep", [ms], policy(max_time),
                          command=False, max_output_bytes=1000, control=control)


# --- poll_oneoff ---


def test_a_sleep_sleeps_and_answers(sandbox: Sandbox, sleeper: Prepared) -> None:
    outcome = sandbox.run(sleeper, "sleep", [50], policy(), command=False, max_output_bytes=10)
    assert outcome.error is None and outcome.output == SLEPT
    assert 50 <= outcome.duration_ms < 100


def test_a_sleep_past_max_time_ends_at_it(sandbox: Sandbox, sleeper: Prepared) -> None:
    """Also without a LiveControl from the caller (the sandbox makes one)."""
    began = time.perf_counter()
    outcome = sandbox.run(sleeper, "sleep", [5_000], policy(max_time=200), command=False,
                          max_output_bytes=10)
    took_ms = (time.perf_counter() - began) * 1000
    assert outcome.error is not None and outcome.error.code == "timeout"
    assert "200 ms" in outcome.error.message
    assert 200 <= outcome.duration_ms < 250 and took_ms < 250


def test_cancel_ends_a_sleep_within_milliseconds(sandbox: Sandbox, threads: ThreadPoolExecutor,
                                                 sleeper: Prepared) -> None:
    control = LiveControl(max_pause_ms=10_000)
    future = start(threads, sandbox, sleeper, 60_000, control)
    wait_until(lambda: control.running_ms > 50, "the sleep")
    cancelled_at = time.perf_counter()
    assert control.cancel()
    outcome = future.result(timeout=5)
    assert (time.perf_counter() - cancelled_at) * 1000 < 50
    assert outcome.error is not None and outcome.error.code == "cancelled"


def test_close_wakes_a_sleeping_run(threads: ThreadPoolExecutor) -> None:
    box = Sandbox()
    prepared = box.prepare(wasmtime.wat2wasm(SLEEP_WAT))
    future = threads.submit(box.run, prepared, "sleep", [60_000], policy(), command=False,
                            max_output_bytes=10)  # no control of the caller's
    time.sleep(0.05)
    closed_at = time.perf_counter()
    box.close()
    outcome = future.result(timeout=5)
    assert (time.perf_counter() - closed_at) * 1000 < 50
    assert outcome.error is not None and outcome.error.code == "cancelled"


def test_a_pause_stops_the_sleep_in_place(sandbox: Sandbox, threads: ThreadPoolExecutor,
                                          sleeper: Prepared) -> None:
    events: list[str] = []
    control = LiveControl(max_pause_ms=10_000, on_event=events.append)
    began = time.perf_counter()
    future = start(threads, sandbox, sleeper, 300, control, max_time=400)
    wait_until(lambda: control.running_ms > 100, "the sleep")
    paused_at = time.perf_counter()
    assert control.pause()
    wait_until(lambda: control.state == "paused", "the pause")
    assert (time.perf_counter() - paused_at) * 1000 < 50
    assert events == ["paused"]
    time.sleep(0.5)  # longer than max_time and than the sleep: neither may pass while paused
    assert not future.done()
    assert control.resume(additional_gas=10)
    outcome = future.result(timeout=5)
    assert outcome.error is None and outcome.output == SLEPT
    assert events == ["paused", "resumed"]
    assert 300 <= outcome.duration_ms < 350  # it slept what was left, no more
    assert (time.perf_counter() - began) * 1000 >= 800
    assert control.gas_limit == policy().max_gas + 10


def test_a_pause_past_max_pause_while_sleeping_cancels(sandbox: Sandbox,
                                                       threads: ThreadPoolExecutor,
                                                       sleeper: Prepared) -> None:
    control = LiveControl(max_pause_ms=100)
    assert control.pause()  # before the start: it pauses at its first tick or its sleep
    outcome = start(threads, sandbox, sleeper, 60_000, control).result(timeout=5)
    assert outcome.error is not None and outcome.error.code == "cancelled"
    assert "pause limit" in outcome.error.message


def test_an_absolute_sleep_wakes_at_its_deadline(sandbox: Sandbox) -> None:
    """Absolute monotonic deadlines are on wasmtime's WASI clock, whose origin the host
    call must know: it never wakes early, and not much late."""
    prepared = sandbox.prepare(wasmtime.wat2wasm(ABSOLUTE_WAT))
    outcome = sandbox.run(prepared, "sleep_until", [50], policy(), command=False,
                          max_output_bytes=10)
    assert outcome.error is None
    assert 0 <= outcome.output < 5_000, outcome.output  # µs past the deadline
    assert outcome.duration_ms >= 50


def _subscription(userdata: int, tag: int, body: bytes) -> bytes:
    head = userdata.to_bytes(8, "little") + bytes([tag]) + bytes(7)
    return (head + body).ljust(48, b"\0")


def _clock(clock: int, ns: int, flags: int = 0) -> bytes:
    return (clock.to_bytes(4, "little") + bytes(4) + ns.to_bytes(8, "little") + bytes(8)
            + flags.to_bytes(2, "little"))


def test_poll_answers_what_is_ready_without_sleeping(raw: Raw) -> None:
    subscriptions = (_subscription(1, 0, _clock(1, 10 * 10**9))  # a 10 s sleep
                     + _subscription(2, 1, (0).to_bytes(4, "little"))  # stdin readable
                     + _subscription(3, 2, (1).to_bytes(4, "little"))  # stdout writable
                     + _subscription(4, 2, (7).to_bytes(4, "little")))  # no such fd
    raw.put(0, subscriptions)
    began = time.perf_counter()
    assert raw.call("poll", 0, 1024, 4, 2048) == 0
    assert time.perf_counter() - began < 0.1
    assert int.from_bytes(raw.get(2048, 4), "little") == 3
    events = [raw.get(1024 + 32 * i, 32) for i in range(3)]
    assert [int.from_bytes(e[:8], "little") for e in events] == [2, 3, 4]
    assert [int.from_bytes(e[8:10], "little") for e in events] == [0, 0, EBADF]
    assert int.from_bytes(events[1][16:24], "little") == 1000  # room left in the output


def test_poll_refuses_what_wasmtime_refuses(raw: Raw) -> None:
    assert raw.call("poll", 0, 1024, 0, 2048) == EINVAL  # nothing to wait for
    raw.put(0, _subscription(1, 0, _clock(2, 1000)))  # the process CPU-time clock
    assert raw.call("poll", 0, 1024, 1, 2048) == EINVAL
    raw.put(0, _subscription(1, 9, b""))
    assert raw.call("poll", 0, 1024, 1, 2048) == EINVAL
    assert raw.call("poll", PAGE - 10, 1024, 1, 2048) == EFAULT
    raw.put(0, _subscription(1, 0, _clock(1, 1000)))
    assert raw.call("poll", 0, PAGE - 10, 1, 2048) == EFAULT


def test_several_clocks_wake_at_the_first(raw: Raw) -> None:
    # Realtime, absolute, in the past: due at once, like the relative zero sleep beside it.
    past = raw.call("clock", 0) - 10**9
    raw.put(0, _subscription(1, 0, _clock(1, 5 * 10**9)) + _subscription(2, 0, _clock(0, past, 1))
            + _subscription(3, 0, _clock(1, 0)))
    assert raw.call("poll", 0, 1024, 3, 2048) == 0
    assert int.from_bytes(raw.get(2048, 4), "little") == 2
    woken = [int.from_bytes(raw.get(1024 + 32 * i, 8), "little") for i in range(2)]
    assert woken == [2, 3]


# --- fd_write ---


def test_writes_fill_the_output_then_fail_with_efbig(sandbox: Sandbox) -> None:
    raw = Raw(sandbox, output_limit=10)
    try:
        iovec(0, b"abcdef", raw)
        assert raw.call("write", 1, 0, 1, 100) == 0
        assert int.from_bytes(raw.get(100, 4), "little") == 6
        # stderr shares the cap: 4 bytes fit of 6, and the call says so.
        iovec(0, b"ghijkl", raw)
        assert raw.call("write", 2, 0, 1, 100) == 0
        assert int.from_bytes(raw.get(100, 4), "little") == 4
        assert raw.call("write", 1, 0, 1, 100) == EFBIG
        assert raw.call("write", 1, 0, 0, 100) == 0  # nothing to write is no error
        assert raw.output.read("stdout") == b"abcdef"
        assert raw.output.read("stderr") == b"ghij"
        assert raw.output.size == 10
    finally:
        raw.close()


def test_writes_gather_vectors_and_check_every_pointer(raw: Raw) -> None:
    raw.put(2000, b"hello, world")
    raw.put(0, (2000).to_bytes(4, "little") + (7).to_bytes(4, "little")
            + (2007).to_bytes(4, "little") + (5).to_bytes(4, "little"))
    assert raw.call("write", 1, 0, 2, 100) == 0
    assert raw.output.read("stdout") == b"hello, world"
    assert raw.call("write", 0, 0, 2, 100) == EBADF  # stdin
    assert raw.call("write", 3, 0, 2, 100) == EBADF
    assert raw.call("write", 1, 0, 2, PAGE - 2) == EFAULT
    raw.put(0, (PAGE - 4).to_bytes(4, "little") + (8).to_bytes(4, "little"))
    assert raw.call("write", 1, 0, 1, 100) == EFAULT
    assert raw.output.read("stdout") == b"hello, world"  # a faulty call wrote nothing


def test_a_command_that_ignores_efbig_succeeds_with_its_output_cut(sandbox: Sandbox) -> None:
    """What a user sees from a module that goes on after its writes fail: its output up to the
    cap, as text once cut JSON no longer parses."""
    wat = """(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "[1,2,3]")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 7))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
    prepared = sandbox.prepare(wasmtime.wat2wasm(wat))
    whole = sandbox.run(prepared, "_start", [], policy(), command=True, max_output_bytes=14)
    assert whole.error is None and whole.output == "[1,2,3][1,2,3]"
    cut = sandbox.run(prepared, "_start", [], policy(), command=True, max_output_bytes=10)
    assert cut.error is None and cut.output == "[1,2,3][1,"
    one = sandbox.run(prepared, "_start", [], policy(), command=True, max_output_bytes=7)
    assert one.error is None and one.output == [1, 2, 3]


def test_the_c_functions_the_calls_are_registered_with_are_the_expected_ones() -> None:
    """Fails loudly when a wasmtime upgrade changes what executor.wasi calls through ctypes."""
    import ctypes

    from wasmtime import _bindings

    callback: Any = _bindings.wasmtime_func_callback_t
    assert callback._restype_ is ctypes.c_size_t
    assert callback._argtypes_ == (
        ctypes.c_void_p, ctypes.POINTER(_bindings.wasmtime_caller_t),
        ctypes.POINTER(_bindings.wasmtime_val_t), ctypes.c_size_t,
        ctypes.POINTER(_bindings.wasmtime_val_t), ctypes.c_size_t)
    define: Any = _bindings._wasmtime_linker_define_func
    assert define.argtypes[6] is callback and len(define.argtypes) == 9
    trap: Any = _bindings._wasmtime_trap_new
    assert trap.argtypes == [ctypes.POINTER(ctypes.c_char), ctypes.c_size_t]
    stdin: Any = _bindings._wasi_config_set_stdin_bytes
    assert stdin.argtypes == [ctypes.POINTER(_bindings.wasi_config_t),
                              ctypes.POINTER(_bindings.wasm_byte_vec_t)]
