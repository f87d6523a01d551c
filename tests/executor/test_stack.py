"""The sandbox's wasm stack: `max_stack` picks one of a few Engines, never more stack than asked."""

from __future__ import annotations

import pytest
import wasmtime

from executor.sandbox import Sandbox
from relay.schemas import EffectivePolicy
from relay.settings import MAX_STACK_BYTES

DEPTH_WAT = """(module (func $down (export "main") (param i32) (result i32)
  local.get 0 i32.eqz if (result i32) i32.const 0 else
  local.get 0 i32.const 1 i32.sub call $down i32.const 1 i32.add end))"""


def policy(max_stack: int) -> EffectivePolicy:
    return EffectivePolicy(max_memory=2**20, max_gas=10**9, max_time=5000, max_stack=max_stack)


def test_a_run_gets_its_max_stack_rounded_down_to_a_power_of_two() -> None:
    box = Sandbox(max_stack_bytes=1_000_000)
    try:
        assert box.stack_of(1_000_000) == box.stack_of(2**40) == 1_000_000  # the ceiling
        assert box.stack_of(999_999) == 524_288
        assert box.stack_of(65_536) == box.stack_of(100_000) == 65_536
        assert box.stack_of(1) == 1
    finally:
        box.close()


def test_runs_of_any_stack_size_share_a_few_engines(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(wasmtime.wat2wasm(DEPTH_WAT))
    sizes = range(1000, 2**20, 9973)
    for size in sizes:
        outcome = sandbox.run(prepared, "main", [10], policy(size), command=False,
                              max_output_bytes=0)
        assert outcome.output == 10 or outcome.error is not None
        assert outcome.error is None or outcome.error.code == "stack_overflow"
    assert prepared.stacks is not None
    assert set(prepared.stacks) == {sandbox.stack_of(size) for size in sizes} | {2**20}
    assert len(prepared.stacks) <= 11  # 1024 .. 2**20
    # Inline runs pick the same copies (one may give up on a busy host: None, run again).
    for size in sizes:
        inline = sandbox.try_inline(prepared, "main", [10], policy(size))
        assert inline is None or inline.output == 10 or inline.error is not None
    assert set(prepared.stacks) == {sandbox.stack_of(size) for size in sizes} | {2**20}


def test_the_ceiling_is_bounded_by_what_wasmtime_allows() -> None:
    with pytest.raises(ValueError, match=str(MAX_STACK_BYTES)):
        Sandbox(max_stack_bytes=MAX_STACK_BYTES + 1)
    box = Sandbox(max_stack_bytes=MAX_STACK_BYTES)
    try:
        prepared = box.prepare(wasmtime.wat2wasm(DEPTH_WAT))
        deep = box.run(prepared, "main", [40_000], policy(MAX_STACK_BYTES), command=False,
                       max_output_bytes=0)
        assert deep.output == 40_000  # about 1.9 MiB of stack, on this test's own thread
    finally:
        box.close()
