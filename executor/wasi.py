"""Bounded WASI host calls: the WASI preview 1 functions that could outrun a limit, replaced.

wasmtime's own WASI runs outside fuel and epoch checks, and writes stdout and stderr wherever it
is told to, without limit. So the sandbox's linker shadows two of them (everything else stays
wasmtime's: stdin, clocks, random numbers, and the refusals of a sandbox with no files):

- `fd_write` to stdout (1) and stderr (2) goes into the run's `Output`, which holds at most
  `max_output_bytes` for both streams together. A write that finds less room writes what fits
  and reports that count; once it is full, writes fail with `EFBIG`, as a file over its size
  limit would. Nothing a module writes reaches the host's disk, and no more than the cap of it
  is held in memory. Any other descriptor is `EBADF` (the sandbox opens none).
- `poll_oneoff` (the call behind every WASI sleep) sleeps through `LiveControl.sleep`: it ends
  the run within milliseconds of its `max_time` or a cancel, and pauses in place when asked
  (see there). The only other preview 1 calls that could block are reads of stdin, which is a
  buffer here, and the socket calls, which have no socket to act on.

The functions are registered with wasmtime's C API through ctypes (wasmtime-py's own
`Linker.define_func` cannot end a run without going through a process-wide "last exception",
which concurrent runs would share), so a call can end the run with a trap of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import wasmtime
from wasmtime import _bindings, _ffi

from relay.modules import WASI_MODULE
from relay.schemas import ErrorInfo

if TYPE_CHECKING:
    from executor.control import LiveControl

log = logging.getLogger("relay.executor.wasi")

Stream = Literal["stdout", "stderr"]
# WASI preview 1 errno values.
EBADF, EFAULT, EFBIG, EINVAL = 8, 21, 22, 28
_SUBSCRIPTION = struct.Struct("<QB")  # userdata, tag; the tag's body starts at +16
_CLOCK = struct.Struct("<I4xQQH")  # id, timeout (ns), precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, errno, type, nbytes, flags: 32 bytes
_SUBSCRIPTION_BYTES = 48
_CLOCK_REALTIME, _CLOCK_MONOTONIC = 0, 1
_TAG_CLOCK, _TAG_FD_READ, _TAG_FD_WRITE = 0, 1, 2
_ABSTIME = 1
_IOVEC = struct.Struct("<II")
_U32 = struct.Struct("<I")
_U32_MASK = 0xFFFFFFFF
_YIELD_EVERY_S = 0.001


class Output:
    """What a module wrote to stdout and stderr: at most `limit` bytes for both together.
    Written on the wasm thread, read from any (the progress tail reads it as it grows)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._streams: dict[Stream, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._lock = threading.Lock()
        self.size = 0
        """Bytes held, both streams together."""

    @property
    def room(self) -> int:
        return self.limit - self.size

    def write(self, stream: Stream, data: bytes) -> int:
        """Append what fits of `data`; returns how many bytes were taken."""
        with self._lock:
            taken = data[:self.limit - self.size]
            self._streams[stream] += taken
            self.size += len(taken)
            return len(taken)

    def view(self, stream: Stream) -> memoryview:
        """All of `stream`, in place (no copy): for after the run, when nothing writes to it
        any more (a view pins the buffer: a write would raise BufferError)."""
        return memoryview(self._streams[stream])

    def read(self, stream: Stream, offset: int = 0, limit: int | None = None) -> bytes:
        """Bytes of `stream` from `offset` on (at most `limit`)."""
        with self._lock:
            end = None if limit is None else offset + limit
            return bytes(self._streams[stream][offset:end])


class Host:
    """What the shadowed calls of one run act on; the sandbox sets it for its thread
    (`running`) while the run's module may call them."""

    def __init__(self, output: Output, control: LiveControl) -> None:
        self.output = output
        self.control = control
        self.monotonic_origin_ns = time.monotonic_ns()
        """Where wasmtime's WASI monotonic clock starts (at `Store.set_wasi`): an absolute
        monotonic sleep is measured from it: make the Host right after `set_wasi`."""
        self.yielded_at = 0.0
        """When a call last let other threads take the GIL (perf_counter seconds)."""
        self.memory: wasmtime.Memory | None = None
        """The module's memory, found at its first call (looking it up costs more than the
        rest of a write)."""


_current = threading.local()


@contextlib.contextmanager
def running(host: Host) -> Iterator[Host]:
    """`with running(host):` the calls made on this thread act on `host`."""
    _current.host = host
    try:
        yield host
    finally:
        _current.host = None


def set_stdin(wasi: wasmtime.WasiConfig, data: bytes) -> None:
    """Give the module `data` as its stdin, from memory (wasmtime-py only takes a file)."""
    vec = _bindings.wasm_byte_vec_t()
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    _bindings.wasm_byte_vec_new(ctypes.byref(vec), len(data), buffer)
    # wasmtime takes the bytes over (and frees them with the config).
    _bindings.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))


