"""Warm starts: compiled modules kept on disk (executor.diskcache) and RELAY_PRELOAD, with a real
wasmtime and a real Redis.

A restarted executor is a new Sandbox (new Engines) and a new CompiledModules: what it finds
in the directory is all it has. That it did not compile is shown by `Sandbox.compilations` and,
so that no counting mistake can hide a compile, by running with `wasmtime.Module(...)` (the
compiler; loading does not go through it) made to fail.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime

from executor import diskcache
from executor.binary import export_state
from executor.cache import CompiledModules
from executor.diskcache import HEADER_BYTES, DiskModules, engine_fingerprint
from executor.sandbox import ENGINE_CONFIG, Sandbox, engine_config
from relay import connection
from relay.keys import Keys
from relay.modules import ModuleStore, inspect
from relay.schemas import EffectivePolicy
from relay.settings import Settings
from tests.conftest import ADD_WAT, running, upload, wait_for, with_settings

# Big enough that compiling it is work, small enough for a quick test.
FUNCTIONS = 40


def module_wat(salt: int) -> str:
    """A module whose `main(a, b)` is a + b + salt, with some functions to compile."""
    body = " ".join(f"local.get 0 i32.const {i} i32.mul local.get 1 i32.xor i32.add"
                    for i in range(8))
    funcs = "\n".join(f'(func $f{i} (param i32 i32) (result i32) local.get 0 {body})'
                      for i in range(FUNCTIONS))
    return f"""(module {funcs}
      (func (export "main") (param i32 i32) (result i32)
        local.get 0 local.get 1 i32.add i32.const {salt} i32.add))"""


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ModuleStore]:
    client = connection.connect(settings.redis_url or "")
    yield ModuleStore(client, Keys(settings.prefix))
    await client.aclose()


@pytest.fixture
def sandboxes() -> Iterator[list[Sandbox]]:
    """Sandboxes a test makes (`fresh`), closed after it."""
    made: list[Sandbox] = []
    yield made
    for box in made:
        box.close()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "modules"


async def put(store: ModuleStore, wat: str) -> str:
    wasm = bytes(wasmtime.wat2wasm(wat))
    info = inspect(wasm)
    await store.put(info, wasm, "alice")
    return info.cid


def restart(sandboxes: list[Sandbox], store: ModuleStore, directory: Path | None,
            max_bytes: int = 1 << 30, **sandbox_args: int) -> CompiledModules:
    """What a freshly started executor has: a new sandbox, an empty memory, the directory."""
    box = Sandbox(**sandbox_args)
    sandboxes.append(box)
    disk = (DiskModules.open(directory, max_bytes, box.fingerprint)
            if directory is not None else None)
    return CompiledModules(box, store, disk=disk)


def add(modules: CompiledModules, prepared: Any, a: int, b: int) -> Any:
    policy = EffectivePolicy(max_gas=1_000_000, max_memory=1 << 20, max_time=1000,
                             max_stack=modules.sandbox.max_stack_bytes)
    outcome = modules.sandbox.run(prepared, "main", [a, b], policy, command=False,
                                  max_output_bytes=1024)
    assert outcome.error is None, outcome.error
    return outcome.output


def cwasm_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.cwasm"))


def only_file(directory: Path) -> Path:
    files = cwasm_files(directory)
    assert len(files) == 1, files
    return files[0]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- a restart finds what was compiled before ---


async def test_a_restarted_executor_loads_instead_of_compiling(
        store: ModuleStore, sandboxes: list[Sandbox], cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cid = await put(store, module_wat(7))
    first = restart(sandboxes, store, cache_dir)
    compiled = await first.get(cid)
    assert not compiled.prepared.from_disk and first.sandbox.compilations == 1
    assert first.sources == {"compiled": 1}
    assert mode_of(cache_dir) == 0o700
    path = only_file(cache_dir)
    assert path.name.startswith(cid) and mode_of(path) == 0o600

    second = restart(sandboxes, store, cache_dir)
    monkeypatch.setattr(wasmtime.Module, "__init__", _refuse_to_compile)
    loaded = await second.get(cid)
    assert loaded.prepared.from_disk and second.sources == {"disk": 1}
    assert second.sandbox.compilations == 0
    assert add(second, loaded.prepared, 2, 3) == 12
    # Another stack size is a copy of the loaded code, not a compile either.
    small = EffectivePolicy(max_gas=1_000_000, max_memory=1 << 20, max_time=1000,
                            max_stack=64 * 1024)
    outcome = second.sandbox.run(loaded.prepared, "main", [1, 1], small, command=False,
                                 max_output_bytes=1024)
    assert outcome.output == 9 and second.sandbox.compilations == 0


def _refuse_to_compile(self: wasmtime.Module, engine: wasmtime.Engine, wasm: Any) -> None:
    raise AssertionError("compiled although the module was on disk")


async def test_without_the_directory_a_restart_compiles(store: ModuleStore,
                                                        sandboxes: list[Sandbox],
                                                        cache_dir: Path) -> None:
    """The control of the test above: the same steps with no cache do compile (so counting
    compilations does show a bypassed cache)."""
    cid = await put(store, module_wat(8))
    await restart(sandboxes, store, None).get(cid)
    second = restart(sandboxes, store, None)
    assert not (await second.get(cid)).prepared.from_disk
    assert second.sandbox.compilations == 1 and second.sources == {"compiled": 1}


# --- what is never loaded: it is compiled again, and the file rewritten ---


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: HEADER_BYTES + 100])


def flip_a_byte_of_the_code(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + len(data[HEADER_BYTES:]) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [truncate, flip_a_byte_of_the_code, garbage, empty])
async def test_a_damaged_file_is_compiled_again_and_replaced(
        store: ModuleStore, sandboxes: list[Sandbox], cache_dir: Path, damage: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    cid = await put(store, module_wat(9))
    await restart(sandboxes, store, cache_dir).get(cid)
    path = only_file(cache_dir)
    damage(path)

    second = restart(sandboxes, store, cache_dir)
    with caplog.at_level(logging.WARNING, "relay.executor.cache"):
        compiled = await second.get(cid)
    assert not compiled.prepared.from_disk and second.sandbox.compilations == 1
    assert add(second, compiled.prepared, 2, 3) == 14
    assert f"compiling {cid} again" in caplog.text
    # Rewritten whole: the next restart loads it.
    third = restart(sandboxes, store, cache_dir)
    assert (await third.get(cid)).prepared.from_disk and third.sandbox.compilations == 0


async def test_another_engine_configuration_is_never_loaded(
        store: ModuleStore, sandboxes: list[Sandbox], cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cid = await put(store, module_wat(10))
    await restart(sandboxes, store, cache_dir).get(cid)
    # Another stack ceiling: another fingerprint, another file.
    other = restart(sandboxes, store, cache_dir, max_stack_bytes=256 * 1024)
    assert not (await other.get(cid)).prepared.from_disk
    assert other.sandbox.compilations == 1
    assert len(cwasm_files(cache_dir)) == 2
    # Another wasmtime version: the same.
    monkeypatch.setattr(diskcache.importlib.metadata, "version", lambda name: "0.0.1")
    upgraded = restart(sandboxes, store, cache_dir)
    assert not (await upgraded.get(cid)).prepared.from_disk
    assert upgraded.sandbox.compilations == 1


def test_the_fingerprint_covers_every_engine_setting() -> None:
    base = engine_fingerprint(engine_config(1 << 20))
    assert engine_fingerprint(engine_config(1 << 19)) != base
    for name, value in ENGINE_CONFIG.items():
        changed = {**engine_config(1 << 20), name: not value}
        assert engine_fingerprint(changed) != base, name


async def test_a_file_under_the_wrong_name_or_for_an_incompatible_engine_is_refused(
        store: ModuleStore, sandboxes: list[Sandbox], cache_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The header's fingerprint and source hash are checked, and wasmtime checks what it
    loads: a file passing our checks but holding code for another Engine is compiled again."""
    one, two = await put(store, module_wat(11)), await put(store, module_wat(12))
    first = restart(sandboxes, store, cache_dir)
    await first.get(one)
    disk = first.disk
    assert disk is not None
    # Module one's file under module two's name: its source hash does not match.
    os.replace(disk.path(one), disk.path(two))
    second = restart(sandboxes, store, cache_dir)
    with caplog.at_level(logging.WARNING, "relay.executor.cache"):
        compiled = await second.get(two)
    assert not compiled.prepared.from_disk and add(second, compiled.prepared, 0, 0) == 12
    assert "was compiled from other bytes" in caplog.text
    # A well-formed file whose code was compiled by an Engine without fuel: wasmtime refuses.
    wasm = await store.wasm(one)
    assert wasm is not None
    source = export_state(wasm)
    config = wasmtime.Config()
    config.epoch_interruption = True
    foreign = wasmtime.Module(wasmtime.Engine(config), source).serialize()
    assert disk.store(one, source, foreign)
    third = restart(sandboxes, store, cache_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "relay.executor.cache"):
        compiled = await third.get(one)
    assert not compiled.prepared.from_disk and add(third, compiled.prepared, 1, 2) == 14
    assert "wasmtime refused" in caplog.text


