"""`GET /intent/execute-wasm/events`: Server-Sent Events.

Written by `EventStream`, a plain ASGI response rather than sse-starlette's: thousands of open
streams are what one gateway holds, and sse-starlette spends three tasks, a task group and a
timeout scope per send on each; `bench/bench_sse.py` measured 42 KiB and, at 5,000 streams, a
p99 of 0.8 s with it (see the README). Here a stream is the server's own task for the request
plus one small task watching for the client to leave, and once a stream has caught up, the
fan-in writes each event straight to its connection (`uvicorn_wire`) rather than waking that
task.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import cast

import redis
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from relay.errors import InvalidRequest
from relay.gateway.fanin import Entry, Subscriber, Wire
from relay.gateway.http import SERVER_SEND
from relay.gateway.state import Gateway, gateway_of
from relay.gateway.subscription import follow, start_id, subscriber_credential

RETRY_MS = 3000
SHUTDOWN_RETRY_MS = 500
_REQUEST_ID = re.compile(r"[0-9a-f]{64}")


def _frame(item: Entry | bytes | None) -> bytes:
    """One SSE message: an entry's frame, a notice without an id, or a keep-alive comment."""
    if item is None:
        return b": ping\n\n"
    if isinstance(item, bytes):
        return b"data: " + item + b"\n\n"
    return item.frame


_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: pass each event on at once
]


def uvicorn_wire(scope: Scope) -> Wire | None:
    """The transport under an event stream served by uvicorn's httptools protocol (what
    `relay gateway` runs), once its response has started: the fan-in writes a caught-up
    stream's events straight to it. None under any other server (an in-process test client,
    h11): streams then send everything through ASGI.

    Waking a stream's task and passing each event down four layers of ASGI `send` cost about
    three times the `write()` itself, for every event and every stream; at 5,000 streams that
    was most of a core (see the README's SSE figures). The bytes are those uvicorn would write
    for the same body message (one chunk of its chunked encoding). uvicorn would write them at
    once too while its transport holds nothing back, is not closing (the client is
    connected) and the response is not complete (a stream's task ends its body only after it
    stopped waiting, when the fan-in no longer writes to it)."""
    cycle = getattr(scope.get(SERVER_SEND), "__self__", None)
    if getattr(cycle, "chunked_encoding", None) is not True:
        return None
    transport = getattr(cycle, "transport", None)
    # Duck-typed: uvloop's transports are no subclasses of asyncio's.
    if not all(hasattr(transport, name)
               for name in ("write", "is_closing", "get_write_buffer_size")):
        return None
    return cast(Wire, transport)


class EventStream:
    """`text/event-stream`: a subscriber's events (after a replay from `after`) until it ends,
    written in the server's own task for the request. One small task watches for the client
    leaving (ASGI tells it only through `receive`), which ends the subscription at once rather
    than at the next keep-alive."""

    def __init__(self, gw: Gateway, subscriber: Subscriber, after: str | None,
                 until: float, slot: str) -> None:
        self.gw = gw
        self.subscriber = subscriber
        self.after = after
        self.until = until
        self.slot = slot
        """Its place among its principal's open streams (`Gateway.streams`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscriber = self.subscriber
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            subscriber.task = asyncio.current_task()
            watcher = asyncio.create_task(_until_disconnect(receive, subscriber))
            try:
                await self._stream(scope, send)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        finally:
            self.gw.fan_in.unsubscribe(subscriber)
            await self.gw.streams.release(subscriber.principal, self.slot)

    async def _stream(self, scope: Scope, send: Send) -> None:
        def body(chunk: bytes) -> Message:
            return {"type": "http.response.body", "body": chunk, "more_body": True}

        try:
            await send(body(b"retry: %d\n\n" % RETRY_MS))
            try:
                async for batch in follow(self.gw, self.subscriber, self.after, self.until,
                                           uvicorn_wire(scope)):
                    await send(body(_frame(batch[0]) if len(batch) == 1
                                    else b"".join(map(_frame, batch))))
            finally:
                self.subscriber.wire = None  # nothing may follow what ends the body, or an error
            if self.gw.fan_in.shutting_down:
                # This gateway is stopping: come back soon (to another replica), from the
                # last id seen.
                await send(body(b": gateway shutting down\nretry: %d\n\n" % SHUTDOWN_RETRY_MS))
            await send({"type": "http.response.body", "body": b""})
        except (OSError, redis.RedisError):
            # The client went away mid-send (ASGI 2.4 servers raise OSError), or Redis did
            # mid-replay: end; the client resumes with Last-Event-ID.
            return
        except asyncio.CancelledError:
            if not self.subscriber.aborted:
                raise
            # Stuck on a client that reads nothing: give up on it. The server closes the
            # connection, since the response is incomplete.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()


async def _until_disconnect(receive: Receive, subscriber: Subscriber) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.end()


class Sse:
    """`GET /intent/execute-wasm/events`, routed as a plain ASGI app (Starlette routes an
    instance so) rather than as a request handler, whose wrappers would keep three more frames
    alive for as long as each of thousands of streams lasts. Errors raised before the stream
    starts reach the app's exception handlers all the same."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = await _open(Request(scope, receive))
        await stream(scope, receive, send)


async def _open(request: Request) -> EventStream:
    gw = gateway_of(request)
    credential = await subscriber_credential(gw, request)
    principal = credential.principal
    gw.authorizer.require(principal, "subscribe", None)
    request_ids = _request_id_filter(request.query_params.getlist("request_id"))
    session_id = request.query_params.get("session_id")
    if session_id is not None:
        await gw.sessions.owned(principal, session_id)  # 404 for another's
    pipeline_id = request.query_params.get("pipeline_id")
    if pipeline_id is not None:
        await gw.pipelines.owner_check(principal, pipeline_id)  # 404 for another's
    after = start_id(request)
    slot = await gw.streams.acquire(principal)  # last: nothing after it may fail
    return EventStream(gw, gw.fan_in.subscribe(principal, request_ids, credential.stored_key,
                                               session_id, pipeline_id),
                       after, credential.expires_at, slot)


def _request_id_filter(values: list[str]) -> frozenset[str] | None:
    if not values:
        return None
    for value in values:
        if not _REQUEST_ID.fullmatch(value):
            raise InvalidRequest(f"request_id must be 64 lowercase hex digits, got {value!r}")
    return frozenset(values)
