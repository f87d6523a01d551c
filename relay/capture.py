"""Which modules a session can hold: those whose whole state between calls is their memory and
their mutable globals.

After each call a session keeps memory 0 and every mutable global (executor.binary exports
them to the executor), and puts them back into a fresh instance before the next call. Whatever
else a call could change would be lost or reset in between, so a module that can change it is
refused, with a reason the user reads:
- tables (`table.set`, `table.grow`, `table.fill`, `table.copy`, `table.init`): wasmtime-py
  cannot map a table's function references back to function indices;
- dropped segments (`data.drop`, `elem.drop`): a fresh instance has them back;
- shared memories; globals of reference type, and mutable v128 globals: wasmtime-py can read
  and write none of them;
- imports other than functions (Relay links only WASI functions);
- exports named `__relay_…`: the executor reads the state through exports of such names, and a
  module's own would hide part of its state (its memory, say) from what a session commits.

The table and segment instructions are found by decoding every function body, since their
opcode bytes also occur inside other instructions' immediates. The decoder knows the MVP,
sign extension, saturating truncation, bulk memory, reference types, multi-value, SIMD
(relaxed SIMD too) and tail calls; an instruction beyond those (exceptions, GC, threads, typed
function references, ...) is refused as one it cannot check rather than guessed at.

The input is a module wasmtime has validated; on anything else the answer is a reason too,
never an exception, and the walk ends (every step consumes at least one byte).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from relay.wasmtypes import read_uleb, sections

_IMPORT, _MEMORY, _GLOBAL, _EXPORT, _CODE = 2, 5, 6, 7, 10
RESERVED_EXPORT_PREFIX = "__relay_"
"""The executor's copy of a module exports its state under names with this prefix
(executor.binary); a module's own export of such a name would keep that part of its state out
of what a session captures."""
_IMPORT_KINDS = {1: "a table", 2: "a memory", 3: "a global", 4: "a tag"}
_NUMBER_TYPES = {0x7F, 0x7E, 0x7D, 0x7C, 0x7B}  # i32 i64 f32 f64 v128; all others are references
_V128 = 0x7B
_REFERENCE_NAMES = {0x70: "funcref", 0x6F: "externref"}
_REF, _REF_NULL = 0x64, 0x63  # `(ref null? <heap type>)`: the heap type follows
_END = 0x0B
_UNCAPTURABLE = "so its state could not be captured whole"

Reader = Callable[[bytes, int], int]
"""Reads an instruction's immediates at a position; answers the position after them."""


class _Refused(Exception):
    """A reason to refuse, found deep in the walk."""


class _Instruction(Exception):
    """An instruction that settles the answer: `what` it does (a phrase) and its `name`."""

    def __init__(self, what: str, name: str, *, uncapturable: bool = True) -> None:
        super().__init__(what, name)
        self.what, self.name, self.uncapturable = what, name, uncapturable


def why_not_capturable(wasm: bytes) -> str | None:
    """None when a session can capture the module's whole state between calls; otherwise why
    not, as a phrase for the user, e.g. "its code changes a table (table.set in function 3), so
    its state could not be captured whole". Expects a validated module; never raises."""
    try:
        _check(wasm)
    except _Refused as refused:
        return str(refused)
    except (IndexError, ValueError):
        return "Relay could not read its binary"
    return None


def mutable_globals(wasm: bytes) -> list[int]:
    """The global index (imported globals count first) of each mutable global the module
    defines, in order. Raises ValueError if an initializer uses an instruction the decoder does
    not know (only a GC-typed global's can), IndexError on a truncated binary."""
    found = {sid: start for sid, _, start, _ in sections(wasm)}
    first = _imports(wasm, found[_IMPORT]).globals if _IMPORT in found else 0
    if _GLOBAL not in found:
        return []
    try:
        return [first + index for index, _, mutable in _globals(wasm, found[_GLOBAL]) if mutable]
    except _Refused as refused:
        raise ValueError(str(refused)) from None


def _check(wasm: bytes) -> None:
    if wasm[:4] != b"\0asm":
        raise ValueError("not a binary module")
    functions = 0
    for sid, _, start, end in sections(wasm):
        if sid == _IMPORT:
            imports = _imports(wasm, start)
            if imports.refused:
                raise _Refused(imports.refused)
            functions = imports.functions
        elif sid == _MEMORY:
            _memories(wasm, start)
        elif sid == _EXPORT:
            _exports(wasm, start)
        elif sid == _GLOBAL:
            for index, code, mutable in _globals(wasm, start, check=True):
                if code == _V128 and mutable:
                    raise _Refused(f"it has a mutable v128 global (global {index}), which "
                                   "Relay cannot capture")
        elif sid == _CODE:
            _code(wasm, start, end, functions)


class _Imports:
    def __init__(self) -> None:
        self.functions = self.globals = 0
        self.refused = ""
        """Why the first import that is not a function is refused, if there is one."""


