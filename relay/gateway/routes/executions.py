"""`/executions/{request_id}`: an execution's state; cancel, pause, resume and step it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.errors import decode_body
from relay.gateway.http import json_response
from relay.gateway.state import gateway_of
from relay.pipeline.validate import read_body
from relay.schemas import Action, decode_resume, decode_step


async def get_execution(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(await gw.controller.state(principal, request.path_params["request_id"]))


async def cancel_execution(request: Request) -> Response:
    return await _control(request, "cancel")


async def pause_execution(request: Request) -> Response:
    return await _control(request, "pause")


async def resume_execution(request: Request) -> Response:
    return await _control(request, "resume")


async def step_execution(request: Request) -> Response:
    """200 with the state once the step has stopped (paused again, or finished), 202 with the
    state so far if it has not within RELAY_SYNC_WAIT."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    gas = decode_body(decode_step, body).gas if body.strip() else None
    stopped, state = await gw.controller.step(principal, request.path_params["request_id"], gas,
                                              gw.settings.sync_wait_ms / 1000)
    return json_response(state, 200 if stopped else 202)


async def _control(request: Request, action: Action) -> Response:
    """200 with the state once the executor confirmed, 202 with the state so far if it has not
    within a few seconds."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    additional_gas = 0
    if action == "resume":
        body = await read_body(request, gw.settings.max_request_bytes)
        if body.strip():
            additional_gas = decode_body(decode_resume, body).additional_gas
    confirmed, state = await gw.controller.act(principal, request.path_params["request_id"],
                                               action, additional_gas)
    return json_response(state, 200 if confirmed else 202)
