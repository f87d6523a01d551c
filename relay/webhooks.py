"""Webhooks (Standard Webhooks 1.0): callbacks, signing secrets, and the deliveries' records.

What lives in Redis, so that any process may take over from any other:
- a callback, written at acceptance: an execution's record holds `callback` (`{"url",
  "events"}` JSON); a pipeline's hash holds `callback_url` and `callback_events`;
- each principal's signing secret (`whsec_` + base64 of 32 random bytes), with the previous
  one for `RELAY_WEBHOOK_ROTATION_GRACE` after a rotation;
- each delivery: a hash (url, principal, body, attempts made) and its place in one sorted set
  of due times; a deliverer takes it by pushing its due time to the end of a lease;
- each execution's or pipeline's log of attempts, for `GET /executions/{id}/deliveries`.

The deliverer (relay.deliverer) reads events and sends; this module holds the state and rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import secrets
import time
from typing import Literal, NamedTuple

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from relay import ssrf
from relay.bus import Script
from relay.errors import InvalidRequest
from relay.keys import Keys
from relay.schemas import encode, rfc3339

_QUEUE = Script.named("webhook_queue")
_CLAIM = Script.named("webhook_claim")
_RECORD = Script.named("webhook_record")
_ROTATE = Script.named("webhook_rotate")

SECRET_PREFIX = "whsec_"
SECRET_CACHE_S = 1.0
EXECUTION_EVENTS = ("execution_queued", "execution_started", "execution_progress",
                    "execution_output", "execution_paused", "execution_resumed",
                    "execution_complete", "execution_error")
PIPELINE_EVENTS = ("pipeline_progress", "pipeline_complete")
BATCH_EVENTS = ("batch_complete",)
"""For batches, once they exist: their route stores a callback as a pipeline's is stored, and
relay.deliverer looks it up by the event's `batch_id`."""
DEFAULT_EVENTS = {"execution": ("execution_complete", "execution_error"),
                  "pipeline": ("pipeline_complete",), "batch": ("batch_complete",)}
KNOWN_EVENTS = {"execution": EXECUTION_EVENTS, "pipeline": PIPELINE_EVENTS,
                "batch": BATCH_EVENTS}
Kind = Literal["execution", "pipeline", "batch"]

MAX_RETRY_AFTER_MS = 86_400_000
"""A receiver's Retry-After is honoured up to a day; longer would hold a delivery for ever."""


class Callback(msgspec.Struct, kw_only=True):
    """Where and for which events an execution's owner is called back."""

    url: str
    events: list[str]


decode_callback = msgspec.json.Decoder(Callback).decode


class Attempt(msgspec.Struct, kw_only=True):
    """One delivery attempt, as `GET /executions/{id}/deliveries` lists it."""

    webhook_id: str
    url: str
    attempt: int
    status_code: int | None
    error: str | None
    at: str
    next_attempt_at: str | None


decode_attempt = msgspec.json.Decoder(Attempt).decode


class DeliveryPage(msgspec.Struct, kw_only=True):
    """`GET /executions/{id}/deliveries`: a page of its attempts, oldest first."""

    items: list[Attempt]
    next_cursor: str | None


class WebhookSecret(msgspec.Struct):
    """`GET` and `POST /webhooks/secret`: the principal's signing secret."""

    secret: str


class NewDelivery(NamedTuple):
    """A delivery to queue: an event's, to its execution's or pipeline's callback."""

    delivery_id: str
    kind: Kind
    owner_id: str
    url: str
    principal: str
    body: bytes


class Due(NamedTuple):
    """A delivery a deliverer has taken, to send now."""

    delivery_id: str
    """The event's id on `relay:events`: the `webhook-id` of every attempt."""
    url: str
    principal: str
    body: bytes
    log: str
    attempt: int
    """The number of this attempt (1 for the first)."""


# --- the request side ---


async def check_callback(url: str | None, events: list[str] | None, kind: Kind, *,
                         allow_http: bool, allow_private: bool) -> Callback | None:
    """The callback a request asks for, checked: its URL by the SSRF guard (relay.ssrf), its
    events against the kind's. Raises InvalidRequest (pointers `/callback_url`,
    `/callback_events/N`); None without a URL (events without one are refused)."""
    if url is None:
        if events is not None:
            raise InvalidRequest.at("/callback_events", "callback_events needs a callback_url")
        return None
    known = KNOWN_EVENTS[kind]
    for index, name in enumerate(events or ()):
        if name not in known:
            raise InvalidRequest.at(f"/callback_events/{index}",
                                    f"unknown event type {name!r}; a {kind} has "
                                    f"{', '.join(known)}")
    if events is not None and not events:
        raise InvalidRequest.at("/callback_events", "callback_events must name at least one "
                                "event type (omit it for the default)")
    try:
        await ssrf.check(url, allow_http=allow_http, allow_private=allow_private)
    except ssrf.Refused as exc:
        raise InvalidRequest.at("/callback_url", f"callback_url refused: {exc}") from None
    return Callback(url=url, events=list(dict.fromkeys(events or DEFAULT_EVENTS[kind])))


def fingerprinted(fingerprint: str, callback: Callback) -> str:
    """An idempotency fingerprint that covers the request's callback too, so the same request
    with another callback is another request (and an explicit key reused with it, 422)."""
    return hashlib.sha256(fingerprint.encode() + encode(callback)).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' `v1,<base64 HMAC-SHA256>` over `<id>.<timestamp>.<body>`, keyed by
    the secret's base64-decoded bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def retry_delay_ms(schedule: tuple[int, ...], attempt: int, retry_after_ms: int | None,
                   ) -> int | None:
    """How long after failed attempt number `attempt` (1-based) the next one goes: the
    schedule's delay times a uniform factor in [0.8, 1.2], or a longer Retry-After (up to a
    day). None when the schedule is used up."""
    if attempt > len(schedule):
        return None
    delay = round(schedule[attempt - 1] * random.uniform(0.8, 1.2))
    if retry_after_ms is not None:
        delay = max(delay, min(retry_after_ms, MAX_RETRY_AFTER_MS))
    return delay


