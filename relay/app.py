"""The gateway: routes, the execute pipeline in order, and the process's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import redis
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay import connection
from relay.bus import Accepted as BusAccepted
from relay.bus import Bus
from relay.cid import InvalidCid, normalize
from relay.errors import (
    Conflict,
    IdempotencyKeyReuse,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RelayError,
    Unavailable,
)
from relay.events import EventFanIn
from relay.http import RequestIdMiddleware, json_response, problem_response, read_body
from relay.keys import Keys
from relay.modules import InvalidModule, ModuleStore, inspect, to_binary
from relay.pipeline.authenticate import Authenticator
from relay.pipeline.validate import Validated, validate
from relay.schemas import (
    Accepted,
    ExecuteResponse,
    Links,
    decode_completed,
    decode_name_binding,
    encode,
    response_from_completed,
)
from relay.settings import Settings

log = logging.getLogger("relay.gateway")

REPLAYED = {"Idempotent-Replayed": "true"}
MAX_PAGE = 200
MAX_NAME_RETRIES = 3


class Gateway:
    """Everything one gateway process shares between requests."""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.prefix)
        self.bus = Bus(client, self.keys, events_retention=settings.events_retention,
                       requests_retention=settings.requests_retention)
        self.modules = ModuleStore(client, self.keys)
        self.fan_in = EventFanIn(client, self.keys)
        self.authenticate = Authenticator(settings.api_keys)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# --- execute ---


async def execute(request: Request) -> Response:
    """The pipeline, in the contract's order: authenticate -> validate -> idempotency -> publish.
    (Rate limiting and authorization join in their places in the next stages of the build.)"""
    gw = gateway_of(request)
    principal = gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    respond_async = "respond-async" in request.headers.get("prefer", "")
    validated, accepted, completion = await _publish(
        gw, body, request.headers.get("idempotency-key"), principal, respond_async)
    request_id = validated.request.request_id
    try:
        headers: dict[str, str] = {}
        if not accepted.is_new:
            if validated.explicit_key and accepted.fingerprint != validated.fingerprint:
                raise IdempotencyKeyReuse(
                    "this idempotency key was used with a different request")
            if accepted.result is not None:
                return json_response(accepted.result, headers=REPLAYED)
            headers = REPLAYED
        if completion is None:
            return _accepted(request_id, headers)
        result = await _wait_result(gw, request_id, completion)
        if result is None:
            return _accepted(request_id, headers)
        return json_response(result, headers=headers)
    finally:
        gw.fan_in.release(request_id, completion)


async def _publish(gw: Gateway, body: bytes, header_key: str | None, principal: str,
                   respond_async: bool,
                   ) -> tuple[Validated, BusAccepted, asyncio.Future[bytes] | None]:
    """Validate and accept; for a sync caller, also a registered completion to wait on."""
    for _ in range(MAX_NAME_RETRIES):
        validated = await validate(body, header_key, principal, gw.modules, gw.settings)
        request_id = validated.request.request_id
        # Registered before publishing, so the completion cannot slip past us.
        completion = None if respond_async else gw.fan_in.completion(request_id)
        try:
            accepted = await gw.bus.accept(validated.request, validated.fingerprint,
                                           validated.name)
        except BaseException:
            gw.fan_in.release(request_id, completion)
            raise
        if not accepted.name_moved:
            return validated, accepted, completion
        gw.fan_in.release(request_id, completion)
        assert validated.name is not None
        gw.modules.forget(validated.name)  # our cached binding was stale: resolve it afresh
    raise Conflict("the module's name moved while the request was accepted; retry")


async def _wait_result(gw: Gateway, request_id: str, completion: asyncio.Future[bytes],
                       ) -> bytes | None:
    try:
        async with asyncio.timeout(gw.settings.sync_wait_ms / 1000):
            event = await completion
        return encode(response_from_completed(decode_completed(event)))
    except TimeoutError:
        # One last look, in case the fan-in was reconnecting when the result landed.
        stored: bytes | None = await gw.client.hget(gw.keys.execution(request_id), "result")
        return stored


def _accepted(request_id: str, headers: dict[str, str]) -> Response:
    location = f"/executions/{request_id}"
    body = Accepted(request_id=request_id, status="queued", links=Links(
        self_=location, events=f"/intent/execute-wasm/events?request_id={request_id}"))
    return json_response(body, 202, {**headers, "Location": location})


# --- executions ---


async def get_execution(request: Request) -> Response:
    gw = gateway_of(request)
    principal = gw.authenticate(request)
    request_id = request.path_params["request_id"]
    owner, status, cid, result = await gw.client.hmget(
        gw.keys.execution(request_id), ["principal", "status", "cid", "result"])
    if owner is None or owner.decode() != principal:
        raise NotFound(f"no execution {request_id}")  # another's execution is not ours to show
    view: dict[str, Any] = {"request_id": request_id, "status": status.decode(),
                            "cid": cid.decode()}
    if result is not None:
        view.update(msgspec.structs.asdict(msgspec.json.decode(result, type=ExecuteResponse)))
    return json_response(view)


# --- modules and names ---


async def upload_module(request: Request) -> Response:
    gw = gateway_of(request)
    principal = gw.authenticate(request)
    body = await read_body(request, gw.settings.max_module_bytes)
    name = request.query_params.get("name")
    tag = request.query_params.get("tag") or "latest"
    if name is None and "tag" in request.query_params:
        raise InvalidRequest("a tag needs a name")
    if name is not None:  # refuse before storing anything
        await gw.modules.check_bindable(name, tag, principal)
    try:
        wasm = to_binary(body)
        info = await anyio.to_thread.run_sync(inspect, wasm)
    except InvalidModule as exc:
        raise InvalidRequest(str(exc)) from None
    if len(wasm) > gw.settings.max_module_bytes:
        raise InvalidRequest(f"the compiled module is over {gw.settings.max_module_bytes} bytes")
    created = await gw.modules.put(info, wasm, principal)
    if name is not None:
        await gw.modules.bind(name, tag, info.cid, principal)
    return json_response(info, 201 if created else 200, {"Location": f"/modules/{info.cid}"})


async def list_modules(request: Request) -> Response:
    gw = gateway_of(request)
    gw.authenticate(request)
    cursor = _query_int(request, "cursor", 0, 0, 2**31)
    limit = _query_int(request, "limit", 50, 1, MAX_PAGE)
    return json_response(await gw.modules.page(cursor, limit))


async def get_module(request: Request) -> Response:
    gw = gateway_of(request)
    gw.authenticate(request)
    return json_response(await gw.modules.require(_path_cid(request)))


async def get_module_wasm(request: Request) -> Response:
    gw = gateway_of(request)
    gw.authenticate(request)
    cid = _path_cid(request)
    wasm = await gw.modules.wasm(cid)
    if wasm is None:
        raise NotFound(f"no module {cid}")
    return Response(wasm, media_type="application/wasm")


async def delete_module(request: Request) -> Response:
    gw = gateway_of(request)
    principal = gw.authenticate(request)
    await gw.modules.delete(_path_cid(request), principal)
    return Response(status_code=204)


async def bind_name(request: Request) -> Response:
    gw = gateway_of(request)
    principal = gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    try:
        binding = decode_name_binding(body)
        cid = normalize(binding.cid)
    except (msgspec.DecodeError, InvalidCid) as exc:
        raise InvalidRequest.at("/cid", str(exc)) from None
    name, tag = request.path_params["name"], request.path_params["tag"]
    await gw.modules.bind(name, tag, cid, principal)
    return json_response({"name": name, "tag": tag, "cid": cid})


async def get_name(request: Request) -> Response:
    gw = gateway_of(request)
    gw.authenticate(request)
    name = request.path_params["name"]
    return json_response({"name": name, "tags": await gw.modules.tags(name)})


def _path_cid(request: Request) -> str:
    try:
        return normalize(request.path_params["cid"])
    except InvalidCid as exc:
        raise InvalidRequest(str(exc)) from None


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


# --- health ---


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await gateway_of(request).client.ping()
    except redis.RedisError:
        return json_response({"status": "unavailable", "redis": False}, 503)
    return json_response({"status": "ready", "redis": True})


async def health(request: Request) -> Response:
    gw = gateway_of(request)
    try:
        executors = await gw.bus.live_executors(gw.settings.heartbeat_ttl_ms)
        status = "healthy" if executors else "degraded"
    except redis.RedisError:
        executors, status = 0, "unhealthy"
    body = {
        "status": status,
        "features": {"idempotency": True, "rate_limiting": False, "authorization": False,
                     "sse_events": False, "bus_events": True},
        "limits": {"rate_limit": None, "rate_window": None,
                   "idempotency_ttl": gw.settings.idempotency_ttl_ms},
        "executors": executors,
    }
    return json_response(body, 503 if status == "unhealthy" else 200)


# --- errors ---


async def relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    return problem_response(exc, request)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: RelayError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed here",
                                 headers=dict(exc.headers or {}))
    elif exc.status_code == 404:
        error = NotFound(f"no route {request.url.path}")
    else:
        error = Conflict(str(exc.detail))
        error.status = exc.status_code  # type: ignore[misc]
    return problem_response(error, request)


async def redis_error(request: Request, exc: Exception) -> Response:
    log.warning("redis unavailable: %s", exc)
    return problem_response(Unavailable("the store is unreachable; retry shortly"), request)


ROUTES = [
    Route("/intent/execute-wasm", execute, methods=["POST"]),
    Route("/intent/execute-wasm/health", health, methods=["GET"]),
    Route("/executions/{request_id}", get_execution, methods=["GET"]),
    Route("/modules", upload_module, methods=["POST"]),
    Route("/modules", list_modules, methods=["GET"]),
    Route("/modules/{cid}", get_module, methods=["GET"]),
    Route("/modules/{cid}", delete_module, methods=["DELETE"]),
    Route("/modules/{cid}/wasm", get_module_wasm, methods=["GET"]),
    Route("/names/{name}/{tag}", bind_name, methods=["PUT"]),
    Route("/names/{name}", get_name, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]


def create_app(settings: Settings) -> Starlette:
    """The gateway ASGI app. `settings.redis_url` must be set (the CLI starts an embedded Redis
    and fills it in when the environment has none)."""
    if settings.redis_url is None:
        raise ValueError("create_app needs settings.redis_url")
    redis_url = settings.redis_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = connection.connect(redis_url)
        gateway = Gateway(settings, client)
        await gateway.bus.ensure_group()
        await gateway.fan_in.start(await gateway.bus.last_event_id())
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.fan_in.stop()
            await client.aclose()

    middleware = [Middleware(RequestIdMiddleware)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["*"], allow_headers=["*"],
            expose_headers=["Location", "X-Request-Id", "Idempotent-Replayed", "Retry-After"]))
    return Starlette(
        routes=ROUTES,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            RelayError: relay_error,
            HTTPException: http_error,
            redis.ConnectionError: redis_error,
            redis.TimeoutError: redis_error,
        },
    )
