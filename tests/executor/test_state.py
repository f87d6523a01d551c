"""Capturing and restoring a session's state on live instances (executor.state).

The modules export their memory and mutable globals under the names the executor's binary
rewrite gives them, so these tests do not depend on that rewrite.
"""

from __future__ import annotations

import hashlib
import threading

import msgspec
import pytest
import wasmtime

from executor.state import (
    PAGE_BYTES,
    Baseline,
    Captured,
    Manifest,
    PageCache,
    StateDoesNotFit,
    capture,
    restore,
    state_cid,
)
from tests.conftest import cid_of

F32_SIGNALLING_NAN = 0x7F800001
F64_NAN_PAYLOAD = 0x7FF0000000000ABC

STATEFUL_WAT = """(module
  (memory (export "__relay_memory") 2)
  (data (i32.const 0) "seeded by a data segment")
  (global (export "__relay_global_0") (mut i32) (i32.const 7))
  (global (export "__relay_global_1") (mut i64) (i64.const -1))
  (global (export "__relay_global_2") (mut f32) (f32.const 0))
  (global (export "__relay_global_3") (mut f64) (f64.const 0))
  (global $immutable i32 (i32.const 5))
  (func (export "store") (param $at i32) (param $value i32)
    local.get $at local.get $value i32.store)
  (func (export "load") (param $at i32) (result i32) local.get $at i32.load)
  (func (export "grow") (param $pages i32) (result i32) local.get $pages memory.grow)
  (func (export "wipe") (param $at i32) (param $bytes i32)
    local.get $at i32.const 0 local.get $bytes memory.fill)
  (func (export "set_floats") (param $f32 i32) (param $f64 i64)
    local.get $f32 f32.reinterpret_i32 global.set 2
    local.get $f64 f64.reinterpret_i64 global.set 3)
  (func (export "f32_bits") (result i32) global.get 2 i32.reinterpret_f32)
  (func (export "f64_bits") (result i64) global.get 3 i64.reinterpret_f64)
  (func (export "bump") global.get 0 i32.const 1 i32.add global.set 0))"""

ENGINE = wasmtime.Engine()
MODULE = wasmtime.Module(ENGINE, wasmtime.wat2wasm(STATEFUL_WAT))


class Live:
    """A fresh instance of STATEFUL_WAT in its own store."""

    def __init__(self, module: wasmtime.Module = MODULE, memory_limit: int | None = None,
                 ) -> None:
        self.store = wasmtime.Store(ENGINE)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        self.instance = wasmtime.Instance(self.store, module, [])

    def __call__(self, name: str, *args: int) -> object:
        func = self.instance.exports(self.store)[name]
        assert isinstance(func, wasmtime.Func)
        return func(self.store, *args)

    def memory(self) -> bytes:
        memory = self.instance.exports(self.store)["__relay_memory"]
        assert isinstance(memory, wasmtime.Memory)
        return memory.read(self.store, 0, memory.data_len(self.store))

    def capture(self, baseline: Baseline) -> Captured:
        return capture(self.store, self.instance, baseline)

    def restore(self, manifest: Manifest, pages: dict[str, bytes]) -> Baseline:
        return restore(self.store, self.instance, manifest, pages)


def worked_on() -> tuple[Live, Manifest, dict[str, bytes]]:
    """An instance after some calls, and its state captured from scratch."""
    live = Live()
    live("store", 70_000, 1234)
    live("bump")
    live("set_floats", F32_SIGNALLING_NAN, F64_NAN_PAYLOAD)
    manifest, pages, _ = live.capture(Baseline.fresh())
    return live, manifest, pages


def test_a_restored_state_is_the_captured_one_byte_for_byte() -> None:
    before, manifest, pages = worked_on()
    live = Live()
    baseline = live.restore(manifest, pages)
    assert live.memory() == before.memory()
    assert live("load", 70_000) == 1234
    assert live("bump") is None and live("load", 0) == before("load", 0)
    # NaN payloads (a signalling f32 NaN too) come back bit for bit.
    assert live("f32_bits") == F32_SIGNALLING_NAN
    assert live("f64_bits") == F64_NAN_PAYLOAD
    assert dict((i, kind) for i, kind, _ in manifest.globals) == {
        0: "i32", 1: "i64", 2: "f32", 3: "f64"}
    assert manifest.globals[0][2] == 8 and manifest.globals[1][2] == 2**64 - 1

    # Capturing a restored state with nothing run gives the same manifest and no new page.
    untouched = Live()
    again, new_pages, _ = untouched.capture(untouched.restore(manifest, pages))
    assert again == manifest and again.encode() == manifest.encode()
    assert new_pages == {}
    assert baseline.manifest == manifest


