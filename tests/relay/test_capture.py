"""Which modules a session can hold: refused with a reason naming what it cannot capture,
accepted when their whole state is memory 0 and mutable numeric globals."""

from __future__ import annotations

import random
import time

import pytest
import wasmtime

from relay.capture import mutable_globals, why_not_capturable
from relay.wasmtypes import sections
from tests.conftest import FIXTURES

UNCAPTURABLE = ", so its state could not be captured whole"


def wasm(wat: str) -> bytes:
    return bytes(wasmtime.wat2wasm(wat))


TABLE = "(table $t 2 funcref) (func $f) (elem $e funcref (ref.func $f))"

REFUSED = {
    "table.set": (f"(module {TABLE} (func (table.set $t (i32.const 0) (ref.null func))))",
                  f"its code changes a table (table.set in function 1){UNCAPTURABLE}"),
    "table.init": (f"(module {TABLE} (func (table.init $t $e (i32.const 0) (i32.const 0) "
                   "(i32.const 1))))",
                   f"its code changes a table (table.init in function 1){UNCAPTURABLE}"),
    "elem.drop": (f"(module {TABLE} (func (elem.drop $e)))",
                  f"its code drops a segment (elem.drop in function 1){UNCAPTURABLE}"),
    "table.copy": (f"(module {TABLE} (func (table.copy (i32.const 0) (i32.const 1) "
                   "(i32.const 1))))",
                   f"its code changes a table (table.copy in function 1){UNCAPTURABLE}"),
    "table.grow": (f"(module {TABLE} (func (drop (table.grow $t (ref.null func) (i32.const 1)))))",
                   f"its code changes a table (table.grow in function 1){UNCAPTURABLE}"),
    "table.fill": (f"(module {TABLE} (func (table.fill $t (i32.const 0) (ref.null func) "
                   "(i32.const 2))))",
                   f"its code changes a table (table.fill in function 1){UNCAPTURABLE}"),
    "data.drop": ('(module (memory 1) (data $d "abc") (func (data.drop $d)))',
                  f"its code drops a segment (data.drop in function 0){UNCAPTURABLE}"),
    "function-index-counts-imports": (
        '(module (import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))'
        ' (table 1 funcref) (func) (func (table.set 0 (i32.const 0) (ref.null func))))',
        f"its code changes a table (table.set in function 2){UNCAPTURABLE}"),
    "shared-memory": ("(module (memory 1 2 shared) (func))",
                      f"its memory is shared{UNCAPTURABLE}"),
    "funcref-global": ("(module (func $f) (global funcref (ref.func $f)))",
                       "it has a global of reference type (global 0: funcref), which Relay "
                       "cannot capture"),
    "mutable-externref-global": (
        "(module (global (mut i32) (i32.const 0)) (global (mut externref) (ref.null extern)))",
        "it has a global of reference type (global 1: externref), which Relay cannot capture"),
    "mutable-v128-global": ("(module (global (mut v128) (v128.const i64x2 0 0)))",
                            "it has a mutable v128 global (global 0), which Relay cannot "
                            "capture"),
    "imported-memory": ('(module (import "env" "memory" (memory 1)))',
                        "it imports a memory (env.memory), and Relay provides only WASI "
                        "functions"),
    "imported-global": ('(module (import "env" "g" (global (mut i32))))',
                        "it imports a global (env.g), and Relay provides only WASI functions"),
    "imported-table": ('(module (import "env" "t" (table 1 funcref)))',
                       "it imports a table (env.t), and Relay provides only WASI functions"),
    "exceptions": ("(module (tag $oops) (func (throw $oops)))",
                   "its code uses an instruction Relay cannot check (0x08 in function 0)"),
    "typed-function-references": (
        "(module (type $t (func)) (func $f) (elem declare func $f)"
        " (func (call_ref $t (ref.func $f))))",
        "its code uses an instruction Relay cannot check (0x14 in function 1)"),
    "wide-arithmetic": (
        "(module (func (result i64 i64) (i64.add128 (i64.const 1) (i64.const 2) (i64.const 3)"
        " (i64.const 4))))",
        "its code uses an instruction Relay cannot check (0xfc 19 in function 0)"),
}


