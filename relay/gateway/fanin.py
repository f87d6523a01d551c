"""One reader of `relay:events` per gateway process, fanning events out to whoever waits.

- Sync callers register a completion future for their request id before the request is
  published, so the terminal event cannot slip past them.
- Event streams (SSE, WebSocket) subscribe with their principal and, optionally, request ids;
  each gets a bounded queue. A subscriber that falls behind is dropped (its stream ends and the
  client resumes with Last-Event-ID) instead of growing memory or slowing anyone else.
- Control calls wait for one event of one execution (`next_event`).

Entries are routed by their `user` field; their JSON is decoded only when a filter needs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple, Protocol

import redis
import redis.asyncio as aioredis

from relay.connection import reader_link
from relay.keys import Keys
from relay.redislink import fields_of
from relay.schemas import EventHead, decode_head

log = logging.getLogger("relay.events")

READ_BLOCK_MS = 1000
READ_COUNT = 1000
COMPLETED_PREFIX = b'{"type":"wasm_exec_completed"'

class Entry(NamedTuple):
    """An event for clients, with its SSE frame encoded once for all the streams it goes to."""

    id: bytes
    data: bytes
    frame: bytes


def entry(entry_id: bytes, data: bytes) -> Entry:
    # Event JSON has no newline: one `data:` line.
    return Entry(entry_id, data, b"id: " + entry_id + b"\ndata: " + data + b"\n\n")


def chunk_of(entries: list[Entry]) -> bytes:
    """The frames of `entries` as one chunk of a chunked HTTP/1.1 body (what a stream written
    directly gets)."""
    body = entries[0].frame if len(entries) == 1 else b"".join(e.frame for e in entries)
    return b"%x\r\n%b\r\n" % (len(body), body)


class Wire(Protocol):
    """The connection under a caught-up stream, for its events to be written at once without
    waking its task: the HTTP server's transport (`routes.sse.uvicorn_wire`)."""

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int:
        """Bytes the transport holds that the socket has not taken yet."""

    def write(self, data: bytes) -> None: ...


PING = "ping"
"""Queued for a stream that has been quiet, so it sends a keep-alive comment."""

PING_S = 15.0
"""A stream that sent nothing for this long gets a keep-alive."""

STUCK_S = 10.0
"""How long a stream dropped for falling behind may stay blocked sending to a client that
reads nothing, before its task is cancelled."""

Item = Entry | str | None
"""What a stream takes: an entry, PING, or None: the end (dropped, or the gateway stops)."""


class Subscriber:
    """One event stream's bounded mailbox (a list and one waiter: thousands of these are fed
    for every event, so it costs less than an asyncio.Queue)."""

    __slots__ = ("_items", "_loop", "_waiter", "aborted", "armed", "capacity", "ended",
                 "pipeline_id", "principal", "quiet_since", "request_ids", "session_id",
                 "stored_key", "task", "wire")

    def __init__(self, principal: str, request_ids: frozenset[str] | None, capacity: int,
                 stored_key: bytes | None = None, session_id: str | None = None,
                 pipeline_id: str | None = None) -> None:
        self.principal = principal
        self.request_ids = request_ids
        self.session_id = session_id
        """Set: only the events of this session's calls."""
        self.pipeline_id = pipeline_id
        """Set: only the events that carry this pipeline's id (relay.pipelines)."""
        self.capacity = capacity
        self.stored_key = stored_key
        """The digest of the stored API key the stream was opened with (its revocation ends
        the stream), or None."""
        self._items: list[Item] = []
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self.quiet_since = self._loop.time()
        """When the stream last took something (the keep-alives' clock)."""
        self.ended = False
        self.task: asyncio.Task[object] | None = None
        """The task writing this stream to its client, to cancel if the client stops reading."""
        self.aborted = False
        self.wire: Wire | None = None
        """Set while the stream is caught up (replay done) and can be written to directly."""
        self.armed: Wire | None = None
        """The wire, while the stream's task waits with nothing queued: everything before
        the next events is on it already, so they may follow there at once."""

    def offer(self, entries: list[Entry]) -> None:
        """Queue `entries`, in order, for the stream's task."""
        if self.ended:
            return
        for entry in entries:
            if len(self._items) >= self.capacity:
                # Its client reconnects from the last id it saw; the replay from Redis fills
                # the gap.
                self.end()
                # A stream blocked in a send (its client reads nothing) would never see that:
                # a timer per dropped stream, rather than a timeout around every send.
                self._loop.call_later(STUCK_S, self._abort)
                return
            self._put(entry)

    def ping(self) -> None:
        """Ask the stream for a keep-alive."""
        if not self.ended and not self._items:
            self._put(PING)

    def end(self) -> None:
        """Drop what it has not read and tell it to go."""
        self.ended = True
        self._items.clear()
        self._put(None)

    async def take(self, limit: int) -> list[Item]:
        """What is queued, up to `limit` items, once there is something."""
        while not self._items:
            self._waiter = self._loop.create_future()
            self.armed = self.wire
            try:
                await self._waiter
            finally:
                self._waiter = self.armed = None
        taken = self._items[:limit]
        del self._items[:limit]
        self.quiet_since = self._loop.time()
        return taken

    def _put(self, item: Item) -> None:
        self.armed = None  # what follows must wait its turn behind this
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _abort(self) -> None:
        if self.task is not None and not self.task.done():
            log.warning("cancelling an event stream whose client has read nothing for %.0f s",
                        STUCK_S)
            self.aborted = True
            self.task.cancel()


