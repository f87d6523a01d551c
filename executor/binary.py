"""A small edit of WebAssembly binaries: exporting a module's own memory to the sandbox.

A refused `memory.grow` returns -1 and most code then traps; to name that `memory_limit`, the
sandbox looks at the module's memory after a trap, which it can only reach through an export.
Modules that keep their memory unexported get one, under a name no module uses, in the copy the
executor compiles (the stored module and its CID are untouched).
"""

from __future__ import annotations

from relay.wasmtypes import read_uleb, sections

MEMORY_EXPORT = "__relay_memory"
_EXPORT, _MEMORY = 7, 5
_AFTER_EXPORTS = {8, 9, 10, 11, 12}  # start, element, code, data, data count
_KIND_MEMORY = 2


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _exports_a_memory(wasm: bytes, start: int) -> bool:
    count, pos = read_uleb(wasm, start)
    for _ in range(count):
        length, pos = read_uleb(wasm, pos)
        pos += length
        kind = wasm[pos]
        _, pos = read_uleb(wasm, pos + 1)
        if kind == _KIND_MEMORY:
            return True
    return False


def export_memory(wasm: bytes) -> bytes:
    """`wasm` with its memory 0 exported as MEMORY_EXPORT, if it defines one and exports none;
    otherwise `wasm` unchanged. Expects a valid module."""
    found = sections(wasm)
    if not any(sid == _MEMORY for sid, *_ in found):
        return wasm
    entry = _uleb(len(MEMORY_EXPORT)) + MEMORY_EXPORT.encode() + bytes([_KIND_MEMORY, 0])
    for sid, head, start, end in found:
        if sid == _EXPORT:
            if _exports_a_memory(wasm, start):
                return wasm
            count, rest = read_uleb(wasm, start)
            body = _uleb(count + 1) + wasm[rest:end] + entry
            return wasm[:head] + bytes([_EXPORT]) + _uleb(len(body)) + body + wasm[end:]
    body = _uleb(1) + entry
    section = bytes([_EXPORT]) + _uleb(len(body)) + body
    at = next((head for sid, head, _, _ in found if sid in _AFTER_EXPORTS), len(wasm))
    return wasm[:at] + section + wasm[at:]
