"""Validation: turn a body into a publishable `wasm_exec_requested`, or a 400 with pointers.

Everything is checked before anything is queued: the body's size (413, before it is read whole),
the JSON shape (msgspec), the CID or name, the entrypoint and each input against the module's
stored signature, and the policy against the defaults and ceilings. Other routes read and check
their bodies, names and tags here too.
"""

from __future__ import annotations

import secrets
import sys
from typing import Any, NamedTuple

import msgspec
from starlette.requests import Request

from relay import environments, memo
from relay.cid import NAME_RULE, GlyphName, is_name
from relay.errors import (
    MAX_JSON_DEPTH,
    FieldError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    SessionExhausted,
    decode_body,
)
from relay.modules import ModuleStore, memoizable, runs_as_command
from relay.pipeline import idempotency
from relay.policy import PrincipalCaps
from relay.schemas import (
    PRIORITIES,
    EffectivePolicy,
    EnvironmentPolicy,
    ExecuteRequest,
    ModuleInfo,
    Priority,
    RunEnvironment,
    WasmExecRequested,
    decode_execute_request,
    decode_session_call,
    now_iso,
)
from relay.sessions import Session
from relay.settings import Settings
from relay.webhooks import Callback, check_callback, fingerprinted

_MAX_KEY_LENGTH = 256
_INT_RANGES = {"i32": (-(2**31), 2**31 - 1), "i64": (-(2**63), 2**63 - 1)}
_FLOAT_MAX = {"f32": 3.4028234663852886e38, "f64": sys.float_info.max}
_FLOATS = tuple(_FLOAT_MAX)


class Validated(NamedTuple):
    request: WasmExecRequested
    fingerprint: str
    """sha256 of the canonical request (resolved CID, entrypoint, inputs, effective policy)."""
    explicit_key: bool
    name: GlyphName | None
    """The glyph name the request used; accepting checks it still names `request.cid`."""
    owner: str
    """The module's owner, for authorization."""
    explicit: frozenset[str] = frozenset()
    """The policy limits the body set (a session's budget refuses those over what remains,
    and lowers the others)."""
    memo: memo.MemoKey | None = None
    """A `memoize` request of a memoizable module: its computation (relay.memo)."""
    callback: Callback | None = None
    """Where its events are delivered (relay.webhooks): kept with its record at acceptance."""


async def validate(body: bytes, header_key: str | None, principal: str,
                   modules: ModuleStore, environs: environments.Environments,
                   settings: Settings, caps: PrincipalCaps,
                   session: Session | None = None) -> Validated:
    """Raises InvalidRequest (400) or NotFound (404, unknown module); for a call on `session`
    also SessionExhausted (409). See `validate_request`."""
    if session is not None:
        call = decode_body(decode_session_call, body)
        request = ExecuteRequest(cid=session.cid, entrypoint=call.entrypoint, inputs=call.inputs,
                                 policy=call.policy, idempotency_key=call.idempotency_key,
                                 callback_url=call.callback_url,
                                 callback_events=call.callback_events,
                                 step_gas=call.step_gas,
                                 environment=session.fields.get("environment") or None,
                                 priority=call.priority)
    else:
        request = decode_body(decode_execute_request, body)
    return await validate_request(request, header_key, principal, modules, environs, settings,
                                  caps, session)