class EventFanIn:
    def __init__(self, client: aioredis.Redis, keys: Keys, queue_capacity: int = 256) -> None:
        self.client = client
        self.keys = keys
        self.queue_capacity = queue_capacity
        self._completions: dict[str, list[asyncio.Future[bytes]]] = {}
        self._watchers: dict[str, list[tuple[frozenset[str], asyncio.Future[bytes]]]] = {}
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._last_id = b"$"
        """The last entry read; a restarted `follow` goes on after it."""
        self._stopped = False
        self.shutting_down = False
        """The server began to stop: streams end (with a hint to come back soon)."""
        self._pinger: asyncio.TimerHandle | None = None
        self.node_completed: Callable[[], None] | None = None
        """Told when a pipeline node's `wasm_exec_completed` passes: the pipeline scheduler
        reads its group then (relay.scheduler.Scheduler.wake)."""

    def start(self, last_id: bytes) -> None:
        """Follow the stream from `last_id` (exclusive) once `follow` runs, and start the
        keep-alives."""
        self._last_id = last_id
        self._keep_alive()

    def _keep_alive(self) -> None:
        """Once a second, a keep-alive for each stream quiet for PING_S: one timer for the
        process rather than one per stream."""
        now = asyncio.get_running_loop().time()
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                if now - subscriber.quiet_since >= PING_S:
                    subscriber.ping()
        if not self._stopped:
            self._pinger = asyncio.get_running_loop().call_later(1.0, self._keep_alive)

    def begin_shutdown(self) -> None:
        """The server stops taking requests: end every stream now, so it need not wait for
        them (the HTTP server calls this; the lifespan's end comes only after)."""
        self.shutting_down = True
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.end()

    def stop(self) -> None:
        """Stop following, and end every subscriber's stream. Call before closing the client."""
        self._stopped = True
        if self._pinger is not None:
            self._pinger.cancel()
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.end()

    # --- sync callers ---

    def completion(self, request_id: str) -> asyncio.Future[bytes]:
        """A future resolved with the `wasm_exec_completed` entry of `request_id`.

        Release it with `release` whatever happens, or it stays registered.
        """
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._completions.setdefault(request_id, []).append(future)
        return future

    def release(self, request_id: str, future: asyncio.Future[bytes] | None) -> None:
        if future is not None:
            _remove(self._completions, request_id, future)

    # --- control calls ---

    async def next_event(self, request_id: str, types: frozenset[str],
                         timeout_s: float) -> bytes | None:
        """The next event of `request_id` whose type is in `types`, or None after `timeout_s`.

        Register before causing the event, or it may come first: use `watch` then."""
        future = self.watch(request_id, types)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return None
        finally:
            self.unwatch(request_id, future)

    def watch(self, request_id: str, types: frozenset[str]) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._watchers.setdefault(request_id, []).append((types, future))
        return future

    def unwatch(self, request_id: str, future: asyncio.Future[bytes]) -> None:
        watchers = self._watchers.get(request_id, [])
        watchers[:] = [(types, f) for types, f in watchers if f is not future]
        if not watchers:
            self._watchers.pop(request_id, None)

    # --- event streams ---

    def subscribe(self, principal: str, request_ids: frozenset[str] | None,
                  stored_key: bytes | None = None, session_id: str | None = None,
                  pipeline_id: str | None = None) -> Subscriber:
        """Start queueing `principal`'s events (of `request_ids` only, and of `session_id`'s
        calls only, if given)."""
        subscriber = Subscriber(principal, request_ids, self.queue_capacity, stored_key,
                                session_id, pipeline_id)
        self._subscribers.setdefault(principal, set()).add(subscriber)
        if self.shutting_down:
            subscriber.end()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(subscriber.principal)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[subscriber.principal]

    @property
    def subscriber_count(self) -> int:
        return sum(len(subscribers) for subscribers in self._subscribers.values())

    def subscribers(self) -> list[Subscriber]:
        """Every open stream's subscriber (a copy: the caller may end them)."""
        return [subscriber for subscribers in self._subscribers.values()
                for subscriber in subscribers]

    # --- the reader ---

    async def follow(self) -> None:
        """Read the events stream until `stop`: the process's one reader, run (and restarted,
        should it fail) by the gateway's supervisor."""
        stream = self.keys.events
        link = reader_link(self.client)  # its own: the read blocks
        try:
            while not self._stopped:
                try:
                    reply = await link.execute("XREAD", "COUNT", READ_COUNT,
                                               "BLOCK", READ_BLOCK_MS,
                                               "STREAMS", stream, self._last_id,
                                               block_ms=READ_BLOCK_MS)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    if self._stopped:
                        return
                    log.warning("cannot read %s, retrying: %s", stream, exc)
                    await asyncio.sleep(0.2)
                    continue
                for _, entries in reply or ():
                    self._last_id = entries[-1][0]  # past an entry that breaks the dispatch
                    self._dispatch(entries)
        finally:
            await link.aclose()

    def _dispatch(self, entries: list[tuple[bytes, list[bytes]]]) -> None:
        """Route one read's entries: to waiters, then to each principal's streams, all of a
        principal's entries at once, so a stream taking them all gets them in one write (a
        fan-in that fell behind reads several per call, and so catches up: the write to each
        socket, not the event, is what costs)."""
        by_user: dict[str, list[Entry]] = {}
        for entry_id, fields in entries:
            data, user_bytes = data_and_user(fields)
            if self._watchers or data.startswith(COMPLETED_PREFIX):
                head = decode_head(data)
                self._notify(head.request_id, head.type, data)
                if ((head.pipeline_id is not None or head.batch_id is not None)
                        and head.type == "wasm_exec_completed"
                        and self.node_completed is not None):
                    self.node_completed()
            if not self._subscribers:
                continue
            user = user_bytes.decode()
            if user in self._subscribers and for_clients(data):
                by_user.setdefault(user, []).append(entry(entry_id, data))
        now = asyncio.get_running_loop().time()
        for user, events in by_user.items():
            all_chunk = chunk_of(events)
            heads: list[EventHead] | None = None  # decoded once, if a stream filters by them
            # Thousands of streams take every event: this loop runs per event per stream, so
            # it calls no Python function on the way to the wire (and iterates the set itself:
            # nothing here adds or removes a stream).
            for subscriber in self._subscribers[user]:
                wanted = events
                if (subscriber.request_ids is not None or subscriber.session_id is not None
                        or subscriber.pipeline_id is not None):
                    if heads is None:
                        heads = [decode_head(event.data) for event in events]
                    wanted = [event for event, head in zip(events, heads, strict=True)
                              if wanted_by(subscriber, head)]
                    if not wanted:
                        continue
                wire = subscriber.armed
                # A transport holding bytes back is one whose client reads slowly: the
                # stream's bounded queue takes over (and drops it if it stays behind).
                if wire is not None and not wire.get_write_buffer_size() and not wire.is_closing():
                    wire.write(all_chunk if wanted is events else chunk_of(wanted))
                    subscriber.quiet_since = now
                else:
                    subscriber.offer(wanted)

    def _notify(self, request_id: str, event_type: str, data: bytes) -> None:
        for types, future in self._watchers.get(request_id, ()):
            if event_type in types and not future.done():
                future.set_result(data)
        if event_type == "wasm_exec_completed":
            for future in self._completions.pop(request_id, ()):
                if not future.done():
                    future.set_result(data)


