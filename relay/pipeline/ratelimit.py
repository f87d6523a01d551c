"""Rate limiting: per principal, shared by every gateway replica through Redis.

A fixed window of `RELAY_RATE_WINDOW` ms allowing `RELAY_RATE_LIMIT` requests, or the
principal's own numbers from principals.toml, counted by a Lua script (relay/lua/
ratelimit.lib.lua): an execute's count is made by its accept script, in the same round trip
(`RateCheck`), a request refused before its accept and an upload are counted on their own.
Uploads are counted apart, under the same numbers (their policy is named `upload-default` or
`upload-principal`). Every response of a limited route carries the IETF httpapi
`RateLimit-Policy` and `RateLimit` fields; a refusal is 429 with `Retry-After`.

(The `limits` library counted the window before; its round trip of its own cost a sync execute
0.3 ms at one caller, and its fixed window is these few lines of Lua.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

from relay.bus import Accepted, Bus, RateWindow, Script
from relay.errors import RateLimited
from relay.metrics import Metrics
from relay.policy import Policies
from relay.settings import Settings

_RATE = Script.named("rate", libs=("ratelimit",))


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


class Window(NamedTuple):
    """A principal's window: where its requests are counted, and how it reads."""

    rate: RateWindow
    policy: str
    window_s: int

    def state(self, used: int, left_ms: int) -> RateState:
        """The principal's state once the window's count is `used`, `left_ms` before it ends."""
        limit = self.rate.limit
        reset_s = min(max(math.ceil(left_ms / 1000), 0), self.window_s)
        return RateState(self.policy, limit, self.window_s, max(limit - used, 0), reset_s)


class RateLimiter:
    def __init__(self, bus: Bus, settings: Settings, policies: Policies) -> None:
        self._bus = bus
        self._settings = settings
        self._policies = policies

    def window(self, principal: str, scope: str = "") -> Window | None:
        """The principal's window (`scope` "upload" counts apart from execute, under the same
        numbers); None when this principal is not limited."""
        caps = self._policies.caps(principal)
        own = caps.rate_limit is not None or caps.rate_window is not None
        limit = caps.rate_limit or self._settings.rate_limit
        if not limit:
            return None
        window_s = (caps.rate_window or self._settings.rate_window_ms) // 1000
        policy = "principal" if own else "default"
        return Window(RateWindow(self._bus.keys.rate_window(scope, principal, limit, window_s),
                                 limit, window_s * 1000),
                      f"{scope}-{policy}" if scope else policy, window_s)

    async def hit_many(self, principal: str, count: int) -> list[RateState | RateLimited | None]:
        """Count `count` requests at once (a batch's items, one round trip): each one's state
        (None: not limited), or the RateLimited it is refused with, in order."""
        window = self.window(principal)
        if window is None:
            return [None] * count
        total, left_ms = await self.count(window, count)
        verdicts: list[RateState | RateLimited | None] = []
        for index in range(count):
            used = total - count + index + 1  # this item's place in the window
            verdicts.append(_verdict(window, used, left_ms))
        return verdicts

    async def count(self, window: Window, amount: int) -> tuple[int, int]:
        """Add `amount` to the window: its count after, and the ms it has left."""
        used, left_ms = await self._bus.run(_RATE, [window.rate.key],
                                            [amount, window.rate.window_ms])
        return int(used), int(left_ms)


def _verdict(window: Window, used: int, left_ms: int) -> RateState | RateLimited:
    """The state once the window's count is `used`, or the refusal when that is over."""
    state = window.state(used, left_ms)
    return _refusal(state) if used > window.rate.limit else state


def _refusal(state: RateState) -> RateLimited:
    retry_after = max(state.reset_s, 1)
    return RateLimited(
        f"over {state.limit} requests per {state.window_s} s; retry in {retry_after} s",
        retry_after_s=retry_after, headers=state.headers())


class RateCheck:
    """One request's count under the rate limit, made once: by its accept script, in the same
    round trip (`in_accept` gives the script the window, `accepted` reads the count back), or,
    for a request refused before it is accepted (and for an upload), on its own (`headers`)."""

    def __init__(self, limiter: RateLimiter, principal: str, metrics: Metrics,
                 scope: str = "") -> None:
        self._limiter = limiter
        self._window = limiter.window(principal, scope)
        self._uncounted = self._window is not None
        self._verdict: RateState | RateLimited | None = None
        self._metrics = metrics

    def in_accept(self) -> RateWindow | None:
        """The window for the accept script to count the request in; None when it is not
        limited, or counted already (an accept sent again counts nothing more)."""
        if not self._uncounted or self._window is None:
            return None
        self._uncounted = False
        return self._window.rate

    def accepted(self, accepted: Accepted) -> None:
        """Read the count of the accept that was given `in_accept`'s window."""
        if self._window is not None:
            self._verdict = _verdict(self._window, accepted.rate_used, accepted.rate_left_ms)

    async def headers(self) -> dict[str, str]:
        """The RateLimit fields for the answer (counting the request first, if no accept
        did). Raises RateLimited."""
        if self._uncounted and self._window is not None:
            self._uncounted = False
            used, left_ms = await self._limiter.count(self._window, 1)
            self._verdict = _verdict(self._window, used, left_ms)
        return _fields(self._verdict, self._metrics)


class Counted:
    """A count made already (a batch's item's, by `hit_many`), answering as RateCheck does."""

    def __init__(self, verdict: RateState | RateLimited | None, metrics: Metrics) -> None:
        self._verdict = verdict
        self._metrics = metrics

    def in_accept(self) -> RateWindow | None:
        return None

    def accepted(self, accepted: Accepted) -> None:
        pass

    async def headers(self) -> dict[str, str]:
        """The RateLimit fields for the answer. Raises RateLimited."""
        return _fields(self._verdict, self._metrics)


def _fields(verdict: RateState | RateLimited | None, metrics: Metrics) -> dict[str, str]:
    if isinstance(verdict, RateLimited):
        metrics.count("rate_limited")
        raise verdict
    return {} if verdict is None else verdict.headers()
