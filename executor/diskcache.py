"""Compiled modules on disk, so that a restarted executor loads what it compiled before.

Compiling a module takes milliseconds to seconds (it grows with the module); loading the code
wasmtime compiled earlier (`Module.serialize`, then `Module.deserialize`) takes a fraction of
that. An executor keeps what it compiles in RELAY_MODULE_CACHE_DIR, one file a module:

    <CID>.<engine fingerprint>.cwasm

The fingerprint (`engine_fingerprint`) digests everything the compiled code depends on: the
wasmtime version, every Config flag the sandbox sets, the wasm stack size and the host's
architecture and OS. A file compiled under any other configuration has another name, so it is
never looked at; wasmtime checks the same on load too (its version, its flags, the CPU
features the code needs), and a file it refuses is compiled again and overwritten.

Deserializing runs machine code from the file: it is only safe for files wasmtime itself wrote
for this executor. So:
- the directory is created mode 700 and refused (logged, the cache off) unless it is owned by
  the executor's user and writable by nobody else; a file is skipped unless it is a regular
  file (not a link) owned by that user and writable by nobody else;
- a file starts with a header: a magic and format version, the engine fingerprint, the
  sha256 of the bytes compiled and the sha256 of the serialized code after it. All are
  checked before wasmtime sees a byte, so a truncated, corrupted or misnamed file is compiled
  again, never deserialized; the bytes checked are the bytes deserialized (read once, into
  memory: no window between the check and the load);
- files are written whole to a temporary file in the directory and renamed over the old one, so
  a reader (another executor sharing the directory) sees the old file or the new, never half.

The hash guards against accidents (a crash mid-write, a full disk, a bad sector), not against
someone able to write to the directory: they could write a matching hash too. Against them,
the ownership and mode checks are the guard: only the executor's own user can place a file.

The directory holds at most RELAY_MODULE_CACHE_BYTES: after each write the least recently used
files (by mtime: a load touches its file) are removed until it fits.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import wasmtime

log = logging.getLogger("relay.executor.cache")

MAGIC = b"RELAY-CWASM\x01"
"""The format's name and version (the last byte): a change of the layout changes it."""
_DIGEST = 32
HEADER_BYTES = len(MAGIC) + 3 * _DIGEST
SUFFIX = ".cwasm"
_TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 3600.0
"""A temporary file older than this was left by a writer that died: removed when evicting."""
_CID = re.compile(r"[a-z0-9]{8,128}")
"""What a file name's CID may be (a canonical CID is base32, lower case): nothing that could
name another path."""