@pytest.mark.parametrize(("wat", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_what_a_session_could_not_capture_is_refused_with_its_reason(wat: str,
                                                                     reason: str) -> None:
    assert why_not_capturable(wasm(wat)) == reason


ACCEPTED = {
    "counter": """(module (memory (export "memory") 1) (global $n (mut i64) (i64.const 0))
      (func (export "next") (result i64)
        (global.set $n (i64.add (global.get $n) (i64.const 1)))
        (i64.store (i32.const 8) (global.get $n))
        (global.get $n)))""",
    # Every SIMD immediate form, bulk memory copy/fill/init (a passive segment never dropped).
    "simd-and-bulk-memory": """(module (memory 1) (data $d "relay")
      (global v128 (v128.const i32x4 1 2 3 4))
      (func (export "main") (param i32) (result i32) (local v128)
        (memory.copy (i32.const 0) (i32.const 64) (i32.const 16))
        (memory.fill (i32.const 100) (i32.const 38) (i32.const 10))
        (memory.init $d (i32.const 200) (i32.const 0) (i32.const 5))
        (local.set 1 (v128.load offset=38 (local.get 0)))
        (local.set 1 (i8x16.shuffle 0 31 1 17 2 18 3 19 4 20 5 21 6 22 7 23
          (local.get 1) (v128.const i8x16 38 252 253 11 0 0 0 0 0 0 0 0 0 0 0 38)))
        (local.set 1 (v128.load8_lane offset=38 15 (local.get 0) (local.get 1)))
        (v128.store32_lane 3 (local.get 0) (local.get 1))
        (local.set 1 (v128.load32_zero (local.get 0)))
        (local.set 1 (i32x4.replace_lane 2 (local.get 1) (i32.const 38)))
        (local.set 1 (i32x4.dot_i16x8_s (local.get 1) (local.get 1)))
        (local.set 1 (i16x8.relaxed_q15mulr_s (local.get 1) (local.get 1)))
        (v128.store (i32.const 0) (local.get 1))
        (i32x4.extract_lane 1 (local.get 1))))""",
    # The table is only read: call_indirect, table.get, table.size.
    "call-indirect-over-a-constant-table": """(module
      (type $unary (func (param i32) (result i32)))
      (table $t 2 funcref) (elem (table $t) (i32.const 0) func $double $square)
      (func $double (type $unary) (i32.mul (local.get 0) (i32.const 2)))
      (func $square (type $unary) (i32.mul (local.get 0) (local.get 0)))
      (func (export "apply") (param i32 i32) (result i32)
        (drop (ref.is_null (table.get $t (i32.const 0))))
        (drop (table.size $t))
        (call_indirect $t (type $unary) (local.get 1) (local.get 0)))
      (func (export "tail") (param i32) (result i32)
        (return_call_indirect $t (type $unary) (local.get 0) (i32.const 1))))""",
    # Immediates holding the bytes of refused opcodes (0x26 table.set, 0xfc, 0x09, 0x0d, ...)
    # and the other instruction forms: a decoder that scanned bytes would refuse this.
    "refused-bytes-inside-immediates": """(module (memory 1)
      (global $g (mut f64) (f64.const 38.5)) (global (mut f32) (f32.const -0.0))
      (global i32 (i32.add (i32.const 38) (i32.const 252)))
      (func $pair (param i32) (result i32 i64) (local.get 0) (i64.const 0x26fc0d0c0911))
      (func (export "main") (param i32) (result i32)
        (block $a (result i32 i64) (call $pair (local.get 0)))
        (drop) (drop)
        (block $b (block $c (br_table $b $c $b (local.get 0))))
        (loop $l (br_if $l (i32.eqz (i32.const 38))))
        (drop (select (result i32) (i32.const 1) (i32.const 2) (local.get 0)))
        (drop (i32.trunc_sat_f64_s (global.get $g)))
        (drop (i64.extend8_s (i64.const 252)))
        (drop (memory.grow (i32.const 0)))
        (i32.store8 offset=38 (i32.const 0) (i32.const 0xfc))
        (if (result i32) (local.get 0) (then (i32.const 9)) (else (memory.size)))))""",
}


@pytest.mark.parametrize("wat", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_modules_whose_state_is_memory_and_numeric_globals_are_accepted(wat: str) -> None:
    binary = wasm(wat)
    wasmtime.Module.validate(wasmtime.Engine(), binary)
    assert why_not_capturable(binary) is None


@pytest.mark.parametrize("name", ["json_sum", "ticker", "escape"])
def test_compiled_c_modules_decode_whole(name: str) -> None:
    """Modules clang compiled (WASI commands, which the gateway refuses for sessions on their
    `_start`): every instruction is one the decoder knows, and none changes a table."""
    assert why_not_capturable((FIXTURES / f"{name}.wasm").read_bytes()) is None


def fuzz_seeds() -> list[bytes]:
    return [wasm(wat) for wat in ACCEPTED.values()] + [
        wasm(wat) for wat, _ in REFUSED.values()]


def test_a_module_cut_anywhere_gives_an_answer_never_an_exception() -> None:
    for binary in fuzz_seeds():
        for cut in range(len(binary)):
            answer = why_not_capturable(binary[:cut])
            assert answer is None or isinstance(answer, str)
    c_module = (FIXTURES / "json_sum.wasm").read_bytes()
    for cut in range(0, len(c_module), 97):
        assert why_not_capturable(c_module[:cut]) != ""
    assert why_not_capturable(b"") == "Relay could not read its binary"
    counter = wasm(ACCEPTED["counter"])
    code = next(start for sid, _, start, _ in sections(counter) if sid == 10)
    assert why_not_capturable(counter[:code + 6]) == "Relay could not read its binary"


def test_garbage_gives_an_answer_never_an_exception() -> None:
    rng = random.Random(14)
    seeds = [*fuzz_seeds(), (FIXTURES / "json_sum.wasm").read_bytes()[:4000]]
    for _ in range(3000):
        binary = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            binary[rng.randrange(8, len(binary))] = rng.randrange(256)
        answer = why_not_capturable(bytes(binary))
        assert answer is None or isinstance(answer, str)


def test_a_large_module_is_decoded_in_milliseconds() -> None:
    """20,000 functions (524 KB, 160,000 instructions): ~20 ms here, about twice wasmtime's
    validation of the same binary."""
    binary = wasm("(module " + "".join(
        f"(func (export \"f{i}\") (param i32) (result i32) local.get 0 i32.const {i} i32.add "
        "i32.const 3 i32.mul local.get 0 i32.xor)" for i in range(20_000)) + ")")
    began = time.perf_counter()
    assert why_not_capturable(binary) is None
    assert time.perf_counter() - began < 1.0


def test_mutable_globals_are_numbered_in_the_global_index_space() -> None:
    binary = wasm("""(module (import "env" "base" (global i32))
      (global (mut i32) (i32.const 0)) (global i64 (i64.const 1))
      (global (mut f64) (f64.const 2)) (global (mut v128) (v128.const i64x2 0 0)))""")
    assert mutable_globals(binary) == [1, 3, 4]
    assert mutable_globals(wasm("(module (memory 1))")) == []


def test_mutable_globals_refuses_an_initializer_it_cannot_read() -> None:
    binary = wasm("""(module (type $s (struct (field i32)))
      (global (mut (ref null $s)) (struct.new $s (i32.const 1)))
      (global (mut i32) (i32.const 0)))""")
    with pytest.raises(ValueError, match=r"global 0 uses an instruction .* \(0xfb\)"):
        mutable_globals(binary)
