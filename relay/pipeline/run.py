"""The execute pipeline, in the contract's order, in one function: `ExecutePipeline.admit`.

authenticate (401) → rate limit (429) → validate (413, 400, 404) → idempotency (replay, join,
422) → authorize (403) → budgets (429) → publish (503 while too much is queued). The last four
are decided together, atomically, by the bus's accept script; what each one decides lives in its
stage's module (budgets: relay.budgets).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import NamedTuple, Protocol

from starlette.requests import Request

from relay import budgets
from relay.bus import SESSION_REFUSALS, Accepted, Bus, RateWindow
from relay.environments import Environments
from relay.errors import (
    Conflict,
    IdempotencyKeyReuse,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RelayError,
    SessionClosed,
    SessionExhausted,
    Unavailable,
)
from relay.memo import Memo
from relay.metrics import Metrics
from relay.modules import ModuleStore
from relay.pipeline import idempotency
from relay.pipeline.authenticate import Authenticator
from relay.pipeline.authorize import Authorizer
from relay.pipeline.ratelimit import RateCheck, RateLimiter
from relay.pipeline.validate import Validated, read_body, validate
from relay.policy import ModuleResource, Policies
from relay.schemas import WasmExecRequested, encode
from relay.sessions import Sessions
from relay.settings import Settings
from relay.webhooks import Webhooks

MAX_NAME_RETRIES = 3
QUEUE_FULL_RETRY_S = 5
INVALID = (InvalidRequest, NotFound, PayloadTooLarge, IdempotencyKeyReuse)
"""Refusals counted as `invalid_request`."""


class Completions(Protocol):
    """Where a sync caller waits for its execution's `wasm_exec_completed` (the gateway's
    fan-in): registered before publishing, so the result cannot slip past."""

    def completion(self, request_id: str) -> asyncio.Future[bytes]: ...

    def release(self, request_id: str, future: asyncio.Future[bytes] | None) -> None: ...


class Counted(Protocol):
    """A request's count under the rate limit (relay.pipeline.ratelimit)."""

    def in_accept(self) -> RateWindow | None:
        """The window the accept script is to count the request in, if any."""
        ...

    def accepted(self, accepted: Accepted) -> None:
        """Read the count of the accept that was given `in_accept`'s window."""
        ...

    async def headers(self) -> dict[str, str]:
        """The RateLimit fields for the answer. Raises RateLimited."""
        ...


class Admission(NamedTuple):
    """An accepted request: what to answer with, or wait for."""

    request_id: str
    headers: dict[str, str]
    """The RateLimit fields, and `Idempotent-Replayed` for a repeat."""
    result: bytes | None
    """A finished execution's stored response (a replay)."""
    completion: asyncio.Future[bytes] | None
    """For a sync caller of an unfinished execution; `Completions.release` it when done."""


def _session_refusal(status: str, session_id: str) -> RelayError:
    """What the accept script's refusal of a session call means to the caller (it changed since
    validation read the session)."""
    if status == "session-closed":
        return SessionClosed(f"session {session_id} is closed")
    if status == "session-exhausted":
        return SessionExhausted(f"session {session_id} has used its budget; raise it with "
                                "PATCH /sessions/{id}")
    return NotFound(f"no session {session_id}")


