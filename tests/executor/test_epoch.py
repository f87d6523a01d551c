"""The epoch deadline callback's binding, on real wasmtime: its C signatures, and a callback
that reads and sets a running module's fuel and ends it."""

from __future__ import annotations

import ctypes
import importlib.metadata
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import wasmtime
from wasmtime import _bindings

from executor import epoch

# A loop with a call in it: the callback runs at its back-edge and sees the fuel it left.
CALLING_LOOP_WAT = """(module (func $step) (func (export "main") (loop (call $step) (br 0))))"""


def test_the_c_binding_is_what_live_control_was_written_for() -> None:
    """Fails loudly when a wasmtime upgrade moves or changes what live control calls."""
    epoch.check_binding()
    install: Any = _bindings._wasmtime_store_epoch_deadline_callback
    assert install.restype is None
    store_p, callback, data, finalizer = install.argtypes
    assert store_p is ctypes.POINTER(_bindings.wasmtime_store_t)
    assert data is ctypes.c_void_p
    assert callback._restype_ is ctypes.c_size_t
    assert callback._argtypes_ == (ctypes.POINTER(_bindings.wasmtime_context_t), ctypes.c_void_p,
                                   ctypes.POINTER(ctypes.c_uint64),
                                   ctypes.POINTER(ctypes.c_uint8))
    assert finalizer._restype_ is None and finalizer._argtypes_ == (ctypes.c_void_p,)
    assert _bindings._wasmtime_context_set_fuel.argtypes[1] is ctypes.c_uint64
    # The fuel reserve trick behind `additional_gas` is pinned to one major version.
    assert importlib.metadata.version("wasmtime").split(".")[0] == "50"


def test_a_changed_signature_is_told_apart() -> None:
    """The check behind `check_binding` refuses any other function type than the one used."""
    args = (ctypes.c_void_p,)
    assert epoch._is_function_type(ctypes.CFUNCTYPE(None, *args), (None,), args)
    assert not epoch._is_function_type(ctypes.CFUNCTYPE(None, ctypes.c_int), (None,), args)
    assert not epoch._is_function_type(ctypes.CFUNCTYPE(ctypes.c_int, *args), (None,), args)
    assert not epoch._is_function_type(ctypes.PYFUNCTYPE(None, *args), (None,), args)
    assert not epoch._is_function_type(None, (None,), args)
    assert not epoch._is_function_type(ctypes.c_void_p, (None,), args)


@pytest.fixture
def engine() -> Iterator[wasmtime.Engine]:
    """An engine whose epoch ticks every millisecond, as the sandbox's does every 10."""
    config = wasmtime.Config()
    config.consume_fuel = True
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.001):
            engine.increment_epoch()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    yield engine
    stop.set()
    ticker.join()


def run_loop(engine: wasmtime.Engine, on_tick: epoch.OnTick, fuel: int) -> wasmtime.Store:
    """Run the endless loop with `on_tick` installed until a tick stops it; its Store."""
    store = wasmtime.Store(engine)
    store.set_fuel(fuel)
    key = epoch.install(store, on_tick)
    try:
        instance = wasmtime.Instance(store, wasmtime.Module(engine, CALLING_LOOP_WAT), [])
        main = instance.exports(store)["main"]
        assert isinstance(main, wasmtime.Func)
        with pytest.raises(wasmtime.WasmtimeError) as raised:
            main(store)
        assert not isinstance(raised.value, wasmtime.Trap)
        assert epoch.is_stop(raised.value)
    finally:
        epoch.uninstall(key)
    return store


def test_ticks_read_the_fuel_and_end_the_run(engine: wasmtime.Engine) -> None:
    readings: list[int | None] = []
    into = ctypes.c_uint64()

    def on_tick(context: Any) -> int:
        readings.append(epoch.read_fuel(context, into))
        return epoch.stop_error("enough") if len(readings) == 5 else 0

    run_loop(engine, on_tick, fuel=10**12)
    assert len(readings) == 5
    fuel = [reading for reading in readings if reading is not None]
    assert fuel == readings and fuel == sorted(fuel, reverse=True) and fuel[-1] < 10**12


def test_fuel_set_at_a_tick_is_the_stores(engine: wasmtime.Engine) -> None:
    """(Running code then overwrites it with what it holds: executor.control adds gas through
    wasmtime's reserve, above i64::MAX, and tests/executor/test_sandbox_control.py pins that.)"""
    seen: list[int | None] = []

    def on_tick(context: Any) -> int:
        epoch.set_fuel(context, 12_345)
        seen.append(epoch.read_fuel(context, ctypes.c_uint64()))
        return epoch.stop_error("enough")

    run_loop(engine, on_tick, fuel=10**12)
    assert seen == [12_345]


def test_an_exception_from_a_tick_lets_the_run_go_on(engine: wasmtime.Engine) -> None:
    """An exception escaping a ctypes callback would end the process: it is swallowed."""
    ticks = 0

    def on_tick(context: Any) -> int:
        nonlocal ticks
        ticks += 1
        if ticks == 1:
            raise RuntimeError("a bug in a tick")
        return epoch.stop_error("enough") if ticks == 3 else 0

    run_loop(engine, on_tick, fuel=10**12)
    assert ticks == 3


def test_other_errors_are_not_stops(engine: wasmtime.Engine) -> None:
    store = wasmtime.Store(engine)
    store.set_fuel(10)
    store.set_epoch_deadline(10**6)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, CALLING_LOOP_WAT), [])
    main = instance.exports(store)["main"]
    assert isinstance(main, wasmtime.Func)
    with pytest.raises(wasmtime.Trap) as raised:  # out of fuel
        main(store)
    assert not epoch.is_stop(raised.value)
