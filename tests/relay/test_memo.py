"""relay.memo without Redis: the name of a computation, the entries a process holds."""

from __future__ import annotations

import time

from relay.memo import Entries, Entry, digest
from relay.modules import inspect, memoizable
from tests.conftest import ADD_WAT, FIXTURES


def test_the_name_of_a_computation() -> None:
    base = digest("bafy", "main", [{"a": 1, "b": [2, 3]}])
    assert base == digest("bafy", "main", [{"b": [2, 3], "a": 1}])  # objects' key order
    assert len({base, digest("bafy", "main", [{"a": 1, "b": [3, 2]}]),
                digest("bafy", "other", [{"a": 1, "b": [2, 3]}]),
                digest("bafz", "main", [{"a": 1, "b": [2, 3]}]),
                digest("bafy", "main", [{"a": 1, "b": [2, 3]}], environment="pure@1")}) == 5


def test_held_entries_are_bounded_in_bytes_and_time() -> None:
    entries = Entries(max_bytes=10, ttl_s=0.2)
    entries.put("a", Entry("ra", b"12345", 1, 1))
    entries.put("b", Entry("rb", b"12345", 1, 1))
    assert entries.get("a") is not None  # now the most recently used
    entries.put("c", Entry("rc", b"1", 1, 1))  # over 10 bytes: the least recent goes
    assert entries.get("b") is None and entries.get("a") is not None
    entries.put("huge", Entry("rh", b"x" * 11, 1, 1))  # bigger than all: not held
    assert entries.get("huge") is None and entries.get("c") is not None
    entries.drop("a")
    assert entries.get("a") is None
    time.sleep(0.25)
    assert entries.get("c") is None  # read too long ago


def test_memoizable_modules() -> None:
    import wasmtime

    assert memoizable(inspect(wasmtime.wat2wasm(ADD_WAT)))
    assert memoizable(inspect((FIXTURES / "json_sum.wasm").read_bytes()))  # stdio only
    assert not memoizable(inspect((FIXTURES / "escape.wasm").read_bytes()))  # environ_get
    for name, params in (("clock_time_get", "i32 i64 i32"), ("random_get", "i32 i32"),
                         ("poll_oneoff", "i32 i32 i32 i32"), ("args_get", "i32 i32")):
        wat = (f'(module (import "wasi_snapshot_preview1" "{name}" '
               f'(func (param {params}) (result i32))))')
        assert not memoizable(inspect(wasmtime.wat2wasm(wat))), name