def shadow(linker: wasmtime.Linker) -> None:
    """Replace the WASI calls this module bounds in `linker` (which already defines WASI)."""
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    for name, key in _KEYS.items():
        func_type = wasmtime.FuncType([i32] * 4, [i32])  # both take four i32s
        module, field = WASI_MODULE.encode(), name.encode()
        error = _bindings.wasmtime_linker_define_func(
            linker.ptr(), module, len(module), field, len(field), func_type.ptr(), _CALLBACK,
            key, _NO_FINALIZER)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
    linker.allow_shadowing = False


# --- the calls ---

class _Memory:
    """The calling module's memory (exported as `memory`, as WASI has it), bounds-checked."""

    def __init__(self, host: Host, caller: wasmtime.Caller) -> None:
        memory = host.memory
        if memory is None:
            found = caller.get("memory")
            if not isinstance(found, wasmtime.Memory):
                raise _Fault
            memory = host.memory = found
        self.base = ctypes.cast(memory.data_ptr(caller), ctypes.c_void_p).value or 0
        self.size = memory.data_len(caller)

    def check(self, pointer: int, length: int) -> None:
        if pointer < 0 or length < 0 or pointer + length > self.size:
            raise _Fault

    def read(self, pointer: int, length: int) -> bytes:
        self.check(pointer, length)
        return ctypes.string_at(self.base + pointer, length)

    def write(self, pointer: int, data: bytes) -> None:
        self.check(pointer, len(data))
        ctypes.memmove(self.base + pointer, data, len(data))


class _Fault(Exception):
    """A pointer outside the module's memory: EFAULT."""


def _fd_write(host: Host, caller: wasmtime.Caller, fd: int, iovs: int, iovs_len: int,
              written_at: int) -> int | ErrorInfo:
    stream: Stream | None = "stdout" if fd == 1 else "stderr" if fd == 2 else None
    if stream is None:
        return EBADF
    memory = _Memory(host, caller)
    memory.check(written_at, 4)
    vectors = memory.read(iovs, iovs_len * _IOVEC.size)
    room = host.output.room
    wanted = 0
    parts = []
    for index in range(iovs_len):
        pointer, length = _IOVEC.unpack_from(vectors, index * _IOVEC.size)
        memory.check(pointer, length)
        wanted += length
        if room > 0:  # never copy more than the cap holds
            parts.append(memory.read(pointer, min(length, room)))
            room -= len(parts[-1])
    if wanted and host.output.room == 0:
        return EFBIG
    written = host.output.write(stream, b"".join(parts))
    memory.write(written_at, _U32.pack(written))
    return 0


