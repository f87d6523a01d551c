"""Pause, resume, step and cancel, the gateway's side.

A request for a running execution goes out on the pub/sub channel `relay:control`; the executor
running it acts on it and emits `execution_paused`, `execution_resumed` or the terminal event,
which the gateway waits for (briefly) so the answer says what happened; an executor that refuses
a pause (it holds as many paused runs as it may) answers `control_refused` instead. An execution
still queued is cancelled by the gateway itself, atomically, so no executor ever starts it.

A step goes out the same way, to a paused execution, and its answer waits until the execution
stops again: its next `execution_paused` or terminal event. Which events are new is told by the
execution's event index (`Keys.execution_events`), read together with the status it was paused
in: an event the fan-in hands over late (a pause before this step) is never taken for the
step's end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.budgets import BudgetStore
from relay.bus import Bus
from relay.errors import (
    Conflict,
    FieldError,
    InvalidRequest,
    NotFound,
    SessionExhausted,
    TooManyPaused,
)
from relay.gateway.fanin import EventFanIn
from relay.keys import Keys
from relay.policy import Policies
from relay.schemas import (
    TERMINAL_TYPES,
    Action,
    ControlMessage,
    EnvironmentRef,
    ErrorInfo,
    ExecuteResponse,
    ExecutionState,
    Priority,
    RunEnvironment,
    WasmExecRequested,
    decode_control_refused,
    decode_head,
    decode_paused,
    decode_requested,
    decode_response,
    encode,
    now_iso,
)
from relay.settings import Settings

CONFIRM_WAIT_S = 5.0
FINISHED = frozenset({"completed", "failed", "cancelled"})
STOPS = frozenset({"execution_paused"}) | TERMINAL_TYPES
"""The events that end a step."""
PAUSE_LOOKBACK = 16
"""How many of a paused execution's last events are searched for its pause (output chunks of a
WASI module may follow it)."""
_EXPECTED: dict[str, frozenset[str]] = {
    "pause": frozenset({"execution_paused", "control_refused"}) | TERMINAL_TYPES,
    "resume": frozenset({"execution_resumed"}) | TERMINAL_TYPES,
    "cancel": TERMINAL_TYPES,
}




class _AcceptedIn(msgspec.Struct):
    """The fields of a stored request that `GET /executions/{id}` shows (the rest, inputs
    included, is skipped unread)."""

    environment: RunEnvironment | None = None
    priority: Priority = "normal"
    batch_id: str | None = None


_decode_environment = msgspec.json.Decoder(_AcceptedIn).decode


class Controller:
    def __init__(self, client: aioredis.Redis, keys: Keys, bus: Bus, fan_in: EventFanIn,
                 settings: Settings, policies: Policies) -> None:
        self.client = client
        self.keys = keys
        self.bus = bus
        self.fan_in = fan_in
        self.settings = settings
        self.policies = policies

    async def state(self, principal: str, request_id: str) -> ExecutionState:
        """The execution as `GET /executions/{id}` shows it. Raises NotFound (also when it is
        another principal's: their ids are not ours to confirm)."""
        views = await self.states(principal, [request_id])
        if not views:
            raise NotFound(f"no execution {request_id}")
        return views[0]

    async def states(self, principal: str, request_ids: list[str]) -> list[ExecutionState]:
        """`state` of each execution of `principal` among `request_ids` that still exists, in
        their order, read in one round trip (and one more per paused one)."""
        pipe = self.client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hmget(self.keys.execution(request_id), STATE_FIELDS)
        views = []
        for request_id, fields in zip(request_ids, await pipe.execute(), strict=True):
            view = _view(principal, request_id, fields)
            if view is None:
                continue
            if view.status == "paused":  # the gas its executor counted at the pause
                view.gas_used = max(view.gas_used or 0, await self._paused_gas(request_id))
            views.append(view)
        return views

    async def act(self, principal: str, request_id: str, action: Action,
                  additional_gas: int = 0) -> tuple[bool, ExecutionState]:
        """Do `action`; returns whether its effect was confirmed, and the state after it.

        Raises NotFound, Conflict (409: finished, or not in a state the action applies to),
        TooManyPaused (409: its executor refused the pause), InvalidRequest (additional gas
        over the ceiling or the principal's cap), SessionExhausted (409: over what a session
        call's session has left) or BudgetExhausted (429: no room for it in a budget of the
        principal's).
        """
        key = self.keys.execution(request_id)
        owner, status_raw, request_raw, extra_raw = await self.client.hmget(
            key, ["principal", "status", "request", "extra_gas"])
        if owner is None or owner.decode() != principal:
            raise NotFound(f"no execution {request_id}")
        status = status_raw.decode()
        if status in FINISHED:
            raise Conflict(f"the execution has already finished ({status})")
        if action == "pause" and status != "running":
            raise Conflict(f"only a running execution can be paused; this one is {status}")
        if action == "resume" and status != "paused":
            raise Conflict(f"only a paused execution can be resumed; this one is {status}")
        request = decode_requested(request_raw)
        if action == "resume" and additional_gas:
            self._check_gas(principal, request.policy.max_gas + int(extra_raw or 0)
                            + additional_gas)
            if request.session_id is not None:
                await self._check_session_gas(request, int(extra_raw or 0) + additional_gas)
            # Reserved from the principal's budgets (429 when they have no room) with the raise.
            await BudgetStore(self.client, self.keys).reserve_gas(request_id, additional_gas)
        if action == "cancel" and status == "queued":
            cancelled = ExecuteResponse(
                success=False, request_id=request_id, cid=request.cid, output=None, gas_used=0,
                duration=0.0, executed_at=now_iso(),
                error=ErrorInfo("cancelled", "cancelled before it started"))
            if await self.bus.cancel_queued(request, cancelled,
                                            self.settings.idempotency_ttl_ms):
                return True, await self.state(principal, request_id)
            # An executor started it meanwhile: cancel it where it runs.
        confirmation = self.fan_in.watch(request_id, _EXPECTED[action])
        try:
            # It may have ended between the read above and the watch: its terminal event has
            # gone by, and waiting for it would take the whole confirmation wait.
            if await self.client.hexists(key, "result"):
                return True, await self.state(principal, request_id)
            await self.client.publish(self.keys.control, encode(ControlMessage(
                request_id=request_id, action=action, additional_gas=additional_gas)))
            try:
                async with asyncio.timeout(CONFIRM_WAIT_S):
                    answer = await confirmation
                confirmed = True
            except TimeoutError:
                confirmed = False
        finally:
            self.fan_in.unwatch(request_id, confirmation)
        if confirmed and decode_head(answer).type == "control_refused":
            raise TooManyPaused(decode_control_refused(answer).detail)
        return confirmed, await self.state(principal, request_id)

    async def step(self, principal: str, request_id: str, gas: int | None,
                   wait_s: float) -> tuple[bool, ExecutionState]:
        """Let a paused execution run until it has used `gas` more (default: its `step_gas`)
        or ends; returns whether it stopped within `wait_s` seconds (0: do not wait), and its
        state then: paused with the gas used at that pause, or finished with its result.

        Raises NotFound, Conflict (409: not paused), InvalidRequest (no `gas` and no
        `step_gas`: pointer `/gas`).
        """
        key = self.keys.execution(request_id)
        # The status and how many events the execution has had, as of one moment: every event
        # from that position on is newer than the pause this step starts from.
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(key, ["principal", "status", "request"])
        pipe.llen(self.keys.execution_events(request_id))
        (owner, status_raw, request_raw), seen = await pipe.execute()
        if owner is None or owner.decode() != principal:
            raise NotFound(f"no execution {request_id}")
        status = status_raw.decode()
        if status in FINISHED:
            raise Conflict(f"the execution has already finished ({status})")
        if status != "paused":
            raise Conflict(f"only a paused execution can be stepped; this one is {status}")
        gas = gas or decode_requested(request_raw).step_gas
        if gas is None:
            raise InvalidRequest.at("/gas", "give the gas to step by: the execution has no "
                                            "step_gas to default to")
        wake = self.fan_in.watch(request_id, STOPS)
        try:
            await self.client.publish(self.keys.control, encode(ControlMessage(
                request_id=request_id, action="step", gas=gas)))
            deadline = asyncio.get_running_loop().time() + wait_s
            while True:
                woken = await _until(wake, deadline)
                # Watch again before looking, so a stop landing meanwhile wakes the next wait.
                self.fan_in.unwatch(request_id, wake)
                wake = self.fan_in.watch(request_id, STOPS)
                stop = await self._stop_since(request_id, int(seen))
                if stop is not None or not woken:
                    break
        finally:
            self.fan_in.unwatch(request_id, wake)
        view = await self.state(principal, request_id)
        if stop is None:
            return False, view
        head = decode_head(stop)
        if head.type == "execution_paused" and view.status not in FINISHED:
            # Where this step stopped, even if it has been resumed since.
            view = msgspec.structs.replace(view, status="paused",
                                           gas_used=decode_paused(stop).gas_used)
        return True, view

    async def _stop_since(self, request_id: str, position: int) -> bytes | None:
        """The first `execution_paused` or terminal event of the execution from `position` of
        its event index on, if any (None too if it was trimmed from the stream meanwhile)."""
        for data in await self._events(request_id, position, -1):
            if decode_head(data).type in STOPS:
                return data
        return None

    async def _paused_gas(self, request_id: str) -> int:
        """The gas used at the execution's last pause, as its `execution_paused` says (0 if
        that event is not among its last few, or was trimmed)."""
        for data in reversed(await self._events(request_id, -PAUSE_LOOKBACK, -1)):
            if decode_head(data).type == "execution_paused":
                return decode_paused(data).gas_used
        return 0

    async def _events(self, request_id: str, start: int, end: int) -> list[bytes]:
        """The execution's events from `start` to `end` of its index (LRANGE positions)."""
        ids = await self.client.lrange(self.keys.execution_events(request_id), start, end)
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(self.keys.events, entry_id, entry_id)
        return [entries[0][1][b"data"] for entries in await pipe.execute() if entries]

    async def _check_session_gas(self, request: WasmExecRequested, more: int) -> None:
        """A session call's gas may grow (`more`: all it was given beyond its `max_gas`) only
        within what its session's budget has left beside it: the call holds its `max_gas`
        already (an omitted one was lowered to all that was left). Raises SessionExhausted
        (409). Without this, `additional_gas` ran a call past its session's total."""
        assert request.session_id is not None
        budget, used = await self.client.hmget(self.keys.session(request.session_id),
                                                ["budget_gas", "gas_used"])
        if not budget:
            return
        left = int(budget) - int(used or 0) - request.policy.max_gas
        if more > left:
            detail = (f"the session's budget has {max(left, 0)} gas left beside what this call "
                      "holds already; raise it with PATCH /sessions/{id} first")
            raise SessionExhausted(detail, errors=[FieldError("/additional_gas", detail)])

    def _check_gas(self, principal: str, total: int) -> None:
        cap = self.policies.caps(principal).max_gas
        ceiling = self.settings.max_gas
        for limit, what in ((ceiling, "ceiling"), (cap, "your cap")):
            if limit is not None and total > limit:
                detail = f"the gas budget would be {total}, over {what} of {limit}"
                raise InvalidRequest(detail, errors=[FieldError("/additional_gas", detail)])


async def _until(future: asyncio.Future[bytes], deadline: float) -> bool:
    """Wait for `future` until `deadline` (loop time); whether it resolved."""
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.shield(future)
        return True
    except TimeoutError:
        return False


STATE_FIELDS = ["principal", "status", "cid", "result", "session", "pipeline", "gas_seen",
                "request"]


def _view(principal: str, request_id: str, fields: list[Any]) -> ExecutionState | None:
    """An execution's view from its record's STATE_FIELDS; None when it is gone or another
    principal's."""
    owner, status, cid, result, session, pipeline, gas_seen, accepted = fields
    if owner is None or owner.decode() != principal or status is None or cid is None:
        return None
    view = ExecutionState(request_id=request_id, status=status.decode(), cid=cid.decode())
    accepted_in = _decode_environment(accepted) if accepted else _AcceptedIn()
    environment = accepted_in.environment
    view.priority = accepted_in.priority
    if accepted_in.batch_id is not None:
        view.batch_id = accepted_in.batch_id
    if environment is not None:
        view.environment = EnvironmentRef(name=environment.name, version=environment.version)
    if session is not None:
        view.session_id = session.decode()
    if pipeline is not None:
        view.pipeline_id = pipeline.decode()
    if result is None:
        # Running or paused: the gas used as last reported (progress, or the pause).
        if gas_seen is not None:
            view.gas_used = int(gas_seen)
        return view
    finished = decode_response(result)
    view.output_ref = finished.output_ref
    return msgspec.structs.replace(
        view, success=finished.success, output=finished.output, gas_used=finished.gas_used,
        duration=finished.duration, executed_at=finished.executed_at, error=finished.error,
        state_cid=finished.state_cid, cached=finished.cached, memo_of=finished.memo_of)
