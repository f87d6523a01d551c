"""Environments: named presets of limits and WASI capabilities that executions run in.

An environment caps each limit of the executions in it (and lowers the default of one that asks
for none), says whether WASI is offered and with which `env`, `args`, clocks and randomness, and
may lower the output cap. Each PUT raises its version; an execution keeps the version it was
accepted with, because the gateway copies what the executor needs into the request
(`RunEnvironment`): no executor reads environments, and a change never reaches a run already
accepted.

Two are shipped and cannot be deleted: `wasi` (the default: v1's WASI with stdio, clocks and
randomness, the global ceilings) and `pure` (no WASI). They exist at version 1 without being
stored; a PUT stores one like any other. Gateways keep what they read for CACHE_S, so a change
made through another gateway is seen within that.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import msgspec
import redis.asyncio as aioredis

from relay.bus import Script
from relay.cid import NAME_RULE, is_name
from relay.errors import Conflict, FieldError, InvalidRequest, NotFound
from relay.keys import Keys
from relay.modules import WASI_MODULE
from relay.schemas import (
    Environment,
    EnvironmentPage,
    EnvironmentPolicy,
    EnvironmentRequest,
    EnvironmentWasi,
    ModuleInfo,
    RunEnvironment,
    encode,
)
from relay.settings import Settings

SHIPPED: dict[str, EnvironmentRequest] = {
    "wasi": EnvironmentRequest(
        description="WASI with stdio, clocks and randomness, no env or args, the global "
                    "ceilings: how every execution ran before environments existed"),
    "pure": EnvironmentRequest(
        description="no WASI: modules that import any WASI function are refused",
        wasi=EnvironmentWasi(enabled=False, clock=False, random=False)),
}
V1 = ("wasi", 1)
"""The shipped default, unchanged: what v1 ran every execution in (its requests keep their v1
idempotency fingerprints)."""
CLOCK_IMPORTS = frozenset({"clock_time_get", "clock_res_get", "poll_oneoff"})
RANDOM_IMPORTS = frozenset({"random_get"})
MAX_ENVIRONMENTS = 1000
"""Most environments stored at once (each gateway may cache them all)."""
MAX_ENV_BYTES = 65536
"""Most bytes of `env` (names and values) and `args` together: every request in the environment
carries them to its executor."""
CACHE_S = 1.0
CACHE_SIZE = 1024

_PUT = Script.named("environment_put")
_decode_stored = msgspec.json.Decoder(EnvironmentRequest).decode


def ceilings(settings: Settings) -> EnvironmentPolicy:
    """The deployment's ceilings (RELAY_MAX_*): the caps of an environment that sets none."""
    return EnvironmentPolicy(
        max_gas=settings.max_gas, max_memory=settings.max_memory_bytes,
        max_time=settings.max_time_ms,
        max_stack=settings.max_stack_bytes)


def view(name: str, version: int, stored: EnvironmentRequest, settings: Settings) -> Environment:
    """The environment as shown and applied: omitted caps are the ceilings in force."""
    top = ceilings(settings)
    limits = stored.policy
    wasi = stored.wasi
    if not wasi.enabled:  # no WASI, so neither clocks nor randomness
        wasi = msgspec.structs.replace(wasi, clock=False, random=False)
    return Environment(
        name=name, version=version, description=stored.description,
        policy=EnvironmentPolicy(
            max_gas=limits.max_gas or top.max_gas,
            max_memory=limits.max_memory or top.max_memory,
            max_time=limits.max_time or top.max_time,
            max_stack=limits.max_stack or top.max_stack),
        wasi=wasi,
        max_output_bytes=stored.max_output_bytes or settings.max_output_bytes)


def run_environment(environment: Environment, stored: EnvironmentRequest) -> RunEnvironment:
    """What an execution in `environment` carries to its executor."""
    wasi = environment.wasi
    return RunEnvironment(
        name=environment.name, version=environment.version, wasi=wasi.enabled, env=wasi.env,
        args=wasi.args, clock=wasi.clock, random=wasi.random,
        max_output_bytes=stored.max_output_bytes)


def tag(environment: RunEnvironment) -> str:
    """`name@version`: how memo keys and idempotency fingerprints name an environment."""
    return f"{environment.name}@{environment.version}"


def refusal(environment: RunEnvironment, info: ModuleInfo) -> str | None:
    """Why the module cannot run in `environment` (a WASI import it does not offer), or None.
    The gateway refuses such a request; the executor checks again what it is sent."""
    wasi = [imp.name for imp in info.imports if imp.module == WASI_MODULE]
    if not wasi:
        return None
    name = environment.name
    if not environment.wasi:
        return (f"environment {name!r} offers no WASI, and the module imports "
                f"{WASI_MODULE}.{wasi[0]}")
    for offered, calls, what in ((environment.clock, CLOCK_IMPORTS, "clocks"),
                                 (environment.random, RANDOM_IMPORTS, "randomness")):
        needed = [call for call in wasi if call in calls]
        if not offered and needed:
            return (f"environment {name!r} offers no {what}, and the module imports "
                    f"{WASI_MODULE}.{needed[0]}")
    return None


