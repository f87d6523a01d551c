"""Pause, resume and cancel, the gateway's side.

A request for a running execution goes out on the pub/sub channel `relay:control`; the executor
running it acts on it and emits `execution_paused`, `execution_resumed` or the terminal event,
which the gateway waits for (briefly) so the answer says what happened; an executor that refuses
a pause (it holds as many paused runs as it may) answers `control_refused` instead. An execution
still queued is cancelled by the gateway itself, atomically, so no executor ever starts it.
"""

from __future__ import annotations

import asyncio

import msgspec
import redis.asyncio as aioredis

from relay.budgets import BudgetStore
from relay.bus import Bus
from relay.errors import Conflict, FieldError, InvalidRequest, NotFound, TooManyPaused
from relay.gateway.fanin import EventFanIn
from relay.keys import Keys
from relay.policy import Policies
from relay.schemas import (
    TERMINAL_TYPES,
    Action,
    ControlMessage,
    ErrorInfo,
    ExecuteResponse,
    ExecutionState,
    decode_control_refused,
    decode_head,
    decode_requested,
    decode_response,
    encode,
    now_iso,
)
from relay.settings import Settings

CONFIRM_WAIT_S = 5.0
FINISHED = frozenset({"completed", "failed", "cancelled"})
_EXPECTED: dict[str, frozenset[str]] = {
    "pause": frozenset({"execution_paused", "control_refused"}) | TERMINAL_TYPES,
    "resume": frozenset({"execution_resumed"}) | TERMINAL_TYPES,
    "cancel": TERMINAL_TYPES,
}




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
        owner, status, cid, result, session = await self.client.hmget(
            self.keys.execution(request_id), ["principal", "status", "cid", "result", "session"])
        if owner is None or owner.decode() != principal:
            raise NotFound(f"no execution {request_id}")
        view = ExecutionState(request_id=request_id, status=status.decode(), cid=cid.decode())
        if session is not None:
            view.session_id = session.decode()
        if result is None:
            return view
        finished = decode_response(result)
        return msgspec.structs.replace(
            view, success=finished.success, output=finished.output, gas_used=finished.gas_used,
            duration=finished.duration, executed_at=finished.executed_at, error=finished.error,
            state_cid=finished.state_cid)

    async def act(self, principal: str, request_id: str, action: Action,
                  additional_gas: int = 0) -> tuple[bool, ExecutionState]:
        """Do `action`; returns whether its effect was confirmed, and the state after it.

        Raises NotFound, Conflict (409: finished, or not in a state the action applies to),
        TooManyPaused (409: its executor refused the pause), InvalidRequest (additional gas
        over the ceiling or the principal's cap) or BudgetExhausted (429: no room for it in a
        budget of the principal's).
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

    def _check_gas(self, principal: str, total: int) -> None:
        cap = self.policies.caps(principal).max_gas
        ceiling = self.settings.max_gas
        for limit, what in ((ceiling, "ceiling"), (cap, "your cap")):
            if limit is not None and total > limit:
                detail = f"the gas budget would be {total}, over {what} of {limit}"
                raise InvalidRequest(detail, errors=[FieldError("/additional_gas", detail)])
