"""Short calls run on the executor's event loop; longer ones are moved to a thread and run again
from the start, so nobody can tell the difference but by the latency."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import wasmtime

from executor.sandbox import INLINE_GAS, Outcome, Prepared, Sandbox
from executor.worker import Executor
from relay.schemas import EffectivePolicy
from tests.conftest import ADD_WAT, upload

# Counts to its argument: about 8 gas an iteration.
COUNT_WAT = """(module (func (export "main") (param i32) (result i32) (local i32)
  (loop (local.set 1 (i32.add (local.get 1) (i32.const 1)))
        (br_if 0 (i32.lt_u (local.get 1) (local.get 0))))
  (local.get 1)))"""
# Fills its whole memory (64 MiB) over and over: one gas a fill, a lot of time.
FILL_WAT = """(module (memory 1024)
  (func (export "main") (loop (memory.fill (i32.const 0) (i32.const 7)
                                           (i32.const 67108864)) (br 0))))"""
ATTEMPTS = 5


def policy(*, max_gas: int = 10**9) -> EffectivePolicy:
    return EffectivePolicy(max_memory=64 * 2**20, max_gas=max_gas, max_time=5000)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    yield box
    box.close()


def prepare(sandbox: Sandbox, wat: str) -> Prepared:
    return sandbox.prepare(bytes(wasmtime.wat2wasm(wat)))


def inline(sandbox: Sandbox, prepared: Prepared, inputs: list[Any],
           limits: EffectivePolicy) -> Outcome | None:
    """`try_inline` of a call that ends well within the inline budget: an attempt ends early
    (None) when an epoch tick (every 10 ms) falls inside it, which a loaded machine makes
    happen now and then, so a few attempts are made; the first one that ends is the answer."""
    for _ in range(ATTEMPTS):
        outcome = sandbox.try_inline(prepared, "main", inputs, limits)
        if outcome is not None:
            return outcome
    return None


def test_a_short_call_runs_inline(sandbox: Sandbox) -> None:
    outcome = inline(sandbox, prepare(sandbox, ADD_WAT), [2, 3], policy())
    assert outcome is not None and outcome.error is None and outcome.output == 5


# Every number type in, every one out, in the other order.
TYPES_WAT = """(module (func (export "main") (param i32 i64 f32 f64) (result f64 f32 i64 i32)
  local.get 3 local.get 2 local.get 1 local.get 0))"""


def test_each_number_type_goes_in_and_out_as_it_is(sandbox: Sandbox) -> None:
    prepared = prepare(sandbox, TYPES_WAT)

    def outputs(inputs: list[Any]) -> list[Any]:
        """The output inline, and in a thread (`run`): the same."""
        ran_inline = inline(sandbox, prepared, inputs, policy())
        ran = sandbox.run(prepared, "main", inputs, policy(), command=False,
                          max_output_bytes=2**20)
        assert ran_inline is not None and ran_inline.error is None and ran.error is None
        assert ran_inline.output == ran.output
        return list(ran.output)

    output = outputs([-5, -(2**40), 1.5, 2])
    assert output == [2.0, 1.5, -(2**40), -5]
    assert isinstance(output[0], float)  # an integer for a float is made one
    # An f32 holds what it can: 0.1 comes back as the f32 nearest to it.
    assert outputs([0, 0, 0.1, 0.1])[:2] == [0.1, 0.10000000149011612]


def test_calls_coming_one_after_another_wake_the_ticker_once() -> None:
    """Short calls a millisecond apart (inline runs under load) find the epoch ticker awake:
    had it gone idle whenever no call was under way, each batch of them would wake it (a
    thread switch, and a fight for the GIL). Once they stop, it goes idle: an idle executor
    spends nothing on ticks."""
    box = Sandbox()  # a ticker of its own
    try:
        prepared = prepare(box, ADD_WAT)
        deadline = time.monotonic() + 0.5  # 50 of the ticker's passes
        while time.monotonic() < deadline:
            assert inline(box, prepared, [2, 3], policy()) is not None
            time.sleep(0.001)
        # One wake to begin with; a few more allowed for a machine that stalls this thread
        # longer than a pass (10 ms). Going idle between calls, it was about one a pass.
        assert 1 <= box.ticker_wakes <= 5
        stopped = time.monotonic() + 5
        while not box._ticker_idle:
            assert time.monotonic() < stopped, "the ticker did not go idle"
            time.sleep(0.005)
    finally:
        box.close()


def test_a_long_call_is_left_to_a_thread_and_costs_the_same_there(sandbox: Sandbox) -> None:
    counter = prepare(sandbox, COUNT_WAT)
    assert sandbox.try_inline(counter, "main", [INLINE_GAS], policy()) is None
    moved = sandbox.run(counter, "main", [INLINE_GAS], policy(), command=False,
                        max_output_bytes=1)
    assert moved.error is None and moved.output == INLINE_GAS
    short = inline(sandbox, counter, [100], policy())
    assert short is not None and short.output == 100
    # The gas of the attempt is not counted: a run costs what it costs, wherever it ran.
    assert moved.gas_used > INLINE_GAS > short.gas_used
    assert sandbox.run(counter, "main", [100], policy(), command=False,
                       max_output_bytes=1).gas_used == short.gas_used


def test_running_out_of_a_small_budget_inline_is_the_answer(sandbox: Sandbox) -> None:
    outcome = inline(sandbox, prepare(sandbox, COUNT_WAT), [10**6], policy(max_gas=1000))
    assert outcome is not None and outcome.error is not None
    assert outcome.error.code == "out_of_gas" and "1000" in outcome.error.message
    assert outcome.gas_used == 1000


def test_traps_inline_are_the_answer(sandbox: Sandbox) -> None:
    trap = prepare(sandbox, '(module (func (export "main") unreachable))')
    outcome = inline(sandbox, trap, [], policy())
    assert outcome is not None and outcome.error is not None and outcome.error.code == "trap"


def test_cheap_gas_that_takes_long_does_not_hold_the_loop(sandbox: Sandbox) -> None:
    fill = prepare(sandbox, FILL_WAT)
    started = time.monotonic()
    assert sandbox.try_inline(fill, "main", [], policy()) is None
    held = time.monotonic() - started
    print(f"\n[inline] a hostile memory.fill loop held the caller {held * 1000:.1f} ms")
    assert held < 1.0  # a tick (10 ms) and the fill under way; its max_time is 5 s


async def test_executions_either_side_of_the_inline_budget(
        http: httpx.AsyncClient, executor: Executor) -> None:
    module = await upload(http, COUNT_WAT)
    for n in (10, INLINE_GAS):
        result = (await http.post("/intent/execute-wasm",
                                  json={"cid": module["cid"], "inputs": [n]})).json()
        assert result["success"] is True and result["output"] == n
        assert 8 * n <= result["gas_used"] <= 8 * n + 100
