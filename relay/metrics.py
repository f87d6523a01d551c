"""Prometheus metrics, cluster-wide.

Gateways and executors count in memory and add their counts to one Redis hash about once a
second, so `GET /metrics` on any gateway replica reports the totals of the whole deployment
(scrape one replica, or take `max` across them; never `sum`). Counting costs no round trip on
the request path.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import Counter, defaultdict

import redis
import redis.asyncio as aioredis

from relay.keys import Keys

log = logging.getLogger("relay.metrics")

PREFIX = "relay_execute_wasm"
COUNTERS = {
    "success": "Executions that ran to the end.",
    "error": "Executions that ended with an error (trap, limit, cancellation, internal).",
    "invalid_request": "Execute requests refused as invalid (400, 404, 413, 422).",
    "rate_limited": "Execute requests refused by the rate limiter (429).",
    "permission_denied": "Requests refused by the authorization policies (403).",
    "idempotent_hit": "Execute requests answered by an earlier execution (replay or join).",
}
LABELLED_COUNTERS = (
    # (metric, counted field prefix, label, its values, help)
    ("relay_webhook_attempts_total", "webhook_attempt:", "outcome",
     ("success", "http_error", "gone", "timeout", "connection_error", "refused"),
     "Webhook delivery attempts by outcome (refused: the URL failed the SSRF check)."),
    ("relay_webhook_deliveries_total", "webhook_delivery:", "result",
     ("delivered", "gone", "exhausted"),
     "Webhook deliveries finished: delivered (2xx), gone (410) or exhausted (retries used up)."),
    ("relay_module_compilations_total", "module_load:", "source", ("compiled", "disk"),
     "Modules executors made ready to run: compiled, or loaded from their disk cache of "
     "compiled modules (RELAY_MODULE_CACHE_DIR)."),
)
HISTOGRAMS = {
    "duration_seconds": ("Wall-clock time of executions.",
                         (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0, 30.0, 60.0, 300.0)),
    "gas_used": ("Gas (wasmtime fuel) used by executions.",
                 tuple(float(10**exponent) for exponent in range(2, 13))),
}

# Each histogram's fields in the metrics hash: a bucket's (the last for values above every
# bound), the count's and the sum's.
_FIELDS = {name: (tuple(f"{name}:bucket:{i}" for i in range(len(bounds) + 1)),
                  f"{name}:count", f"{name}:sum")
           for name, (_, bounds) in HISTOGRAMS.items()}


class Metrics:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._counts: Counter[str] = Counter()
        self._sums: defaultdict[str, float] = defaultdict(float)

    def count(self, name: str, amount: int = 1) -> None:
        self._counts[name] += amount

    def observe_execution(self, error_code: str | None, duration_ms: float,
                          gas_used: int) -> None:
        if error_code is None:
            self.count("success")
        else:
            self.count("error")
            self.count(f"error:{error_code}")
        self._observe("duration_seconds", duration_ms / 1000)
        self._observe("gas_used", float(gas_used))

    def _observe(self, name: str, value: float) -> None:
        # Once an execution: the first bucket whose bound is at or above it, by bisection, and
        # the fields' names made once (_FIELDS).
        buckets, count, total = _FIELDS[name]
        self._counts[buckets[bisect.bisect_left(HISTOGRAMS[name][1], value)]] += 1
        self._counts[count] += 1
        self._sums[total] += value

    async def flush(self) -> None:
        """Add what was counted since the last flush to the shared totals."""
        if not self._counts and not self._sums:
            return
        counts, sums = self._counts, self._sums
        self._counts, self._sums = Counter(), defaultdict(float)
        pipe = self.client.pipeline(transaction=False)
        for field, amount in counts.items():
            pipe.hincrby(self.keys.metrics, field, amount)
        for field, total in sums.items():
            pipe.hincrbyfloat(self.keys.metrics, field, total)
        try:
            await pipe.execute()
        except redis.RedisError:
            counts.update(self._counts)  # keep them for the next flush
            for field, total in self._sums.items():
                sums[field] += total
            self._counts, self._sums = counts, sums
            raise

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except redis.RedisError as exc:
                log.warning("cannot flush metrics, keeping them: %s", exc)

    async def render(self, gauges: dict[str, tuple[str, float | dict[str, float]]]) -> str:
        """The Prometheus text exposition of the totals, plus `gauges` (name: (help, value)),
        a value being a number or {labels as written between braces: number}."""
        await self.flush()
        raw = await self.client.hgetall(self.keys.metrics)
        totals = {field.decode(): float(value) for field, value in raw.items()}
        lines: list[str] = []
        for name, help_text in COUNTERS.items():
            metric = f"{PREFIX}_{name}_total"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter",
                      f"{metric} {_number(totals.get(name, 0))}"]
            if name == "error":
                for field in sorted(f for f in totals if f.startswith("error:")):
                    code = field.partition(":")[2]
                    lines.append(f'{metric}{{code="{code}"}} {_number(totals[field])}')
        for metric, field, label, values, help_text in LABELLED_COUNTERS:
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
            lines += [f'{metric}{{{label}="{value}"}} {_number(totals.get(field + value, 0))}'
                      for value in values]
        for name, (help_text, bounds) in HISTOGRAMS.items():
            metric = f"{PREFIX}_{name}"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"]
            cumulative = 0.0
            for i, bound in enumerate((*bounds, float("inf"))):
                cumulative += totals.get(f"{name}:bucket:{i}", 0)
                le = "+Inf" if bound == float("inf") else _number(bound)
                lines.append(f'{metric}_bucket{{le="{le}"}} {_number(cumulative)}')
            lines += [f"{metric}_sum {_number(totals.get(f'{name}:sum', 0))}",
                      f"{metric}_count {_number(totals.get(f'{name}:count', 0))}"]
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            if isinstance(value, dict):
                lines += [f"{name}{{{labels}}} {_number(one)}" for labels, one in value.items()]
            else:
                lines.append(f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
