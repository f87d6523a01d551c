"""`/modules` and `/names`: upload, list, describe, download and delete modules; glyph names."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.cid import InvalidCid, compute, normalize
from relay.errors import (
    Conflict,
    FieldError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RelayError,
    decode_body,
)
from relay.gateway.http import json_response, query_int
from relay.gateway.state import Gateway, gateway_of
from relay.modules import MAX_PAGE_SIZE, InvalidModule, StoredModule, inspect, to_binary
from relay.pipeline.ratelimit import RateCheck
from relay.pipeline.validate import check_name, read_body
from relay.policy import ModuleResource
from relay.schemas import NameBound, NameTags, decode_name_binding


async def upload_module(request: Request) -> Response:
    """authenticate (401) → rate limit (429, counted apart from execute) → name and tag (400) →
    may the caller upload at all (403) → a free upload slot (503) → the body (413) → parse and
    validate, off the event loop (400) → may it upload this module (403) → store within its
    quota (403) → bind the name."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    limits = await RateCheck(gw.pipeline.rate_limiter, principal, gw.metrics,
                             scope="upload").headers()
    try:
        response = await _upload(request, gw, principal)
    except RelayError as error:
        error.headers.update(limits)
        raise
    response.headers.update(limits)
    return response


async def _upload(request: Request, gw: Gateway, principal: str) -> Response:
    settings = gw.settings
    name = request.query_params.get("name")
    tag = request.query_params.get("tag") or "latest"
    if name is None and "tag" in request.query_params:
        raise InvalidRequest("a tag needs a name")
    if name is not None:  # refuse before storing anything
        await _check_bindable(gw, name, tag, principal)
    # Before reading or parsing anything: may the caller upload a module of its own (its CID is
    # not known yet, so the resource has none)? Checked again on the module below.
    gw.authorizer.require(principal, "upload", ModuleResource("", name or "", principal))
    slots = gw.uploads
    async with slots.take():
        body = await read_body(request, settings.max_module_bytes)
        try:
            wasm = await slots.run(to_binary, body)
        except InvalidModule as exc:
            raise InvalidRequest(str(exc)) from None
        del body  # a WAT text can be several times its binary's size
        if len(wasm) > settings.max_module_bytes:
            raise PayloadTooLarge(f"the compiled module is over {settings.max_module_bytes} "
                                  "bytes")
        cid = compute(wasm)
        existing = await gw.modules.stored(cid)
        owner = existing.owner if existing else principal
        gw.authorizer.require(principal, "upload", ModuleResource(cid, name or "", owner))
        try:
            info = existing.info if existing else await slots.run(inspect, wasm)
        except InvalidModule as exc:
            raise InvalidRequest(str(exc)) from None
        caps = gw.policies.caps(principal)
        created = await gw.modules.put(
            info, wasm, principal, max_modules=caps.max_modules or settings.max_modules,
            max_bytes=caps.max_module_storage or settings.max_module_storage_bytes)
    if name is not None:
        await _bind(gw, name, tag, info.cid, principal)
    return json_response(info, 201 if created else 200, {"Location": f"/modules/{info.cid}"})


async def list_modules(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cursor = query_int(request, "cursor", 0, 0, 2**31)
    limit = query_int(request, "limit", 50, 1, MAX_PAGE_SIZE)

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
    """Its owner may delete a module, and whoever the policies grant `admin` on it; not while a
    glyph name points at it (409, naming them), nor while a live session or snapshot uses it
    (409)."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cid = _path_cid(request)
    owner = await gw.modules.owner(cid)  # never a cached one: it may have been re-uploaded
    if owner is None:
        raise NotFound(f"no module {cid}")
    if owner != principal:
        gw.authorizer.require(principal, "admin", ModuleResource(cid, "", owner))
    if await gw.modules.delete(cid, owner) is not None:
        raise Conflict("the module was deleted and uploaded again meanwhile; retry")
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
