"""Reading WebAssembly binaries without compiling them: the one LEB128 reader and section walk
(`read_uleb`, `sections`, used by the executor's binary rewrite too), and the signatures of a
module's imports and exports (`describe`).

Describing an upload used to mean compiling it with Cranelift (seconds for a big module, on the
gateway) and asking wasmtime-py for its types, which aborts the whole process on a `v128` in a
signature. Validation (`wasmtime.Module.validate`, milliseconds) proves the binary well formed;
this reads the type, import, function and export sections of such a validated binary. On a
binary that was not validated it may raise IndexError or ValueError.
"""

from __future__ import annotations

from typing import NamedTuple

_TYPE, _IMPORT, _FUNCTION, _EXPORT = 1, 2, 3, 7
_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}
_VALUE_TYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
                0x70: "funcref", 0x6F: "externref"}
# Heap types of the GC and exception proposals' shorthands (0x6E anyref, 0x6D eqref, ...).
_HEAP_TYPES = {0x70: "func", 0x6F: "extern", 0x6E: "any", 0x6D: "eq", 0x6C: "i31",
               0x6B: "struct", 0x6A: "array", 0x69: "exn", 0x71: "none", 0x72: "noextern",
               0x73: "nofunc", 0x74: "noexn"}
_REF, _REF_NULL = 0x64, 0x63
_FUNC_TYPE = 0x60
# Composite type prefixes of the GC proposal: a recursion group, sub types, struct, array.
_REC, _SUB, _SUB_FINAL, _STRUCT, _ARRAY = 0x4E, 0x50, 0x4F, 0x5F, 0x5E


class Signature(NamedTuple):
    params: list[str]
    results: list[str]


class Import(NamedTuple):
    module: str
    name: str
    kind: str


class Described(NamedTuple):
    exports: list[tuple[str, Signature]]
    """The exported functions, in order, with their signatures."""
    imports: list[Import]


def read_uleb(data: bytes, pos: int) -> tuple[int, int]:
    """(the unsigned LEB128 number at `pos`, the position after it)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def sections(wasm: bytes) -> list[tuple[int, int, int, int]]:
    """(id, start of the section, start of its contents, end) of each section of a binary."""
    found, pos = [], 8
    while pos < len(wasm):
        size, start = read_uleb(wasm, pos + 1)
        found.append((wasm[pos], pos, start, start + size))
        pos = start + size
    return found


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uleb(self) -> int:
        value, self.pos = read_uleb(self.data, self.pos)
        return value

    def sleb(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value - (1 << shift) if byte & 0x40 else value

    def name(self) -> str:
        length = self.uleb()
        text = self.data[self.pos:self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def value_type(self) -> str:
        code = self.byte()
        if code in _VALUE_TYPES:
            return _VALUE_TYPES[code]
        if code in _HEAP_TYPES:  # a shorthand of the GC proposal, e.g. `anyref`
            return f"{_HEAP_TYPES[code]}ref"
        if code in (_REF, _REF_NULL):
            heap = self.sleb()
            kind = _HEAP_TYPES.get(heap + 0x80, "") if heap < 0 else f"type {heap}"
            return f"(ref {'null ' if code == _REF_NULL else ''}{kind})"
        raise ValueError(f"unknown value type 0x{code:02x}")

    def limits(self) -> None:
        flags = self.uleb()
        self.uleb()  # minimum
        if flags & 1:
            self.uleb()  # maximum


def describe(wasm: bytes) -> Described:
    """The exported functions' signatures and the imports of a validated binary module."""
    types: list[Signature | None] = []
    functions: list[int] = []  # the type index of each function, imported ones first
    imports: list[Import] = []
    exports: list[tuple[str, int]] = []
    reader = _Reader(wasm, 8)
    while reader.pos < len(wasm):
        section = reader.byte()
        size = reader.uleb()
        end = reader.pos + size
        if section == _TYPE:
            for _ in range(reader.uleb()):
                types.extend(_rec_group(reader))
        elif section == _IMPORT:
            for _ in range(reader.uleb()):
                imports.append(_import(reader, functions))
        elif section == _FUNCTION:
            functions.extend(reader.uleb() for _ in range(reader.uleb()))
        elif section == _EXPORT:
            for _ in range(reader.uleb()):
                name, kind, index = reader.name(), reader.byte(), reader.uleb()
                if kind == 0:
                    exports.append((name, index))
        reader.pos = end
    described = []
    for name, index in exports:
        signature = types[functions[index]]
        if signature is None:
            raise ValueError(f"export {name!r} has no function type")
        described.append((name, signature))
    return Described(described, imports)


def _rec_group(reader: _Reader) -> list[Signature | None]:
    """The types of one entry of the type section (several for a recursion group); None for
    a type that is not a function's."""
    if reader.data[reader.pos] == _REC:
        reader.byte()
        return [_sub_type(reader) for _ in range(reader.uleb())]
    return [_sub_type(reader)]


def _sub_type(reader: _Reader) -> Signature | None:
    if reader.data[reader.pos] in (_SUB, _SUB_FINAL):
        reader.byte()
        for _ in range(reader.uleb()):
            reader.uleb()  # super types
    form = reader.byte()
    if form == _FUNC_TYPE:
        params = [reader.value_type() for _ in range(reader.uleb())]
        results = [reader.value_type() for _ in range(reader.uleb())]
        return Signature(params, results)
    if form == _STRUCT:
        for _ in range(reader.uleb()):
            _field(reader)
    elif form == _ARRAY:
        _field(reader)
    else:
        raise ValueError(f"unknown type form 0x{form:02x}")
    return None


def _field(reader: _Reader) -> None:
    if reader.data[reader.pos] in (0x78, 0x77):  # packed i8, i16
        reader.byte()
    else:
        reader.value_type()
    reader.byte()  # mutability


def _import(reader: _Reader, functions: list[int]) -> Import:
    module, name, kind = reader.name(), reader.name(), reader.byte()
    if kind == 0:
        functions.append(reader.uleb())
    elif kind == 1:
        reader.value_type()
        reader.limits()
    elif kind == 2:
        reader.limits()
    elif kind == 3:
        reader.value_type()
        reader.byte()  # mutability
    elif kind == 4:
        reader.byte()  # attribute
        reader.uleb()  # type index
    else:
        raise ValueError(f"unknown import kind {kind}")
    return Import(module, name, _KINDS[kind])
