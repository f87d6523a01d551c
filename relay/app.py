"""The gateway: routes, the execute pipeline in order, and the process's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

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
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from relay import connection, openapi
from relay.apikeys import StoredKeys
from relay.bus import Accepted as BusAccepted
from relay.bus import Bus
from relay.cid import NAME_PATTERN, InvalidCid, compute, normalize
from relay.control import Controller
from relay.errors import (
    Conflict,
    FieldError,
    Forbidden,
    IdempotencyKeyReuse,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    Unavailable,
    decode_body,
)
from relay.events import EventFanIn
from relay.http import RequestIdMiddleware, json_response, problem_response, read_body
from relay.keys import Keys
from relay.metrics import Metrics
from relay.modules import (
    MAX_PAGE_SIZE,
    InvalidModule,
    ModuleStore,
    StoredModule,
    inspect,
    to_binary,
)
from relay.pipeline.authenticate import Authenticator
from relay.pipeline.ratelimit import RateLimiter, RateState
from relay.pipeline.validate import Validated, validate
from relay.policy import ModuleResource, Policies
from relay.schemas import (
    Accepted,
    Action,
    Health,
    HealthFeatures,
    HealthLimits,
    Links,
    Liveness,
    NameBound,
    NameTags,
    Readiness,
    decode_completed,
    decode_name_binding,
    decode_resume,
    encode,
    response_from_completed,
)
from relay.settings import Settings
from relay.streams import SERVER_SEND, Sse, mint_token, websocket
from relay.tokens import AccessTokens

log = logging.getLogger("relay.gateway")

REPLAYED = {"Idempotent-Replayed": "true"}
MAX_NAME_RETRIES = 3
DIGITS = re.compile(r"[0-9]{1,12}")  # str.isdigit() also takes "²", which int() refuses
QUEUE_FULL_RETRY_S = 5
# Refusals of an execute request counted as `invalid_request`.
INVALID = (InvalidRequest, NotFound, PayloadTooLarge, IdempotencyKeyReuse)


class Gateway:
    """Everything one gateway process shares between requests."""

    def __init__(self, settings: Settings, client: aioredis.Redis, policies: Policies,
                 token_secret: bytes) -> None:
        self.settings = settings
        self.client = client
        self.keys = Keys(settings.prefix)
        self.policies = policies
        self.bus = Bus(client, self.keys, events_retention=settings.events_retention,
                       requests_retention=settings.requests_retention,
                       max_queue=settings.max_queue)
        self.modules = ModuleStore(client, self.keys)
        self.fan_in = EventFanIn(client, self.keys, settings.sse_queue)
        self.authenticate = Authenticator(settings, StoredKeys(client, self.keys))
        self.rate_limiter = RateLimiter(client, self.keys, settings, policies)
        self.metrics = Metrics(client, self.keys)
        self.tokens = AccessTokens(token_secret)
        self.controller = Controller(client, self.keys, self.bus, self.fan_in, settings,
                                     policies)

    def authorize(self, principal: str, action: str, resource: ModuleResource | None) -> None:
        """Raises Forbidden unless the policies permit it."""
        if not self.policies.authorize(principal, action, resource):
            self.metrics.count("permission_denied")
            raise Forbidden(f"the policies do not allow {principal} to {action} "
                            + (f"module {resource.cid}" if resource else "here"))

    async def module_resource(self, cid: str, name: str = "") -> ModuleResource:
        """The Cedar view of a stored module. Raises NotFound."""
        stored = await self.modules.require(cid)
        return ModuleResource(cid, name, stored.owner)


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# --- execute ---


async def execute(request: Request) -> Response:
    """`POST /intent/execute-wasm`: the pipeline, in the contract's order. Authenticate (401),
    rate limit (429), then `_execute`: validate (400/404/413), and in one atomic script
    idempotency (replay, join, 422), authorization (403) and publishing."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    # The rate limiter's round trip runs while the body is read and validated; its verdict is
    # awaited before anything is accepted, and a refusal wins over any validation error, so
    # the stages still decide in the contract's order.
    limited = asyncio.ensure_future(gw.rate_limiter.hit(principal))
    try:
        response = await _execute(gw, request, principal, limited)
    except RelayError as error:
        if not isinstance(error, RateLimited):
            rate = await _rate_verdict(gw, limited)
            if isinstance(error, INVALID):
                gw.metrics.count("invalid_request")
            if rate is not None:
                error.headers.update(rate.headers())
        raise
    except BaseException:
        limited.cancel()
        limited.add_done_callback(_retrieve)  # what it raised, if anything, is of no interest
        raise
    rate = limited.result()
    if rate is not None:
        response.headers.update(rate.headers())
    return response


