"""A small edit of WebAssembly binaries: exporting a module's own memory to the sandbox.

A refused `memory.grow` returns -1 and most code then traps; to name that `memory_limit`, the
sandbox looks at the module's memory after a trap, which it can only reach through an export.
Modules that keep their memory unexported get one, under a name no module uses, in the copy the
executor compiles (the stored module and its CID are untouched).
"""

from __future__ import annotations

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


def _read_uleb(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _sections(wasm: bytes) -> list[tuple[int, int, int, int]]:
    """(id, start of the section, start of its contents, end) of each section."""
    sections, pos = [], 8
    while pos < len(wasm):
        size, start = _read_uleb(wasm, pos + 1)
        sections.append((wasm[pos], pos, start, start + size))
        pos = start + size
    return sections


def _exports_a_memory(wasm: bytes, start: int) -> bool:
    count, pos = _read_uleb(wasm, start)
    for _ in range(count):
        length, pos = _read_uleb(wasm, pos)
        pos += length
        kind = wasm[pos]
        _, pos = _read_uleb(wasm, pos + 1)
        if kind == _KIND_MEMORY:
            return True
    return False


def export_memory(wasm: bytes) -> bytes:
    """`wasm` with its memory 0 exported as MEMORY_EXPORT, if it defines one and exports none;
    otherwise `wasm` unchanged. Expects a valid module."""
    sections = _sections(wasm)
    if not any(sid == _MEMORY for sid, *_ in sections):
        return wasm
    entry = _uleb(len(MEMORY_EXPORT)) + MEMORY_EXPORT.encode() + bytes([_KIND_MEMORY, 0])
    for sid, head, start, end in sections:
        if sid == _EXPORT:
            if _exports_a_memory(wasm, start):
                return wasm
            count, rest = _read_uleb(wasm, start)
            body = _uleb(count + 1) + wasm[rest:end] + entry
            return wasm[:head] + bytes([_EXPORT]) + _uleb(len(body)) + body + wasm[end:]
    body = _uleb(1) + entry
    section = bytes([_EXPORT]) + _uleb(len(body)) + body
    at = next((head for sid, head, _, _ in sections if sid in _AFTER_EXPORTS), len(wasm))
    return wasm[:at] + section + wasm[at:]
