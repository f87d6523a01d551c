"""A session's state on a live instance: capture it as a manifest of pages, restore it.

A state is memory 0 and every mutable global (docs: "Sessions"). The copy of the module the
executor compiles exports them as `__relay_memory` and `__relay_global_<index>`. The stored form
is a `Manifest`: one SHA-256 per 64 KiB page ("" for an all-zero page) and each global's raw
bits, so equal pages are stored once across states, sessions and principals, and a call that
changes one page writes one page.

Finding what a call changed must not cost a hash of the whole memory with SHA-256 (~10 ms at
16 MiB): right after a restore, `Baseline` keeps an xxh3-128 digest of each page (~1 ms at
16 MiB, hashed straight from the memory, no copy); `capture` hashes the pages again and pays
SHA-256 only for those that differ. xxh3 is not collision resistant, so it only ever compares a
page with the same page of the same instance a moment earlier, under a seed secret to this
process: it never names content that others share.

Nothing here talks to Redis (relay.states does); `PageCache` keeps pages an executor used
recently, so consecutive calls of a session fetch nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Literal, NamedTuple

import msgspec
import wasmtime
import xxhash
from msgspec import Meta

# The raw value of a global is only reachable through wasmtime-py's ctypes layer: its public
# `Global.value` turns an f32 into a Python float, which quiets a signalling NaN (a state would
# not come back bit for bit). wasmtime is pinned to one major (pyproject.toml) and
# tests/executor/test_state.py checks NaN payloads survive.
from wasmtime import _ffi as ffi

from executor.binary import MEMORY_EXPORT
from relay import cid

PAGE_BYTES = 65536
GLOBAL_EXPORT_PREFIX = "__relay_global_"
ZERO_PAGE = bytes(PAGE_BYTES)
MANIFEST_VERSION: Literal[1] = 1

PageHash = Annotated[str, Meta(pattern="^([0-9a-f]{64})?$")]
"""SHA-256 of a page, lowercase hex, or "" for an all-zero page."""
GlobalKind = Literal["i32", "i64", "f32", "f64"]
GlobalState = tuple[Annotated[int, Meta(ge=0)], GlobalKind, Annotated[int, Meta(ge=0)]]
"""(global index, type, raw bits as an unsigned integer: below 2**32 or 2**64, which `restore`
checks, as msgspec bounds no integer past int64)."""

_BITS: dict[GlobalKind, type[ctypes.c_uint32] | type[ctypes.c_uint64]] = {
    "i32": ctypes.c_uint32, "f32": ctypes.c_uint32, "i64": ctypes.c_uint64, "f64": ctypes.c_uint64,
}
_VALUE_KINDS: dict[GlobalKind, ctypes.c_uint8] = {
    "i32": ffi.WASMTIME_I32, "i64": ffi.WASMTIME_I64, "f32": ffi.WASMTIME_F32,
    "f64": ffi.WASMTIME_F64,
}

# A secret seed: a module that wanted its change to go unnoticed would have to find an xxh3
# collision without knowing the function.
_SEED = secrets.randbits(64)
_ZERO_DIGEST = xxhash.xxh3_128_digest(ZERO_PAGE, seed=_SEED)


class StateDoesNotFit(ValueError):
    """The state cannot be restored into this instance: its memory is smaller than the fresh
    instance's or larger than the store's limit or the memory's maximum, or its globals are not
    the instance's mutable globals, or a page is missing or not a page."""


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The stored form of a state (JSON; field order fixed, so equal states encode equal)."""

    v: Literal[1]
    pages: tuple[PageHash, ...]
    """One entry per page of memory 0: its length is the memory's size in pages."""
    globals: tuple[GlobalState, ...]
    """Every mutable global, by index."""

    @property
    def size(self) -> int:
        """Bytes of memory 0."""
        return len(self.pages) * PAGE_BYTES

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Raises msgspec.ValidationError (a ValueError) when `data` is not a manifest."""
        return _decoder.decode(data)

    def stored_pages(self) -> set[str]:
        """The hashes of its non-zero pages, each once."""
        return {page for page in self.pages if page}


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(Manifest)


def state_cid(manifest_bytes: bytes) -> str:
    """The state's content id: CIDv1, raw, sha2-256 of the encoded manifest."""
    return cid.compute(manifest_bytes)


