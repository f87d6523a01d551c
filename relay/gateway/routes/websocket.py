"""`/ws/executions/{request_id}`: one execution's events, and control messages from the client.

The events are replayed from the first one retained, then live, until the terminal event. The
client may send `{"action": "pause" | "resume" | "cancel", "additional_gas"?: N}`; a refusal is
answered with a `control_error` message, an effect by the events it causes. Close codes: 4401
unauthenticated, 4403 forbidden, 4404 no such execution (of this principal).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import redis
from starlette.websockets import WebSocket, WebSocketDisconnect

from relay.errors import RelayError
from relay.gateway.fanin import Entry
from relay.gateway.problems import close_with, send_control_error
from relay.gateway.state import Gateway, gateway_of
from relay.gateway.subscription import follow, subscriber_principal
from relay.schemas import TERMINAL_TYPES, decode_head, decode_ws_command


async def websocket(ws: WebSocket) -> None:
    gw = gateway_of(ws)
    request_id = ws.path_params["request_id"]
    await ws.accept()
    try:
        principal, until = await subscriber_principal(gw, ws)
        gw.authorizer.require(principal, "subscribe", None)
        await gw.controller.state(principal, request_id)
    except RelayError as error:
        await close_with(ws, error)
        return
    subscriber = gw.fan_in.subscribe(principal, frozenset({request_id}))
    commands = asyncio.create_task(_commands(gw, ws, principal, request_id))
    try:
        async for batch in follow(gw, subscriber, "0", until):
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
    """Control messages from the client, until it goes."""
    while True:
        try:
            raw = await ws.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            return
        try:
            command = decode_ws_command(raw)
            await gw.controller.act(principal, request_id, command.action,
                                    command.additional_gas)
        except (msgspec.DecodeError, RelayError) as error:
            await send_control_error(ws, error)