class ExecutePipeline:
    def __init__(self, *, settings: Settings, policies: Policies, authenticate: Authenticator,
                 rate_limiter: RateLimiter, modules: ModuleStore, authorizer: Authorizer,
                 bus: Bus, completions: Completions, metrics: Metrics,
                 sessions: Sessions) -> None:
        self.settings = settings
        self.policies = policies
        self.authenticate = authenticate
        self.rate_limiter = rate_limiter
        self.modules = modules
        self.authorizer = authorizer
        self.bus = bus
        self.completions = completions
        self.metrics = metrics
        self.sessions = sessions
        self.memo = Memo(bus.client, bus.keys, ttl_ms=settings.memo_ttl_ms,
                         record_ttl_ms=settings.idempotency_ttl_ms)
        self.webhooks = Webhooks(bus.client, bus.keys, schedule=settings.webhook_schedule_ms,
                                 rotation_grace_ms=settings.webhook_rotation_grace_ms)
        self.environments = Environments(bus.client, bus.keys, settings)

    async def admit(self, request: Request, session_id: str | None = None) -> Admission:
        """Run the pipeline on one `POST /intent/execute-wasm` (or, with `session_id`, one
        `POST /sessions/{id}/calls`). Raises a RelayError for the first stage that refuses it
        (carrying the RateLimit fields once it was counted)."""
        principal = await self.authenticate(request)
        rate = RateCheck(self.rate_limiter, principal, self.metrics)  # counted by the accept
        try:
            body = await read_body(request, self.settings.max_request_bytes)
        except RelayError as error:
            await self._refused(error, rate)
            raise
        return await self.admit_body(
            principal, body, request.headers.get("idempotency-key"), rate,
            sync="respond-async" not in request.headers.get("prefer", ""),
            session_id=session_id)

    async def admit_body(self, principal: str, body: bytes, header_key: str | None,
                         rate: Counted, *, sync: bool, session_id: str | None = None,
                         batch_id: str | None = None) -> Admission:
        """The stages after authentication, for one request body (a batch's item too, with
        `batch_id`); `rate` is its count under the rate limit. Raises a RelayError for the
        first stage that refuses it (with the RateLimit fields)."""
        try:
            for _ in range(MAX_NAME_RETRIES):
                session = (None if session_id is None
                           else await self.sessions.callable(principal, session_id))
                validated = await validate(body, header_key,
                                           principal, self.modules, self.environments,
                                           self.settings, self.policies.caps(principal),
                                           session)
                if batch_id is not None:
                    validated.request.batch_id = batch_id
                admission = await self._accept(validated, principal, sync, rate)
                if admission is not None:
                    return admission
                assert validated.name is not None
                self.modules.forget(validated.name)  # its cached binding was stale
            raise Conflict("the module's name moved while the request was accepted; retry")
        except RelayError as error:
            await self._refused(error, rate)
            raise

    async def _refused(self, error: RelayError, rate: Counted) -> None:
        """Count a refusal, and give it the RateLimit fields (or raise RateLimited instead)."""
        if not isinstance(error, RateLimited):
            error.headers.update(await rate.headers())  # raises instead, when over
        if isinstance(error, INVALID):
            self.metrics.count("invalid_request")

    async def _accept(self, validated: Validated, principal: str, sync: bool,
                      rate: Counted) -> Admission | None:
        """The rate limit's count, idempotency, authorization and publishing, committed
        atomically by one script (a 429 wins over everything after validation); None when the
        request's glyph name moved meanwhile (resolve it again)."""
        request = validated.request
        permitted = self.authorizer.permits(principal, "execute", ModuleResource(
            request.cid, validated.name.name if validated.name else "", validated.owner))
        completion = self.completions.completion(request.request_id) if sync else None
        try:
            max_active = self.policies.caps(principal).max_active or self.settings.max_active
            callback = b""
            if validated.callback is not None:  # kept with the record (relay.webhooks)
                callback = encode(validated.callback)
                await self.webhooks.ensure_secret(principal)
            # A memoize request's stored result, if any, answers it (relay.memo).
            memo = (await self.memo.prepare(validated.memo, request)
                    if validated.memo is not None else None)

            def accept(published: WasmExecRequested,
                       window: RateWindow | None = None) -> Awaitable[Accepted]:
                return self.bus.accept(published, validated.fingerprint, validated.name,
                                       permitted=permitted, max_active=max_active,
                                       explicit=validated.explicit, memo=memo,
                                       callback=callback, rate=window)

            # Counted by this accept, or before it (a batch's item, an accept sent again): a
            # 429 is raised before anything is accepted either way.
            window = rate.in_accept()
            headers = {} if window is not None else await rate.headers()
            accepted = await accept(request, window)
            if window is not None:
                rate.accepted(accepted)
                headers = await rate.headers()  # over: the script accepted nothing
            # Over what the principal's budgets have left, with limits the request left out:
            # lowered to that and accepted again, while concurrent executions take it away.
            for _ in range(budgets.LOWER_ATTEMPTS):
                if accepted.status != "lower":
                    break
                accepted = await accept(budgets.lowered(request, accepted.budget))
            if accepted.name_moved:
                self.completions.release(request.request_id, completion)
                return None
            if accepted.hit:  # finished already: a new execution, answered at once
                self.completions.release(request.request_id, completion)
                return Admission(request.request_id, headers, accepted.result, None)
            if (memo is not None and memo.hit is not None and not accepted.existing
                    and not accepted.forbidden):
                self.memo.missed(memo)  # its entry expired or was replaced meanwhile
            repeat = idempotency.repeat_of(accepted, validated.fingerprint,
                                           validated.explicit_key, self.metrics)
            if repeat is not None:
                headers = {**headers, **idempotency.REPLAYED}
                if repeat.result is not None:
                    self.completions.release(request.request_id, completion)
                    return Admission(request.request_id, headers, repeat.result, None)
            elif accepted.forbidden:
                raise self.authorizer.refusal(principal, "execute", request.cid)
            elif accepted.full:
                raise Unavailable("too much work is queued already; retry shortly",
                                  retry_after_s=QUEUE_FULL_RETRY_S)
            elif accepted.status in SESSION_REFUSALS:
                raise _session_refusal(accepted.status, request.session_id or "")
            elif accepted.status in ("budget", "lower"):
                raise budgets.refusal(accepted)
        except BaseException:
            self.completions.release(request.request_id, completion)
            raise
        return Admission(request.request_id, headers, None, completion)
