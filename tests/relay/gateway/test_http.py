"""HTTP plumbing: a crash inside a route still answers problem+json with the correlation id."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.gateway.http import RequestIdMiddleware


async def crash(request: Request) -> Response:
    raise RuntimeError("boom")


async def test_unhandled_error_is_a_500_problem_with_the_request_id() -> None:
    # Placed as create_app places it: inside Starlette's own ServerErrorMiddleware.
    app = Starlette(routes=[Route("/crash", crash)], middleware=[Middleware(RequestIdMiddleware)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        response = await client.get("/crash", headers={"X-Request-Id": "trace-42"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "trace-42"
    body = response.json()
    assert body["type"] == "/problems/internal"
    assert body["request_id"] == "trace-42"
    assert "boom" not in response.text  # internals stay in the log