class Baseline(NamedTuple):
    """What the instance held when a call started: the state it came from and an xxh3-128
    digest of each of its pages then."""

    manifest: Manifest | None
    """None for a freshly instantiated module: every page is hashed at capture."""
    digests: tuple[bytes, ...]

    @classmethod
    def fresh(cls) -> Baseline:
        return cls(None, ())


def restore(store: wasmtime.Store, instance: wasmtime.Instance, manifest: Manifest,
            pages: Mapping[str, bytes]) -> Baseline:
    """Make a freshly instantiated `instance` hold the state `manifest`, byte for byte.

    `pages`: the raw bytes of each non-zero page the manifest names (sha256 -> 65536 bytes; not
    verified against the hash: they come from Relay's own store). Grows memory 0 to the state's
    size; what the module's start function or data segments put there is overwritten.
    Call it on the thread that uses `store`, before any wasm runs. Raises StateDoesNotFit.
    """
    exports = instance.exports(store)
    memory = _memory(exports)
    if memory is None:
        if manifest.pages:
            raise StateDoesNotFit("the state has a memory and the module none")
    else:
        initial = memory.size(store)
        wanted = len(manifest.pages)
        if wanted < initial:
            raise StateDoesNotFit(f"the state's memory ({wanted} pages) is smaller than the "
                                  f"module's initial memory ({initial} pages)")
        if wanted > initial:
            try:
                memory.grow(store, wanted - initial)
            except wasmtime.WasmtimeError as exc:
                raise StateDoesNotFit(f"the memory cannot grow to the state's {wanted} pages "
                                      f"(over its limit or maximum): {exc}") from None
        with _pages_of(store, memory) as view:
            for index, page in enumerate(manifest.pages):
                at = index * PAGE_BYTES
                if page:
                    data = pages.get(page)
                    if data is None or len(data) != PAGE_BYTES:
                        raise StateDoesNotFit(f"page {page} is missing or not {PAGE_BYTES} bytes")
                    view[at:at + PAGE_BYTES] = data
                elif index < initial and bytes(view[at:at + PAGE_BYTES]) != ZERO_PAGE:
                    # A data segment (or the start function) wrote here; grown pages are zero.
                    view[at:at + PAGE_BYTES] = ZERO_PAGE
    globals_ = _globals(store, exports)
    stored = {index: kind for index, kind, _ in manifest.globals}
    found = {index: kind for index, (kind, _) in globals_.items()}
    if stored != found:
        raise StateDoesNotFit(f"the state's globals {sorted(stored.items())} are not the "
                              f"module's {sorted(found.items())}")
    for index, kind, bits in manifest.globals:
        _set_bits(store, globals_[index][1], kind, bits)
    return Baseline(manifest, _digests(store, memory))


class Captured(NamedTuple):
    manifest: Manifest
    """The instance's state now."""
    new_pages: dict[str, bytes]
    """The raw bytes of each of its pages the baseline did not have (sha256 -> bytes: what must
    be stored)."""
    baseline: Baseline
    """The state now as a baseline: the next call on the same instance starts from it."""


