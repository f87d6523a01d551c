"""Execution histograms: each observation counted in the first bucket whose bound is at or above
it, as Prometheus reads `le`, and in +Inf above every bound."""

from __future__ import annotations

import re

import redis.asyncio as aioredis

from relay.keys import Keys
from relay.metrics import Metrics
from relay.settings import Settings


async def test_durations_land_in_the_bucket_their_bound_covers(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        metrics = Metrics(client, Keys(settings.prefix))
        # ms: on the first bound (0.5 ms), just above it, on the 1 s bound, above them all.
        for duration_ms in (0.5, 0.6, 1000.0, 400_000.0):
            metrics.observe_execution(None, duration_ms, 10)
        text = await metrics.render({})
    finally:
        await client.aclose()
    buckets = dict(re.findall(r'relay_execute_wasm_duration_seconds_bucket\{le="([^"]+)"\} (\S+)',
                              text))
    assert (buckets["0.0005"], buckets["0.001"], buckets["0.5"], buckets["1"]) == (
        "1", "2", "2", "3")
    assert (buckets["300"], buckets["+Inf"]) == ("3", "4")
    assert "relay_execute_wasm_duration_seconds_count 4" in text
    assert 'relay_execute_wasm_gas_used_bucket{le="100"} 4' in text  # 10 gas each