def _imports(data: bytes, pos: int) -> _Imports:
    found = _Imports()
    count, pos = read_uleb(data, pos)
    for _ in range(count):
        names = []
        for _ in range(2):
            length, pos = read_uleb(data, pos)
            names.append(data[pos:pos + length].decode("utf-8", "replace"))
            pos += length
        kind, pos = data[pos], pos + 1
        if kind == 0:
            found.functions += 1
            pos = _leb(data, pos)  # type index
            continue
        if not found.refused:
            found.refused = (f"it imports {_IMPORT_KINDS.get(kind, 'something')} "
                             f"({'.'.join(names)}), and Relay provides only WASI functions")
        if kind == 1:
            pos = _limits(data, _value_type(data, pos))[1]
        elif kind == 2:
            pos = _limits(data, pos)[1]
        elif kind == 3:
            found.globals += 1
            pos = _value_type(data, pos) + 1  # and its mutability
        elif kind == 4:
            pos = _leb(data, pos + 1)  # attribute, type index
        else:
            raise ValueError(f"unknown import kind {kind}")
    return found


def _exports(data: bytes, pos: int) -> None:
    count, pos = read_uleb(data, pos)
    for _ in range(count):
        length, pos = read_uleb(data, pos)
        name = data[pos:pos + length].decode("utf-8", "replace")
        if name.startswith(RESERVED_EXPORT_PREFIX):
            raise _Refused(f"it exports {name!r}, and names starting with "
                           f"{RESERVED_EXPORT_PREFIX!r} are Relay's own (it reads a "
                           f"session's memory and globals through them), {_UNCAPTURABLE}")
        pos = _leb(data, pos + length + 1)  # after the kind, the index


def _memories(data: bytes, pos: int) -> None:
    count, pos = read_uleb(data, pos)
    for _ in range(count):
        flags, pos = _limits(data, pos)
        if flags & 0x02:
            raise _Refused(f"its memory is shared, {_UNCAPTURABLE}")


def _limits(data: bytes, pos: int) -> tuple[int, int]:
    """(the flags of a table's or memory's limits, the position after them)."""
    flags, pos = read_uleb(data, pos)
    pos = _leb(data, pos)  # minimum
    if flags & 0x01:
        pos = _leb(data, pos)  # maximum
    if flags & 0x08:
        pos = _leb(data, pos)  # page size (custom page sizes)
    return flags, pos


def _globals(data: bytes, pos: int, *, check: bool = False) -> Iterator[tuple[int, int, bool]]:
    """(index in the section, value type code, mutable) of each defined global. `check`:
    refuse a global of reference type before reading its initializer."""
    count, pos = read_uleb(data, pos)
    for index in range(count):
        code = data[pos]
        if check and code not in _NUMBER_TYPES:
            kind = _REFERENCE_NAMES.get(code, "a reference")
            raise _Refused(f"it has a global of reference type (global {index}: {kind}), "
                           "which Relay cannot capture")
        pos = _value_type(data, pos)
        mutable = bool(data[pos] & 1)
        pos += 1
        try:
            while data[pos] != _END:  # its initializer, a constant expression
                pos = _instruction(data, pos)
        except _Instruction as found:
            raise _Refused(f"the initializer of its global {index} uses an instruction Relay "
                           f"cannot check ({found.name})") from None
        pos += 1
        yield index, code, mutable


def _code(data: bytes, pos: int, end: int, first: int) -> None:
    """Decode every function body; `first` is the index of the first defined function."""
    count, pos = read_uleb(data, pos)
    for index in range(first, first + count):
        size, pos = read_uleb(data, pos)
        body_end = pos + size
        if body_end > end:
            raise ValueError("a function body runs past the code section")
        try:
            _body(data, pos, body_end)
        except _Instruction as found:
            reason = f"its code {found.what} ({found.name} in function {index})"
            raise _Refused(f"{reason}, {_UNCAPTURABLE}" if found.uncapturable else reason) \
                from None
        pos = body_end


def _body(data: bytes, pos: int, end: int) -> None:
    count, pos = read_uleb(data, pos)
    for _ in range(count):  # local declarations: how many, then their type
        pos = _value_type(data, _leb(data, pos))
    while pos < end:
        pos = _instruction(data, pos)
    if pos != end:
        raise ValueError("an instruction runs past its function body")


def _instruction(data: bytes, pos: int) -> int:
    reader = _OPCODES.get(data[pos])
    if reader is None:
        raise _Instruction("uses an instruction Relay cannot check", f"0x{data[pos]:02x}",
                           uncapturable=False)
    return reader(data, pos + 1)


# --- immediates ---


def _leb(data: bytes, pos: int) -> int:
    """Skip one LEB128 number, signed or not."""
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def _none(data: bytes, pos: int) -> int:
    return pos


def _two_lebs(data: bytes, pos: int) -> int:
    return _leb(data, _leb(data, pos))


def _value_type(data: bytes, pos: int) -> int:
    """A value type, or a block type (also one byte for none or one value; else an s33 type
    index), in either case followed by a heap type when it is `(ref null? ...)`."""
    first = data[pos]
    pos = _leb(data, pos)
    return _leb(data, pos) if first in (_REF, _REF_NULL) else pos


