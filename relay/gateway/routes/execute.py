"""`POST /intent/execute-wasm`: the pipeline admits the request; `answers` answers it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.gateway.answers import answer
from relay.gateway.state import gateway_of


async def execute(request: Request) -> Response:
    gw = gateway_of(request)
    return await answer(gw, await gw.pipeline.admit(request))