async def _rate_verdict(gw: Gateway, limited: asyncio.Future[RateState | None],
                        ) -> RateState | None:
    """The rate limiter's answer; raises RateLimited when the request is over its limit."""
    try:
        return await limited
    except RateLimited:
        gw.metrics.count("rate_limited")
        raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _execute(gw: Gateway, request: Request, principal: str,
                   limited: asyncio.Future[RateState | None]) -> Response:
    body = await read_body(request, gw.settings.max_request_bytes)
    respond_async = "respond-async" in request.headers.get("prefer", "")
    validated, accepted, completion = await _publish(
        gw, body, request.headers.get("idempotency-key"), principal, respond_async, limited)
    request_id = validated.request.request_id
    try:
        headers: dict[str, str] = {}
        if not accepted.is_new:
            if validated.explicit_key and accepted.fingerprint != validated.fingerprint:
                raise IdempotencyKeyReuse(
                    "this idempotency key was used with a different request")
            gw.metrics.count("idempotent_hit")
            if accepted.result is not None:
                return json_response(accepted.result, headers=dict(REPLAYED))
            headers = dict(REPLAYED)
        if completion is None:
            return _accepted(request_id, headers)
        result = await _wait_result(gw, request_id, completion)
        if result is None:
            return _accepted(request_id, headers)
        return json_response(result, headers=headers)
    finally:
        gw.fan_in.release(request_id, completion)


async def _publish(gw: Gateway, body: bytes, header_key: str | None, principal: str,
                   respond_async: bool, limited: asyncio.Future[RateState | None],
                   ) -> tuple[Validated, BusAccepted, asyncio.Future[bytes] | None]:
    """Validate and accept (once the rate limiter let the request through); for a sync
    caller, also a registered completion to wait on."""
    caps = gw.policies.caps(principal)
    for _ in range(MAX_NAME_RETRIES):
        validated = await validate(body, header_key, principal, gw.modules, gw.settings, caps)
        await _rate_verdict(gw, limited)
        request = validated.request
        # Decided here, enforced by the accept script only if the request is new: a replay
        # or a join needs no new authorization.
        permitted = gw.policies.authorize(principal, "execute", ModuleResource(
            request.cid, validated.name.name if validated.name else "", validated.owner))
        # Registered before publishing, so the completion cannot slip past us.
        completion = None if respond_async else gw.fan_in.completion(request.request_id)
        try:
            accepted = await gw.bus.accept(request, validated.fingerprint, validated.name,
                                           permitted=permitted)
        except BaseException:
            gw.fan_in.release(request.request_id, completion)
            raise
        if accepted.full:
            gw.fan_in.release(request.request_id, completion)
            raise Unavailable("too much work is queued already; retry shortly",
                              retry_after_s=QUEUE_FULL_RETRY_S)
        if accepted.forbidden:
            gw.fan_in.release(request.request_id, completion)
            gw.metrics.count("permission_denied")
            raise Forbidden(f"the policies do not allow {principal} to execute {request.cid}")
        if not accepted.name_moved:
            return validated, accepted, completion
        gw.fan_in.release(request.request_id, completion)
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
    body = Accepted(request_id=request_id, links=Links(
        self_=location, events=f"/intent/execute-wasm/events?request_id={request_id}"))
    return json_response(body, 202, {**headers, "Location": location})


# --- executions ---


