"""The one place errors become what a client receives.

- HTTP: RFC 9457 `application/problem+json`, with the correlation id, from a `RelayError`, from
  Starlette's own HTTP errors (unknown route, wrong method) and from Redis being unreachable,
  stalled or full;
  an unexpected exception is a 500 problem (`send_internal_error`, called by the middleware
  that logs it: it sits inside Starlette's own error middleware, so the 500 carries the
  correlation id like every other response).
- WebSocket: before the socket streams, a close code of 4000 + the HTTP status; once it
  streams, a refused control message gets a `control_error` message and the socket stays open.
- SSE: errors before the stream starts are HTTP problems; once it has started nothing is written
  after the response began (the stream ends and the client resumes with Last-Event-ID).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
import redis
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from relay.connection import out_of_memory
from relay.errors import (
    Conflict,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RelayError,
    Unavailable,
)
from relay.schemas import ControlError, encode

log = logging.getLogger("relay.gateway")

PROBLEM_MEDIA_TYPE = "application/problem+json"
MAX_CLOSE_REASON = 120  # a close frame's reason must fit in 123 bytes
_STARLETTE_KINDS: dict[int, type[RelayError]] = {
    kind.status: kind for kind in (InvalidRequest, NotFound, MethodNotAllowed, Conflict,
                                   PayloadTooLarge)
}


def problem_body(error: RelayError, request_id: str | None) -> bytes:
    return encode(error.problem(request_id))


def request_id_of(request: Request) -> str | None:
    """The correlation id `relay.gateway.http.RequestIdMiddleware` gave the request."""
    request_id: str | None = request.scope.get("state", {}).get("request_id")
    return request_id


def problem_response(error: RelayError, request: Request) -> Response:
    return Response(problem_body(error, request_id_of(request)), error.status, error.headers,
                    media_type=PROBLEM_MEDIA_TYPE)


async def relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    return problem_response(exc, request)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = _STARLETTE_KINDS.get(exc.status_code, RelayError)
    detail = {404: f"no route {request.url.path}",
              405: f"{request.method} is not allowed here"}.get(exc.status_code, str(exc.detail))
    return problem_response(kind(detail, headers=dict(exc.headers or {})), request)


async def redis_error(request: Request, exc: Exception) -> Response:
    log.warning("redis unavailable: %s", exc)
    return problem_response(Unavailable("the store is unreachable; retry shortly"), request)


STORE_FULL_RETRY_S = 5


async def redis_refusal(request: Request, exc: Exception) -> Response:
    """Redis answered with an error. Out of memory: 503, nothing was written (a script refused
    at its first write), retry once memory is freed. Anything else is a bug of ours: 500."""
    if out_of_memory(exc):
        log.warning("redis is out of memory: %s", exc)
        return problem_response(Unavailable("the store is full; retry later",
                                            retry_after_s=STORE_FULL_RETRY_S), request)
    log.error("redis refused a command", exc_info=exc)
    return problem_response(RelayError("an internal error occurred; it has been logged"),
                            request)


async def send_internal_error(send: Send, request_id: str) -> None:
    error = RelayError("an internal error occurred; it has been logged")
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode())]})
    await send({"type": "http.response.body", "body": problem_body(error, request_id)})


HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    RelayError: relay_error,
    HTTPException: http_error,
    redis.ConnectionError: redis_error,
    redis.TimeoutError: redis_error,
    redis.ResponseError: redis_refusal,
}
"""The app's exception handlers."""


def close_code(error: RelayError) -> int:
    """The WebSocket close code for an error before streaming: 4401, 4403, 4404, ..."""
    return 4000 + error.status


async def close_with(ws: WebSocket, error: RelayError) -> None:
    await ws.close(close_code(error), error.detail[:MAX_CLOSE_REASON])


async def send_control_error(ws: WebSocket, error: RelayError | msgspec.DecodeError) -> None:
    """Answer a refused control message; the socket stays open."""
    if isinstance(error, RelayError):
        message = ControlError(status=error.status, detail=error.detail)
    else:
        message = ControlError(status=InvalidRequest.status, detail=(
            f'expected {{"action": "pause"|"resume"|"cancel"}}: {error}'))
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await ws.send_text(encode(message).decode())
