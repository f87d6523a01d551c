"""Validation: turn a body into a publishable `wasm_exec_requested`, or a 400 with pointers.

Everything is checked before anything is queued: the JSON shape (msgspec), the CID or name, the
entrypoint and each input against the module's stored signature, and the policy against the
defaults and ceilings.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any, NamedTuple

import msgspec

from relay.cid import GlyphName
from relay.errors import FieldError, InvalidRequest, NotFound, pointer_from_msgspec
from relay.modules import ModuleStore
from relay.schemas import (
    EffectivePolicy,
    ExecuteRequest,
    ModuleInfo,
    WasmExecRequested,
    decode_execute_request,
    encode,
    now_iso,
)
from relay.settings import Settings

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


def parse(body: bytes) -> ExecuteRequest:
    """Decode the body. Raises InvalidRequest with a JSON pointer to the first problem."""
    try:
        return decode_execute_request(body)
    except msgspec.ValidationError as exc:
        pointer, detail = pointer_from_msgspec(str(exc))
        raise InvalidRequest.at(pointer, detail) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest.at("", f"the body is not valid JSON: {exc}") from None


async def validate(body: bytes, header_key: str | None, principal: str,
                   modules: ModuleStore, settings: Settings) -> Validated:
    """Raises InvalidRequest (400) or NotFound (404, unknown module)."""
    request = parse(body)
    if header_key is not None and not 1 <= len(header_key) <= _MAX_KEY_LENGTH:
        raise InvalidRequest(f"the Idempotency-Key header must have 1 to {_MAX_KEY_LENGTH} "
                             "characters")
    if header_key is not None and request.idempotency_key not in (None, header_key):
        raise InvalidRequest.at("/idempotency_key",
                                "the Idempotency-Key header and idempotency_key differ")
    key = request.idempotency_key or header_key
    cid, name = await modules.resolve(request.cid)
    info = await modules.info(cid)
    if info is None:
        raise NotFound(f"no module {cid}", errors=[FieldError("/cid", "no module with this CID")])
    entrypoint = _entrypoint(info, request.entrypoint)
    if not (info.wasi and entrypoint == "_start"):
        _check_inputs(info, entrypoint, request.inputs)
    policy = _effective_policy(request, settings)
    fingerprint = hashlib.sha256(encode(
        {"cid": cid, "entrypoint": entrypoint, "inputs": request.inputs, "policy": policy}
    )).hexdigest()
    request_id = _request_id(principal, key or fingerprint)
    published = WasmExecRequested(
        request_id=request_id, cid=cid, entrypoint=entrypoint, inputs=request.inputs,
        policy=policy, user_id=principal, timestamp=now_iso(),
    )
    return Validated(published, fingerprint, key is not None, name)


def _request_id(principal: str, key: str) -> str:
    # Length-prefixed, so no (principal, key) pair can collide with another.
    return hashlib.sha256(f"{len(principal)}:{principal}{key}".encode()).hexdigest()


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


def _effective_policy(request: ExecuteRequest, settings: Settings) -> EffectivePolicy:
    limits = {
        "max_gas": (request.policy.max_gas, settings.default_max_gas, settings.max_gas),
        "max_memory": (request.policy.max_memory, settings.default_max_memory_bytes,
                       settings.max_memory_bytes),
        "max_time": (request.policy.max_time, settings.default_max_time_ms,
                     settings.max_time_ms),
    }
    errors = [
        FieldError(f"/policy/{name}", f"{asked} is over the ceiling of {ceiling}")
        for name, (asked, _, ceiling) in limits.items()
        if asked is not None and asked > ceiling
    ]
    if errors:
        raise InvalidRequest(errors[0].detail, errors=errors)
    return EffectivePolicy(**{name: asked if asked is not None else default
                              for name, (asked, default, _) in limits.items()})