def _memarg(data: bytes, pos: int) -> int:
    align, pos = read_uleb(data, pos)
    if align & 0x40:  # a memory index follows (multi-memory)
        pos = _leb(data, pos)
    return _leb(data, pos)  # offset


def _memarg_lane(data: bytes, pos: int) -> int:
    return _memarg(data, pos) + 1


def _br_table(data: bytes, pos: int) -> int:
    count, pos = read_uleb(data, pos)
    for _ in range(count + 1):  # the labels, then the default
        pos = _leb(data, pos)
    return pos


def _select_types(data: bytes, pos: int) -> int:
    count, pos = read_uleb(data, pos)
    for _ in range(count):
        pos = _value_type(data, pos)
    return pos


def _fixed(size: int) -> Reader:
    return lambda data, pos: pos + size


def _refuse(name: str, what: str) -> Reader:
    def refuse(data: bytes, pos: int) -> int:
        raise _Instruction(what, name)
    return refuse


def _prefixed(prefix: int, table: dict[int, Reader]) -> Reader:
    def read(data: bytes, pos: int) -> int:
        sub, pos = read_uleb(data, pos)
        reader = table.get(sub)
        if reader is None:
            raise _Instruction("uses an instruction Relay cannot check", f"0x{prefix:02x} {sub}",
                               uncapturable=False)
        return reader(data, pos)
    return read


def _each(codes: Iterable[int], reader: Reader) -> dict[int, Reader]:
    return dict.fromkeys(codes, reader)


_CHANGES_A_TABLE, _DROPS_A_SEGMENT = "changes a table", "drops a segment"

_MISC: dict[int, Reader] = {  # 0xFC: saturating truncation, bulk memory, table instructions
    **_each(range(0, 8), _none),  # i32.trunc_sat_f32_s ... i64.trunc_sat_f64_u
    8: _two_lebs,  # memory.init data memory
    9: _refuse("data.drop", _DROPS_A_SEGMENT),
    10: _two_lebs,  # memory.copy memory memory
    11: _leb,  # memory.fill memory
    12: _refuse("table.init", _CHANGES_A_TABLE),
    13: _refuse("elem.drop", _DROPS_A_SEGMENT),
    14: _refuse("table.copy", _CHANGES_A_TABLE),
    15: _refuse("table.grow", _CHANGES_A_TABLE),
    16: _leb,  # table.size table
    17: _refuse("table.fill", _CHANGES_A_TABLE),
}

# SIMD sub-opcodes that no instruction uses (checked against wasmtime's validator).
_SIMD_UNUSED = {154, 162, 165, 166, 175, 176, 178, 179, 180, 187, 194, 197, 198, 207, 208, 210,
                211, 212, 226, 238}
_SIMD: dict[int, Reader] = {  # 0xFD
    **_each((c for c in range(276) if c not in _SIMD_UNUSED), _none),  # 256-275: relaxed SIMD
    **_each(range(0, 12), _memarg),  # v128.load ... v128.store
    12: _fixed(16),  # v128.const
    13: _fixed(16),  # i8x16.shuffle: 16 lane indices
    **_each(range(21, 35), _fixed(1)),  # extract_lane and replace_lane: a lane index
    **_each(range(84, 92), _memarg_lane),  # v128.load8_lane ... v128.store64_lane
    92: _memarg, 93: _memarg,  # v128.load32_zero, v128.load64_zero
}

_OPCODES: dict[int, Reader] = {
    0x00: _none, 0x01: _none,  # unreachable, nop
    0x02: _value_type, 0x03: _value_type, 0x04: _value_type,  # block, loop, if: a block type
    0x05: _none, 0x0B: _none,  # else, end
    0x0C: _leb, 0x0D: _leb, 0x0E: _br_table, 0x0F: _none,  # br, br_if, br_table, return
    0x10: _leb, 0x11: _two_lebs,  # call function; call_indirect type table
    0x12: _leb, 0x13: _two_lebs,  # return_call, return_call_indirect
    0x1A: _none, 0x1B: _none, 0x1C: _select_types,  # drop, select, select t*
    **_each(range(0x20, 0x25), _leb),  # local.get/set/tee, global.get/set
    0x25: _leb,  # table.get
    0x26: _refuse("table.set", _CHANGES_A_TABLE),
    **_each(range(0x28, 0x3F), _memarg),  # loads and stores
    0x3F: _leb, 0x40: _leb,  # memory.size, memory.grow: a memory index
    0x41: _leb, 0x42: _leb, 0x43: _fixed(4), 0x44: _fixed(8),  # i32/i64/f32/f64.const
    **_each(range(0x45, 0xC5), _none),  # numeric instructions, sign extension
    0xD0: _leb, 0xD1: _none, 0xD2: _leb,  # ref.null heap type, ref.is_null, ref.func function
    0xFC: _prefixed(0xFC, _MISC),
    0xFD: _prefixed(0xFD, _SIMD),
}
