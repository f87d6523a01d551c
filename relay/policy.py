"""Who may do what (Cedar policies) and per-principal caps, read from one directory, hot-reloaded.

The directory (`RELAY_POLICY_DIR`) holds `*.cedar` files, which together form one policy set, and
an optional `principals.toml`. The first load must succeed (`PolicyError`). After that, a file
that does not parse leaves the last good set in force and is reported by `Policies.error` (health
says `degraded`): an operator's typo must neither open the gateway nor lock everyone out.

Cedar's semantics skip a policy whose evaluation errors. For a permit that only withholds a
grant, but a forbid that errors would let a permit through, so `authorize` denies when a forbid
that applies to the request could not be evaluated.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, NamedTuple

import cedarpy
import msgspec

from relay.errors import pointer_from_msgspec
from relay.schemas import Priority, encode

log = logging.getLogger("relay.policy")

ACTIONS: Final = ("execute", "upload", "subscribe", "admin")
POLICY_SUFFIX: Final = ".cedar"
PRINCIPALS_FILE: Final = "principals.toml"

_Positive = Annotated[int, msgspec.Meta(gt=0)]
# The rate limiter counts in whole seconds: a window it would round is refused, not bent.
_WholeSecondsMs = Annotated[int, msgspec.Meta(gt=0, multiple_of=1000)]


class PolicyError(Exception):
    """A policy file (or the directory) Relay cannot use; the message names the file and why."""


class PrincipalCaps(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One principal's overrides from `principals.toml`; None leaves the gateway's default.

    The constraints are checked when the file is loaded (a bad value is a `PolicyError`);
    constructing one directly does not check them.
    """

    rate_limit: _Positive | None = None
    """Requests per `rate_window`."""
    rate_window: _WholeSecondsMs | None = None
    """Milliseconds, a multiple of 1000."""
    max_gas: _Positive | None = None
    max_memory: _Positive | None = None
    """Bytes."""
    max_time: _Positive | None = None
    """Milliseconds."""
    max_stack: _Positive | None = None
    """Bytes of wasm stack."""
    max_modules: _Positive | None = None
    """Modules stored at once."""
    max_module_storage: _Positive | None = None
    """Bytes of the modules stored at once."""
    max_active: _Positive | None = None
    """Executions running or paused at once; the rest wait queued."""
    max_priority: Priority = "high"
    """The highest `priority` its executions may ask for; over it is 400."""


class ModuleResource(NamedTuple):
    """The module a request is about, as Cedar sees it: `Module::"<cid>"` with `name`, `owner`."""

    cid: str
    """CIDv1, base32."""
    name: str
    """The glyph name the request used, or ""."""
    owner: str
    """The principal that uploaded the module."""


# (file name, mtime_ns, size, inode) of every file read: an atomic replace (editors, deploy
# tools, Kubernetes ConfigMaps) always changes the inode, even within one mtime tick.
_Signature = tuple[tuple[str, int, int, int], ...]


class _Loaded(NamedTuple):
    policies: cedarpy.PolicySet
    forbids: cedarpy.PolicySet | None
    """The forbid policies alone (None if there are none): evaluated again to tell whether an
    evaluation error came from a forbid, without parsing Cedar's error messages."""
    caps: Mapping[str, PrincipalCaps]
    decisions: dict[tuple[str, str, ModuleResource | None], bool]
    """Decisions made with this set. A decision depends only on the set and its request (no
    context, no time), so it can be reused; a new set starts with none."""


DECISIONS_KEPT = 100_000


