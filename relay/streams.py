"""Event streams for clients: Server-Sent Events and the per-execution WebSocket.

A stream subscribes to the process's fan-in *before* it replays history from Redis, then drops
from the live queue whatever the replay already sent: no gap, no duplicate, even for events
appended while the replay runs.

SSE is written by `EventStream`, a plain ASGI response rather than sse-starlette's: thousands of
open streams are what one gateway holds, and sse-starlette spends three tasks, a task group and
a timeout scope per send on each; `bench/bench_sse.py` measured 42 KiB and, at 5,000 streams,
a p99 of 0.8 s with it (see the README). Here a stream is the server's own task for the
request plus one small task watching for the client to leave, and once a stream has caught up,
the fan-in writes each event straight to its connection (`uvicorn_wire`) rather than waking
that task.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import msgspec
import redis
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from relay.errors import InvalidRequest, RelayError, Unauthenticated
from relay.events import PING, Entry, Subscriber, Wire, entry, for_clients
from relay.http import json_response
from relay.schemas import TERMINAL_TYPES, AccessToken, Action, EventsLost, decode_head

if TYPE_CHECKING:
    from relay.app import Gateway

RETRY_MS = 3000
SHUTDOWN_RETRY_MS = 500
SEND_BATCH = 64
REPLAY_PAGE = 500
_EVENT_ID = re.compile(r"\d+(-\d+)?")
_REQUEST_ID = re.compile(r"[0-9a-f]{64}")


def _gateway(connection: HTTPConnection) -> Gateway:
    gateway: Gateway = connection.app.state.gateway
    return gateway


async def subscriber_principal(gw: Gateway, connection: HTTPConnection) -> tuple[str, float]:
    """Who is subscribing, and until when (Unix time; `inf` for header credentials).

    `?access_token=` takes only tokens from `POST /auth/tokens`, never a key or a JWT.
    """
    token = connection.query_params.get("access_token")
    if token is not None:
        verified = gw.tokens.verify(token)
        return verified.principal, verified.expires_at
    return await gw.authenticate(connection), float("inf")


def _parse_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _start_id(request: Request) -> str | None:
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if last is None:
        return None
    if not _EVENT_ID.fullmatch(last):
        raise InvalidRequest("Last-Event-ID must be an event id (`<ms>-<seq>`), or 0 for all")
    return last


async def _replay(gw: Gateway, principal: str, request_ids: frozenset[str] | None,
                  after: str) -> AsyncIterator[Entry]:
    """Retained events after `after` (exclusive) that belong to `principal`."""
    cursor = "-" if after in ("0", "0-0") else f"({after}"
    while True:
        page = await gw.client.xrange(gw.keys.events, cursor, "+", count=REPLAY_PAGE)
        for entry_id, fields in page:
            if fields.get(b"user", b"").decode() != principal:
                continue
            data = fields[b"data"]
            if for_clients(data) and (request_ids is None
                                      or decode_head(data).request_id in request_ids):
                yield entry(entry_id, data)
        if len(page) < REPLAY_PAGE:
            return
        cursor = f"({page[-1][0].decode()}"


async def _events_lost(gw: Gateway, after: str) -> bytes | None:
    """The oldest retained id, when events after `after` may have been trimmed already."""
    if after in ("0", "0-0"):
        return None
    oldest = await gw.client.xrange(gw.keys.events, "-", "+", count=1)
    if oldest and _parse_id(oldest[0][0].decode()) > _parse_id(after):
        oldest_id: bytes = oldest[0][0]
        return oldest_id
    return None


async def _follow(gw: Gateway, subscriber: Subscriber, after: str | None, until: float,
                  wire: Wire | None = None) -> AsyncIterator[list[Entry | bytes | None]]:
    """Replay (if `after`), then live events, until the stream must end. Yields batches of
    entries, the JSON of an `events_lost` notice, or None for a keep-alive: a live batch is
    everything queued for the stream, so one send carries it all under load. Once the replay
    has caught up, `wire` (if any) takes live events straight from the fan-in."""
    replayed: tuple[int, int] | None = None
    """The id the client has: live entries up to it were sent already (the fan-in may be
    behind the replay)."""
    if after is not None:
        replayed = _parse_id(after)
        oldest = await _events_lost(gw, after)
        if oldest is not None:
            yield [msgspec.json.encode(EventsLost(oldest_id=oldest.decode()))]
        async for old in _replay(gw, subscriber.principal, subscriber.request_ids, after):
            replayed = _parse_id(old.id.decode())
            yield [old]
    while True:
        if replayed is None:
            subscriber.wire = wire
        if until == float("inf"):  # header credentials: no deadline, no timer per event
            queued = await subscriber.take(SEND_BATCH)
        else:
            remaining = until - time.time()
            if remaining <= 0:
                return  # the access token expired: the client reconnects with a fresh one
            try:
                async with asyncio.timeout(remaining):
                    queued = await subscriber.take(SEND_BATCH)
            except TimeoutError:
                continue
        batch: list[Entry | bytes | None] = []
        for live in queued:
            if live is None:
                if batch:
                    yield batch
                return  # fell behind, or the gateway is stopping
            if live == PING:
                batch.append(None)
                continue
            assert not isinstance(live, str)
            if replayed is not None:
                if _parse_id(live.id.decode()) <= replayed:
                    continue  # the replay sent it already
                replayed = None  # the stream is in order: no duplicate comes after this one
            batch.append(live)
        if batch:
            yield batch


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


SERVER_SEND = "relay.server_send"
"""Scope key of the HTTP server's own `send` (`relay.app.RelayApp` puts it there)."""


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
                 until: float) -> None:
        self.gw = gw
        self.subscriber = subscriber
        self.after = after
        self.until = until

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

    async def _stream(self, scope: Scope, send: Send) -> None:
        def body(chunk: bytes) -> Message:
            return {"type": "http.response.body", "body": chunk, "more_body": True}

        try:
            await send(body(b"retry: %d\n\n" % RETRY_MS))
            try:
                async for batch in _follow(self.gw, self.subscriber, self.after, self.until,
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
    gw = _gateway(request)
    principal, until = await subscriber_principal(gw, request)
    gw.authorize(principal, "subscribe", None)
    request_ids = _request_id_filter(request.query_params.getlist("request_id"))
    after = _start_id(request)
    return EventStream(gw, gw.fan_in.subscribe(principal, request_ids), after, until)


def _request_id_filter(values: list[str]) -> frozenset[str] | None:
    if not values:
        return None
    for value in values:
        if not _REQUEST_ID.fullmatch(value):
            raise InvalidRequest(f"request_id must be 64 lowercase hex digits, got {value!r}")
    return frozenset(values)


class WsCommand(msgspec.Struct, forbid_unknown_fields=True):
    action: Action
    additional_gas: int = 0


_decode_command = msgspec.json.Decoder(WsCommand).decode


async def websocket(ws: WebSocket) -> None:
    """`/ws/executions/{request_id}`: that execution's events, replayed from the first one
    retained then live, until its terminal event; the client may send
    `{"action": "pause" | "resume" | "cancel"}`. Close codes: 4401 unauthenticated, 4403
    forbidden, 4404 no such execution (of this principal)."""
    gw = _gateway(ws)
    request_id = ws.path_params["request_id"]
    await ws.accept()
    try:
        principal, until = await subscriber_principal(gw, ws)
        gw.authorize(principal, "subscribe", None)
        await gw.controller.state(principal, request_id)
    except RelayError as error:
        await ws.close(4000 + error.status, error.detail[:120])
        return
    subscriber = gw.fan_in.subscribe(principal, frozenset({request_id}))
    commands = asyncio.create_task(_commands(gw, ws, principal, request_id))
    try:
        async for batch in _follow(gw, subscriber, "0", until):
            if await _send_batch(ws, batch):
                break
        await ws.close(1000)
    except (WebSocketDisconnect, RuntimeError, redis.RedisError):
        pass
    finally:
        commands.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commands
        gw.fan_in.unsubscribe(subscriber)


async def _send_batch(ws: WebSocket, batch: list[Entry | bytes | None]) -> bool:
    """Send a batch of events; True once the execution's terminal event went out."""
    for item in batch:
        if item is None:
            continue  # WebSocket has its own keep-alive (ping frames)
        data = item if isinstance(item, bytes) else item.data
        await ws.send_text(data.decode())
        if decode_head(data).type in TERMINAL_TYPES:
            return True
    return False


async def _commands(gw: Gateway, ws: WebSocket, principal: str, request_id: str) -> None:
    """Control messages from the client; a refusal is answered with a problem-shaped message
    (`{"type": "control_error", "status", "detail"}`), an effect by the events it causes."""
    while True:
        try:
            raw = await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            return
        try:
            command = _decode_command(raw)
            await gw.controller.act(principal, request_id, command.action,
                                    command.additional_gas)
        except msgspec.DecodeError as exc:
            await _send_error(ws, 400, f"expected {{\"action\": \"pause\"|\"resume\"|\"cancel\"}}"
                                       f": {exc}")
        except RelayError as error:
            await _send_error(ws, error.status, error.detail)


async def _send_error(ws: WebSocket, status: int, detail: str) -> None:
    message: dict[str, Any] = {"type": "control_error", "status": status, "detail": detail}
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await ws.send_text(msgspec.json.encode(message).decode())


async def mint_token(request: Request) -> Response:
    """`POST /auth/tokens`: a subscribe-only token for URLs, minted with normal credentials."""
    gw = _gateway(request)
    if "access_token" in request.query_params:
        raise Unauthenticated("mint tokens with an API key or a bearer token, not a token")
    principal = await gw.authenticate(request)
    gw.authorize(principal, "subscribe", None)
    token, expires_at = gw.tokens.mint(principal)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
    return json_response(AccessToken(access_token=token, expires_at=expires))