async def validate_request(request: ExecuteRequest, header_key: str | None, principal: str,
                           modules: ModuleStore, environs: environments.Environments,
                           settings: Settings, caps: PrincipalCaps,
                           session: Session | None = None) -> Validated:
    """An execute request, decoded (an execute's body, a batch's item, a session's call in
    the session's environment), checked against its module, its environment and the limits.
    Raises InvalidRequest (400) or NotFound (404, unknown module); for a call on `session`
    also SessionExhausted (409).

    `caps` are the principal's own ceilings: a value over them is refused like one over the
    deployment's or the environment's, never clamped; an omitted value takes the default
    lowered to them.
    """
    if header_key is not None and not 1 <= len(header_key) <= _MAX_KEY_LENGTH:
        raise InvalidRequest(f"the Idempotency-Key header must have 1 to {_MAX_KEY_LENGTH} "
                             "characters")
    if header_key is not None and request.idempotency_key not in (None, header_key):
        raise InvalidRequest.at("/idempotency_key",
                                "the Idempotency-Key header and idempotency_key differ")
    key = request.idempotency_key or header_key
    cid, name = await modules.resolve(request.cid)
    stored = await modules.stored(cid)
    if stored is None:
        raise NotFound(f"no module {cid}", errors=[FieldError("/cid", "no module with this CID")])
    info = stored.info
    environment = await environs.resolve(request.environment)
    check_environment(environment.run, info)
    _check_depth(request.inputs)
    entrypoint = _entrypoint(info, request.entrypoint)
    if not runs_as_command(info, entrypoint):
        _check_results(info, entrypoint)
        _check_inputs(info, entrypoint, request.inputs)
    policy = _effective_policy(request, settings, caps, environment.environment.policy)
    check_priority(request.priority, caps)
    explicit = frozenset(field for field in ("max_gas", "max_time")
                         if getattr(request.policy, field) is not None)
    session_id = None
    if session is not None:
        session_id = session.session_id
        policy = _within_budget(policy, explicit, session)
    fingerprint = idempotency.fingerprint(cid, entrypoint, request.inputs, policy, session_id,
                                          request.step_gas, request.memoize,
                                          _fingerprinted(environment.run),
                                          priority=request.priority)
    callback = await check_callback(request.callback_url, request.callback_events, "execution",
                                    allow_http=settings.webhook_allow_http,
                                    allow_private=settings.webhook_allow_private)
    if callback is not None:  # not otherwise: v1 requests keep their fingerprints
        fingerprint = fingerprinted(fingerprint, callback)
    if session is None:
        request_id = idempotency.request_id(principal, key or fingerprint)
    else:  # a call without a key is new work, every time
        request_id = (idempotency.request_id(principal, key, scope=session.session_id)
                      if key else secrets.token_hex(32))
    published = WasmExecRequested(
        request_id=request_id, cid=cid, entrypoint=entrypoint, inputs=request.inputs,
        policy=policy, user_id=principal, timestamp=now_iso(), session_id=session_id,
        step_gas=request.step_gas, memoize=True if request.memoize else msgspec.UNSET,
        environment=environment.run,
    )
    if request.priority != "normal":  # left out for normal: a v1 request's entry is unchanged
        published.priority = request.priority
    memo_key = None
    if request.memoize and memoizable(info):
        memo_key = memo.MemoKey(memo.digest(cid, entrypoint, request.inputs,
                                            environments.tag(environment.run)),
                                None if settings.memo_scope == "global" else principal)
    return Validated(published, fingerprint, key is not None, name, stored.owner, explicit,
                     memo_key, callback)


def check_environment(environment: RunEnvironment, info: ModuleInfo) -> None:
    """Raises InvalidRequest (pointer `/environment`) when the module imports WASI calls the
    environment does not offer."""
    problem = environments.refusal(environment, info)
    if problem is not None:
        raise InvalidRequest.at("/environment", problem)


def check_priority(priority: Priority, caps: PrincipalCaps) -> None:
    """Raises InvalidRequest (pointer `/priority`) over the principal's `max_priority`."""
    if PRIORITIES.index(priority) < PRIORITIES.index(caps.max_priority):
        raise InvalidRequest.at("/priority", f"priority {priority!r} is over your ceiling of "
                                f"{caps.max_priority!r}")


def _fingerprinted(environment: RunEnvironment) -> str | None:
    """The environment as the idempotency fingerprint has it: None for the one v1 ran every
    execution in, so v1 requests keep their fingerprints."""
    return (None if (environment.name, environment.version) == environments.V1
            else environments.tag(environment))


