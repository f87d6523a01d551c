"""Reading signatures from a binary without compiling it: the same answers wasmtime gives."""

from __future__ import annotations

import pytest
import wasmtime

from relay.wasmtypes import Import, Signature, describe

MODULES = [
    '(module (func (export "main") (param i32 i32) (result i32) local.get 0))',
    """(module
      (import "env" "log" (func (param i32)))
      (import "env" "memory" (memory 1 2))
      (import "env" "table" (table 1 funcref))
      (import "env" "base" (global (mut i64)))
      (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
      (func (export "pair") (param i64 f32) (result f64 i32) f64.const 0 i32.const 0)
      (export "log_again" (func 0))
      (memory (export "mem") 1)
      (func (export "nothing")))""",
    '(module (type (func)) (type (func (param f64))) (func (export "b") (type 1)))',
]


def wasmtime_view(wasm: bytes) -> tuple[list[tuple[str, Signature]], list[Import]]:
    module = wasmtime.Module(wasmtime.Engine(), wasm)
    kinds = {wasmtime.FuncType: "func", wasmtime.MemoryType: "memory",
             wasmtime.TableType: "table", wasmtime.GlobalType: "global"}
    exports = [(e.name, Signature([str(t) for t in e.type.params],
                                  [str(t) for t in e.type.results]))
               for e in module.exports if isinstance(e.type, wasmtime.FuncType)]
    imports = [Import(i.module, i.name or "", kinds[type(i.type)]) for i in module.imports]
    return exports, imports


@pytest.mark.parametrize("wat", MODULES)
def test_signatures_match_what_wasmtime_compiles(wat: str) -> None:
    wasm = bytes(wasmtime.wat2wasm(wat))
    described = describe(wasm)
    assert (described.exports, described.imports) == wasmtime_view(wasm)


def test_types_wasmtime_py_cannot_show_are_named() -> None:
    # wasmtime-py aborts the process on a v128 in a signature, and calls externref "anyref".
    wasm = bytes(wasmtime.wat2wasm(
        '(module (func (export "v") (param v128) (result v128) local.get 0)'
        ' (func (export "r") (param externref) (result funcref) ref.null func))'))
    assert describe(wasm).exports == [("v", Signature(["v128"], ["v128"])),
                                      ("r", Signature(["externref"], ["funcref"]))]
