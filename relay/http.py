"""HTTP plumbing: correlation ids, bounded bodies, JSON and problem+json responses."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay import logs
from relay.errors import PayloadTooLarge, RelayError, problem_body
from relay.schemas import encode

log = logging.getLogger("relay.gateway")
access = logging.getLogger("relay.access")

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
        request_id = offered if _CLIENT_REQUEST_ID.fullmatch(offered) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        logs.request_id.set(request_id)
        header = (b"x-request-id", request_id.encode())
        status = 0
        began = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
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
            error = RelayError("an internal error occurred; it has been logged")
            await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/problem+json")]})
            await send({"type": "http.response.body", "body": problem_body(error, request_id)})
        finally:
            if self.access_log:
                access.info("%s %s %d", scope["method"], scope["path"], status, extra={
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": round((time.perf_counter() - began) * 1000, 3)})


def request_id_of(request: Request) -> str | None:
    request_id: str | None = request.scope.get("state", {}).get("request_id")
    return request_id


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body, refusing with 413 as soon as it is known to exceed `limit_bytes`: from
    Content-Length before reading anything, or while streaming a body sent without one."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise PayloadTooLarge(f"the body is over the limit of {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None,
                  ) -> Response:
    content = body if isinstance(body, bytes) else encode(body)
    return Response(content, status_code, headers, media_type="application/json")


def problem_response(error: RelayError, request: Request) -> Response:
    return Response(problem_body(error, request_id_of(request)), error.status, error.headers,
                    media_type="application/problem+json")
