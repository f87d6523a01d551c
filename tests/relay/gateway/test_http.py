"""HTTP plumbing: a crash inside a route still answers problem+json with the correlation id; a
response reaches the client in one segment."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.gateway.http import RequestIdMiddleware
from relay.settings import Settings
from tests.conftest import read_response, serve


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


TCP_INFO_DATA_SEGS_IN = 152
"""Offset of `tcpi_data_segs_in` in Linux's struct tcp_info: segments that carried data."""


def exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes, int]:
    """Send `request` on a new connection: the response's status, headers and body, and the
    number of TCP segments with data it came in."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        status, headers, body = read_response(sock, head_only=request.startswith(b"HEAD"))
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        (segments,) = struct.unpack_from("I", info, TCP_INFO_DATA_SEGS_IN)
    return status, headers, body, segments


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's TCP_INFO")
async def test_a_response_of_known_length_comes_in_one_segment(settings: Settings) -> None:
    # Head and body written apart are two sends and two segments (and two wake-ups of the
    # client); written together, one. HEAD has no body to carry its head: it is not held.
    async with serve(settings) as served:
        status, headers, body, segments = await asyncio.to_thread(
            exchange, served.url, b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert status == 200 and "x-request-id" in headers
        assert json.loads(body) == {"status": "ok"}
        assert segments == 1
        status, headers, _, _ = await asyncio.to_thread(
            exchange, served.url, b"HEAD /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert status == 200 and headers["content-length"] == "15"
