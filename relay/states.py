"""Session states in Redis: compressed pages shared by content, manifests, and their holders.

A state is a manifest (executor.state.Manifest, JSON) naming one SHA-256 per 64 KiB page of
memory; `state_cid` is the CID of the manifest's bytes. Redis holds (relay.keys):
- `page:<sha256>`: the page, zstd-compressed, stored once whatever number of states have it;
- `state:<state_cid>`: hash {manifest, size, refs};
- `page-refs`: hash sha256 -> references to the page from held states' manifests.

`save` writes what a call changed as orphans, with a TTL, before its commit; the commit takes the
first reference (state_ref in lua/states.lib.lua, inside the session scripts), which makes the
state and its pages permanent, so a commit that never happens leaves nothing behind for long.
Dropping the last reference deletes the state and every page no other held state has.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
import zstandard
from redis.exceptions import NoScriptError

from relay.bus import Script
from relay.keys import Keys

PAGE_BYTES = 65536
ZSTD_LEVEL = 1
"""Measured on 16 MiB of half-random pages (bench/bench_state.py): levels 1 to 3 compress it to
the same size within 0.2 % (8.0 MiB) in the same time within noise (3.1 to 3.9 ms)."""
CHUNK_PAGES = 64
"""Pages per MGET (4 MiB raw): a large state is read in several commands of one pipeline, so no
one command holds Redis for long."""
THREAD_BYTES = 1 << 20
"""Compressing or decompressing more than this goes to a thread, off the event loop."""
MANIFEST_CACHE_BYTES = 8 << 20

_SAVE = Script.named("save_state")
_REFS = Script.named("state_refs", libs=("states",))


class StateGone(LookupError):
    """A page a manifest names is not in Redis: the state was dropped, or it was an orphan that
    expired before anything held it."""


class StateStore:
    """Stores and loads states; meant for one event loop (its manifest cache is not locked)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, orphan_ttl_ms: int,
                 level: int = ZSTD_LEVEL, manifest_cache_bytes: int = MANIFEST_CACHE_BYTES,
                 ) -> None:
        """`orphan_ttl_ms`: how long what `save` wrote lives unless a holder takes it (ms); it
        must cover the time from a call's end to its commit."""
        self.client = client
        self.keys = keys
        self.orphan_ttl_ms = orphan_ttl_ms
        self.level = level
        self._manifests: OrderedDict[str, bytes] = OrderedDict()
        self._manifest_bytes = 0
        self._manifest_capacity = manifest_cache_bytes

    async def save(self, manifest: bytes, state_cid: str, new_pages: Mapping[str, bytes]) -> int:
        """Store a state as an orphan: its manifest, and `new_pages` (sha256 -> raw page) that
        Redis may not have yet (pages it has are left alone, and kept while it is an orphan).
        One round trip (one more in the rare case a page expired between its SET and the
        manifest's script). Returns the bytes written (what Redis did not have). Raises
        redis.RedisError (an OOM refusal among them), or ValueError for a manifest that is not
        one."""
        size = _size_of(manifest)
        hashes = list(new_pages)
        raw = [new_pages[sha] for sha in hashes]
        compressed = (await asyncio.to_thread(self._compress, raw)
                      if len(raw) * PAGE_BYTES > THREAD_BYTES else self._compress(raw))
        page_keys = [self.keys.page(sha) for sha in hashes]
        call = ([self.keys.state(state_cid), *page_keys], [self.orphan_ttl_ms, manifest, size])
        written = 0
        for _ in range(3):
            # The pages go as plain SETs: through a script's arguments they would be copied
            # twice more (measured: 23 ms against 13 ms for 16 MiB).
            pipe = self.client.pipeline(transaction=False)
            for key, blob in zip(page_keys, compressed, strict=True):
                pipe.set(key, blob, nx=True, px=self.orphan_ttl_ms)
            _SAVE.queue(pipe, *call)
            *stored, kept = await pipe.execute(raise_on_error=False)
            if isinstance(kept, NoScriptError):
                [kept] = await self._run(_SAVE, [call])
            for result in (*stored, kept):
                if isinstance(result, Exception):
                    raise result
            written += int(kept[0]) + sum(len(blob) for blob, done
                                          in zip(compressed, stored, strict=True) if done)
            gone = [int(position) - 2 for position in kept[1:]]
            if not gone:
                self._remember(state_cid, manifest)
                return written
            page_keys = [page_keys[i] for i in gone]
            compressed = [compressed[i] for i in gone]
            call = ([self.keys.state(state_cid), *page_keys], call[1])
        raise StateGone(f"pages of state {state_cid} expired as fast as they were written")

    async def manifest(self, state_cid: str) -> bytes | None:
        """The manifest's bytes; None when the state is not stored (never, or no more)."""
        cached = self._manifests.get(state_cid)
        if cached is not None:
            self._manifests.move_to_end(state_cid)
            return cached
        manifest: bytes | None = await self.client.hget(self.keys.state(state_cid), "manifest")
        if manifest is not None:
            self._remember(state_cid, manifest)
        return manifest

    async def pages(self, hashes: Iterable[str]) -> dict[str, bytes]:
        """The raw pages (sha256 -> 65536 bytes) named by `hashes` ("" ones skipped), in one
        round trip. Raises StateGone when one is not stored."""
        wanted = list(dict.fromkeys(sha for sha in hashes if sha))
        if not wanted:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(wanted), CHUNK_PAGES):
            pipe.mget([self.keys.page(sha) for sha in wanted[start:start + CHUNK_PAGES]])
        blobs = [blob for reply in await pipe.execute() for blob in reply]
        gone = [sha for sha, blob in zip(wanted, blobs, strict=True) if blob is None]
        if gone:
            raise StateGone(f"{len(gone)} of {len(wanted)} pages are not stored "
                            f"(page {gone[0]} first)")
        raw = (await asyncio.to_thread(_decompress, blobs)
               if len(blobs) * PAGE_BYTES > THREAD_BYTES else _decompress(blobs))
        return dict(zip(wanted, raw, strict=True))

    async def ref(self, state_cid: str, n: int = 1) -> bool:
        """Take `n` references to a stored state (a snapshot, branches restored from one). False,
        taking none, when the state or one of its pages is gone. None/"" (the fresh state):
        True, nothing to hold."""
        if n < 1:
            raise ValueError("n is at least 1")
        [done] = await self._run(_REFS, [([], [self.keys.prefix, *[f"+{state_cid}"] * n])])
        return all(done)

    async def unref(self, state_cid: str) -> bool:
        """Drop one reference; the last one deletes the state and the pages no other held state
        has. False when the state was not held."""
        [done] = await self._run(_REFS, [([], [self.keys.prefix, f"-{state_cid}"])])
        return bool(done[0])

    def _compress(self, pages: Sequence[bytes]) -> list[bytes]:
        compressor = zstandard.ZstdCompressor(level=self.level)  # not thread-safe: one a call
        return [compressor.compress(page) for page in pages]

    def _remember(self, state_cid: str, manifest: bytes) -> None:
        if state_cid in self._manifests or len(manifest) > self._manifest_capacity:
            return
        self._manifests[state_cid] = manifest
        self._manifest_bytes += len(manifest)
        while self._manifest_bytes > self._manifest_capacity:
            _, dropped = self._manifests.popitem(last=False)
            self._manifest_bytes -= len(dropped)

    async def _run(self, script: Script, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run `script` once per (keys, args) in one pipeline, in order; load it and rerun the
        calls Redis did not know it for. Raises the first error a call returned."""
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            script.queue(pipe, keys, args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:  # first use on this server, or after SCRIPT FLUSH / a restart
            await self.client.script_load(script.source)
            retried = await self._run(script, [calls[i] for i in unknown])
            for i, result in zip(unknown, retried, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results


def _decompress(blobs: Sequence[bytes]) -> list[bytes]:
    decompressor = zstandard.ZstdDecompressor()
    pages = [decompressor.decompress(blob, max_output_size=PAGE_BYTES) for blob in blobs]
    if any(len(page) != PAGE_BYTES for page in pages):
        raise ValueError(f"a stored page is not {PAGE_BYTES} bytes")
    return pages


class _PageList(msgspec.Struct):
    """What the core reads of a manifest (executor.state.Manifest is the whole of it)."""

    pages: list[str]


def _size_of(manifest: bytes) -> int:
    """Bytes of memory a manifest describes. Raises msgspec.ValidationError (a ValueError) for
    bytes that are not a manifest."""
    return len(msgspec.json.decode(manifest, type=_PageList).pages) * PAGE_BYTES
