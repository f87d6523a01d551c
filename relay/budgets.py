"""Budgets: how much a principal's executions may use per window, across every gateway.

A budget limits one principal's gas, time (ms of execution) and number of executions within
fixed windows laid back to back from its creation. Whoever creates it manages it: set by the
principal itself it is a spending cap, which the principal may change or delete; set for it by
an administrator (`Action::"admin"`) it is a quota, which the principal may read but not change.

The counting lives in the scripts that accept and settle executions (relay/lua/budgets.lib.lua),
so it holds under any number of gateways: a new execution reserves its `max_gas`, `max_time`
and one execution in the current window of every budget of its principal, or is refused; its
settle turns the reservation into what the run measured, once. This module creates, reads and
changes budgets, and says what the accept script's answers mean.
"""

from __future__ import annotations

import re
import secrets
import time

import msgspec
import redis.asyncio as aioredis

from relay.bus import Accepted, Script
from relay.errors import (
    BudgetExhausted,
    Conflict,
    FieldError,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
)
from relay.keys import Keys
from relay.schemas import (
    Budget,
    BudgetPage,
    BudgetRemaining,
    BudgetRequest,
    BudgetReserved,
    BudgetUsage,
    WasmExecRequested,
    rfc3339,
)

_CREATE = Script.named("budget_create")
_CHANGE = Script.named("budget_change")
_USAGE = Script.named("budget_usage", libs=("budgets",))
_ADD_GAS = Script.named("budget_add_gas", libs=("budgets",))

ID = re.compile(r"bud_[0-9a-f]{24}")
LOWER_ATTEMPTS = 2
"""Times an execution is accepted again with lower limits, while concurrent executions keep
taking what its principal's budgets have left, before it is refused."""
_LIMITS = ("max_gas", "max_time", "max_executions")


_last_us = 0  # so the ids a process makes in one microsecond, a burst of creations, never tie


def new_budget_id() -> tuple[str, int]:
    """A new budget's id and creation time (ms): `bud_`, the creation time in µs (13 hex
    digits, strictly increasing in this process), 11 random hex digits, so ids sort by age."""
    global _last_us
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return f"bud_{_last_us:013x}{secrets.token_hex(6)[:11]}", _last_us // 1000


def lowered(request: WasmExecRequested, remaining: str) -> WasmExecRequested:
    """`request` with its `max_gas` and `max_time` lowered to what remains, from the accept
    script's `lower` answer (`Accepted.budget`: `<gas> <time>`, -1 for no limit). Only limits
    the request left out are ever over what remains there (an explicit one is refused instead).
    Its id and fingerprint stay: a budget never changes which request it is."""
    gas, time_ms = (int(part) for part in remaining.split())
    policy = request.policy
    return msgspec.structs.replace(request, policy=msgspec.structs.replace(
        policy,
        max_gas=policy.max_gas if gas < 0 else min(policy.max_gas, gas),
        max_time=policy.max_time if time_ms < 0 else min(policy.max_time, time_ms)))


def refusal(accepted: Accepted) -> BudgetExhausted:
    """The 429 for an accept script's `budget` answer (`<seconds> <budget id> <limit>`); a
    `lower` one still standing after `LOWER_ATTEMPTS` is a race lost to running executions'
    reservations: 1 s."""
    if accepted.status == "lower":
        return BudgetExhausted("what your budgets have left is being reserved by concurrent "
                               "executions; retry shortly", retry_after_s=1)
    return _exhausted(accepted.budget)


def _exhausted(answer: str) -> BudgetExhausted:
    seconds, budget_id, limit = answer.split()
    why = ("what running executions have reserved frees when they end" if seconds == "1"
           else "its window ends then")
    return BudgetExhausted(f"budget {budget_id} has not enough {limit} left in its window for "
                           f"this; retry in {seconds} s ({why})", retry_after_s=int(seconds))