async def get_execution(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(await gw.controller.state(principal, request.path_params["request_id"]))


async def cancel_execution(request: Request) -> Response:
    return await _control(request, "cancel")


async def pause_execution(request: Request) -> Response:
    return await _control(request, "pause")


async def resume_execution(request: Request) -> Response:
    return await _control(request, "resume")


async def _control(request: Request, action: Action) -> Response:
    """200 with the state once the executor confirmed, 202 with the state so far if it has not
    within a few seconds."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    additional_gas = 0
    if action == "resume":
        body = await read_body(request, gw.settings.max_request_bytes)
        if body.strip():
            additional_gas = decode_body(decode_resume, body).additional_gas
    confirmed, state = await gw.controller.act(principal, request.path_params["request_id"],
                                               action, additional_gas)
    return json_response(state, 200 if confirmed else 202)


# --- modules and names ---


async def upload_module(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_module_bytes)
    name = request.query_params.get("name")
    tag = request.query_params.get("tag") or "latest"
    if name is None and "tag" in request.query_params:
        raise InvalidRequest("a tag needs a name")
    if name is not None:  # refuse before storing anything
        await gw.modules.check_bindable(name, tag, principal)
    try:
        wasm = to_binary(body)
    except InvalidModule as exc:
        raise InvalidRequest(str(exc)) from None
    if len(wasm) > gw.settings.max_module_bytes:
        raise PayloadTooLarge(f"the compiled module is over {gw.settings.max_module_bytes} bytes")
    cid = compute(wasm)
    existing = await gw.modules.stored(cid)
    gw.authorize(principal, "upload",
                 ModuleResource(cid, name or "", existing.owner if existing else principal))
    try:
        info = existing.info if existing else await anyio.to_thread.run_sync(inspect, wasm)
    except InvalidModule as exc:
        raise InvalidRequest(str(exc)) from None
    created = await gw.modules.put(info, wasm, principal)
    if name is not None:
        await gw.modules.bind(name, tag, info.cid, principal)
    return json_response(info, 201 if created else 200, {"Location": f"/modules/{info.cid}"})


async def list_modules(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cursor = _query_int(request, "cursor", 0, 0, 2**31)
    limit = _query_int(request, "limit", 50, 1, MAX_PAGE_SIZE)

    def visible(cid: str, stored: StoredModule) -> bool:
        resource = ModuleResource(cid, "", stored.owner)
        return gw.policies.authorize(principal, "execute", resource)

    return json_response(await gw.modules.page(cursor, limit, visible))


async def get_module(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cid = _path_cid(request)
    gw.authorize(principal, "execute", await gw.module_resource(cid))
    return json_response(await gw.modules.info(cid))


async def get_module_wasm(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cid = _path_cid(request)
    gw.authorize(principal, "execute", await gw.module_resource(cid))
    wasm = await gw.modules.wasm(cid)
    if wasm is None:
        raise NotFound(f"no module {cid}")
    return Response(wasm, media_type="application/wasm")


async def delete_module(request: Request) -> Response:
    """Its owner may delete a module, and whoever the policies grant `admin` on it."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cid = _path_cid(request)
    resource = await gw.module_resource(cid)
    if resource.owner != principal:
        gw.authorize(principal, "admin", resource)
    await gw.modules.delete(cid)
    return Response(status_code=204)


async def bind_name(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    binding = decode_body(decode_name_binding, body)
    try:
        cid = normalize(binding.cid)
    except InvalidCid as exc:
        raise InvalidRequest.at("/cid", str(exc)) from None
    name, tag = request.path_params["name"], request.path_params["tag"]
    await gw.modules.check_bindable(name, tag, principal)
    stored = await gw.modules.stored(cid)
    if stored is None:
        raise NotFound(f"no module {cid}", errors=[FieldError("/cid", "no module with this CID")])
    gw.authorize(principal, "upload", ModuleResource(cid, name, stored.owner))
    await gw.modules.bind(name, tag, cid, principal)
    return json_response(NameBound(name=name, tag=tag, cid=cid))


async def get_name(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    gw.authorize(principal, "execute", None)
    name = request.path_params["name"]
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest("a name matches [a-z0-9][a-z0-9._-]{0,63}")
    return json_response(NameTags(name=name, tags=await gw.modules.tags(name)))


def _path_cid(request: Request) -> str:
    try:
        return normalize(request.path_params["cid"])
    except InvalidCid as exc:
        raise InvalidRequest(str(exc)) from None


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


# --- health ---


async def healthz(request: Request) -> Response:
    return json_response(Liveness())


async def readyz(request: Request) -> Response:
    try:
        await gateway_of(request).client.ping()
    except redis.RedisError:
        raise Unavailable("Redis is unreachable") from None
    return json_response(Readiness())


async def health(request: Request) -> Response:
    gw = gateway_of(request)
    status: Literal["healthy", "degraded", "unhealthy"]
    try:
        executors = await gw.bus.live_executors(gw.settings.heartbeat_ttl_ms)
    except redis.RedisError:
        executors, status = 0, "unhealthy"
    else:
        # Degraded: it answers, but a policy file is broken (the last good set is in force)
        # or no executor is alive to run what it accepts.
        status = "degraded" if gw.policies.error or not executors else "healthy"
    body = Health(
        status=status,
        features=HealthFeatures(idempotency=True, rate_limiting=gw.settings.rate_limit > 0,
                                authorization=True,
                                sse_events=False, bus_events=True),
        limits=HealthLimits(rate_limit=gw.settings.rate_limit,
                            rate_window=gw.settings.rate_window_ms,
                            idempotency_ttl=gw.settings.idempotency_ttl_ms),
        executors=executors,
        policy_error=gw.policies.error or msgspec.UNSET,
    )
    return json_response(body, 503 if status == "unhealthy" else 200)


async def metrics(request: Request) -> Response:
    gw = gateway_of(request)
    pipe = gw.client.pipeline(transaction=False)
    pipe.get(gw.keys.queued)
    pipe.xpending(gw.keys.requests, Keys.EXECUTOR_GROUP)
    queued, pending = await pipe.execute()
    executors = await gw.bus.live_executors(gw.settings.heartbeat_ttl_ms)
    text = await gw.metrics.render({
        "relay_queue_depth": ("Accepted executions not yet started.",
                              max(int(queued or 0), 0)),
        "relay_pending_entries": ("Request entries delivered to executors, not acknowledged.",
                                  pending["pending"]),
        "relay_executors": ("Executors with a live heartbeat.", executors),
    })
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi_json(request: Request) -> Response:
    return json_response(openapi.document_bytes())


# --- errors ---


async def relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    return problem_response(exc, request)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {error.status: error for error in (InvalidRequest, NotFound, MethodNotAllowed,
                                              Conflict, PayloadTooLarge)}.get(exc.status_code,
                                                                              RelayError)
    detail = {404: f"no route {request.url.path}",
              405: f"{request.method} is not allowed here"}.get(exc.status_code, str(exc.detail))
    return problem_response(kind(detail, headers=dict(exc.headers or {})), request)


async def redis_error(request: Request, exc: Exception) -> Response:
    log.warning("redis unavailable: %s", exc)
    return problem_response(Unavailable("the store is unreachable; retry shortly"), request)


def by_method(**handlers: Callable[[Request], Awaitable[Response]],
              ) -> Callable[[Request], Awaitable[Response]]:
    """One endpoint for several methods of a path, so that a 405 lists them all in `Allow`
    (with a route a method, Starlette answers from the first route matching the path)."""
    async def endpoint(request: Request) -> Response:
        return await handlers["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


ROUTES = [
    Route("/intent/execute-wasm", execute, methods=["POST"]),
    Route("/intent/execute-wasm/health", health, methods=["GET"]),
    Route("/intent/execute-wasm/events", Sse(), methods=["GET"]),
    Route("/auth/tokens", mint_token, methods=["POST"]),
    Route("/executions/{request_id}", by_method(GET=get_execution, DELETE=cancel_execution),
          methods=["GET", "DELETE"]),
    Route("/executions/{request_id}/pause", pause_execution, methods=["POST"]),
    Route("/executions/{request_id}/resume", resume_execution, methods=["POST"]),
    WebSocketRoute("/ws/executions/{request_id}", websocket),
    Route("/modules", by_method(POST=upload_module, GET=list_modules), methods=["POST", "GET"]),
    Route("/modules/{cid}", by_method(GET=get_module, DELETE=delete_module),
          methods=["GET", "DELETE"]),
    Route("/modules/{cid}/wasm", get_module_wasm, methods=["GET"]),
    Route("/names/{name}/{tag}", bind_name, methods=["PUT"]),
    Route("/names/{name}", get_name, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]


class RelayApp(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Event streams write caught-up events to the server's connection (streams.uvicorn_wire),
        # which they find through the server's own `send`, not the middleware's wrappers.
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> Starlette:
    """The gateway ASGI app. `settings.redis_url` must be set (the CLI starts an embedded Redis
    and fills it in when the environment has none)."""
    if settings.redis_url is None:
        raise ValueError("create_app needs settings.redis_url")
    redis_url = settings.redis_url

    policies = Policies(settings.policy_dir)  # a broken policy file stops the start here

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = connection.connect(redis_url)
        keys = Keys(settings.prefix)
        secret = await AccessTokens.shared_secret(client, keys.token_secret, settings.token_secret)
        gateway = Gateway(settings, client, policies, secret)
        await gateway.bus.ensure_group()
        await gateway.fan_in.start(await gateway.bus.last_event_id())
        background = [asyncio.create_task(policies.watch()),
                      asyncio.create_task(gateway.metrics.run())]
        app.state.gateway = gateway
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await gateway.fan_in.stop()
            with contextlib.suppress(redis.RedisError):
                await gateway.metrics.flush()
            await client.aclose()

    middleware = [Middleware(RequestIdMiddleware, access_log=settings.access_log)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["*"], allow_headers=["*"],
            expose_headers=["Location", "X-Request-Id", "Idempotent-Replayed", "Retry-After"]))
    return RelayApp(
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