def engine_fingerprint(config: dict[str, Any]) -> str:
    """sha256 (hex) of what code compiled for an Engine made with `config` (Config attribute:
    value, every one the sandbox sets) depends on, besides the module itself."""
    described = {
        "format": MAGIC.decode("latin-1"),
        "wasmtime": importlib.metadata.version("wasmtime"),
        "config": config,
        "machine": platform.machine(),
        "system": platform.system(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class DiskModules:
    """The files of one directory, for Engines with one fingerprint. Never raises for a
    problem of the disk: a file that cannot be read is a miss, one that cannot be written is
    logged (modules are then compiled as if there were no cache)."""

    def __init__(self, directory: Path, max_bytes: int, fingerprint: str) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.fingerprint = fingerprint
        self._fingerprint = bytes.fromhex(fingerprint)

    @classmethod
    def open(cls, directory: str | Path, max_bytes: int,
             fingerprint: str) -> DiskModules | None:
        """The cache in `directory` (created mode 700 if missing), or None, logged, when it
        cannot be used: not creatable, not a directory, not owned by this user, or writable by
        its group or others."""
        path = Path(directory).absolute()
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(path)
        except OSError as exc:
            log.warning("module cache off: cannot create RELAY_MODULE_CACHE_DIR %s (%s); "
                        "modules are compiled at every start", path, exc)
            return None
        problem = _unsafe(info, "directory")
        if problem is not None:
            log.error("module cache off: RELAY_MODULE_CACHE_DIR %s %s, so files in it could "
                      "have been written by someone else and are not loaded (it must be owned "
                      "by uid %d and writable by nobody else: chmod 700 it, or name another); "
                      "modules are compiled at every start", path, problem, os.geteuid())
            return None
        return cls(path, max_bytes, fingerprint)

    def path(self, cid: str) -> Path:
        if _CID.fullmatch(cid) is None:
            raise ValueError(f"not a canonical CID: {cid!r}")
        return self.directory / f"{cid}.{self.fingerprint[:32]}{SUFFIX}"

    def load(self, cid: str, source: bytes, engine: wasmtime.Engine) -> wasmtime.Module | None:
        """The module compiled earlier from `source` (the bytes given to wasmtime) for an
        Engine with this fingerprint, or None when there is none that passes every check."""
        path = self.path(cid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a link (ELOOP), a permission ...
            log.warning("compiling %s again: cannot open %s: %s", cid, path, exc)
            return None
        with os.fdopen(fd, "rb") as file:
            problem = _unsafe(os.fstat(file.fileno()), "file")
            if problem is not None:
                log.warning("compiling %s again: %s %s", cid, path, problem)
                return None
            try:
                data = file.read()
            except OSError as exc:
                log.warning("compiling %s again: cannot read %s: %s", cid, path, exc)
                return None
        problem = self._check(data, source)
        if problem is not None:
            log.warning("compiling %s again: %s %s", cid, path, problem)
            return None
        try:
            module = wasmtime.Module.deserialize(engine, memoryview(data)[HEADER_BYTES:].tobytes())
        except wasmtime.WasmtimeError as exc:
            log.warning("compiling %s again: wasmtime refused %s: %s", cid, path,
                        str(exc).splitlines()[0] if str(exc) else "incompatible")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return module

    def _check(self, data: bytes, source: bytes) -> str | None:
        """Why `data` is not a file written for `source` under this fingerprint, or None."""
        if len(data) <= HEADER_BYTES or not data.startswith(MAGIC):
            return "is not a compiled module of this format (truncated?)"
        at = len(MAGIC)
        fingerprint, source_digest, payload_digest = (
            data[at + i * _DIGEST : at + (i + 1) * _DIGEST] for i in range(3))
        if fingerprint != self._fingerprint:
            return "was compiled under another engine configuration"
        if source_digest != hashlib.sha256(source).digest():
            return "was compiled from other bytes"
        if payload_digest != hashlib.sha256(memoryview(data)[HEADER_BYTES:]).digest():
            return "is corrupt (its content does not match its hash)"
        return None

    def store(self, cid: str, source: bytes, serialized: bytes | bytearray) -> bool:
        """Keep what `Module.serialize` gave for the module compiled from `source`: written
        whole under a temporary name, then renamed into place. Then evict down to max_bytes.
        Returns whether it was written."""
        size = HEADER_BYTES + len(serialized)
        if size > self.max_bytes:
            return False
        path = self.path(cid)
        header = (MAGIC + self._fingerprint + hashlib.sha256(source).digest()
                  + hashlib.sha256(serialized).digest())
        temp = None
        try:
            fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.directory)  # mode 600
            with os.fdopen(fd, "wb") as file:
                file.write(header)
                file.write(serialized)
            os.replace(temp, path)
            temp = None
        except OSError as exc:
            log.warning("cannot keep the compiled %s in %s: %s", cid, self.directory, exc)
            return False
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
        self.evict(keep=path)
        return True

    def evict(self, keep: Path | None = None) -> None:
        """Remove the least recently used files until the directory holds at most max_bytes
        (never `keep`, the file just written), and temporary files left by a writer that
        died."""
        now = time.time()
        files: list[tuple[float, int, str]] = []
        total = 0
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning("cannot list the module cache %s: %s", self.directory, exc)
            return
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile (another executor evicting)
            if entry.name.startswith(_TEMP_PREFIX):
                if now - info.st_mtime > STALE_TEMP_S:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                continue
            if not entry.name.endswith(SUFFIX) or not stat.S_ISREG(info.st_mode):
                continue
            total += info.st_size
            if keep is None or entry.path != str(keep):
                files.append((info.st_mtime, info.st_size, entry.path))
        files.sort()
        for _, size, path in files:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size

    def size(self) -> int:
        """Bytes of compiled modules in the directory."""
        total = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                if entry.name.endswith(SUFFIX) and not entry.name.startswith(_TEMP_PREFIX):
                    with contextlib.suppress(OSError):
                        total += entry.stat(follow_symlinks=False).st_size
        return total


def _unsafe(info: os.stat_result, kind: str) -> str | None:
    """Why a directory or file with this status could hold bytes someone else wrote, or None."""
    wanted = stat.S_ISDIR if kind == "directory" else stat.S_ISREG
    if not wanted(info.st_mode):
        return f"is not a {'directory' if kind == 'directory' else 'regular file'}"
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not this executor's (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by its group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None