class BudgetStore:
    """Budgets in Redis (`Keys.budget`, `Keys.budgets`, `Keys.visible_budgets`). `caller` is
    the authenticated principal: a budget it may not see is NotFound, never Forbidden."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def create(self, caller: str, principal: str, body: BudgetRequest,
                     max_budgets: int | None) -> Budget:
        """A new budget counting `principal`'s executions from now (the caller must have been
        allowed to name `principal`). Raises QuotaExceeded when the principal has
        `max_budgets` already (None: no bound)."""
        budget_id, now_ms = new_budget_id()
        keys = self.keys
        fields = {"principal": principal, "created_by": caller, "created_ms": str(now_ms),
                  **_limit_fields(body)}
        created = await _CREATE.run(self.client, [
            keys.budget(budget_id), keys.budgets(principal), keys.visible_budgets(principal),
            keys.visible_budgets(caller),
        ], [budget_id, "" if max_budgets is None else max_budgets,
            *[part for pair in fields.items() for part in pair]])
        if not created:
            raise QuotaExceeded(f"{principal} has {max_budgets} budgets, as many as it may "
                                "(RELAY_MAX_BUDGETS): delete some first")
        return _budget(budget_id, fields)

    async def get(self, caller: str, budget_id: str) -> Budget:
        """Raises NotFound."""
        fields = await self._fields(budget_id) if ID.fullmatch(budget_id) else None
        if fields is None or caller not in (fields["principal"], fields["created_by"]):
            raise NotFound(f"no budget {budget_id}")
        return _budget(budget_id, fields)

    async def page(self, caller: str, cursor: str | None, limit: int) -> BudgetPage:
        """The budgets `caller` may see, newest first, `limit` at most, after `cursor` (the
        previous page's `next_cursor`). Raises InvalidRequest for a cursor that is not one."""
        if cursor is not None and not ID.fullmatch(cursor):
            raise InvalidRequest("cursor is not a next_cursor this endpoint gave")
        ids = [raw.decode() for raw in await self.client.zrevrangebylex(
            self.keys.visible_budgets(caller), f"({cursor}" if cursor else "+", "-", 0,
            limit + 1)]
        pipe = self.client.pipeline(transaction=False)
        for budget_id in ids[:limit]:
            pipe.hgetall(self.keys.budget(budget_id))
        items = [_budget(budget_id, _decoded(raw))
                 for budget_id, raw in zip(ids, await pipe.execute(), strict=False) if raw]
        return BudgetPage(items=items, next_cursor=ids[limit - 1] if len(ids) > limit else None)

    async def replace(self, caller: str, budget_id: str, body: BudgetRequest) -> Budget:
        """New limits (and window) replace the old ones; the use counted so far stays. Raises
        NotFound, Forbidden (its principal, when someone else set it), InvalidRequest (the body
        names another principal)."""
        reply = await self._change(caller, budget_id, "replace", body.principal or "",
                                   *_limit_fields(body).values())
        return _budget(budget_id, _decoded(dict(zip(reply[::2], reply[1::2], strict=True))))

    async def delete(self, caller: str, budget_id: str) -> None:
        """Raises NotFound, Forbidden (its principal, when someone else set it)."""
        await self._change(caller, budget_id, "delete")

    async def usage(self, caller: str, budget_id: str) -> BudgetUsage:
        """The current window's use (Redis's clock says which window). Raises NotFound."""
        reply = await _USAGE.run(self.client, [self.keys.budget(budget_id)],
                                 [self.keys.prefix, budget_id]) if ID.fullmatch(
                                     budget_id) else None
        if not reply or caller not in (reply[0].decode(), reply[1].decode()):
            raise NotFound(f"no budget {budget_id}")
        (start, end, gas_used, time_used, executions, reserved_gas, reserved_time, max_gas,
         max_time, max_executions) = (int(value) for value in reply[2:])

        def left(limit: int, used: int) -> int | None:
            return None if limit < 0 else max(0, limit - used)

        return BudgetUsage(
            window_start=rfc3339(start / 1000), window_end=rfc3339(end / 1000),
            gas_used=gas_used, time_used=time_used, executions=executions,
            reserved=BudgetReserved(gas=reserved_gas, time=reserved_time),
            remaining=BudgetRemaining(gas=left(max_gas, gas_used + reserved_gas),
                                      time=left(max_time, time_used + reserved_time),
                                      executions=left(max_executions, executions)))

    async def reserve_gas(self, request_id: str, gas: int) -> None:
        """Reserve `gas` more (`additional_gas`) for a running or paused execution in every
        budget of its principal, and raise its gas budget by it. Raises BudgetExhausted, or
        Conflict when it finished meanwhile."""
        reply = await _ADD_GAS.run(self.client, [self.keys.execution(request_id)],
                                   [self.keys.prefix, gas])
        if reply == b"finished":
            raise Conflict("the execution has already finished")
        if reply != b"ok":
            raise _exhausted(reply[1].decode())

    async def _fields(self, budget_id: str) -> dict[str, str] | None:
        raw = await self.client.hgetall(self.keys.budget(budget_id))
        return _decoded(raw) if raw else None

    async def _change(self, caller: str, budget_id: str, action: str, *fields: object,
                      ) -> list[bytes]:
        if not ID.fullmatch(budget_id):
            raise NotFound(f"no budget {budget_id}")
        reply = await _CHANGE.run(self.client, [self.keys.budget(budget_id)],
                                  [caller, self.keys.prefix, action, budget_id, *fields])
        if reply == b"gone":
            raise NotFound(f"no budget {budget_id}")
        if reply == b"forbidden":
            raise Forbidden(f"budget {budget_id} is a quota someone else set for you: only its "
                            "creator may change or delete it")
        if reply == b"principal":
            detail = "a budget's principal cannot change; create another budget"
            raise InvalidRequest(detail, errors=[FieldError("/principal", detail)])
        fields_after: list[bytes] = reply[1]
        return fields_after


def _limit_fields(body: BudgetRequest) -> dict[str, str]:
    """A budget's window and limits as stored ('' for no limit)."""
    return {"window": str(body.window),
            **{name: "" if getattr(body, name) is None else str(getattr(body, name))
               for name in _LIMITS}}


def _decoded(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in raw.items()}


def _budget(budget_id: str, fields: dict[str, str]) -> Budget:
    limits = {name: int(fields[name]) if fields.get(name) else None for name in _LIMITS}
    return Budget(budget_id=budget_id, principal=fields["principal"],
                  window=int(fields["window"]), created_by=fields["created_by"],
                  created_at=rfc3339(int(fields["created_ms"]) / 1000), **limits)
