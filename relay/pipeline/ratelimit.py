"""Rate limiting: per principal, shared by every gateway replica through Redis (`limits`).

A fixed window of `RELAY_RATE_WINDOW` ms allowing `RELAY_RATE_LIMIT` requests, or the
principal's own numbers from principals.toml. Uploads are counted apart, under the same
numbers (their policy is named `upload-default` or `upload-principal`). Every response of a
limited route carries the IETF httpapi `RateLimit-Policy` and `RateLimit` fields; a refusal is
429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import math
import time
from functools import lru_cache
from typing import NamedTuple

import redis.asyncio as aioredis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage

from relay.errors import RateLimited
from relay.keys import Keys
from relay.metrics import Metrics
from relay.policy import Policies
from relay.settings import Settings


class RateState(NamedTuple):
    policy: str
    limit: int
    window_s: int
    remaining: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Policy": f'"{self.policy}";q={self.limit};w={self.window_s}',
            "RateLimit": f'"{self.policy}";r={self.remaining};t={self.reset_s}',
        }


@lru_cache(maxsize=256)
def _item(limit: int, window_s: int) -> RateLimitItem:
    return RateLimitItemPerSecond(limit, window_s)


def _limits_uri(redis_url: str) -> str:
    # `limits` names its schemes after the client; the pool we hand it decides the connection.
    if redis_url.startswith("unix://"):
        return "async+redis+unix://" + redis_url.removeprefix("unix://")
    return "async+" + redis_url


class RateLimiter:
    def __init__(self, client: aioredis.Redis, keys: Keys, settings: Settings,
                 policies: Policies) -> None:
        assert settings.redis_url is not None
        # One pool per process: `limits` runs its scripts on the gateway's own connections.
        self._storage = RedisStorage(_limits_uri(settings.redis_url), implementation="redispy",
                                     key_prefix=keys.rate_limits,
                                     connection_pool=client.connection_pool)
        self._settings = settings
        self._policies = policies
        self._window_ends: dict[str, float] = {}
        """When each window this gateway has seen ends (Unix time)."""

    async def hit_many(self, principal: str, count: int) -> list[RateState | RateLimited | None]:
        """Count `count` requests at once (a batch's items, one round trip): each one's state
        (None: not limited), or the RateLimited it is refused with, in order."""
        counted = await self._count(principal, "", count)
        if counted is None:
            return [None] * count
        state, total = counted
        verdicts: list[RateState | RateLimited | None] = []
        for index in range(count):
            used = total - count + index + 1  # this item's place in the window
            own = state._replace(remaining=max(state.limit - used, 0))
            verdicts.append(own if used <= state.limit else _refusal(own))
        return verdicts

    async def hit(self, principal: str, scope: str = "") -> RateState | None:
        """Count one request. Raises RateLimited (with the RateLimit fields) when over; None
        when this principal is not limited. A `scope` ("upload") counts apart from execute,
        under the same numbers."""
        counted = await self._count(principal, scope, 1)
        if counted is None:
            return None
        state, total = counted
        if total > state.limit:
            raise _refusal(state)
        return state

    async def _count(self, principal: str, scope: str, amount: int,
                     ) -> tuple[RateState, int] | None:
        """Add `amount` to the principal's window: its state after, and the window's count."""
        caps = self._policies.caps(principal)
        own = caps.rate_limit is not None or caps.rate_window is not None
        limit = caps.rate_limit or self._settings.rate_limit
        if not limit:
            return None
        window_s = (caps.rate_window or self._settings.rate_window_ms) // 1000
        item = _item(limit, window_s)
        key = item.key_for(scope, principal) if scope else item.key_for(principal)
        # The library's hit() then get_window_stats() would be three round trips in a row. The
        # count comes back from the increment; when the window ends is read once per window
        # (or learned, when this increment opened it), then remembered.
        count = await self._storage.incr(key, item.get_expiry(), amount=amount)
        now = time.time()
        if count == amount:
            window_end = now + window_s
        else:
            window_end = self._window_ends.get(key, 0.0)
            if window_end <= now:
                window_end = await self._storage.get_expiry(key)
        if len(self._window_ends) > 100_000:  # one entry per active principal: bounded
            self._window_ends.clear()
        self._window_ends[key] = window_end
        reset_s = min(max(math.ceil(window_end - now), 0), window_s)
        policy = "principal" if own else "default"
        return RateState(f"{scope}-{policy}" if scope else policy, limit, window_s,
                         max(limit - count, 0), reset_s), count


def _refusal(state: RateState) -> RateLimited:
    retry_after = max(state.reset_s, 1)
    return RateLimited(
        f"over {state.limit} requests per {state.window_s} s; retry in {retry_after} s",
        retry_after_s=retry_after, headers=state.headers())


class RateCheck:
    """One request's count under way. Started as soon as the caller is known, so its round trip
    overlaps reading and validating the body; `verdict()` is awaited before anything is accepted,
    and a refusal wins over any error found meanwhile (the stages still decide in order)."""

    def __init__(self, limiter: RateLimiter, principal: str, metrics: Metrics,
                 scope: str = "") -> None:
        self._counted = asyncio.ensure_future(limiter.hit(principal, scope))
        self._metrics = metrics

    async def verdict(self) -> RateState | None:
        """The principal's state, None when unlimited. Raises RateLimited (429)."""
        try:
            return await self._counted
        except RateLimited:
            self._metrics.count("rate_limited")
            raise

    async def headers(self) -> dict[str, str]:
        """The RateLimit fields for the answer. Raises RateLimited."""
        state = await self.verdict()
        return {} if state is None else state.headers()

    def abandon(self) -> None:
        """The request ended (cancelled, crashed) before its verdict was wanted."""
        if not self._counted.done():
            self._counted.cancel()
            self._counted.add_done_callback(_retrieve)


class Counted:
    """A count made already (a batch's item's, by `hit_many`), answering as RateCheck does."""

    def __init__(self, verdict: RateState | RateLimited | None, metrics: Metrics) -> None:
        self._verdict = verdict
        self._metrics = metrics

    async def headers(self) -> dict[str, str]:
        """The RateLimit fields for the answer. Raises RateLimited."""
        if isinstance(self._verdict, RateLimited):
            self._metrics.count("rate_limited")
            raise self._verdict
        return {} if self._verdict is None else self._verdict.headers()


def _retrieve(future: asyncio.Future[RateState | None]) -> None:
    if not future.cancelled():
        future.exception()  # what it raised, if anything, is of no interest now