class Policies:
    """The policies and caps in `directory`, swapped as a whole when the files change.

    `authorize` and `caps` read one reference, so they are safe from any thread and never see
    half of a reload; `reload_if_changed` serializes itself with a lock.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Load `directory` now. Raises `PolicyError` if it cannot be read or a file does not
        parse: there is no last good set to fall back on yet."""
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._signature: _Signature | None = _scan(self.directory)
        self._loaded = _load(self.directory, self._signature)
        self._error: str | None = None
        self._warned: _Loaded | None = None

    @property
    def error(self) -> str | None:
        """None when the files in force are the files on disk; else which file is broken and why
        (`<path>: <reason>`), while the last good set stays in force."""
        return self._error

    def authorize(self, principal: str, action: str, resource: ModuleResource | None) -> bool:
        """May `principal` do `action` (one of `ACTIONS`) on `resource` (None: the gateway
        itself, `Relay::"gateway"`)? Default-deny. Raises ValueError for an unknown action."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
        loaded = self._loaded
        key = (principal, action, resource)
        decision = loaded.decisions.get(key)
        if decision is None:
            decision = self._decide(loaded, principal, action, resource)
            if len(loaded.decisions) >= DECISIONS_KEPT:
                loaded.decisions.clear()
            loaded.decisions[key] = decision
        return decision

    def _decide(self, loaded: _Loaded, principal: str, action: str,
                resource: ModuleResource | None) -> bool:
        try:
            if resource is None:
                target, entities = _GATEWAY, _NO_ENTITIES
            else:
                target = {"type": "Module", "id": resource.cid}
                entities = _module_entities(resource.cid, resource.name, resource.owner)
            # The JSON uid form carries any id verbatim: nothing in a name is parsed as Cedar.
            request = {
                "principal": {"type": "User", "id": principal},
                "action": {"type": "Action", "id": action},
                "resource": target,
            }
            result = cedarpy.is_authorized(request, loaded.policies, entities)
            if not result.allowed:
                return False
            if result.diagnostics.errors and loaded.forbids is not None:
                # Some policy failed to evaluate; if any was a forbid, it might have applied.
                check = cedarpy.is_authorized(request, loaded.forbids, entities)
                if check.diagnostics.errors:
                    if self._warned is not loaded:  # once per set: it fails on every request
                        self._warned = loaded
                        log.warning("a forbid failed, denied: %s", check.diagnostics.errors)
                    return False
        except UnicodeEncodeError:
            # A lone surrogate: it cannot reach Cedar (UTF-8), nor can any policy name it.
            return False
        return True

    def caps(self, principal: str) -> PrincipalCaps:
        """The principal's entry in `principals.toml`, or `PrincipalCaps()` without one."""
        return self._loaded.caps.get(principal, _NO_CAPS)

    def reload_if_changed(self) -> bool:
        """Re-read the files if any changed (one `stat` each when none did). A set that loads
        replaces the current one and clears `error`; one that does not leaves the current set in
        force and sets `error`. True when a new set was swapped in. Never raises PolicyError."""
        with self._lock:
            try:
                signature = _scan(self.directory)
            except PolicyError as exc:
                # Forget the signature so that the files are read again when the directory is back.
                self._signature = None
                self._fail(str(exc))
                return False
            if signature == self._signature:
                return False
            # Remembered even if the load fails, so that broken files are not re-read every tick.
            self._signature = signature
            try:
                loaded = _load(self.directory, signature)
            except PolicyError as exc:
                self._fail(str(exc))
                return False
            self._loaded, self._error = loaded, None
            log.info("policies reloaded from %s", self.directory)
            return True

    async def watch(self, interval_s: float = 1.0) -> None:
        """Call `reload_if_changed` every `interval_s` seconds until cancelled. The files are
        read in a worker thread, so a slow filesystem never stalls the event loop."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:
                # A watcher that died would silently end hot reload for the life of the process.
                log.exception("policy reload failed")

    def _fail(self, error: str) -> None:
        if error != self._error:
            log.error("policy files not applied, the last good set stays in force: %s", error)
        self._error = error


_NO_CAPS: Final = PrincipalCaps()
_GATEWAY: Final = {"type": "Relay", "id": "gateway"}
_NO_ENTITIES: Final = cedarpy.Entities.from_json_str("[]")


# Parsing the one-entity set is about half the cost of a decision, and requests keep naming the
# same few modules; the handles are immutable, so one can serve every thread.
@functools.lru_cache(maxsize=1024)
def _module_entities(cid: str, name: str, owner: str) -> cedarpy.Entities:
    entity = {
        "uid": {"type": "Module", "id": cid},
        "attrs": {"name": name, "owner": {"__entity": {"type": "User", "id": owner}}},
        "parents": [],
    }
    return cedarpy.Entities.from_json_str(encode([entity]).decode())


def _is_policy_file(name: str) -> bool:
    # Hidden names are editor artefacts (Emacs's `.#x.cedar` lock links), never policies.
    if name.startswith("."):
        return False
    return name.endswith(POLICY_SUFFIX) or name == PRINCIPALS_FILE


def _scan(directory: Path) -> _Signature:
    entries = []
    try:
        with os.scandir(directory) as found:
            for entry in found:
                if not _is_policy_file(entry.name) or not entry.is_file():
                    continue
                stat = entry.stat()  # follows symlinks: a ConfigMap swaps their targets
                entries.append((entry.name, stat.st_mtime_ns, stat.st_size, stat.st_ino))
    except OSError as exc:
        raise PolicyError(f"{exc.filename or directory}: {exc.strerror or exc}") from exc
    return tuple(sorted(entries))


def _load(directory: Path, signature: _Signature) -> _Loaded:
    permits_and_forbids: dict[str, Any] = {}
    forbids: dict[str, Any] = {}
    caps: Mapping[str, PrincipalCaps] = {}
    for name, *_ in signature:
        path = directory / name
        text = _read(path)
        if name == PRINCIPALS_FILE:
            caps = _parse_caps(path, text)
            continue
        for policy_id, policy in _parse_cedar(path, text).items():
            # Ids that name the file keep Cedar's diagnostics readable across files.
            permits_and_forbids[f"{name}#{policy_id}"] = policy
            if policy["effect"] == "forbid":
                forbids[f"{name}#{policy_id}"] = policy
    try:
        return _Loaded(
            policies=_policy_set(permits_and_forbids),
            forbids=_policy_set(forbids) if forbids else None,
            caps=caps,
            decisions={},
        )
    except ValueError as exc:  # each file parsed alone; this would be about them together
        raise PolicyError(f"{directory}: {exc}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError(f"{path}: cannot read: {reason}") from exc


def _parse_cedar(path: Path, text: str) -> dict[str, Any]:
    """The file's static policies in Cedar's JSON form (EST), by policy id."""
    try:
        document = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        line = _locate_error(text)
        where = f" (near line {line})" if line else ""
        raise PolicyError(f"{path}: {exc}{where}") from None
    if document.get("templates"):
        # A template grants nothing until linked, and nothing here links it.
        raise PolicyError(f"{path}: templates (?principal, ?resource) are not supported")
    policies: dict[str, Any] = document.get("staticPolicies", {})
    return policies


def _policy_set(policies: Mapping[str, Any]) -> cedarpy.PolicySet:
    document = {"staticPolicies": dict(policies), "templates": {}, "templateLinks": []}
    return cedarpy.PolicySet.from_json_str(json.dumps(document))


def _locate_error(text: str) -> int | None:
    """The line where the first policy Cedar rejects starts (its messages carry no position):
    the longest prefix ending in `;` that parses ends just before it."""
    lines = text.splitlines(keepends=True)
    # `//` in a string literal makes a wrong cut; it only makes the answer less precise.
    cuts = [n + 1 for n, line in enumerate(lines) if line.split("//")[0].rstrip().endswith(";")]
    good, low, high = 0, 0, len(cuts)
    while low < high:
        middle = (low + high) // 2
        try:
            cedarpy.PolicySet.from_str("".join(lines[: cuts[middle]]))
        except ValueError:
            high = middle
        else:
            good, low = cuts[middle], middle + 1
    for number in range(good, len(lines)):
        stripped = lines[number].strip()
        if stripped and not stripped.startswith("//"):
            return number + 1
    return None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _parse_caps(path: Path, text: str) -> dict[str, PrincipalCaps]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    unknown = sorted(set(document) - {"principals"})
    if unknown:
        raise PolicyError(
            f"{path}: unknown key {unknown[0]!r}; caps go in [principals.<name>] tables"
        )
    tables = document.get("principals", {})
    if not isinstance(tables, dict):
        raise PolicyError(f"{path}: `principals` must hold [principals.<name>] tables")
    caps = {}
    for name, table in tables.items():
        key = name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)
        if not isinstance(table, dict):
            raise PolicyError(f"{path}: principals.{key} must be a table")
        try:
            caps[name] = msgspec.convert(table, PrincipalCaps)
        except msgspec.ValidationError as exc:
            pointer, detail = pointer_from_msgspec(str(exc))
            field = pointer.removeprefix("/")
            if detail.startswith("Object contains unknown field"):
                detail = (
                    f"unknown key; expected one of {', '.join(PrincipalCaps.__struct_fields__)}"
                )
            # Every value is optional only by leaving it out: `null` does not exist in TOML.
            detail = detail.replace("`int | null`", "`int`")
            raise PolicyError(f"{path}: [principals.{key}] {field}: {detail}") from None
    return caps