# --- who may have written the files ---


async def test_a_directory_others_may_write_to_is_refused(
        store: ModuleStore, sandboxes: list[Sandbox], cache_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    cid = await put(store, module_wat(13))
    await restart(sandboxes, store, cache_dir).get(cid)
    for mode in (0o777, 0o770, 0o702):
        os.chmod(cache_dir, mode)
        caplog.clear()
        with caplog.at_level(logging.ERROR, "relay.executor.cache"):
            modules = restart(sandboxes, store, cache_dir)
        assert modules.disk is None
        assert "module cache off" in caplog.text
        assert "writable by its group or others" in caplog.text
        assert f"mode {mode:o}" in caplog.text
        assert not (await modules.get(cid)).prepared.from_disk
    os.chmod(cache_dir, 0o755)  # readable by others is no risk: used
    assert (await restart(sandboxes, store, cache_dir).get(cid)).prepared.from_disk


async def test_a_path_that_is_not_a_directory_is_refused(
        sandboxes: list[Sandbox], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Sandbox()
    sandboxes.append(box)
    file = tmp_path / "file"
    file.write_text("")
    with caplog.at_level(logging.WARNING, "relay.executor.cache"):
        assert DiskModules.open(file, 1 << 20, box.fingerprint) is None
        assert DiskModules.open(file / "below", 1 << 20, box.fingerprint) is None
    assert "module cache off" in caplog.text


@pytest.mark.parametrize("kind", ["group-writable", "link"])
async def test_a_file_others_may_have_written_is_not_loaded(
        store: ModuleStore, sandboxes: list[Sandbox], cache_dir: Path, tmp_path: Path,
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    cid = await put(store, module_wat(14))
    await restart(sandboxes, store, cache_dir).get(cid)
    path = only_file(cache_dir)
    if kind == "group-writable":
        path.chmod(0o660)
    else:  # a link to a file elsewhere (wherever it points, it is not ours to trust)
        target = tmp_path / "elsewhere.cwasm"
        os.replace(path, target)
        path.symlink_to(target)
    second = restart(sandboxes, store, cache_dir)
    with caplog.at_level(logging.WARNING, "relay.executor.cache"):
        compiled = await second.get(cid)
    assert not compiled.prepared.from_disk and second.sandbox.compilations == 1
    assert f"compiling {cid} again" in caplog.text
    # Replaced by a file of its own (rename replaces the link, not its target).
    assert stat.S_ISREG(path.lstat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_cid_that_is_no_file_name_is_refused(tmp_path: Path) -> None:
    disk = DiskModules(tmp_path, 1 << 20, "00" * 32)
    for cid in ("../escape", "a/b", "", "B" * 20):
        with pytest.raises(ValueError):
            disk.path(cid)


# --- the size bound ---


async def test_the_least_recently_used_files_go_first(store: ModuleStore,
                                                      sandboxes: list[Sandbox],
                                                      cache_dir: Path) -> None:
    a, b, c = [await put(store, module_wat(salt)) for salt in (20, 21, 22)]
    first = restart(sandboxes, store, cache_dir)
    await first.get(a)
    one = only_file(cache_dir).stat().st_size
    # Room for two files (all three are about the same size).
    modules = restart(sandboxes, store, cache_dir, max_bytes=2 * one + one // 2)
    assert modules.disk is not None
    await modules.get(b)
    disk = modules.disk
    os.utime(disk.path(a), (1, 1))  # a is older than b, and...
    os.utime(disk.path(b), (2, 2))
    assert (await restart(sandboxes, store, cache_dir).get(a)).prepared.from_disk
    # ...loading a made it the most recently used: c's write evicts b.
    await modules.get(c)
    assert sorted(p.name.split(".")[0] for p in cwasm_files(cache_dir)) == sorted([a, c])
    assert disk.size() <= disk.max_bytes
    # A module bigger than the whole bound is not kept, and evicts nothing.
    tiny = restart(sandboxes, store, cache_dir, max_bytes=one // 2)
    assert tiny.disk is not None and not tiny.disk.store(b, b"source", b"x" * one)
    assert len(cwasm_files(cache_dir)) == 2


def test_temporary_files_of_a_dead_writer_are_removed(tmp_path: Path) -> None:
    disk = DiskModules(tmp_path, 1 << 20, "00" * 32)
    stale, fresh = tmp_path / ".tmp-stale", tmp_path / ".tmp-fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (1, 1))
    disk.evict()
    assert not stale.exists() and fresh.exists()


# --- through a running executor: the metric, and RELAY_PRELOAD ---


async def execute(http: httpx.AsyncClient, cid: str, inputs: list[int]) -> Any:
    response = await http.post("/intent/execute-wasm", json={"cid": cid, "inputs": inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"], body
    return body["output"]


async def metric(http: httpx.AsyncClient, source: str) -> int:
    text = (await http.get("/metrics")).text
    line = f'relay_module_compilations_total{{source="{source}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    assert found, text
    return int(found[0].removeprefix(line))


async def test_an_executor_restart_serves_from_disk_and_counts_it(
        settings: Settings, http: httpx.AsyncClient, cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    warm = with_settings(settings, module_cache_dir=str(cache_dir),
                         module_cache_bytes=1 << 30)
    cid = (await upload(http, module_wat(30)))["cid"]
    async with running(warm, "before-restart") as worker:
        assert await execute(http, cid, [1, 2]) == 33
        assert worker.sandbox.compilations == 1
    assert await metric(http, "compiled") == 1 and await metric(http, "disk") == 0
    monkeypatch.setattr(wasmtime.Module, "__init__", _refuse_to_compile)
    async with running(warm, "after-restart") as worker:
        # Other inputs: the same request again would join the first execution's result.
        assert await execute(http, cid, [2, 2]) == 34
        assert worker.sandbox.compilations == 0
        assert worker.modules.sources == {"disk": 1}
    assert await metric(http, "disk") == 1 and await metric(http, "compiled") == 1


async def test_the_directory_is_under_the_data_dir_by_default(settings: Settings,
                                                           tmp_path: Path) -> None:
    data = with_settings(settings, data_dir=str(tmp_path / "data"), module_cache_bytes=1 << 20)
    async with running(data, "data-dir") as worker:
        assert worker.modules.disk is not None
        assert worker.modules.disk.directory == tmp_path / "data" / "modules"
    async with running(settings, "cache-off") as worker:  # RELAY_MODULE_CACHE_BYTES=0
        assert worker.modules.disk is None


async def test_preload_readies_named_modules_before_taking_work(
        settings: Settings, http: httpx.AsyncClient, cache_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    named = (await upload(http, module_wat(40), name="preloaded", tag="v1"))["cid"]
    by_cid = (await upload(http, ADD_WAT))["cid"]
    missing_cid = (await upload(http, module_wat(41)))["cid"]
    response = await http.delete(f"/modules/{missing_cid}")
    assert response.status_code == 204, response.text
    preload = ("glyph://preloaded@v1", by_cid, "glyph://nobody@latest", missing_cid)
    warm = with_settings(settings, preload=preload, module_cache_dir=str(cache_dir),
                         module_cache_bytes=1 << 30)
    with caplog.at_level(logging.INFO, "relay.executor"):
        async with running(warm, "preloading") as worker:
            await wait_for(lambda: worker.modules.cached(named)
                           and worker.modules.cached(by_cid))
            assert worker.sandbox.compilations == 2
            assert not worker.modules.cached(missing_cid)
            # Started despite the two it could not find, and runs both without compiling.
            assert await execute(http, "glyph://preloaded@v1", [1, 1]) == 42
            assert await execute(http, by_cid, [2, 3]) == 5
            assert worker.sandbox.compilations == 2
    assert "RELAY_PRELOAD: skipping glyph://nobody@latest" in caplog.text
    assert f"RELAY_PRELOAD: skipping {missing_cid}" in caplog.text
    assert "preloaded 2 of 4 modules" in caplog.text
    # The next start preloads them from disk.
    async with running(warm, "preloading-again") as worker:
        await wait_for(lambda: worker.modules.sources["disk"] == 2)
        assert worker.sandbox.compilations == 0