def test_a_manifest_names_each_page_by_sha256_and_zero_pages_by_nothing() -> None:
    before, manifest, pages = worked_on()
    memory = before.memory()
    assert len(manifest.pages) == 2 and manifest.size == 2 * PAGE_BYTES
    for index, page in enumerate(manifest.pages):
        assert page == hashlib.sha256(memory[index * PAGE_BYTES:][:PAGE_BYTES]).hexdigest()
        assert pages[page] == memory[index * PAGE_BYTES:][:PAGE_BYTES]
    fresh, fresh_pages, _ = Live().capture(Baseline.fresh())
    assert fresh.pages[1] == "" and set(fresh_pages) == {fresh.pages[0]}


def test_the_state_cid_is_the_cid_of_the_encoded_manifest() -> None:
    _, manifest, _ = worked_on()
    data = manifest.encode()
    assert state_cid(data) == cid_of(data)
    assert data.startswith(b'{"v":1,"pages":["')
    assert Manifest.decode(data) == manifest
    _, same, _ = worked_on()
    assert same.encode() == data  # equal states encode equal
    for bad in (b'{"v":2,"pages":[],"globals":[]}', b'{"v":1,"pages":["XY"],"globals":[]}',
                b'{"v":1,"pages":[],"globals":[[0,"v128",0]]}',
                b'{"v":1,"pages":[],"globals":[],"extra":1}'):
        with pytest.raises(msgspec.ValidationError):
            Manifest.decode(bad)


def test_a_grown_memory_is_restored_at_its_size() -> None:
    before = Live()
    assert before("grow", 3) == 2
    before("store", 5 * PAGE_BYTES - 4, 99)
    manifest, pages, _ = before.capture(Baseline.fresh())
    assert len(manifest.pages) == 5 and manifest.pages[2:4] == ("", "")
    live = Live()
    live.restore(manifest, pages)
    assert live("load", 5 * PAGE_BYTES - 4) == 99
    assert live.memory() == before.memory()


def test_a_data_segment_page_the_state_zeroed_is_zero_after_restore() -> None:
    before = Live()
    before("wipe", 0, PAGE_BYTES)
    manifest, pages, _ = before.capture(Baseline.fresh())
    assert manifest.pages == ("", "") and pages == {}
    live = Live()
    assert live("load", 0) != 0  # the data segment is there when the instance starts
    live.restore(manifest, pages)
    assert live.memory() == bytes(2 * PAGE_BYTES)


def test_one_changed_page_gives_exactly_one_new_page() -> None:
    before = Live()
    before("grow", 14)  # 16 pages, every one of them different
    for page in range(16):
        before("store", page * PAGE_BYTES + 8, page + 1)
    manifest, pages, _ = before.capture(Baseline.fresh())
    assert len(pages) == 16
    live = Live()
    baseline = live.restore(manifest, pages)
    live("store", 9 * PAGE_BYTES + 100, 42)
    changed, new_pages, _ = live.capture(baseline)
    assert len(new_pages) == 1
    differ = [i for i, (a, b) in enumerate(zip(manifest.pages, changed.pages, strict=True))
              if a != b]
    assert differ == [9] and set(new_pages) == {changed.pages[9]}
    assert changed.globals == manifest.globals

    live("bump")  # a global alone changes the state, and no page
    bumped, again, _ = live.capture(baseline)
    assert set(again) == {changed.pages[9]}  # against the baseline, page 9 is still new
    assert bumped.pages == changed.pages and bumped.globals != changed.globals
    assert state_cid(bumped.encode()) != state_cid(changed.encode())


