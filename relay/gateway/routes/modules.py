"""`/modules` and `/names`: upload, list, describe, download and delete modules; glyph names."""

from __future__ import annotations

import re

import anyio
from starlette.requests import Request
from starlette.responses import Response

from relay.cid import InvalidCid, compute, normalize
from relay.errors import FieldError, InvalidRequest, NotFound, PayloadTooLarge, decode_body
from relay.gateway.http import json_response
from relay.gateway.state import Gateway, gateway_of
from relay.modules import MAX_PAGE_SIZE, InvalidModule, StoredModule, inspect, to_binary
from relay.pipeline.validate import check_name, read_body
from relay.policy import ModuleResource
from relay.schemas import NameBound, NameTags, decode_name_binding

DIGITS = re.compile(r"[0-9]{1,12}")  # str.isdigit() also takes "²", which int() refuses


async def upload_module(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_module_bytes)
    name = request.query_params.get("name")
    tag = request.query_params.get("tag") or "latest"
    if name is None and "tag" in request.query_params:
        raise InvalidRequest("a tag needs a name")
    if name is not None:  # refuse before storing anything
        await _check_bindable(gw, name, tag, principal)
    try:
        wasm = to_binary(body)
    except InvalidModule as exc:
        raise InvalidRequest(str(exc)) from None
    if len(wasm) > gw.settings.max_module_bytes:
        raise PayloadTooLarge(f"the compiled module is over {gw.settings.max_module_bytes} bytes")
    cid = compute(wasm)
    existing = await gw.modules.stored(cid)
    owner = existing.owner if existing else principal
    gw.authorizer.require(principal, "upload", ModuleResource(cid, name or "", owner))
    try:
        info = existing.info if existing else await anyio.to_thread.run_sync(inspect, wasm)
    except InvalidModule as exc:
        raise InvalidRequest(str(exc)) from None
    created = await gw.modules.put(info, wasm, principal)
    if name is not None:
        await _bind(gw, name, tag, info.cid, principal)
    return json_response(info, 201 if created else 200, {"Location": f"/modules/{info.cid}"})


async def list_modules(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cursor = _query_int(request, "cursor", 0, 0, 2**31)
    limit = _query_int(request, "limit", 50, 1, MAX_PAGE_SIZE)

    def visible(cid: str, stored: StoredModule) -> bool:
        return gw.authorizer.permits(principal, "execute", ModuleResource(cid, "", stored.owner))

    return json_response(await gw.modules.page(cursor, limit, visible))


async def get_module(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cid = _path_cid(request)
    gw.authorizer.require(principal, "execute", await gw.authorizer.module(cid))
    return json_response(await gw.modules.info(cid))


async def get_module_wasm(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cid = _path_cid(request)
    gw.authorizer.require(principal, "execute", await gw.authorizer.module(cid))
    wasm = await gw.modules.wasm(cid)
    if wasm is None:
        raise NotFound(f"no module {cid}")
    return Response(wasm, media_type="application/wasm")


async def delete_module(request: Request) -> Response:
    """Its owner may delete a module, and whoever the policies grant `admin` on it."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cid = _path_cid(request)
    resource = await gw.authorizer.module(cid)
    if resource.owner != principal:
        gw.authorizer.require(principal, "admin", resource)
    await gw.modules.delete(cid)
    return Response(status_code=204)


async def bind_name(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    binding = decode_body(decode_name_binding, body)
    try:
        cid = normalize(binding.cid)
    except InvalidCid as exc:
        raise InvalidRequest.at("/cid", str(exc)) from None
    name, tag = request.path_params["name"], request.path_params["tag"]
    await _check_bindable(gw, name, tag, principal)
    stored = await gw.modules.stored(cid)
    if stored is None:
        raise NotFound(f"no module {cid}", errors=[FieldError("/cid", "no module with this CID")])
    gw.authorizer.require(principal, "upload", ModuleResource(cid, name, stored.owner))
    await _bind(gw, name, tag, cid, principal)
    return json_response(NameBound(name=name, tag=tag, cid=cid))


async def get_name(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    gw.authorizer.require(principal, "execute", None)
    name = request.path_params["name"]
    check_name("name", name)
    return json_response(NameTags(name=name, tags=await gw.modules.tags(name)))


async def _check_bindable(gw: Gateway, name: str, tag: str, principal: str) -> None:
    """Raises InvalidRequest for a malformed name or tag, Forbidden for another's name."""
    check_name("name", name)
    check_name("tag", tag)
    gw.authorizer.require_name(principal, name, await gw.modules.name_owner(name))


async def _bind(gw: Gateway, name: str, tag: str, cid: str, principal: str) -> None:
    if not await gw.modules.bind(name, tag, cid, principal):
        raise gw.authorizer.name_taken(name)  # another principal bound it first, just now


def _path_cid(request: Request) -> str:
    try:
        return normalize(request.path_params["cid"])
    except InvalidCid as exc:
        raise InvalidRequest(str(exc)) from None


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)
