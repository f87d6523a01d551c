"""`POST /auth/tokens`: short-lived, subscribe-only tokens for event stream URLs."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.errors import Unauthenticated
from relay.gateway.http import json_response
from relay.gateway.state import gateway_of
from relay.schemas import AccessToken, rfc3339


async def mint_token(request: Request) -> Response:
    """A token for `?access_token=`, minted with normal credentials (never with a token)."""
    gw = gateway_of(request)
    if "access_token" in request.query_params:
        raise Unauthenticated("mint tokens with an API key or a bearer token, not a token")
    principal = await gw.authenticate(request)
    gw.authorizer.require(principal, "subscribe", None)
    token, expires_at = gw.tokens.mint(principal)
    return json_response(AccessToken(access_token=token,
                                     expires_at=rfc3339(expires_at, millis=False)))
