"""The binary rewrite that exports a module's own memory and mutable globals to the executor:
checked by compiling and running what it writes with wasmtime."""

from __future__ import annotations

import pytest
import wasmtime

from executor.binary import GLOBAL_EXPORT_PREFIX, MEMORY_EXPORT, export_state

ENGINE = wasmtime.Engine()


def wasm(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


def exports(binary: bytes) -> dict[str, str]:
    module = wasmtime.Module(ENGINE, binary)  # raises if the rewrite broke the module
    return {export.name: type(export.type).__name__ for export in module.exports}


def test_a_module_without_memory_is_unchanged() -> None:
    binary = wasm('(module (func (export "main") (result i32) i32.const 7))')
    assert export_state(binary) == binary


def test_a_module_without_memory_or_mutable_globals_is_unchanged() -> None:
    binary = wasm('(module (global (export "g") i32 (i32.const 1)) (func (export "main")))')
    assert export_state(binary) == binary


def test_an_imported_memory_is_not_the_modules_own() -> None:
    binary = wasm('(module (import "env" "memory" (memory 1)) (func (export "main")))')
    assert export_state(binary) == binary


@pytest.mark.parametrize("wat", [
    '(module (memory (export "memory") 1) (func (export "main")))',
    '(module (memory (export "heap") 1 2) (data (i32.const 0) "x"))',
], ids=["exported", "exported-under-another-name"])
def test_an_exported_memory_gets_the_relay_name_too(wat: str) -> None:
    """One naming rule: the executor finds memory 0 under MEMORY_EXPORT whatever the module
    calls it, and both names reach the same memory."""
    rewritten = export_state(wasm(wat))
    store = wasmtime.Store(ENGINE)
    found = wasmtime.Instance(store, wasmtime.Module(ENGINE, rewritten), []).exports(store)
    memory, own = found[MEMORY_EXPORT], found["memory" if "memory" in found else "heap"]
    assert isinstance(memory, wasmtime.Memory) and isinstance(own, wasmtime.Memory)
    memory.write(store, b"relay", 100)
    assert own.read(store, 100, 105) == b"relay"
    assert export_state(rewritten) == rewritten  # the name is taken now: nothing added


def test_an_unexported_memory_gets_exported_and_the_module_still_runs() -> None:
    binary = wasm("""(module (memory 2 5) (data (i32.const 16) "relay")
      (func (export "main") (param i32) (result i32)
        (i32.add (local.get 0) (i32.load8_u (i32.const 16)))))""")
    rewritten = export_state(binary)
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
    assert export_state(rewritten) == rewritten  # now it exports one


def test_a_module_with_no_export_section_gets_one_where_it_belongs() -> None:
    """The export section goes before start, element, code and data: a start function and data
    segments still work."""
    binary = wasm("""(module (memory 1) (global $g (mut i32) (i32.const 0))
      (table 1 funcref) (elem (i32.const 0) $init)
      (func $init (global.set $g (i32.load8_u (i32.const 3))))
      (start $init) (data (i32.const 3) "*"))""")
    rewritten = export_state(binary)
    global_export = f"{GLOBAL_EXPORT_PREFIX}0"
    assert exports(rewritten) == {MEMORY_EXPORT: "MemoryType", global_export: "GlobalType"}
    store = wasmtime.Store(ENGINE)
    instance = wasmtime.Instance(store, wasmtime.Module(ENGINE, rewritten), [])
    memory, global_ = instance.exports(store)[MEMORY_EXPORT], instance.exports(store)[global_export]
    assert isinstance(memory, wasmtime.Memory) and isinstance(global_, wasmtime.Global)
    assert memory.read(store, 3, 4) == b"*"
    assert global_.value(store) == ord("*")  # what the start function set


@pytest.mark.parametrize("count", [0, 1, 20, 21, 22, 23, 24, 25, 126, 127, 128, 129])
def test_export_counts_and_sizes_across_leb128_boundaries(count: int) -> None:
    """The export count and the section's size are LEB128: the rewrite may make either one
    byte longer (127 -> 128 entries; a section body crossing 127 bytes)."""
    funcs = " ".join(f'(func (export "f{i}"))' for i in range(count))
    rewritten = export_state(wasm(f"(module (memory 1) {funcs})"))
    found = exports(rewritten)
    assert found == {**{f"f{i}": "FuncType" for i in range(count)}, MEMORY_EXPORT: "MemoryType"}


def test_internal_mutable_globals_are_exported_readable_and_settable() -> None:
    """A module keeping its memory and globals to itself: each mutable global is exported
    under its index in the global index space (an imported one counts), immutable ones are
    not, and what the executor writes through the exports is what the module sees."""
    binary = wasm("""(module
      (import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))
      (memory 1)
      (global $count (mut i32) (i32.const 5))
      (global $limit i64 (i64.const 99))
      (global $total (mut i64) (i64.const -3))
      (global $scale (mut f64) (f64.const 1.5))
      (global $half (mut f32) (f32.const 0.5))
      (func (export "bump") (result i32)
        (global.set $count (i32.add (global.get $count) (i32.const 1)))
        (global.set $total (i64.add (global.get $total) (global.get $limit)))
        (i32.store (i32.const 0) (global.get $count))
        (global.get $count))
      (func (export "scaled") (result f64)
        (f64.mul (global.get $scale) (f64.promote_f32 (global.get $half)))))""")
    rewritten = export_state(binary)
    names = {0: "count", 2: "total", 3: "scale", 4: "half"}
    assert exports(rewritten) == {"bump": "FuncType", "scaled": "FuncType",
                                  MEMORY_EXPORT: "MemoryType",
                                  **{f"{GLOBAL_EXPORT_PREFIX}{i}": "GlobalType" for i in names}}
    linker = wasmtime.Linker(ENGINE)
    linker.define_wasi()
    store = wasmtime.Store(ENGINE)
    store.set_wasi(wasmtime.WasiConfig())
    found = linker.instantiate(store, wasmtime.Module(ENGINE, rewritten)).exports(store)
    count, total, scale, half = (found[f"{GLOBAL_EXPORT_PREFIX}{i}"] for i in names)
    bump, scaled, memory = found["bump"], found["scaled"], found[MEMORY_EXPORT]
    assert all(isinstance(g, wasmtime.Global) for g in (count, total, scale, half))
    assert isinstance(bump, wasmtime.Func) and isinstance(scaled, wasmtime.Func)
    assert isinstance(memory, wasmtime.Memory)
    assert isinstance(count, wasmtime.Global) and isinstance(total, wasmtime.Global)
    assert isinstance(scale, wasmtime.Global) and isinstance(half, wasmtime.Global)
    assert [str(g.type(store).content) for g in (count, total, scale, half)] == [
        "i32", "i64", "f64", "f32"]
    assert (count.value(store), total.value(store)) == (5, -3)
    assert (scale.value(store), half.value(store)) == (1.5, 0.5)
    assert bump(store) == 6
    assert (count.value(store), total.value(store)) == (6, 96)
    count.set_value(store, 41)  # as a session restores a state
    scale.set_value(store, wasmtime.Val.f64(4.0))
    assert bump(store) == 42
    assert memory.read(store, 0, 4) == (42).to_bytes(4, "little")
    assert scaled(store) == 2.0


def test_a_global_the_module_exports_itself_gets_the_relay_name_too() -> None:
    binary = wasm("""(module (global $g (export "counter") (mut i32) (i32.const 0))
      (func (export "inc") (global.set $g (i32.add (global.get $g) (i32.const 1)))))""")
    rewritten = export_state(binary)
    assert exports(rewritten) == {"counter": "GlobalType", "inc": "FuncType",
                                  f"{GLOBAL_EXPORT_PREFIX}0": "GlobalType"}
    store = wasmtime.Store(ENGINE)
    found = wasmtime.Instance(store, wasmtime.Module(ENGINE, rewritten), []).exports(store)
    inc, own, relay = found["inc"], found["counter"], found[f"{GLOBAL_EXPORT_PREFIX}0"]
    assert isinstance(inc, wasmtime.Func)
    assert isinstance(own, wasmtime.Global) and isinstance(relay, wasmtime.Global)
    inc(store)
    assert own.value(store) == relay.value(store) == 1


def test_a_relay_name_the_module_uses_for_something_else_is_left_alone() -> None:
    """Two exports cannot share a name: the module's own export keeps it and still runs."""
    binary = wasm(f"""(module (memory 1) (global (mut i32) (i32.const 0))
      (func (export "{GLOBAL_EXPORT_PREFIX}0") (result i32) (i32.const 7)))""")
    rewritten = export_state(binary)
    assert exports(rewritten) == {f"{GLOBAL_EXPORT_PREFIX}0": "FuncType",
                                  MEMORY_EXPORT: "MemoryType"}


def test_globals_of_every_type_are_exported_and_the_module_still_compiles() -> None:
    """Reference and v128 globals (sessions refuse such modules, but every run is rewritten)
    and initializers using other globals and extended constants."""
    binary = wasm("""(module (func $f)
      (global $base i32 (i32.const 8))
      (global (mut funcref) (ref.func $f))
      (global (mut v128) (v128.const i64x2 1 2))
      (global (mut i32) (i32.add (global.get $base) (i32.const 4))))""")
    assert exports(export_state(binary)) == {
        f"{GLOBAL_EXPORT_PREFIX}{i}": "GlobalType" for i in (1, 2, 3)}


def test_a_bytearray_is_rewritten_like_bytes() -> None:
    """`wasmtime.wat2wasm` answers a bytearray, and callers pass it on as it is."""
    binary = wasmtime.wat2wasm('(module (memory (export "m") 1) (global (mut i32) (i32.const 0)))')
    assert export_state(binary) == export_state(bytes(binary))