def _within_budget(policy: EffectivePolicy, explicit: frozenset[str],
                   session: Session) -> EffectivePolicy:
    """The policy a session call runs under: omitted gas and time lowered to what the session's
    budget still allows. Raises SessionExhausted when nothing remains, or an explicit value is
    over it (the accept script checks again, atomically; the executor clamps at the start)."""
    if session.exhausted:
        raise SessionExhausted(f"session {session.session_id} has used its budget; raise it "
                               "with PATCH /sessions/{id}")
    remaining = session.remaining
    lowered = {}
    for field, left in (("max_gas", remaining.gas), ("max_time", remaining.time)):
        asked = getattr(policy, field)
        if left is None or asked <= left:
            continue
        if field in explicit:
            raise SessionExhausted(f"{field} {asked} is over what the session's budget has "
                                   f"left ({left})",
                                   errors=[FieldError(f"/policy/{field}",
                                                      f"at most {left} remains")])
        lowered[field] = left
    return msgspec.structs.replace(policy, **lowered) if lowered else policy


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body, refusing with 413 as soon as it is known to exceed `limit_bytes`: from
    Content-Length before reading anything, or while streaming a body sent without one."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLarge(f"the body is over the limit of {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_name(what: str, value: str) -> None:
    """Raises InvalidRequest unless `value` is a valid glyph name (or tag: `what`)."""
    if not is_name(value):
        raise InvalidRequest(f"a {what} matches {NAME_RULE}")


def _entrypoint(info: ModuleInfo, requested: str | None) -> str:
    names = [export.name for export in info.exports]
    if requested is not None:
        if requested not in names:
            raise InvalidRequest.at("/entrypoint", f"the module exports no function {requested!r}"
                                    f" (it exports: {', '.join(names) or 'none'})")
        return requested
    if "main" in names:
        return "main"
    if len(names) == 1:
        return names[0]
    if info.wasi:
        return "_start"
    raise InvalidRequest.at("/entrypoint", "the module has no default entrypoint (no `main`, "
                            f"several exports: {', '.join(names) or 'none'}); name one")


def _check_inputs(info: ModuleInfo, entrypoint: str, inputs: list[Any]) -> None:
    signature = next(export for export in info.exports if export.name == entrypoint)
    if len(inputs) != len(signature.params):
        raise InvalidRequest.at("/inputs", f"{entrypoint} takes {len(signature.params)} "
                                f"inputs ({', '.join(signature.params)}), got {len(inputs)}")
    errors = [
        FieldError(f"/inputs/{index}", problem)
        for index, (kind, value) in enumerate(zip(signature.params, inputs, strict=True))
        if (problem := _input_problem(kind, value)) is not None
    ]
    if errors:
        raise InvalidRequest(errors[0].detail, errors=errors)


def _check_depth(inputs: list[Any]) -> None:
    """Raises InvalidRequest for inputs nested deeper than the body may be (MAX_JSON_DEPTH: the
    body's object and its `inputs` array are two of those levels). Walked without recursion,
    so no depth can overflow a stack here or later, when the request is encoded again."""
    level: list[Any] = [inputs]
    depth = 2
    while level:
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest.at("/inputs", f"the body is nested deeper than "
                                    f"{MAX_JSON_DEPTH} levels")
        level = [child for value in level
                 for child in (value.values() if isinstance(value, dict) else value)
                 if isinstance(child, (list, dict))]
        depth += 1


def _check_results(info: ModuleInfo, entrypoint: str) -> None:
    """Raises InvalidRequest unless every result of `entrypoint` can be written as JSON:
    numbers can; references (`funcref`, `externref`) and `v128` cannot."""
    signature = next(export for export in info.exports if export.name == entrypoint)
    unfit = [kind for kind in signature.results if kind not in _INT_RANGES and
             kind not in _FLOATS]
    if unfit:
        raise InvalidRequest.at("/entrypoint", f"{entrypoint} returns {', '.join(unfit)}, "
                                "which cannot be returned as JSON; only i32, i64, f32 and f64 "
                                "results can")


def _input_problem(kind: str, value: Any) -> str | None:
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        if type(value) is not int:
            return f"expected an integer for {kind}, got {_json_type(value)}"
        if not low <= value <= high:
            return f"{value} is out of the {kind} range [{low}, {high}]"
        return None
    if kind in _FLOATS:
        if type(value) not in (int, float):
            return f"expected a number for {kind}, got {_json_type(value)}"
        if not (-_FLOAT_MAX[kind] <= value <= _FLOAT_MAX[kind]):
            return f"{value} is out of the {kind} range"
        return None
    return f"parameters of type {kind} cannot be passed from JSON"


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", float: "a non-integer number", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _effective_policy(request: ExecuteRequest, settings: Settings, caps: PrincipalCaps,
                      environment: EnvironmentPolicy) -> EffectivePolicy:
    """The limits a request runs under: each asked value (or the default) within the
    deployment's ceiling, the environment's cap and the principal's cap."""
    limits = {  # name: (asked, default, deployment ceiling, principal's cap)
        "max_gas": (request.policy.max_gas, settings.default_max_gas, settings.max_gas,
                    caps.max_gas),
        "max_memory": (request.policy.max_memory, settings.default_max_memory_bytes,
                       settings.max_memory_bytes, caps.max_memory),
        "max_time": (request.policy.max_time, settings.default_max_time_ms,
                     settings.max_time_ms, caps.max_time),
        "max_stack": (request.policy.max_stack, settings.max_stack_bytes,
                      settings.max_stack_bytes, caps.max_stack),
    }
    errors = []
    effective = {}
    for name, (asked, default, ceiling, cap) in limits.items():
        pointer = f"/policy/{name}"
        fence = getattr(environment, name)
        if asked is not None and asked > ceiling:
            errors.append(FieldError(pointer, f"{asked} is over the ceiling of {ceiling}"))
        elif asked is not None and asked > fence:
            errors.append(FieldError(pointer, f"{asked} is over the environment's cap of "
                                     f"{fence}"))
        elif asked is not None and cap is not None and asked > cap:
            errors.append(FieldError(pointer, f"{asked} is over your cap of {cap}"))
        effective[name] = asked if asked is not None else min(default, fence, cap or default)
    if errors:
        raise InvalidRequest(errors[0].detail, errors=errors)
    return EffectivePolicy(**effective)


# Public for pipeline nodes (relay.gateway.routes.pipelines, relay.scheduler), each checked as
# an execute request, with references among its inputs checked once they are resolved.
entrypoint_of = _entrypoint
check_results = _check_results
check_depth = _check_depth
input_problem = _input_problem
effective_policy = _effective_policy
