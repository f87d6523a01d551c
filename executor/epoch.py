"""wasmtime's epoch deadline callback, reached with ctypes through wasmtime-py's private bindings
(wasmtime-py has no wrapper for it).

Once installed on a Store, the callback runs on the wasm thread at its epoch deadline, at
function entries and loop back-edges, and calls the function it was installed with: that
function reads and sets the running module's fuel, may block (to pause the module in place), and
returns 0 to let it continue or an error from `stop_error` to end it; the next deadline is as many
ticks later as the `TicksToNext` given says. wasmtime then no longer traps at the deadline: the
function enforces any time limit itself.

Everything here is checked at import against the C signatures it was written for (wasmtime 50);
when they differ, `check_binding` and `install` raise and the rest of the sandbox still works.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import wasmtime
from wasmtime import _bindings

OnTick = Callable[[Any], int]
"""Called with the running Store's context (a wasmtime_context_t*): 0 to continue, or an error
from `stop_error` to end the run. It must not raise."""
TicksToNext = Callable[[], int]
"""Called after each `OnTick`: how many epoch ticks until the next call (at least 1)."""

# Ends the text of the error a tick returns to stop a run (it surfaces as a WasmtimeError, not a
# Trap): tells such a stop from any other error.
_STOP_MARKER = "relay-live-control-stop:"


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
    """Raise RuntimeError if the callback cannot work with the installed wasmtime."""
    if _BINDING_ERROR is not None:
        raise RuntimeError(_BINDING_ERROR)


def install(store: wasmtime.Store, on_tick: OnTick,
            ticks_to_next: TicksToNext | None = None) -> int:
    """Call `on_tick` at the next epoch tick of `store`'s runs, then every `ticks_to_next()`
    ticks (default: every tick); returns the key to `uninstall` it with once the run has
    returned. Raises RuntimeError (check_binding)."""
    check_binding()
    key = next(_KEYS)
    # No finalizer: the callback and `_TICKS` are module-level and outlive every Store, and the
    # entry goes when the run returns (the callback never runs after that).
    _TICKS[key] = (on_tick, ticks_to_next or _every_tick)
    _BINDING.install(store.ptr(), _CALLBACK, key, _NO_FINALIZER)
    store.set_epoch_deadline(1)
    return key


def uninstall(key: int) -> None:
    _TICKS.pop(key, None)


def read_fuel(context: Any, into: ctypes.c_uint64) -> int | None:
    """The fuel left in the running Store (read through `into`), None if it cannot be read."""
    error = _BINDING.get_fuel(context, ctypes.byref(into))
    if error:
        _BINDING.error_delete(error)
        return None
    return into.value


def set_fuel(context: Any, fuel: int) -> None:
    """Raises RuntimeError if wasmtime refuses."""
    error = _BINDING.set_fuel(context, fuel)
    if error:
        _BINDING.error_delete(error)
        raise RuntimeError("cannot set the fuel of a running module")


def stop_error(reason: str) -> int:
    """What a tick returns to end the run: an owned wasmtime_error_t*, as an address."""
    pointer = _BINDING.error_new((_STOP_MARKER + reason).encode())
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def is_stop(exc: Exception) -> bool:
    """Whether the run ended because a tick returned a `stop_error`."""
    return _STOP_MARKER in str(exc)


# What wasmtime hands back to the callback as `data` is a key looked up here, never dereferenced:
# a stale one finds nothing instead of freed memory.
_TICKS: dict[int, tuple[OnTick, TicksToNext]] = {}
_KEYS = itertools.count(1)


def _every_tick() -> int:
    return 1


def _epoch_callback(context: Any, data: int | None, delta: Any, kind: Any) -> int:
    # An exception escaping a ctypes callback crashes the process: catch everything, and set the
    # out-parameters first (a delta of 0 would call back again at once, forever).
    try:
        delta[0] = 1
        kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
        installed = _TICKS.get(data or 0)
        if installed is None:
            return 0
        on_tick, ticks_to_next = installed
        result = on_tick(context)
        # After the tick: a pause inside it may have started or ended a step.
        delta[0] = max(ticks_to_next(), 1)
        return result
    except BaseException:
        return 0


_BINDING_ERROR: str | None = None
try:
    _BINDING = _load_binding()
    _CALLBACK = _BINDING.callback_type(_epoch_callback)
    _NO_FINALIZER = ctypes.cast(0, _BINDING.finalizer_type)
except RuntimeError as exc:  # live control refuses to run; everything else still works
    _BINDING_ERROR = str(exc)
