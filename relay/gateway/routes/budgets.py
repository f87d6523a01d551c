"""`/budgets`: limits on a principal's use per window, and what a window has used.

A budget is visible to its principal and its creator (404 to everyone else); only its creator
may change or delete it (relay.budgets). Naming another principal needs `Action::"admin"`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.budgets import BudgetStore
from relay.errors import InvalidRequest, decode_body
from relay.gateway.http import json_response, list_limit
from relay.gateway.state import Gateway, gateway_of
from relay.pipeline.validate import read_body
from relay.principals import RULE, is_principal
from relay.schemas import BudgetRequest, decode_budget_request


async def create_budget(request: Request) -> Response:
    """authenticate (401) → the body (413, 400) → naming another principal: admin (403) →
    the principal's number of budgets (403), unless an administrator sets it a quota."""
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    body = await _body(request, gw)
    principal = body.principal or caller
    if principal != caller:
        gw.authorizer.require(caller, "admin", None)
    budget = await _store(gw).create(
        caller, principal, body, gw.settings.max_budgets if principal == caller else None)
    return json_response(budget, 201, {"Location": f"/budgets/{budget.budget_id}"})


async def list_budgets(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    limit = list_limit(request)
    return json_response(await _store(gw).page(caller, request.query_params.get("cursor"),
                                               limit))


async def get_budget(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    return json_response(await _store(gw).get(caller, request.path_params["budget_id"]))


async def replace_budget(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    body = await _body(request, gw)
    return json_response(await _store(gw).replace(caller, request.path_params["budget_id"],
                                                  body))


async def delete_budget(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    await _store(gw).delete(caller, request.path_params["budget_id"])
    return Response(status_code=204)


async def get_usage(request: Request) -> Response:
    gw = gateway_of(request)
    caller = await gw.authenticate(request)
    return json_response(await _store(gw).usage(caller, request.path_params["budget_id"]))


async def _body(request: Request, gw: Gateway) -> BudgetRequest:
    body = decode_body(decode_budget_request,
                       await read_body(request, gw.settings.max_request_bytes))
    if body.principal is not None and not is_principal(body.principal):
        raise InvalidRequest.at("/principal", f"a principal's name has {RULE}")
    return body


def _store(gw: Gateway) -> BudgetStore:
    # Two references: cheaper to make per request than to add to the Gateway container.
    return BudgetStore(gw.client, gw.keys)
