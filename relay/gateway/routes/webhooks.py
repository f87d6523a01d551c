"""`/webhooks/secret` and the delivery logs (relay.webhooks; sent by relay.deliverer).

`GET /webhooks/secret` answers the principal's signing secret (made at its first callback, or
here if it has none yet); `POST` rotates it and answers the new one, the only time it is shown
before the next GET. `GET /executions/{id}/deliveries` and `/pipelines/{id}/deliveries` list
every attempt; another principal's execution or pipeline is 404, as everywhere.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.errors import NotFound
from relay.gateway.http import json_response, list_limit, list_offset
from relay.gateway.state import Gateway, gateway_of
from relay.webhooks import DeliveryPage, Kind, WebhookSecret


async def get_secret(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(WebhookSecret(await gw.webhooks.secret(principal)))


async def rotate_secret(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(WebhookSecret(await gw.webhooks.rotate(principal)))


async def execution_deliveries(request: Request) -> Response:
    return await _deliveries(request, "execution", request.path_params["request_id"])


async def pipeline_deliveries(request: Request) -> Response:
    return await _deliveries(request, "pipeline", request.path_params["pipeline_id"])


async def _deliveries(request: Request, kind: Kind, owner_id: str) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    offset, limit = list_offset(request), list_limit(request)
    owner, items = await gw.webhooks.log(kind, owner_id, offset, limit)
    if owner is None:  # nothing delivered yet: known only by its own record
        owner = await _owner(gw, kind, owner_id)
    if owner != principal:
        raise NotFound(f"no {kind} {owner_id}")
    more = len(items) > limit
    return json_response(DeliveryPage(items=items[:limit],
                                     next_cursor=str(offset + limit) if more else None))


async def _owner(gw: Gateway, kind: Kind, owner_id: str) -> str | None:
    key = gw.keys.execution(owner_id) if kind == "execution" else gw.keys.pipeline(owner_id)
    found = await gw.client.hget(key, "principal")
    return None if found is None else str(found.decode())
