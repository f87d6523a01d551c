"""The binary rewrite that exports a module's own memory to the sandbox: checked by compiling
and running what it writes with wasmtime."""

from __future__ import annotations

import pytest
import wasmtime

from executor.binary import MEMORY_EXPORT, export_memory

ENGINE = wasmtime.Engine()


def wasm(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def exports(binary: bytes) -> dict[str, str]:
    module = wasmtime.Module(ENGINE, binary)  # raises if the rewrite broke the module
    return {export.name: type(export.type).__name__ for export in module.exports}


def test_a_module_without_memory_is_unchanged() -> None:
    binary = wasm('(module (func (export "main") (result i32) i32.const 7))')
    assert export_memory(binary) == binary


@pytest.mark.parametrize("wat", [
    '(module (memory (export "memory") 1) (func (export "main")))',
    '(module (memory (export "heap") 1 2) (data (i32.const 0) "x"))',
    '(module (import "env" "memory" (memory 1)) (func (export "main")))',
], ids=["exported", "exported-under-another-name", "imported"])
def test_a_module_whose_memory_is_reachable_or_not_its_own_is_byte_identical(wat: str) -> None:
    binary = wasm(wat)
    assert export_memory(binary) == binary


def test_an_unexported_memory_gets_exported_and_the_module_still_runs() -> None:
    binary = wasm("""(module (memory 2 5) (data (i32.const 16) "relay")
      (func (export "main") (param i32) (result i32)
        (i32.add (local.get 0) (i32.load8_u (i32.const 16)))))""")
    rewritten = export_memory(binary)
    assert exports(rewritten) == {"main": "FuncType", MEMORY_EXPORT: "MemoryType"}
    store = wasmtime.Store(ENGINE)
    instance = wasmtime.Instance(store, wasmtime.Module(ENGINE, rewritten), [])
    main, memory = instance.exports(store)["main"], instance.exports(store)[MEMORY_EXPORT]
    assert isinstance(main, wasmtime.Func) and isinstance(memory, wasmtime.Memory)
    assert main(store, 1) == 1 + ord("r")
    assert memory.data_len(store) == 2 * 65536
    assert memory.read(store, 16, 21) == b"relay"
    # The module's own memory, not a copy: a grow is seen through the export.
    assert memory.grow(store, 1) == 2
    assert export_memory(rewritten) == rewritten  # now it exports one


def test_a_module_with_no_export_section_gets_one_where_it_belongs() -> None:
    """The export section goes before start, element, code and data: a start function and data
    segments still work."""
    binary = wasm("""(module (memory 1) (global $g (mut i32) (i32.const 0))
      (table 1 funcref) (elem (i32.const 0) $init)
      (func $init (global.set $g (i32.load8_u (i32.const 3))))
      (start $init) (data (i32.const 3) "*"))""")
    rewritten = export_memory(binary)
    assert exports(rewritten) == {MEMORY_EXPORT: "MemoryType"}
    store = wasmtime.Store(ENGINE)
    instance = wasmtime.Instance(store, wasmtime.Module(ENGINE, rewritten), [])
    memory = instance.exports(store)[MEMORY_EXPORT]
    assert isinstance(memory, wasmtime.Memory)
    assert memory.read(store, 3, 4) == b"*"


@pytest.mark.parametrize("count", [0, 1, 20, 21, 22, 23, 24, 25, 126, 127, 128, 129])
def test_export_counts_and_sizes_across_leb128_boundaries(count: int) -> None:
    """The export count and the section's size are LEB128: the rewrite may make either one
    byte longer (127 -> 128 entries; a section body crossing 127 bytes)."""
    funcs = " ".join(f'(func (export "f{i}"))' for i in range(count))
    rewritten = export_memory(wasm(f"(module (memory 1) {funcs})"))
    found = exports(rewritten)
    assert found == {**{f"f{i}": "FuncType" for i in range(count)}, MEMORY_EXPORT: "MemoryType"}