def wanted_by(subscriber: Subscriber, head: EventHead) -> bool:
    """Whether a filtering stream takes an event of its principal."""
    return ((subscriber.request_ids is None or head.request_id in subscriber.request_ids)
            and (subscriber.session_id is None or head.session_id == subscriber.session_id)
            and (subscriber.pipeline_id is None or head.pipeline_id == subscriber.pipeline_id))


def data_and_user(fields: list[bytes]) -> tuple[bytes, bytes]:
    """An events entry's `data` and `user` (relay/lua/events.lib.lua writes them in that
    order: read in place, not made a dict, for the four entries of every execution)."""
    if len(fields) == 4 and fields[0] == b"data" and fields[2] == b"user":
        return fields[1], fields[3]
    named = fields_of(fields)
    return named[b"data"], named.get(b"user", b"")  # no data: a KeyError, as it always was


def for_clients(data: bytes) -> bool:
    """Whether an entry is a client event: `wasm_exec_completed` (the whole request again, for
    bus consumers) is not."""
    return not data.startswith(COMPLETED_PREFIX)


def _remove(table: dict[str, list[asyncio.Future[bytes]]], key: str,
            future: asyncio.Future[bytes]) -> None:
    futures = table.get(key)
    if futures is not None and future in futures:
        futures.remove(future)
        if not futures:
            del table[key]
