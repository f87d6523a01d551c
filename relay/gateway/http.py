"""HTTP plumbing: correlation ids and access logs, a response written in one go, JSON responses,
several methods on a path."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay import logs
from relay.errors import InvalidRequest
from relay.gateway.problems import send_internal_error
from relay.schemas import encode

log = logging.getLogger("relay.gateway")

SERVER_SEND = "relay.server_send"
"""Scope key of the HTTP server's own `send` (`relay.gateway.app.RelayApp` puts it there)."""

CLIENT_CLOSED = 499  # the status access logs use for "the client went away first"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    """Gives every HTTP response an `X-Request-Id` (the client's, if sane, else a new one),
    puts it in `scope["state"]["request_id"]` for errors and in the logs' context, and writes
    one access log line a request. Pure ASGI, so streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode(
            "latin-1")
        # Not secrets.token_hex: a correlation id needs to be unique, not unguessable, and the
        # system's randomness is a syscall a request.
        request_id = (offered if _CLIENT_REQUEST_ID.fullmatch(offered)
                      else f"{random.getrandbits(64):016x}")
        scope.setdefault("state", {})["request_id"] = request_id
        logs.request_id.set(request_id)
        header = (b"x-request-id", request_id.encode())
        status = 0
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = headers = [*message.get("headers", []), header]
                hold_head(scope, headers)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = status or CLIENT_CLOSED  # nobody to answer: not an error of ours
        except Exception:
            # Here rather than in Starlette's ServerErrorMiddleware, which sits outside this
            # one: the 500 then carries the correlation id like every other response.
            log.exception("unhandled error")
            if status:
                raise
            await send_internal_error(send_with_id, request_id)
        finally:
            if self.access_log:
                logs.log_access(scope["method"], scope["path"], status,
                                round((time.perf_counter() - began) * 1000, 3))


class _HeadHeld:
    """Stands in for uvicorn's transport while it writes a response's head: the head is held
    and goes out with the body, in one write. A head and a body written apart are two
    syscalls and two TCP segments, for server and client alike (a loopback send costs about
    5 µs of CPU: a tenth of a sync execute's HTTP cost)."""

    __slots__ = ("cycle", "head", "transport")

    def __init__(self, cycle: Any) -> None:
        self.cycle = cycle
        self.transport = cycle.transport
        self.head: bytes | None = None
        cycle.transport = self

    def write(self, data: bytes) -> None:
        if self.head is None:
            self.head = data
            return
        self.cycle.transport = self.transport
        self.transport.write(self.head + data)

    def __getattr__(self, name: str) -> Any:  # close(), is_closing()...: the transport's own
        return getattr(self.transport, name)


def hold_head(scope: Scope, headers: list[tuple[bytes, bytes]]) -> None:
    """Under uvicorn's httptools protocol (what `relay gateway` runs), have the head of a
    response of known length written with its body (see `_HeadHeld`). Not a streamed one
    (chunked): its head goes out at once, whenever its first chunk comes. A response that
    fails before its body closes the connection, as it would have, head or not."""
    cycle = getattr(scope.get(SERVER_SEND), "__self__", None)
    # Not for HEAD: uvicorn writes no body for it, so nothing would carry the head.
    if (getattr(cycle, "response_started", True) or scope["method"] == "HEAD"
            or not any(name == b"content-length" for name, _ in headers)
            or not hasattr(getattr(cycle, "transport", None), "write")):
        return
    _HeadHeld(cycle)


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None,
                  ) -> Response:
    content = body if isinstance(body, bytes) else encode(body)
    return Response(content, status_code, headers, media_type="application/json")


Endpoint = Callable[[Request], Awaitable[Response]]


def by_method(**handlers: Endpoint) -> Endpoint:
    """One endpoint for several methods of a path, so that a 405 lists them all in `Allow`
    (with a route a method, Starlette answers from the first route matching the path)."""
    async def endpoint(request: Request) -> Response:
        return await handlers["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


DIGITS = re.compile(r"[0-9]{1,12}")  # str.isdigit() also takes "²", which int() refuses


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """The query parameter `name` as an integer in [low, high] (`default` when absent).
    Raises InvalidRequest."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


LIST_LIMIT = 500
"""The most items one page of a v1.1 list endpoint holds (`?limit=`, default 50)."""


def list_limit(request: Request) -> int:
    """A v1.1 list endpoint's `?limit=`. Raises InvalidRequest."""
    return query_int(request, "limit", 50, 1, LIST_LIMIT)


def list_offset(request: Request) -> int:
    """A v1.1 list endpoint's `?cursor=`, where it is an offset. Raises InvalidRequest."""
    return query_int(request, "cursor", 0, 0, 2**31)
