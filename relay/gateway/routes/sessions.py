"""`/sessions`: stateful instances of a module, and their calls.

A call goes through the execute pipeline (`ExecutePipeline.admit` with the session) and is
answered as an execute is; the session's own routes read and change its record
(relay.sessions). Another principal's session is 404 on every route.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request
from starlette.responses import Response

from relay.capture import why_not_capturable
from relay.errors import Conflict, FieldError, InvalidRequest, NotFound, RelayError, decode_body
from relay.gateway.answers import answer
from relay.gateway.http import json_response, list_limit, list_offset
from relay.gateway.state import Gateway, gateway_of
from relay.pipeline.validate import check_environment, read_body
from relay.policy import ModuleResource
from relay.schemas import (
    Action,
    SessionPage,
    SessionView,
    decode_create_session,
    decode_patch_session,
    decode_resume,
    decode_step,
    now_iso,
)
from relay.sessions import Session

CANCEL_CONCURRENCY = 16
"""Calls a close cancels at once (each takes a Redis connection for a few round trips)."""


async def create_session(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = decode_body(decode_create_session,
                       await read_body(request, gw.settings.max_request_bytes))
    environment = await gw.environments.resolve(body.environment)
    cid, name = await gw.modules.resolve(body.cid)
    stored = await gw.modules.stored(cid)
    if stored is None:
        raise NotFound(f"no module {cid}", errors=[FieldError("/cid", "no module with this CID")])
    check_environment(environment.run, stored.info)
    gw.authorizer.require(principal, "execute",
                          ModuleResource(cid, name.name if name else "", stored.owner))
    await _check_capturable(gw, cid)
    session_id = await gw.sessions.create(
        principal, cid, budget=body.budget, ttl_ms=body.ttl,
        environment=environment.environment.name,
        created_at=now_iso())
    view = await _view(gw, principal, session_id)
    return json_response(view, 201, {"Location": view.links.self_})


async def list_sessions(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cursor = list_offset(request)
    limit = list_limit(request)
    items, next_cursor = await gw.sessions.page(principal, cursor, limit)
    return json_response(SessionPage(
        items=items, next_cursor=None if next_cursor is None else str(next_cursor)))


async def get_session(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(await _view(gw, principal, request.path_params["session_id"]))


async def patch_session(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = decode_body(decode_patch_session,
                       await read_body(request, gw.settings.max_request_bytes))
    session_id = request.path_params["session_id"]
    await gw.sessions.set_budget(principal, session_id, body.budget)
    return json_response(await _view(gw, principal, session_id))


async def close_session(request: Request) -> Response:
    """Close it and cancel its unfinished calls (the running one where it runs), the last
    first, a few at a time: all at once, thousands of queued calls took every connection of
    the gateway's Redis pool, and the cancels that waited too long for one failed (503, and
    those calls ran after the close)."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    session_id = request.path_params["session_id"]
    await gw.sessions.close(principal, session_id)
    calls = await gw.sessions.unfinished(session_id)
    places = asyncio.Semaphore(CANCEL_CONCURRENCY)

    async def cancel(call: str) -> None:
        async with places:
            await _cancel(gw, principal, call)

    await asyncio.gather(*(cancel(call) for call in reversed(calls)))
    return json_response(await _view(gw, principal, session_id))


async def call_session(request: Request) -> Response:
    gw = gateway_of(request)
    admission = await gw.pipeline.admit(request, request.path_params["session_id"])
    return await answer(gw, admission)


async def pause_session(request: Request) -> Response:
    return await _control_current(request, "pause")


async def resume_session(request: Request) -> Response:
    """Resume the current call, with `{"additional_gas"}` as `POST /executions/{id}/resume`
    takes it (within what the session's budget has left)."""
    return await _control_current(request, "resume")


async def step_session(request: Request) -> Response:
    """Step the session's current call, as `POST /executions/{id}/step` does."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    gas = decode_body(decode_step, body).gas if body.strip() else None
    current = await _current(gw, principal, request.path_params["session_id"])
    stopped, state = await gw.controller.step(principal, current, gas,
                                              gw.settings.sync_wait_ms / 1000)
    return json_response(state, 200 if stopped else 202)


async def _control_current(request: Request, action: Action) -> Response:
    """Pause or resume the session's current call: as its own route does, 409 without one."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    additional_gas = 0
    if action == "resume":  # as POST /executions/{id}/resume: more gas, optionally
        body = await read_body(request, gw.settings.max_request_bytes)
        if body.strip():
            additional_gas = decode_body(decode_resume, body).additional_gas
    current = await _current(gw, principal, request.path_params["session_id"])
    confirmed, state = await gw.controller.act(principal, current, action, additional_gas)
    return json_response(state, 200 if confirmed else 202)


async def _current(gw: Gateway, principal: str, session_id: str) -> str:
    """The request id of the principal's session's current call. Raises NotFound, Conflict."""
    await gw.sessions.owned(principal, session_id)
    current = await gw.sessions.current(session_id)
    if current is None:
        raise Conflict(f"session {session_id} has no call running")
    return current


async def _cancel(gw: Gateway, principal: str, request_id: str) -> None:
    with contextlib.suppress(RelayError):  # finished meanwhile
        await gw.controller.act(principal, request_id, "cancel")


async def _view(gw: Gateway, principal: str, session_id: str) -> SessionView:
    session: Session = await gw.sessions.owned(principal, session_id)
    return await gw.sessions.view(session)


_CAPTURABLE: dict[str, str | None] = {}
"""Module CID -> why a session cannot hold it (None: it can); CIDs name immutable bytes."""


async def _check_capturable(gw: Gateway, cid: str) -> None:
    """Raises InvalidRequest (pointer /cid) for a module whose state a session could not
    capture whole, or a WASI command."""
    stored = await gw.modules.stored(cid)
    if stored is not None and (stored.info.wasi
                               or any(e.name == "_start" for e in stored.info.exports)):
        raise InvalidRequest.at("/cid", "the module is a WASI command (it exports _start): a "
                                "session needs a module whose exports it calls")
    if cid not in _CAPTURABLE:
        wasm = await gw.modules.wasm(cid)
        if wasm is None:
            raise NotFound(f"no module {cid}")
        _CAPTURABLE[cid] = await asyncio.to_thread(why_not_capturable, wasm)
    reason = _CAPTURABLE[cid]
    if reason is not None:
        raise InvalidRequest.at("/cid", f"a session cannot hold this module: {reason}")
