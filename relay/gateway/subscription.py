"""What a client's event stream follows: who subscribes, a replay of retained events from
Redis, then live events from the process's fan-in, with no gap and no duplicate.

A stream subscribes to the fan-in *before* it replays history from Redis, then drops from the
live queue whatever the replay already sent, even for events appended while the replay runs.
The SSE and WebSocket routes both stream what `follow` yields.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

from starlette.requests import HTTPConnection, Request

from relay.errors import InvalidRequest
from relay.gateway.fanin import PING, Entry, Subscriber, Wire, entry, for_clients
from relay.gateway.state import Gateway
from relay.schemas import EventsLost, decode_head, encode

SEND_BATCH = 64
REPLAY_PAGE = 500
_EVENT_ID = re.compile(r"\d+(-\d+)?")


async def subscriber_principal(gw: Gateway, connection: HTTPConnection) -> tuple[str, float]:
    """Who is subscribing, and until when (Unix time; `inf` for header credentials).

    `?access_token=` takes only tokens from `POST /auth/tokens`, never a key or a JWT.
    """
    token = connection.query_params.get("access_token")
    if token is not None:
        verified = gw.tokens.verify(token)
        return verified.principal, verified.expires_at
    return await gw.authenticate(connection), float("inf")


def parse_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def start_id(request: Request) -> str | None:
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
    if oldest and parse_id(oldest[0][0].decode()) > parse_id(after):
        oldest_id: bytes = oldest[0][0]
        return oldest_id
    return None


async def follow(gw: Gateway, subscriber: Subscriber, after: str | None, until: float,
                  wire: Wire | None = None) -> AsyncIterator[list[Entry | bytes | None]]:
    """Replay (if `after`), then live events, until the stream must end. Yields batches of
    entries, the JSON of an `events_lost` notice, or None for a keep-alive: a live batch is
    everything queued for the stream, so one send carries it all under load. Once the replay
    has caught up, `wire` (if any) takes live events straight from the fan-in."""
    replayed: tuple[int, int] | None = None
    """The id the client has: live entries up to it were sent already (the fan-in may be
    behind the replay)."""
    if after is not None:
        replayed = parse_id(after)
        oldest = await _events_lost(gw, after)
        if oldest is not None:
            yield [encode(EventsLost(oldest_id=oldest.decode()))]
        async for old in _replay(gw, subscriber.principal, subscriber.request_ids, after):
            replayed = parse_id(old.id.decode())
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
                if parse_id(live.id.decode()) <= replayed:
                    continue  # the replay sent it already
                replayed = None  # the stream is in order: no duplicate comes after this one
            batch.append(live)
        if batch:
            yield batch
