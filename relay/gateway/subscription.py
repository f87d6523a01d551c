"""What a client's event stream follows: who subscribes, a replay of retained events from
Redis, then live events from the process's fan-in, with no gap and no duplicate.

A stream subscribes to the fan-in *before* it replays history from Redis, then drops from the
live queue whatever the replay already sent, even for events appended while the replay runs.
The SSE and WebSocket routes both stream what `follow` yields.

The history of named executions (a WebSocket's, an SSE stream's with `?request_id=`) comes from
each execution's index of its entry ids, not from a scan of the whole stream, whose retained
entries are mostly other executions' (and include `wasm_exec_completed`, up to 1 MiB each).

A stream ends when its credential does: an access token's or a JWT's expiry (`follow`), or the
revocation of the stored API key it was opened with (`end_revoked`).
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
from relay.pipeline.authenticate import Credential
from relay.schemas import EventsLost, decode_head, encode

SEND_BATCH = 64
REPLAY_PAGE = 500
_EVENT_ID = re.compile(r"\d+(-\d+)?")
RECHECK_MIN_MS = 100
"""How often, at most, open streams' stored keys are checked (RELAY_STORED_KEY_CACHE may be 0)."""


async def subscriber_credential(gw: Gateway, connection: HTTPConnection) -> Credential:
    """Who is subscribing, and what ends the stream: its expiry (Unix time; `inf` for API
    keys), the stored key it may be revoked with, and whether it may control executions.

    `?access_token=` takes only tokens from `POST /auth/tokens`, never a key or a JWT; those
    only subscribe.
    """
    token = connection.query_params.get("access_token")
    if token is not None:
        verified = gw.tokens.verify(token)
        return Credential(verified.principal, verified.expires_at, controls=False)
    return await gw.authenticate.credential(connection)


async def end_revoked(gw: Gateway) -> None:
    """End the streams whose stored API key was revoked, until cancelled (run by the gateway's
    supervisor). Once per RELAY_STORED_KEY_CACHE, one HMGET of the distinct keys that open
    streams were opened with: thousands of streams cost one round trip, not one each."""
    interval_s = max(gw.settings.stored_key_cache_ms, RECHECK_MIN_MS) / 1000
    while True:
        await asyncio.sleep(interval_s)
        by_key: dict[bytes, list[Subscriber]] = {}
        for subscriber in gw.fan_in.subscribers():
            if subscriber.stored_key is not None:
                by_key.setdefault(subscriber.stored_key, []).append(subscriber)
        if not by_key:
            continue
        kept = await gw.stored_keys.kept(list(by_key))
        for key_digest, subscribers in by_key.items():
            if key_digest not in kept:
                gw.authenticate.forget(key_digest)
                for subscriber in subscribers:
                    subscriber.end()  # the client reconnects, and is refused


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
                  after: str) -> AsyncIterator[Entry | bytes]:
    """Retained events after `after` (exclusive) that belong to `principal` (and to
    `request_ids`, if given); for those, an `events_lost` notice too when some of their events
    were trimmed from the stream already."""
    if request_ids is not None:
        async for found in _replay_indexed(gw, principal, request_ids, after):
            yield found
        return
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


async def _replay_indexed(gw: Gateway, principal: str, request_ids: frozenset[str],
                          after: str) -> AsyncIterator[Entry | bytes]:
    """The events of `request_ids` after `after`, read by their ids from each execution's
    index: the cost is their number, not the stream's length. Ids the stream no longer holds
    (trimmed) end it with an `events_lost` notice: the client re-reads the state instead."""
    pipe = gw.client.pipeline(transaction=False)
    for request_id in sorted(request_ids):
        pipe.lrange(gw.keys.execution_events(request_id), 0, -1)
    start = parse_id(after)
    ids = sorted(entry_id for listed in await pipe.execute() for entry_id
                 in map(parse_id, map(bytes.decode, listed)) if entry_id > start)
    trimmed = False
    for first in range(0, len(ids), REPLAY_PAGE):
        pipe = gw.client.pipeline(transaction=False)
        for ms, seq in ids[first:first + REPLAY_PAGE]:
            pipe.xrange(gw.keys.events, f"{ms}-{seq}", f"{ms}-{seq}")
        for found in await pipe.execute():
            trimmed = trimmed or not found
            # Another principal's when it guessed an id.
            for entry_id, fields in found:
                if fields.get(b"user", b"").decode() == principal:
                    yield entry(entry_id, fields[b"data"])
    if trimmed:
        oldest = await gw.client.xrange(gw.keys.events, "-", "+", count=1)
        yield encode(EventsLost(oldest_id=oldest[0][0].decode() if oldest else "0-0"))


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
        request_ids = subscriber.request_ids
        if subscriber.session_id is not None:  # its calls' events, by their indexes
            calls = frozenset(await gw.sessions.history(subscriber.session_id))
            request_ids = calls if request_ids is None else request_ids & calls
        async for old in _replay(gw, subscriber.principal, request_ids, after):
            if (isinstance(old, Entry) and subscriber.pipeline_id is not None
                    and decode_head(old.data).pipeline_id != subscriber.pipeline_id):
                continue  # another pipeline's, or none's
            if isinstance(old, Entry):
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
