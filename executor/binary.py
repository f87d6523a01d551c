"""A small edit of WebAssembly binaries: exporting a module's own state to the executor.

The executor reaches a module's memory and globals only through exports, and needs them:
- a refused `memory.grow` returns -1 and most code then traps; to name that `memory_limit`, the
  sandbox looks at the module's memory after a trap;
- a session keeps memory 0 and every mutable global between calls (relay.capture says which
  modules have no other state), read after a call and written back into a fresh instance.
So the copy the executor compiles (the stored module and its CID are untouched) exports memory
0 as MEMORY_EXPORT and each mutable global the module defines as GLOBAL_EXPORT_PREFIX + its
index, even when the module exports them itself (a second export of the same thing is valid):
one naming rule finds all of them.
"""

from __future__ import annotations

from relay.capture import mutable_globals
from relay.wasmtypes import read_uleb, sections

MEMORY_EXPORT = "__relay_memory"
GLOBAL_EXPORT_PREFIX = "__relay_global_"
"""Followed by the global's index in the global index space (imported globals first)."""
_EXPORT, _MEMORY = 7, 5
_AFTER_EXPORTS = {8, 9, 10, 11, 12}  # start, element, code, data, data count
_KIND_MEMORY, _KIND_GLOBAL = 2, 3


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _export_names(wasm: bytes, start: int) -> set[bytes]:
    names = set()
    count, pos = read_uleb(wasm, start)
    for _ in range(count):
        length, pos = read_uleb(wasm, pos)
        names.add(bytes(wasm[pos:pos + length]))
        _, pos = read_uleb(wasm, pos + length + 1)  # after the kind, the index
    return names


def _state(wasm: bytes, found: list[tuple[int, int, int, int]]) -> list[tuple[str, int, int]]:
    """(export name, kind, index) of memory 0, if the module defines it, and of each mutable
    global it defines."""
    state = [(MEMORY_EXPORT, _KIND_MEMORY, 0) for sid, _, start, _ in found
             if sid == _MEMORY and read_uleb(wasm, start)[0]]
    try:
        globals_ = mutable_globals(wasm)
    except ValueError:  # a GC-typed global's initializer: sessions refuse such modules anyway
        globals_ = []
    return state + [(f"{GLOBAL_EXPORT_PREFIX}{index}", _KIND_GLOBAL, index)
                    for index in globals_]


def export_state(wasm: bytes) -> bytes:
    """`wasm` with memory 0 (if it defines one) exported as MEMORY_EXPORT and each mutable
    global it defines as GLOBAL_EXPORT_PREFIX + its global index; `wasm` itself when it has
    neither. A name the module already exports keeps its meaning (two exports cannot share a
    name): the executor checks an export's type before it reads one. Expects a valid module."""
    found = sections(wasm)
    exports = next(((head, start, end) for sid, head, start, end in found if sid == _EXPORT),
                   None)
    taken = _export_names(wasm, exports[1]) if exports else set()
    added = [(name.encode(), kind, index) for name, kind, index in _state(wasm, found)
             if name.encode() not in taken]
    if not added:
        return wasm
    entries = b"".join(_uleb(len(name)) + name + bytes([kind]) + _uleb(index)
                       for name, kind, index in added)
    if exports:
        head, start, end = exports
        count, rest = read_uleb(wasm, start)
        body = _uleb(count + len(added)) + wasm[rest:end] + entries
        return wasm[:head] + bytes([_EXPORT]) + _uleb(len(body)) + body + wasm[end:]
    body = _uleb(len(added)) + entries
    section = bytes([_EXPORT]) + _uleb(len(body)) + body
    at = next((head for sid, head, _, _ in found if sid in _AFTER_EXPORTS), len(wasm))
    return wasm[:at] + section + wasm[at:]
