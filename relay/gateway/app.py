"""The gateway's ASGI app: its routes, middleware and lifespan (`create_app`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from relay import connection
from relay.deliverer import Deliverer
from relay.gateway import problems
from relay.gateway.http import SERVER_SEND, RequestIdMiddleware, by_method
from relay.gateway.routes import (
    batches,
    budgets,
    console,
    docs,
    environments,
    execute,
    executions,
    health,
    modules,
    pipelines,
    sessions,
    snapshots,
    sse,
    tokens,
    webhooks,
    websocket,
)
from relay.gateway.state import Gateway
from relay.gateway.subscription import end_revoked
from relay.keys import Keys
from relay.policy import Policies
from relay.settings import Settings
from relay.tokens import AccessTokens

EXECUTE_PATH = "/intent/execute-wasm"
EXECUTE_ROUTE = Route(EXECUTE_PATH, execute.execute, methods=["POST"])

ROUTES = [
    EXECUTE_ROUTE,
    Route("/intent/execute-wasm/health", health.health, methods=["GET"]),
    Route(health.EVENTS_PATH, sse.Sse(), methods=["GET"]),
    Route("/auth/tokens", tokens.mint_token, methods=["POST"]),
    Route("/intent/execute-wasm/batch", batches.execute_batch, methods=["POST"]),
    Route("/batches/{batch_id}", batches.get_batch, methods=["GET"]),
    Route("/executions", executions.list_executions, methods=["GET"]),
    Route("/executions/{request_id}", by_method(GET=executions.get_execution,
                                                DELETE=executions.cancel_execution),
          methods=["GET", "DELETE"]),
    Route("/executions/{request_id}/output", executions.get_output, methods=["GET"]),
    Route("/executions/{request_id}/deliveries", webhooks.execution_deliveries,
          methods=["GET"]),
    Route("/executions/{request_id}/pause", executions.pause_execution, methods=["POST"]),
    Route("/executions/{request_id}/resume", executions.resume_execution, methods=["POST"]),
    Route("/executions/{request_id}/step", executions.step_execution, methods=["POST"]),
    WebSocketRoute("/ws/executions/{request_id}", websocket.websocket),
    WebSocketRoute("/ws/sessions/{session_id}", websocket.session_websocket),
    Route("/modules", by_method(POST=modules.upload_module, GET=modules.list_modules),
          methods=["POST", "GET"]),
    Route("/modules/{cid}", by_method(GET=modules.get_module, DELETE=modules.delete_module),
          methods=["GET", "DELETE"]),
    Route("/modules/{cid}/wasm", modules.get_module_wasm, methods=["GET"]),
    Route("/names/{name}/{tag}", modules.bind_name, methods=["PUT"]),
    Route("/names/{name}", modules.get_name, methods=["GET"]),
    Route("/sessions", by_method(POST=sessions.create_session, GET=sessions.list_sessions),
          methods=["POST", "GET"]),
    Route("/sessions/{session_id}", by_method(GET=sessions.get_session,
                                              PATCH=sessions.patch_session,
                                              DELETE=sessions.close_session),
          methods=["GET", "PATCH", "DELETE"]),
    Route("/sessions/{session_id}/state", sessions.get_session, methods=["GET"]),
    Route("/sessions/{session_id}/calls", sessions.call_session, methods=["POST"]),
    Route("/sessions/{session_id}/pause", sessions.pause_session, methods=["POST"]),
    Route("/sessions/{session_id}/resume", sessions.resume_session, methods=["POST"]),
    Route("/sessions/{session_id}/step", sessions.step_session, methods=["POST"]),
    Route("/sessions/{session_id}/snapshots", snapshots.create_snapshot, methods=["POST"]),
    Route("/snapshots", snapshots.list_snapshots, methods=["GET"]),
    Route("/snapshots/{snapshot_id}", by_method(GET=snapshots.get_snapshot,
                                                DELETE=snapshots.delete_snapshot),
          methods=["GET", "DELETE"]),
    Route("/snapshots/{snapshot_id}/restore", snapshots.restore_snapshot, methods=["POST"]),
    Route("/budgets", by_method(POST=budgets.create_budget, GET=budgets.list_budgets),
          methods=["POST", "GET"]),
    Route("/budgets/{budget_id}", by_method(GET=budgets.get_budget, PUT=budgets.replace_budget,
                                            DELETE=budgets.delete_budget),
          methods=["GET", "PUT", "DELETE"]),
    Route("/budgets/{budget_id}/usage", budgets.get_usage, methods=["GET"]),
    Route("/pipelines", by_method(POST=pipelines.create_pipeline, GET=pipelines.list_pipelines),
          methods=["POST", "GET"]),
    Route("/pipelines/{pipeline_id}", by_method(GET=pipelines.get_pipeline,
                                                DELETE=pipelines.cancel_pipeline),
          methods=["GET", "DELETE"]),
    Route("/environments", environments.list_environments, methods=["GET"]),
    Route("/environments/{environment}",
          by_method(GET=environments.get_environment, PUT=environments.put_environment,
                    DELETE=environments.delete_environment),
          methods=["GET", "PUT", "DELETE"]),
    Route("/pipelines/{pipeline_id}/deliveries", webhooks.pipeline_deliveries,
          methods=["GET"]),
    Route("/webhooks/secret", by_method(GET=webhooks.get_secret, POST=webhooks.rotate_secret),
          methods=["GET", "POST"]),
    Route("/", health.index, methods=["GET"]),
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/readyz", health.readyz, methods=["GET"]),
    Route("/metrics", health.metrics, methods=["GET"]),
    Route("/openapi.json", health.openapi_json, methods=["GET"]),
    Route("/console", console.page, methods=["GET"]),
    Route("/console/{file}", console.asset, methods=["GET"]),
    Route("/docs", docs.page, methods=["GET"]),
    Route("/docs/{asset}", docs.asset, methods=["GET"]),
]


class RelayApp(Starlette):
    execute_directly: ASGIApp | None = None
    """`POST /intent/execute-wasm`, served past Starlette's router and middleware (see
    `direct_execute`); None when the app has more middleware to apply (CORS)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Event streams write caught-up events to the server's connection (sse.uvicorn_wire),
        # which they find through the server's own `send`, not the middleware's wrappers.
        scope[SERVER_SEND] = send
        if (self.execute_directly is not None and scope["type"] == "http"
                and scope["path"] == EXECUTE_PATH and scope["method"] == "POST"):
            scope["app"] = self
            await self.execute_directly(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def direct_execute(access_log: bool) -> ASGIApp:
    """The execute route's own app (Starlette's, which turns errors into problems by the app's
    handlers) inside `RequestIdMiddleware` (the request id, the access line, the 500 of an
    unhandled error), without the layers between: the error and exception middleware and the
    router, 15 to 25 µs of a sync execute's 250 in the gateway, the process that sets the
    pace of trivial executes (docs/operations.md)."""
    route = EXECUTE_ROUTE.app
    # What ExceptionMiddleware gives the routes below it: the app's handlers, none by status.
    handlers: tuple[object, dict[int, object]] = (problems.HANDLERS, {})

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        scope["starlette.exception_handlers"] = handlers
        await route(scope, receive, send)

    return RequestIdMiddleware(serve, access_log=access_log)


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
        secret = await AccessTokens.shared_secret(client, Keys(settings.prefix).token_secret,
                                                  settings.token_secret)
        gateway = Gateway(settings, client, policies, secret)
        await gateway.bus.ensure_group()
        gateway.fan_in.start(await gateway.bus.last_event_id())
        gateway.supervisor.start("events fan-in", gateway.fan_in.follow)
        gateway.supervisor.start("policy watch", policies.watch)
        gateway.supervisor.start("metrics", gateway.metrics.run)
        gateway.supervisor.start("stream leases", gateway.streams.renew)
        gateway.supervisor.start("stream credentials", functools.partial(end_revoked, gateway))
        gateway.supervisor.start("session expiry", gateway.sessions.expire)
        await gateway.scheduler.ensure_group()
        gateway.supervisor.start("pipeline scheduler", gateway.scheduler.consume)
        gateway.supervisor.start("pipeline timers", gateway.scheduler.timers)
        # Webhooks: apart from the fan-in, so a slow receiver never delays events.
        deliverer = Deliverer(client, gateway.keys, settings, gateway.webhooks, gateway.metrics)
        await deliverer.ensure_group()
        gateway.supervisor.start("webhook events", deliverer.consume)
        gateway.supervisor.start("webhook deliveries", deliverer.deliver)
        app.state.gateway = gateway
        try:
            yield
        finally:
            gateway.fan_in.stop()
            await gateway.supervisor.stop()
            await deliverer.aclose()
            gateway.uploads.close()
            with contextlib.suppress(redis.RedisError):
                await gateway.metrics.flush()
            await client.aclose()

    middleware = [Middleware(RequestIdMiddleware, access_log=settings.access_log)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["*"], allow_headers=["*"],
            expose_headers=["Location", "X-Request-Id", "Idempotent-Replayed", "Retry-After",
                            "RateLimit", "RateLimit-Policy"]))
    app = RelayApp(routes=ROUTES, middleware=middleware, lifespan=lifespan,
                   exception_handlers=problems.HANDLERS)
    if len(middleware) == 1:  # the request id's only: what the direct path applies itself
        app.execute_directly = direct_execute(settings.access_log)
    return app