# --- the Redis side ---


class Webhooks:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, schedule: tuple[int, ...],
                 rotation_grace_ms: int) -> None:
        self.client = client
        self.keys = keys
        self.schedule = schedule
        self.rotation_grace_ms = rotation_grace_ms
        # A record outlives every attempt its delivery can make (each at most a day late,
        # by Retry-After), and a day more to be read.
        self.ttl_ms = sum(schedule) * 2 + MAX_RETRY_AFTER_MS * (len(schedule) + 1)
        self._have_secret: set[str] = set()
        """Principals known to have a secret (one is never deleted): no round trip for them."""
        self._secrets: dict[str, tuple[float, str, str | None, int]] = {}
        """Principal -> (read until, current, previous, rotated_ms), for signing."""

    # --- secrets ---

    async def ensure_secret(self, principal: str) -> None:
        """Create the principal's signing secret if it has none (at its first callback)."""
        if principal in self._have_secret:
            return
        await self.client.hsetnx(self.keys.webhook_secret(principal), "current", new_secret())
        self._have_secret.add(principal)

    async def secret(self, principal: str) -> str:
        """The principal's current secret, created if it has none."""
        await self.ensure_secret(principal)
        current = await self.client.hget(self.keys.webhook_secret(principal), "current")
        return str(current.decode())

    async def rotate(self, principal: str) -> str:
        """Replace the principal's secret; the old one still signs during the grace period."""
        secret = new_secret()
        await _ROTATE.run(self.client, [self.keys.webhook_secret(principal)],
                          [secret, int(time.time() * 1000)])
        self._have_secret.add(principal)
        self._secrets.pop(principal, None)
        return secret

    async def signing_secrets(self, principal: str) -> list[str]:
        """The secrets a delivery is signed with now: the current one, and the previous one
        during the grace period after a rotation. Read from Redis at most once a second per
        principal (a rotation by another process signs within a second)."""
        now = time.monotonic()
        cached = self._secrets.get(principal)
        if cached is None or cached[0] < now:
            current, previous, rotated_ms = await self.client.hmget(
                self.keys.webhook_secret(principal), "current", "previous", "rotated_ms")
            if current is None:
                current = (await self.secret(principal)).encode()
            cached = (now + SECRET_CACHE_S, current.decode(),
                      None if previous is None else previous.decode(),
                      0 if rotated_ms is None else int(rotated_ms))
            self._secrets[principal] = cached
        _, current_secret, previous_secret, rotated = cached
        if previous_secret is not None and time.time() * 1000 < rotated + self.rotation_grace_ms:
            return [current_secret, previous_secret]
        return [current_secret]

    # --- deliveries ---

    async def queue(self, deliveries: list[NewDelivery]) -> None:
        """Queue each delivery (due now), unless it exists already; one round trip."""
        now_ms = int(time.time() * 1000)
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for new in deliveries:
                log = self.keys.webhook_log(new.kind, new.owner_id)
                _QUEUE.queue(pipe, [self.keys.webhook(new.delivery_id), self.keys.webhook_due,
                                    log + ":owner"],
                             [new.delivery_id, new.url, new.principal, new.body, log, now_ms,
                              self.ttl_ms])
            try:
                await pipe.execute()
                return
            except NoScriptError:  # first use on this server (queueing twice changes nothing)
                if attempt:
                    raise
                await self.client.script_load(_QUEUE.source)

    async def claim(self, count: int, lease_ms: int) -> tuple[list[Due], float | None]:
        """Take up to `count` due deliveries for `lease_ms`; also when the next one is due
        (Unix seconds; None when nothing waits)."""
        now_ms = int(time.time() * 1000)
        next_due, taken = await _CLAIM.run(self.client, [self.keys.webhook_due],
                                           [now_ms, now_ms + lease_ms, count,
                                            self.keys.webhook("")])
        due = [Due(delivery_id.decode(), url.decode(), principal.decode(), body, log.decode(),
                   int(attempt) + 1)
               for delivery_id, url, principal, body, log, attempt in taken]
        return due, None if next_due in (b"", "", None) else int(next_due) / 1000

    async def record(self, due: Due, status_code: int | None, error: str | None,
                     next_delay_ms: int | None) -> None:
        """Log an attempt; the delivery is due again after `next_delay_ms`, or is finished."""
        now = time.time()
        next_at = None if next_delay_ms is None else now + next_delay_ms / 1000
        entry = Attempt(webhook_id=due.delivery_id, url=due.url, attempt=due.attempt,
                        status_code=status_code, error=error, at=rfc3339(now),
                        next_attempt_at=None if next_at is None else rfc3339(next_at))
        await _RECORD.run(self.client, [self.keys.webhook(due.delivery_id),
                                        self.keys.webhook_due, due.log],
                          [due.delivery_id, due.attempt, encode(entry),
                           "" if next_at is None else int(next_at * 1000), self.ttl_ms])

    async def log(self, kind: Kind, owner_id: str, offset: int, limit: int,
                  ) -> tuple[str | None, list[Attempt]]:
        """The log's owner (None: no delivery was ever queued) and a page of its attempts."""
        key = self.keys.webhook_log(kind, owner_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key + ":owner")
        pipe.lrange(key, offset, offset + limit)  # one more: is there a next page?
        owner, items = await pipe.execute()
        return (None if owner is None else owner.decode(),
                [decode_attempt(item) for item in items])