def capture(store: wasmtime.Store, instance: wasmtime.Instance,
            baseline: Baseline) -> Captured:
    """The instance's state now (see Captured). Pages whose xxh3 digest is the baseline's keep
    the baseline's hash without being read. Call it on the thread that uses `store`, while no
    wasm runs (after the call returned)."""
    exports = instance.exports(store)
    memory = _memory(exports)
    hashes: list[str] = []
    digests: list[bytes] = []
    new_pages: dict[str, bytes] = {}
    known = baseline.manifest.pages if baseline.manifest is not None else ()
    if memory is not None:
        with _pages_of(store, memory) as view:
            for index in range(len(view) // PAGE_BYTES):
                page = view[index * PAGE_BYTES:(index + 1) * PAGE_BYTES]
                digest = xxhash.xxh3_128_digest(page, seed=_SEED)
                digests.append(digest)
                if index < len(known) and digest == baseline.digests[index]:
                    hashes.append(known[index])
                    continue
                data = bytes(page)
                if digest == _ZERO_DIGEST and data == ZERO_PAGE:
                    hashes.append("")
                    continue
                sha = hashlib.sha256(data).hexdigest()
                hashes.append(sha)
                new_pages[sha] = data
    globals_ = tuple((index, kind, _get_bits(store, global_, kind))
                     for index, (kind, global_) in sorted(_globals(store, exports).items()))
    manifest = Manifest(v=MANIFEST_VERSION, pages=tuple(hashes), globals=globals_)
    return Captured(manifest, new_pages, Baseline(manifest, tuple(digests)))


def _memory(exports: Mapping[str, object]) -> wasmtime.Memory | None:
    memory = exports.get(MEMORY_EXPORT)
    return memory if isinstance(memory, wasmtime.Memory) else None


@contextmanager
def _pages_of(store: wasmtime.Store, memory: wasmtime.Memory) -> Iterator[memoryview]:
    """Memory 0 as a writable view, no copy. Valid only until the memory grows (it may move):
    nothing runs wasm while it is held."""
    length = memory.data_len(store)
    if length == 0:
        yield memoryview(b"")
        return
    address = ctypes.addressof(memory.data_ptr(store).contents)
    view = memoryview((ctypes.c_ubyte * length).from_address(address)).cast("B")
    try:
        yield view
    finally:
        view.release()


def _digests(store: wasmtime.Store, memory: wasmtime.Memory | None) -> tuple[bytes, ...]:
    if memory is None:
        return ()
    with _pages_of(store, memory) as view:
        return tuple(xxhash.xxh3_128_digest(view[at:at + PAGE_BYTES], seed=_SEED)
                     for at in range(0, len(view), PAGE_BYTES))


def _globals(store: wasmtime.Store,
             exports: Mapping[str, object]) -> dict[int, tuple[GlobalKind, wasmtime.Global]]:
    """The mutable globals exported for sessions, by index (immutable ones cannot change)."""
    found: dict[int, tuple[GlobalKind, wasmtime.Global]] = {}
    for name, extern in exports.items():
        if not name.startswith(GLOBAL_EXPORT_PREFIX) or not isinstance(extern, wasmtime.Global):
            continue
        suffix = name[len(GLOBAL_EXPORT_PREFIX):]
        kind = str(extern.type(store).content)
        if not suffix.isdigit() or not extern.type(store).mutable:
            continue
        if kind not in _BITS:
            raise StateDoesNotFit(f"global {suffix} is of type {kind}, which a state cannot hold")
        found[int(suffix)] = (kind, extern)
    return found


def _get_bits(store: wasmtime.Store, global_: wasmtime.Global, kind: GlobalKind) -> int:
    raw = ffi.wasmtime_val_t()
    ffi.wasmtime_global_get(store._context(), ctypes.byref(global_._global), ctypes.byref(raw))
    return _BITS[kind].from_buffer(raw.of).value


def _set_bits(store: wasmtime.Store, global_: wasmtime.Global, kind: GlobalKind,
              bits: int) -> None:
    raw = ffi.wasmtime_val_t()
    raw.kind = _VALUE_KINDS[kind]
    width = _BITS[kind]
    if bits >= 1 << (8 * ctypes.sizeof(width)):
        raise StateDoesNotFit(f"{bits} does not fit a {kind}")
    width.from_buffer(raw.of).value = bits
    error = ffi.wasmtime_global_set(store._context(), ctypes.byref(global_._global),
                                    ctypes.byref(raw))
    if error:
        raise StateDoesNotFit(str(wasmtime.WasmtimeError._from_ptr(error)))


class PageCache:
    """Raw pages by SHA-256, bounded by bytes, least recently used dropped first.

    Safe from any thread: every method holds one lock (the executor fills it on its event loop
    and may read it from worker threads). Pages are immutable bytes, so what `get_many` returned
    stays valid after it is evicted.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.size_bytes = 0
        self._pages: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, sha: object) -> bool:
        return sha in self._pages

    def get_many(self, hashes: Iterable[str]) -> tuple[dict[str, bytes], list[str]]:
        """(the pages held, the hashes not held, each once)."""
        found: dict[str, bytes] = {}
        missing: dict[str, None] = {}  # ordered, each once
        with self._lock:
            for sha in hashes:
                if not sha or sha in found:
                    continue
                data = self._pages.get(sha)
                if data is None:
                    missing[sha] = None
                    continue
                self._pages.move_to_end(sha)
                found[sha] = data
        return found, list(missing)

    def put_many(self, pages: Mapping[str, bytes]) -> None:
        """Keep `pages` (the caller vouches that each is the page its hash names)."""
        with self._lock:
            for sha, data in pages.items():
                if sha in self._pages:
                    self._pages.move_to_end(sha)
                    continue
                if len(data) > self.capacity_bytes:
                    continue
                self._pages[sha] = data
                self.size_bytes += len(data)
            while self.size_bytes > self.capacity_bytes:
                _, dropped = self._pages.popitem(last=False)
                self.size_bytes -= len(dropped)
