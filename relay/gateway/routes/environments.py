"""`/environments`: named presets of limits and WASI capabilities (relay.environments).

Any principal may read them (it names them in its requests); creating, changing and deleting
one needs `Action::"admin"`, checked before the body is read.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.errors import decode_body
from relay.gateway.http import json_response, list_limit, list_offset
from relay.gateway.state import gateway_of
from relay.pipeline.validate import read_body
from relay.schemas import decode_environment_request


async def list_environments(request: Request) -> Response:
    gw = gateway_of(request)
    await gw.authenticate(request)
    cursor = list_offset(request)
    return json_response(await gw.environments.page(cursor, list_limit(request)))


async def get_environment(request: Request) -> Response:
    gw = gateway_of(request)
    await gw.authenticate(request)
    return json_response(await gw.environments.get(request.path_params["environment"]))


async def put_environment(request: Request) -> Response:
    """authenticate (401) → admin (403) → the body (413, 400) → a stale `version` (409)."""
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    gw.authorizer.require(caller, "admin", None)
    body = decode_body(decode_environment_request,
                       await read_body(request, gw.settings.max_request_bytes))
    return json_response(await gw.environments.put(request.path_params["environment"], body))


async def delete_environment(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    gw.authorizer.require(caller, "admin", None)
    await gw.environments.delete(request.path_params["environment"])
    return Response(status_code=204)
