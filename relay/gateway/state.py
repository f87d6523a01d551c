"""`Gateway`: everything one gateway process shares between requests, built once at start."""

from __future__ import annotations

import contextlib

import redis.asyncio as aioredis
from starlette.requests import HTTPConnection

from relay.apikeys import StoredKeys
from relay.batches import BatchStore
from relay.bus import Bus
from relay.errors import Conflict, NotFound
from relay.gateway.control import Controller
from relay.gateway.fanin import EventFanIn
from relay.gateway.slots import StreamSlots
from relay.gateway.uploads import UploadSlots
from relay.keys import Keys
from relay.metrics import Metrics
from relay.modules import ModuleStore
from relay.pipeline.authenticate import Authenticator
from relay.pipeline.authorize import Authorizer
from relay.pipeline.ratelimit import RateLimiter
from relay.pipeline.run import ExecutePipeline
from relay.pipeline.validate import input_problem
from relay.pipelines import PipelineStore
from relay.policy import Policies
from relay.scheduler import Scheduler
from relay.sessions import Sessions
from relay.settings import Settings
from relay.snapshots import Snapshots
from relay.supervise import Supervisor
from relay.tokens import AccessTokens


class Gateway:
    def __init__(self, settings: Settings, client: aioredis.Redis, policies: Policies,
                 token_secret: bytes) -> None:
        self.settings = settings
        self.client = client
        self.keys = keys = Keys(settings.prefix)
        self.policies = policies
        self.bus = Bus(client, keys, events_retention=settings.events_retention,
                       requests_retention=settings.requests_retention,
                       max_queue=settings.max_queue)
        self.modules = ModuleStore(client, keys)
        self.fan_in = EventFanIn(client, keys, settings.sse_queue)
        self.streams = StreamSlots(client, keys, settings.max_streams)
        """Each principal's places for open event streams, across gateways."""
        self.metrics = Metrics(client, keys)
        self.stored_keys = StoredKeys(client, keys)
        self.authenticate = Authenticator(settings, self.stored_keys)
        self.authorizer = Authorizer(policies, self.modules, self.metrics)
        self.tokens = AccessTokens(token_secret)
        self.sessions = Sessions(client, keys, settings.session_ttl_ms, settings.max_sessions)
        self.snapshots = Snapshots(client, keys, self.sessions, settings.max_snapshots)
        self.controller = Controller(client, keys, self.bus, self.fan_in, settings, policies)
        self.pipeline = ExecutePipeline(
            settings=settings, policies=policies, authenticate=self.authenticate,
            rate_limiter=RateLimiter(self.bus, settings, policies), modules=self.modules,
            authorizer=self.authorizer, bus=self.bus, completions=self.fan_in,
            metrics=self.metrics, sessions=self.sessions)
        self.environments = self.pipeline.environments
        """Environments (relay.environments), with the cache the execute pipeline reads."""
        self.pipelines = PipelineStore(client, keys, events_retention=settings.events_retention)
        self.webhooks = self.pipeline.webhooks
        """Webhook secrets and deliveries (relay.webhooks); relay.deliverer sends them."""
        self.scheduler = Scheduler(
            client, keys, self.bus, self.pipelines,
            max_active=lambda principal: (policies.caps(principal).max_active
                                          or settings.max_active),
            cancel=self._cancel_node, check_input=input_problem, memo=self.pipeline.memo,
            memo_global=settings.memo_scope == "global",
            max_input_bytes=settings.max_output_bytes,
            batches=BatchStore(client, keys, events_retention=settings.events_retention))
        """Advances pipelines: the consumer of their nodes' completions and their timers."""
        self.fan_in.node_completed = self.scheduler.wake
        self.uploads = UploadSlots(settings.max_uploads)
        self.supervisor = Supervisor("relay.gateway")
        """Runs the background loops: the events fan-in, the policy watch, metrics, stream
        leases and the check of open streams' stored keys."""

    async def _cancel_node(self, principal: str, request_id: str) -> None:
        """Cancel a pipeline node's execution as `DELETE /executions/{id}` does (nothing if
        it has ended, or was never accepted)."""
        with contextlib.suppress(Conflict, NotFound):
            await self.controller.act(principal, request_id, "cancel")


def gateway_of(connection: HTTPConnection) -> Gateway:
    """The process's Gateway, from any request or WebSocket."""
    gateway: Gateway = connection.app.state.gateway
    return gateway