def _poll_oneoff(host: Host, caller: wasmtime.Caller, subscriptions: int, events: int,
                 count: int, count_at: int) -> int | ErrorInfo:
    if count == 0:
        return EINVAL
    memory = _Memory(host, caller)
    memory.check(events, count * _EVENT.size)
    memory.check(count_at, 4)
    raw = memory.read(subscriptions, count * _SUBSCRIPTION_BYTES)
    ready: list[bytes] = []
    timers: list[tuple[int, int]] = []  # (ns to wait, userdata)
    for index in range(count):
        at = index * _SUBSCRIPTION_BYTES
        userdata, tag = _SUBSCRIPTION.unpack_from(raw, at)
        if tag == _TAG_CLOCK:
            clock, timeout, _, flags = _CLOCK.unpack_from(raw, at + 16)
            if clock not in (_CLOCK_REALTIME, _CLOCK_MONOTONIC):
                return EINVAL  # as wasmtime: the CPU-time clocks cannot be waited on
            if flags & _ABSTIME:
                now = (time.time_ns() if clock == _CLOCK_REALTIME
                       else time.monotonic_ns() - host.monotonic_origin_ns)
                timeout = max(timeout - now, 0)
            timers.append((timeout, userdata))
        elif tag in (_TAG_FD_READ, _TAG_FD_WRITE):
            (fd,) = _U32.unpack_from(raw, at + 16)
            # stdin is a buffer and the output never blocks: both are always ready.
            if tag == _TAG_FD_READ and fd == 0:
                ready.append(_EVENT.pack(userdata, 0, tag, 0, 0))
            elif tag == _TAG_FD_WRITE and fd in (1, 2):
                ready.append(_EVENT.pack(userdata, 0, tag, host.output.room, 0))
            else:
                ready.append(_EVENT.pack(userdata, EBADF, tag, 0, 0))
        else:
            return EINVAL
    wait_ns = 0 if ready or not timers else min(ns for ns, _ in timers)
    if wait_ns:
        stop = host.control.sleep(wait_ns / 1e9, caller._context())
        if stop is not None:
            return stop
    ready += [_EVENT.pack(userdata, 0, _TAG_CLOCK, 0, 0)
              for ns, userdata in timers if ns <= wait_ns]
    memory.write(events, b"".join(ready))
    memory.write(count_at, _U32.pack(len(ready)))
    return 0


Handler = Callable[..., "int | ErrorInfo"]
_HANDLERS: dict[str, Handler] = {"fd_write": _fd_write, "poll_oneoff": _poll_oneoff}
_KEYS = {name: index + 1 for index, name in enumerate(_HANDLERS)}
"""What wasmtime hands back to the trampoline to say which call it is."""
_BY_KEY = {key: _HANDLERS[name] for name, key in _KEYS.items()}
# Ends the text of the trap a call ends its run with: tells such an end from any other trap.
_STOP_MARKER = "relay-host-call-stop:"


def is_stop(exc: Exception) -> bool:
    """Whether the run ended because a shadowed call ended it (see `LiveControl.stop_of`)."""
    return _STOP_MARKER in str(exc)


def _trap(message: str) -> int:
    data = message.encode()
    trap = _bindings.wasmtime_trap_new(data, len(data))
    return ctypes.cast(trap, ctypes.c_void_p).value or 0


def _trampoline(key: int | None, caller_p: Any, args: Any, nargs: int, results: Any,
                nresults: int) -> int:
    # Runs on the wasm thread, called by wasmtime. Nothing may escape it (a ctypes callback
    # swallows exceptions and returns garbage): every failure becomes a trap.
    host: Host | None = getattr(_current, "host", None)
    try:
        if host is None:
            return _trap("WASI output and sleeps are not available here")
        caller = wasmtime.Caller(caller_p)
        try:
            # Both calls take four i32s, unsigned here (pointers past 2 GiB).
            answer = _BY_KEY[key or 0](host, caller, args[0].of.i32 & _U32_MASK,
                                       args[1].of.i32 & _U32_MASK, args[2].of.i32 & _U32_MASK,
                                       args[3].of.i32 & _U32_MASK)
        except _Fault:
            answer = EFAULT
        finally:
            caller._invalidate()
        now = time.perf_counter()
        if now - host.yielded_at > _YIELD_EVERY_S:
            # Host calls hold the GIL, and a module making nothing else would keep the
            # executor's event loop waiting for it: let other threads in now and then.
            time.sleep(0)
            host.yielded_at = now
        if isinstance(answer, ErrorInfo):
            host.control.end_in_call(answer)
            return _trap(_STOP_MARKER + answer.code)
        results[0].kind = _ffi.WASMTIME_I32.value
        results[0].of.i32 = answer
        return 0
    except BaseException as exc:
        log.exception("a WASI host call failed")
        if host is not None:
            host.control.end_in_call(ErrorInfo("internal", f"a WASI call failed: {exc!r}"))
        return _trap(f"{_STOP_MARKER}internal")


_CALLBACK = _bindings.wasmtime_func_callback_t(_trampoline)
_NO_FINALIZER = ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p))
