"""The index, health, liveness, readiness, Prometheus metrics and the OpenAPI document: none
needs credentials."""

from __future__ import annotations

from typing import Literal

import msgspec
import redis
from starlette.requests import Request
from starlette.responses import Response

from relay import openapi, relay_version
from relay.connection import memory_full, out_of_memory
from relay.errors import Unavailable
from relay.gateway.http import json_response
from relay.gateway.state import gateway_of
from relay.keys import Keys
from relay.schemas import (
    PRIORITIES,
    Health,
    HealthFeatures,
    HealthLimits,
    Index,
    Liveness,
    Readiness,
)

EVENTS_PATH = "/intent/execute-wasm/events"
INDEX = json_response(Index(version=relay_version(), links={
    "docs": "/docs", "console": "/console", "openapi": "/openapi.json",
    "health": "/intent/execute-wasm/health",
    "execute": "/intent/execute-wasm", "events": EVENTS_PATH, "executions": "/executions/{id}",
    "modules": "/modules", "names": "/names/{name}", "tokens": "/auth/tokens"})).body


async def index(request: Request) -> Response:
    return json_response(INDEX)



async def healthz(request: Request) -> Response:
    return json_response(Liveness())


async def readyz(request: Request) -> Response:
    """Ready: Redis answers and every background loop runs (a gateway whose events reader is
    down would accept work it cannot answer)."""
    gw = gateway_of(request)
    try:
        await gw.client.ping()
    except redis.RedisError:
        raise Unavailable("Redis is unreachable") from None
    if gw.supervisor.down:
        raise Unavailable(f"restarting background loops: {', '.join(gw.supervisor.down)}")
    return json_response(Readiness())


async def health(request: Request) -> Response:
    gw = gateway_of(request)
    status: Literal["healthy", "degraded", "unhealthy"]
    full = False
    try:
        executors = await gw.bus.live_executors(gw.settings.heartbeat_ttl_ms)
        full = await memory_full(gw.client)
    except redis.ResponseError as exc:
        if not out_of_memory(exc):  # the executors' count prunes first: a write
            raise
        executors, full, status = 0, True, "degraded"
    except redis.RedisError:
        executors, status = 0, "unhealthy"
    else:
        # Degraded: it answers, but a policy file is broken (the last good set is in force),
        # a background loop is being restarted, no executor is alive to run what it accepts,
        # or Redis is (nearly) out of memory and refuses writes.
        degraded = gw.policies.error or gw.supervisor.down or not executors or full
        status = "degraded" if degraded else "healthy"
    served = {getattr(route, "path", None) for route in request.app.routes}
    body = Health(
        status=status,
        features=HealthFeatures(idempotency=True, rate_limiting=gw.settings.rate_limit > 0,
                                authorization=True, sse_events=EVENTS_PATH in served,
                                bus_events=True),
        limits=HealthLimits(rate_limit=gw.settings.rate_limit,
                            rate_window=gw.settings.rate_window_ms,
                            idempotency_ttl=gw.settings.idempotency_ttl_ms),
        executors=executors,
        policy_error=gw.policies.error or msgspec.UNSET,
        loops_down=gw.supervisor.down or msgspec.UNSET,
        redis_memory_full=full or msgspec.UNSET,
    )
    return json_response(body, 503 if status == "unhealthy" else 200)


async def metrics(request: Request) -> Response:
    gw = gateway_of(request)
    pipe = gw.client.pipeline(transaction=False)
    pipe.mget(gw.keys.queued, gw.keys.queued_of("high"), gw.keys.queued_of("low"))
    for priority in PRIORITIES:
        pipe.xpending(gw.keys.requests_of(priority), Keys.EXECUTOR_GROUP)
    counts, *pendings = await pipe.execute(raise_on_error=False)
    # A stream with no group yet (no executor ever started) has nothing pending.
    pending = sum(reply["pending"] for reply in pendings if not isinstance(reply, Exception))
    total, high, low = (max(int(count or 0), 0) for count in counts)
    executors = await gw.bus.live_executors(gw.settings.heartbeat_ttl_ms)
    text = await gw.metrics.render({
        "relay_queue_depth": ("Accepted executions not yet started, by priority.", {
            'priority="high"': high,
            # The rest of the total, rather than its own counter: executions accepted before
            # priorities existed are normal ones and were counted only in the total.
            'priority="normal"': max(total - high - low, 0),
            'priority="low"': low}),
        "relay_pending_entries": ("Request entries delivered to executors, not acknowledged.",
                                  pending),
        "relay_executors": ("Executors with a live heartbeat.", executors),
    })
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi_json(request: Request) -> Response:
    return json_response(openapi.document_bytes())