def test_a_page_changed_back_to_zero_is_stored_as_nothing() -> None:
    _, manifest, pages = worked_on()
    live = Live()
    baseline = live.restore(manifest, pages)
    live("wipe", PAGE_BYTES, PAGE_BYTES)
    changed, new_pages, _ = live.capture(baseline)
    assert changed.pages == (manifest.pages[0], "") and new_pages == {}


def test_a_memory_larger_than_allowed_is_refused() -> None:
    before = Live()
    before("grow", 6)
    manifest, pages, _ = before.capture(Baseline.fresh())
    with pytest.raises(StateDoesNotFit, match="cannot grow"):
        Live(memory_limit=4 * PAGE_BYTES).restore(manifest, pages)
    bounded = wasmtime.Module(ENGINE, wasmtime.wat2wasm(
        STATEFUL_WAT.replace('(memory (export "__relay_memory") 2)',
                             '(memory (export "__relay_memory") 2 4)')))
    with pytest.raises(StateDoesNotFit, match="cannot grow"):
        Live(bounded).restore(manifest, pages)


def test_a_memory_smaller_than_the_fresh_instance_is_refused() -> None:
    small = Manifest(v=1, pages=("",), globals=worked_on()[1].globals)
    with pytest.raises(StateDoesNotFit, match="smaller"):
        Live().restore(small, {})


def test_a_state_that_is_not_this_modules_is_refused() -> None:
    _, manifest, pages = worked_on()
    with pytest.raises(StateDoesNotFit, match="globals"):
        Live().restore(msgspec.structs.replace(manifest, globals=manifest.globals[:3]), pages)
    wrong_kind = ((0, "i64", 1), *manifest.globals[1:])
    with pytest.raises(StateDoesNotFit, match="globals"):
        Live().restore(msgspec.structs.replace(manifest, globals=wrong_kind), pages)
    with pytest.raises(StateDoesNotFit, match="missing"):
        Live().restore(manifest, {})
    no_memory = wasmtime.Module(ENGINE, wasmtime.wat2wasm("(module)"))
    with pytest.raises(StateDoesNotFit, match="memory"):
        Live(no_memory).restore(manifest, pages)


def test_a_module_without_memory_or_globals_has_an_empty_state() -> None:
    live = Live(wasmtime.Module(ENGINE, wasmtime.wat2wasm(
        '(module (global (export "__relay_global_0") i32 (i32.const 1)))')))
    manifest, pages, _ = live.capture(Baseline.fresh())
    assert manifest == Manifest(v=1, pages=(), globals=()) and pages == {}
    assert live.capture(live.restore(manifest, {}))[:2] == (manifest, {})


def test_the_page_cache_keeps_the_most_recently_used_pages_within_its_bytes() -> None:
    cache = PageCache(capacity_bytes=3 * PAGE_BYTES)
    pages = {f"{i:064x}": bytes([i]) * PAGE_BYTES for i in range(1, 5)}
    a, b, c, d = pages
    cache.put_many({a: pages[a], b: pages[b], c: pages[c]})
    found, missing = cache.get_many([a, "", a, d])
    assert found == {a: pages[a]} and missing == [d]
    cache.put_many({d: pages[d]})  # b was used least recently
    assert b not in cache and a in cache and c in cache and d in cache
    assert cache.size_bytes == 3 * PAGE_BYTES and len(cache) == 3

    def churn(offset: int) -> None:
        for i in range(200):
            sha = f"{offset + i:064x}"
            cache.put_many({sha: bytes(PAGE_BYTES)})
            cache.get_many([sha, a])

    threads = [threading.Thread(target=churn, args=(1000 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.size_bytes == 3 * PAGE_BYTES and len(cache) == 3


def test_a_capture_is_the_baseline_of_the_next_call_on_the_same_instance() -> None:
    live = Live()
    first = live.capture(Baseline.fresh())
    assert first.baseline == live.capture(first.baseline).baseline  # nothing ran: the same
    live("store", PAGE_BYTES + 8, 99)
    second = live.capture(first.baseline)
    assert len(second.new_pages) == 1
    assert second.baseline.digests[1] != first.baseline.digests[1]
    assert second.baseline.digests[0] == first.baseline.digests[0]
