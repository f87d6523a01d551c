"""`/ws/executions/{request_id}`: one execution's events, and control messages from the client.

The events are replayed from the first one retained, then live, until the terminal event (if
some were trimmed from the stream already, an `events_lost` notice follows the replay, and the
socket closes there when the execution has finished: its terminal event will not come). The
client may send `{"action": "pause" | "resume" | "step" | "cancel", "additional_gas"?: N,
"gas"?: N}` (`gas` for a step: default the execution's `step_gas`); a refusal is answered with a
`control_error` message, an effect by the events it causes (a step's by `execution_resumed`,
then `execution_paused` or the terminal event); a socket opened
with an access token only subscribes (its control messages are refused with 403). Close codes:
4401 unauthenticated, 4403 forbidden, 4404 no such execution (of this principal), 4429 too many
open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import msgspec
import redis
from starlette.websockets import WebSocket, WebSocketDisconnect

from relay.errors import Conflict, Forbidden, RelayError
from relay.gateway.control import FINISHED
from relay.gateway.fanin import Entry
from relay.gateway.problems import close_with, send_control_error
from relay.gateway.state import Gateway, gateway_of
from relay.gateway.subscription import follow, subscriber_credential
from relay.pipeline.authenticate import Credential
from relay.schemas import TERMINAL_TYPES, decode_head, decode_ws_command

Batch = list[Entry | bytes | None]


Target = Callable[[], Awaitable[str]]
"""The execution a control message acts on, when it comes."""


async def websocket(ws: WebSocket) -> None:
    request_id: str = ws.path_params["request_id"]

    async def check(gw: Gateway, principal: str) -> None:
        await gw.controller.state(principal, request_id)  # NotFound for another's

    async def target() -> str:
        return request_id

    async def sent(gw: Gateway, principal: str, batch: Batch) -> bool:
        if await _send_batch(ws, batch):
            return True
        lost = any(isinstance(item, bytes) for item in batch)  # an `events_lost` notice
        # Its terminal event was trimmed: it will never come.
        return lost and await _finished(gw, principal, request_id)

    await _serve(ws, check, frozenset({request_id}), None, target, sent)


async def session_websocket(ws: WebSocket) -> None:
    """`/ws/sessions/{session_id}`: the events of a session's calls, replayed from the first one
    retained, then live, until the client leaves; its commands act on the session's current
    call. Close code 4404 for a session that is not the principal's."""
    session_id: str = ws.path_params["session_id"]
    sessions = gateway_of(ws).sessions

    async def check(gw: Gateway, principal: str) -> None:
        await sessions.owned(principal, session_id)

    async def current() -> str:
        request_id = await sessions.current(session_id)
        if request_id is None:
            raise Conflict(f"session {session_id} has no call running")
        return request_id

    async def sent(gw: Gateway, principal: str, batch: Batch) -> bool:
        await _send_batch(ws, batch)
        return False  # a session goes on after each call's terminal event

    await _serve(ws, check, None, session_id, current, sent)


async def _serve(ws: WebSocket, check: Callable[[Gateway, str], Awaitable[None]],
                 request_ids: frozenset[str] | None, session_id: str | None, target: Target,
                 sent: Callable[[Gateway, str, Batch], Awaitable[bool]]) -> None:
    """Authenticate, `check` the principal may follow it, hold a stream's place, then send its
    events (replayed from the first retained) until `sent` says it is done or the client
    leaves, while `_commands` takes the client's control messages for `target`."""
    gw = gateway_of(ws)
    await ws.accept()
    try:
        credential = await subscriber_credential(gw, ws)
        principal = credential.principal
        gw.authorizer.require(principal, "subscribe", None)
        await check(gw, principal)
        slot = await gw.streams.acquire(principal)
    except RelayError as error:
        await close_with(ws, error)
        return
    subscriber = gw.fan_in.subscribe(principal, request_ids, credential.stored_key, session_id)
    commands = asyncio.create_task(_commands(gw, ws, credential, target))
    # The client left (its messages end): stop streaming at once, rather than at the next event
    # of an execution that may publish none for long, so its place frees.
    commands.add_done_callback(lambda _: subscriber.end())
    try:
        async for batch in follow(gw, subscriber, "0", credential.expires_at):
            if await sent(gw, principal, batch):
                break
        await ws.close(1000)
    except (WebSocketDisconnect, RuntimeError, redis.RedisError):
        pass
    finally:
        commands.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commands
        gw.fan_in.unsubscribe(subscriber)
        await gw.streams.release(principal, slot)


async def _finished(gw: Gateway, principal: str, request_id: str) -> bool:
    return (await gw.controller.state(principal, request_id)).status in FINISHED


async def _send_batch(ws: WebSocket, batch: Batch) -> bool:
    """Send a batch of events; True once an execution's terminal event went out."""
    for item in batch:
        if item is None:
            continue  # WebSocket has its own keep-alive (ping frames)
        data = item if isinstance(item, bytes) else item.data
        await ws.send_text(data.decode())
        if decode_head(data).type in TERMINAL_TYPES:
            return True
    return False


async def _commands(gw: Gateway, ws: WebSocket, credential: Credential,
                    target: Target) -> None:
    """Control messages from the client, until it goes; each acts on the execution `target`
    names when it comes."""
    while True:
        try:
            raw = await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            return
        try:
            command = decode_ws_command(raw)
            if not credential.controls:
                raise Forbidden("an access token only subscribes: pause, resume, step and cancel "
                                "need an API key or a JWT")
            request_id = await target()
            if command.action == "step":
                # Not waited for: the socket carries where it stops, and a cancel sent
                # meanwhile must not queue behind it.
                await gw.controller.step(credential.principal, request_id, command.gas, 0)
            else:
                await gw.controller.act(credential.principal, request_id, command.action,
                                        command.additional_gas)
        except (msgspec.DecodeError, RelayError) as error:
            await send_control_error(ws, error)