def check(name: str, body: EnvironmentRequest, settings: Settings) -> None:
    """What decoding cannot check of a PUT: the name, caps within the ceilings, the size of env
    and args. Raises InvalidRequest listing every problem."""
    if not is_name(name):
        raise InvalidRequest(f"an environment's name matches {NAME_RULE}")
    errors: list[FieldError] = []
    if body.name is not None and body.name != name:
        errors.append(FieldError("/name", f"{body.name!r} is not the name in the path"))
    top = ceilings(settings)
    for field in ("max_gas", "max_memory", "max_time", "max_stack"):
        asked = getattr(body.policy, field)
        if asked is not None and asked > getattr(top, field):
            errors.append(FieldError(f"/policy/{field}",
                                     f"{asked} is over the ceiling of {getattr(top, field)}"))
    if body.max_output_bytes is not None and body.max_output_bytes > settings.max_output_bytes:
        errors.append(FieldError("/max_output_bytes", f"{body.max_output_bytes} is over the "
                                 f"ceiling of {settings.max_output_bytes}"))
    wasi = body.wasi
    # WASI passes them as C strings: a NUL would cut one short.
    errors += [FieldError(f"/wasi/env/{key}", "a value may not contain NUL")
               for key, value in wasi.env.items() if "\0" in value]
    errors += [FieldError(f"/wasi/args/{index}", "an argument may not contain NUL")
               for index, arg in enumerate(wasi.args) if "\0" in arg]
    if not wasi.enabled and (wasi.env or wasi.args):
        errors.append(FieldError("/wasi/enabled", "an environment without WASI has no env or "
                                 "args"))
    size = sum(len(key.encode()) + len(value.encode()) for key, value in wasi.env.items())
    size += sum(len(arg.encode()) for arg in wasi.args)
    if size > MAX_ENV_BYTES:
        errors.append(FieldError("/wasi", f"env and args hold {size} bytes; at most "
                                 f"{MAX_ENV_BYTES} together"))
    if errors:
        raise InvalidRequest(errors[0].detail, errors=errors)


class Resolved(msgspec.Struct, frozen=True):
    """An environment as a gateway applies it."""

    environment: Environment
    run: RunEnvironment


class Environments:
    """The environments in Redis, shared by every gateway, with the shipped ones."""

    def __init__(self, client: aioredis.Redis, keys: Keys, settings: Settings) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self._cache: OrderedDict[str, tuple[Resolved | None, float]] = OrderedDict()

    async def resolve(self, name: str | None) -> Resolved:
        """The environment `name` (None: RELAY_DEFAULT_ENVIRONMENT) as an execution applies it,
        from this gateway's cache when it read it within CACHE_S. Raises InvalidRequest
        (pointer `/environment`) for one that does not exist."""
        name = name or self.settings.default_environment
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and now - cached[1] < CACHE_S:
            resolved = cached[0]
        else:
            resolved = await self._read(name) if is_name(name) else None
            self._cache[name] = (resolved, now)
            self._cache.move_to_end(name)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        if resolved is None:
            raise InvalidRequest.at("/environment", f"no environment named {name!r}")
        return resolved

    async def get(self, name: str) -> Environment:
        """Raises NotFound."""
        resolved = await self._read(name) if is_name(name) else None
        if resolved is None:
            raise NotFound(f"no environment named {name!r}")
        return resolved.environment

    async def page(self, cursor: int, limit: int) -> EnvironmentPage:
        """Every environment, by name."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.environments)
            pipe.hgetall(self.keys.environment_versions)
            stored, versions = await pipe.execute()
        found = {name.decode(): _decode_stored(raw) for name, raw in stored.items()}
        names = sorted(found.keys() | SHIPPED.keys())
        items = [view(name, int(versions.get(name.encode(), 1)),
                      found.get(name) or SHIPPED[name], self.settings)
                 for name in names[cursor:cursor + limit]]
        more = cursor + limit < len(names)
        return EnvironmentPage(items=items, next_cursor=str(cursor + limit) if more else None)

    async def put(self, name: str, body: EnvironmentRequest) -> Environment:
        """Create or replace `name`, raising its version. Raises InvalidRequest, Conflict (a
        stale `version`, or MAX_ENVIRONMENTS reached)."""
        check(name, body, self.settings)
        stored = msgspec.structs.replace(body, name=None, version=None)
        status, version = await _PUT.run(
            self.client, [self.keys.environments, self.keys.environment_versions],
            [name, encode(stored), "1" if name in SHIPPED else "0",
             "" if body.version is None else body.version, MAX_ENVIRONMENTS])
        self._cache.pop(name, None)
        if status == b"conflict":
            raise Conflict(f"environment {name!r} is at version {version}, not "
                           f"{body.version}: read it again" if version else
                           f"environment {name!r} does not exist (omit `version` to create it)")
        if status == b"full":
            raise Conflict(f"there are {MAX_ENVIRONMENTS} environments already; delete one "
                           "first")
        return view(name, int(version), stored, self.settings)

    async def delete(self, name: str) -> None:
        """Raises Conflict (a shipped one, or the default), NotFound."""
        if name in SHIPPED:
            raise Conflict(f"environment {name!r} is shipped with Relay and cannot be deleted")
        if name == self.settings.default_environment:
            raise Conflict(f"environment {name!r} is the default (RELAY_DEFAULT_ENVIRONMENT): "
                           "requests that name none run in it")
        removed = await self.client.hdel(self.keys.environments, name) if is_name(name) else 0
        self._cache.pop(name, None)
        if not removed:
            raise NotFound(f"no environment named {name!r}")

    async def _read(self, name: str) -> Resolved | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.environments, name)
            pipe.hget(self.keys.environment_versions, name)
            raw, version = await pipe.execute()
        stored = _decode_stored(raw) if raw is not None else SHIPPED.get(name)
        if stored is None:
            return None
        environment = view(name, int(version or 1), stored, self.settings)
        return Resolved(environment, run_environment(environment, stored))
