"""The webhook deliverer: queues a delivery for each event someone asked to be called back
for, and sends the deliveries that are due (relay.webhooks holds their state).

Two loops, in every gateway process (so in `relay dev`) and alone in `relay webhooks`:
- `consume`: reads `relay:events:followed` in its own consumer group (`webhooks`), as the
  pipeline scheduler reads it in `pipelines`: the events of executions, pipelines and batches
  with a callback (and of pipeline nodes and batch items), copied there by the scripts that
  emit them (relay/lua/events.lib.lua), so the events of the rest cost it nothing. Entries
  that cannot be deliverable are told apart by their bytes, the callbacks of the others are
  read in one round trip a batch, the deliveries queued, and only then the entries
  acknowledged. An entry a dead process left pending is
  taken over by a peer (XAUTOCLAIM) and queued again, which changes nothing (one delivery per
  event id). It is apart from the gateway's fan-in, so a slow receiver never delays events.
- `deliver`: takes due deliveries under a lease and sends each: the URL checked by the SSRF
  guard again, the connection made to the address checked, no redirects followed, no proxy
  from the environment; then records the attempt and when the next one is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import logging
import ssl
import time
from typing import Any

import httpx
import msgspec
import redis
import redis.asyncio as aioredis

from relay import ssrf
from relay.bus import create_group, read_group, reclaimed
from relay.connection import shared_link
from relay.keys import Keys
from relay.metrics import Metrics
from relay.scheduler import consumer_name
from relay.schemas import decode_head
from relay.settings import Settings
from relay.webhooks import (
    DEFAULT_EVENTS,
    Due,
    Kind,
    NewDelivery,
    Webhooks,
    decode_callback,
    retry_delay_ms,
    signature,
)

log = logging.getLogger("relay.webhooks")


CANDIDATES = (b'{"type":"execution_', b'{"type":"pipeline_', b'{"type":"batch_')
"""How every event a callback may ask for begins (`wasm_exec_*` and the rest never are)."""
READ_COUNT = 200
RECLAIM_IDLE_MS = 10_000
RECLAIM_EVERY_S = 5.0
CONCURRENCY = 32
"""Attempts one process sends at once."""
PER_ORIGIN = 8
"""Connections to one receiver (scheme, host, port) at once. httpcore's pool costs CPU that
grows with its waiting requests times its connections (measured here: 1.3 ms a delivery at 8,
5.3 ms at 64, with one pool), so each receiver gets a small pool of its own."""
MAX_POOLS = 64
"""Receivers whose pools are kept; the least recently used one beyond is closed."""
BUSY_LAG_S = 0.004
"""When this process's event loop runs this late (an average), it is busy answering requests:
deliveries, which can wait, then start at most BUSY_STARTS every LAG_TICK_S (250 a second), so
that callbacks take little CPU from executes while the gateway is loaded, and catch up when it
is not. Starts, not attempts in flight, are limited: a slow receiver's wait costs no CPU."""
BUSY_STARTS = 5
LAG_TICK_S = 0.02
IDLE_POLL_S = 1.0
"""How often the deliver loop looks for due deliveries that peers queued, at the longest."""
LEASE_MARGIN_MS = 10_000
"""A taken delivery's lease: the attempt's timeout plus this, then a peer may take it."""
MAX_ERROR_CHARS = 300
MAX_ANSWER_BYTES = 65536
"""Of a receiver's answer, only the status and headers matter: its body is read this far."""


class Deliverer:
    def __init__(self, client: aioredis.Redis, keys: Keys, settings: Settings,
                 webhooks: Webhooks, metrics: Metrics, *, consumer: str | None = None,
                 read_every_ms: int = 100, verify: ssl.SSLContext | None = None) -> None:
        """`verify`: the TLS context receivers' certificates are checked with (default: the
        system's and certifi's roots, as httpx has them; tests pass their own CA's)."""
        self.client = client
        self.link = shared_link(client)
        self.verify: ssl.SSLContext | bool = True if verify is None else verify
        self.keys = keys
        self.settings = settings
        self.webhooks = webhooks
        self.metrics = metrics
        self.consumer = consumer or consumer_name()
        self.read_every_ms = read_every_ms
        """The group is read this often (at once again after a full read), not blocked on: a
        blocking read woke every gateway for each burst of events, and a memo hit's two
        events cost it a read, a lookup and an acknowledgement, three Redis round trips more
        than the hit itself. A delivery is queued at most this much later."""
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._lag_s = 0.0
        self._lag_watch: asyncio.Task[None] | None = None
        """Measures `_lag_s` while deliveries are being sent (`_watch_lag`)."""
        self._pools: dict[tuple[str, str, int], httpx.AsyncHTTPTransport] = {}
        """A client per receiver, most recently used last. Keyed by the URL's host name, not
        the address: a connection verified by TLS for one name never carries another's."""
        self._closing: set[asyncio.Task[None]] = set()
        self._timeout = httpx.Timeout(settings.webhook_timeout_ms / 1000).as_dict()

    def _pool(self, target: ssrf.Target) -> httpx.AsyncHTTPTransport:
        key = (target.url.scheme, target.host, target.port)
        pool = self._pools.pop(key, None)
        if pool is None:
            # httpx's transport on its own: a client's layers (redirects, cookies, auth,
            # proxies from the environment) are all things a delivery must not do, and cost
            # a fifth of its CPU.
            pool = httpx.AsyncHTTPTransport(verify=self.verify,
                                            limits=httpx.Limits(max_connections=PER_ORIGIN))
            if len(self._pools) >= MAX_POOLS:
                oldest = self._pools.pop(next(iter(self._pools)))
                closing = asyncio.create_task(oldest.aclose())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        self._pools[key] = pool
        return pool

    async def aclose(self) -> None:
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, *self._closing, return_exceptions=True)
        for pool in self._pools.values():
            await pool.aclose()

    # --- events -> deliveries ---

    async def ensure_group(self) -> None:
        await create_group(self.client, self.keys.followed, Keys.WEBHOOK_GROUP)

    async def consume(self) -> None:
        """Queue the deliveries events call for, until cancelled."""
        await self.ensure_group()
        next_reclaim = 0.0
        while True:
            if time.monotonic() >= next_reclaim:
                await self.reclaim()
                next_reclaim = time.monotonic() + RECLAIM_EVERY_S
            try:
                read = await read_group(self.link, self.keys.followed, Keys.WEBHOOK_GROUP,
                                        self.consumer, READ_COUNT)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()
                continue
            entries: list[tuple[bytes, bytes, bytes | None]] = [
                (entry_id, fields.get(b"data", b""), fields.get(b"user", b""))
                for entry_id, fields in read]
            if entries:
                await self.handle(entries)
            if len(entries) < READ_COUNT:
                await asyncio.sleep(self.read_every_ms / 1000)

    async def reclaim(self, min_idle_ms: int = RECLAIM_IDLE_MS) -> None:
        """Take over the entries another consumer left pending (it died before queueing)."""
        async for entries in reclaimed(self.client, self.keys.followed, Keys.WEBHOOK_GROUP,
                                       self.consumer, min_idle_ms, READ_COUNT):
            # The reclaim script returns no `user`: the deliverer reads the owner from the
            # execution's record or the pipeline's hash, which hold it too.
            await self.handle([(entry_id, data, None) for entry_id, data in entries])

    async def handle(self, entries: list[tuple[bytes, bytes, bytes | None]]) -> None:
        """Queue the deliveries `entries` call for, then acknowledge them all."""
        candidates: list[tuple[bytes, bytes, bytes | None, str, Kind, str]] = []
        for entry_id, data, user in entries:
            if data.startswith(CANDIDATES):
                head = decode_head(data)
                if head.type.startswith("execution_") and head.request_id:
                    candidates.append((entry_id, data, user, head.type, "execution",
                                       head.request_id))
                elif head.type.startswith("pipeline_") and head.pipeline_id:
                    candidates.append((entry_id, data, user, head.type, "pipeline",
                                       head.pipeline_id))
                elif head.type.startswith("batch_") and head.batch_id:
                    candidates.append((entry_id, data, user, head.type, "batch", head.batch_id))
        if candidates:
            # One look-up per execution, pipeline or batch, however many of its events a read
            # brings (a run's queued, started, progress and complete; a memo hit's two).
            owners = list(dict.fromkeys((kind, owner_id) for *_, kind, owner_id in candidates))
            lookup: list[tuple[str, ...]] = []
            for kind, owner_id in owners:
                if kind == "execution":
                    lookup.append(("HMGET", self.keys.execution(owner_id), "callback",
                                   "principal"))
                else:
                    owner = (self.keys.pipeline(owner_id) if kind == "pipeline"
                             else self.keys.batch(owner_id))
                    lookup.append(("HMGET", owner, "callback_url", "callback_events",
                                   "principal"))
            replies = await self.link.pipeline(lookup)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            found = dict(zip(owners, replies, strict=True))
            deliveries = []
            for entry_id, data, user, event_type, kind, owner_id in candidates:
                fields = found[(kind, owner_id)]
                target = _callback_of(kind, fields)
                if target is None or event_type not in target[1]:
                    continue
                principal = (user or fields[-1] or b"").decode()
                deliveries.append(NewDelivery(entry_id.decode(), kind, owner_id, target[0],
                                              principal, data))
            if deliveries:
                await self.webhooks.queue(deliveries)
                self._wake.set()
        await self.link.execute("XACK", self.keys.followed, Keys.WEBHOOK_GROUP,
                                *(entry_id for entry_id, _, _ in entries))

    # --- sending ---

    async def deliver(self) -> None:
        """Send due deliveries, until cancelled."""
        lease_ms = self.settings.webhook_timeout_ms + LEASE_MARGIN_MS
        try:
            await self._deliver(lease_ms)
        finally:
            if self._lag_watch is not None:
                self._lag_watch.cancel()

    async def _deliver(self, lease_ms: int) -> None:
        while True:
            busy = self._lag_s > BUSY_LAG_S
            free = max(CONCURRENCY - len(self._sending), 0)
            if busy:
                free = min(free, BUSY_STARTS)
            self._wake.clear()  # before claiming: a delivery queued meanwhile wakes the wait
            due, next_due = await self.webhooks.claim(free, lease_ms) if free else ([], None)
            for item in due:
                task = asyncio.create_task(self._send(item))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            if self._sending and self._lag_watch is None:
                self._lag_watch = asyncio.create_task(self._watch_lag())
            if len(due) == free and free:
                if busy:
                    await asyncio.sleep(LAG_TICK_S)
                continue  # more may be due
            wait = IDLE_POLL_S if next_due is None else min(
                IDLE_POLL_S, max(next_due - time.time(), 0.0))
            if wait > 0:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                # cancellation that lands as its timeout fires, and the loop never stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _watch_lag(self) -> None:
        """Keep `_lag_s`, how late this event loop runs its timers, on average, while
        deliveries are being sent; started with them, it ends with the last one. (It used to
        run always: 50 of an idle gateway's 105 wake-ups a second.) The first claim after a
        quiet spell goes by the last figure measured."""
        try:
            while self._sending:
                before = time.perf_counter()
                await asyncio.sleep(LAG_TICK_S)
                late = max(time.perf_counter() - before - LAG_TICK_S, 0.0)
                self._lag_s = 0.8 * self._lag_s + 0.2 * late
        finally:
            self._lag_watch = None

    async def _send(self, due: Due) -> None:
        try:
            status, error, retry_after_ms = await self.attempt(due)
        except Exception as exc:  # never lose a delivery to a bug: it is tried again later
            log.exception("a webhook attempt failed unexpectedly")
            status, error, retry_after_ms = None, f"internal: {type(exc).__name__}", None
        if status is not None and 200 <= status < 300:
            outcome, next_delay = "success", None
        elif status == 410:
            outcome, next_delay = "gone", None
        else:
            outcome = ("http_error" if status is not None
                       else "refused" if error and error.startswith("refused")
                       else "timeout" if error == "timeout" else "connection_error")
            next_delay = retry_delay_ms(self.webhooks.schedule, due.attempt, retry_after_ms)
        self.metrics.count(f"webhook_attempt:{outcome}")
        if next_delay is None:
            self.metrics.count("webhook_delivery:" + (
                "delivered" if outcome == "success" else "gone" if outcome == "gone"
                else "exhausted"))
        await self.webhooks.record(due, status, error, next_delay)
        # Slots freed are filled in batches (one claim for several), but never left all idle;
        # a retry due earlier than what the loop waits for is found within IDLE_POLL_S.
        if len(self._sending) - 1 <= CONCURRENCY - CONCURRENCY // 4:
            self._wake.set()

    async def attempt(self, due: Due) -> tuple[int | None, str | None, int | None]:
        """Send one attempt: (status code or None, error or None, Retry-After in ms or None)."""
        settings = self.settings
        try:
            target = await ssrf.check(due.url, allow_http=settings.webhook_allow_http,
                                      allow_private=settings.webhook_allow_private)
        except ssrf.Refused as exc:
            return None, f"refused: {exc}"[:MAX_ERROR_CHARS], None
        timestamp = int(time.time())
        signatures = [signature_of(secret, due, timestamp)
                      for secret in await self.webhooks.signing_secrets(due.principal)]
        url = target.url
        host_header = url.netloc.rpartition("@")[2]
        extensions: dict[str, Any] = {}
        headers = {"host": host_header, "content-type": "application/json",
                   "user-agent": "relay-webhooks/1", "webhook-id": due.delivery_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": " ".join(signatures),
                   "relay-attempt": str(due.attempt)}
        if url.scheme == "https":
            extensions["sni_hostname"] = target.host
        pool = self._pool(target)
        response = None
        error = ""
        try:
            # The whole attempt, not each of its phases (httpx times connect, each write and
            # each read apart): a receiver answering a byte at a time must not outlast the
            # lease, or a peer would send the delivery again meanwhile.
            async with asyncio.timeout(self.settings.webhook_timeout_ms / 1000):
                for address in target.addresses:  # each one checked; the next if one refuses
                    # To the address checked, never a second lookup; the Host header, SNI and
                    # the certificate check name the URL's host.
                    netloc = (f"[{address}]" if isinstance(address, ipaddress.IPv6Address)
                              else str(address)) + f":{target.port}"
                    request_url = url._replace(netloc=netloc, fragment="").geturl()
                    request = httpx.Request(
                        "POST", request_url, headers=headers, content=due.body,
                        extensions={**extensions, "timeout": self._timeout})
                    try:
                        response = await pool.handle_async_request(request)
                        await _drain(response)
                        break
                    except httpx.ConnectError as exc:
                        error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
                    except httpx.TimeoutException:
                        return None, "timeout", None
                    except httpx.HTTPError as exc:
                        return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], None
        except TimeoutError:
            return None, "timeout", None
        if response is None:
            return None, error, None
        return response.status_code, None, _retry_after_ms(response.headers.get("retry-after"))


async def _drain(response: httpx.Response) -> None:
    """Read the answer's body, up to MAX_ANSWER_BYTES (more: the connection is dropped rather
    than read), and release the connection."""
    size = 0
    try:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                break
    finally:
        await response.aclose()


def signature_of(secret: str, due: Due, timestamp: int) -> str:
    return signature(secret, due.delivery_id, timestamp, due.body)


def _callback_of(kind: Kind, fields: list[Any]) -> tuple[str, tuple[str, ...]] | None:
    """(url, event types) from what the record holds, or None without a callback."""
    if kind == "execution":
        raw = fields[0]
        if not raw:
            return None
        callback = decode_callback(raw)
        return callback.url, tuple(callback.events)
    url, events = fields[0], fields[1]
    if not url:
        return None
    names = tuple(msgspec.json.decode(events)) if events else DEFAULT_EVENTS[kind]
    return url.decode(), names


def _retry_after_ms(value: str | None) -> int | None:
    """A Retry-After header (seconds, or an HTTP date) in milliseconds."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(int((when.timestamp() - time.time()) * 1000), 0)
