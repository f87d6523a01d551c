"""Sessions: a module instance whose state lives on between calls.

A session is a Redis hash (`Keys.session`): its owner, module, budget, what its calls used,
and the state its last successful call committed (`state_cid`, a manifest of content-addressed
pages: relay.states). Its calls are ordinary executions carrying `session_id`; the accept and
settle scripts keep them in order (relay/lua/sessions.lib.lua): only the oldest unfinished call
is on the requests stream, and its settle publishes the next. An idle session is deleted by the
gateway's sweeper (`Sessions.sweep`) once its `ttl` has passed since its last call.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from relay.bus import Script
from relay.errors import Conflict, NotFound, QuotaExceeded, SessionClosed
from relay.keys import Keys
from relay.schemas import (
    ExecuteResponse,
    SessionBudget,
    SessionLinks,
    SessionStatus,
    SessionView,
    decode_response,
    rfc3339,
)

_CREATE = Script.named("session_create", libs=("states",))
_EXPIRE = Script.named("session_expire", libs=("states",))
_SET = Script.named("session_set")
SWEEP_BATCH = 100
SWEEP_INTERVAL_S = 5.0


def new_session_id() -> str:
    return "ses_" + secrets.token_hex(12)


class Remaining(NamedTuple):
    """What a session's budget still allows (None: no such limit)."""

    gas: int | None
    time: int | None


BUDGET_FIELDS = ("budget_gas", "gas_used", "budget_time", "time_used")
"""The fields of a session's record `remaining` reads."""


def remaining(fields: Mapping[str, str]) -> Remaining:
    """What a session's budget still allows, never below 0, from its record's BUDGET_FIELDS
    (the gateway's view of a session, and the executor's at a call's start)."""
    budget_gas, budget_time = fields.get("budget_gas"), fields.get("budget_time")
    gas_used, time_used = fields.get("gas_used") or "0", fields.get("time_used") or "0"
    return Remaining(
        max(int(budget_gas) - int(gas_used), 0) if budget_gas else None,
        max(int(float(budget_time) - float(time_used)), 0) if budget_time else None)


class Session(NamedTuple):
    """A session's record, as stored."""

    session_id: str
    fields: Mapping[str, str]

    @property
    def principal(self) -> str:
        return self.fields["principal"]

    @property
    def cid(self) -> str:
        return self.fields["cid"]

    @property
    def closed(self) -> bool:
        return self.fields.get("closed") == "1"

    @property
    def state_cid(self) -> str | None:
        return self.fields.get("state_cid") or None

    @property
    def budget(self) -> SessionBudget:
        return SessionBudget(max_gas=_int_or_none(self.fields.get("budget_gas")),
                             max_time=_int_or_none(self.fields.get("budget_time")),
                             max_calls=_int_or_none(self.fields.get("budget_calls")))

    @property
    def gas_used(self) -> int:
        return int(self.fields.get("gas_used", "0"))

    @property
    def time_used(self) -> float:
        return float(self.fields.get("time_used", "0"))

    @property
    def remaining(self) -> Remaining:
        return remaining(self.fields)

    @property
    def exhausted(self) -> bool:
        budget, remaining = self.budget, self.remaining
        calls_left = (budget.max_calls is None
                      or int(self.fields.get("accepted", "0")) < budget.max_calls)
        return not calls_left or remaining.gas == 0 or remaining.time == 0


class Sessions:
    """Sessions in Redis: create, read, list, close, budget, expire."""

    def __init__(self, client: aioredis.Redis, keys: Keys, default_ttl_ms: int,
                 max_sessions: int) -> None:
        self.client = client
        self.keys = keys
        self.default_ttl_ms = default_ttl_ms
        self.max_sessions = max_sessions
        """Sessions one principal may hold at once."""

    async def create(self, principal: str, cid: str, *, budget: SessionBudget,
                     ttl_ms: int | None, environment: str | None, created_at: str,
                     state_cid: str | None = None, state_size: int = 0) -> str:
        """A new session's id. Raises NotFound when the module was deleted meanwhile."""
        session_id = new_session_id()
        created = await _CREATE.run(self.client, *self._create_call(
            session_id, principal, cid, budget=budget, ttl_ms=ttl_ms, environment=environment,
            created_at=created_at, state_cid=state_cid, state_size=state_size))
        if created == 0:
            raise NotFound(f"no module {cid}")
        if created == -1:
            raise NotFound(f"no state {state_cid}")
        if created == -2:
            raise self.quota_exceeded()
        return session_id

    def quota_exceeded(self) -> QuotaExceeded:
        return QuotaExceeded(f"you hold {self.max_sessions} sessions, as many as you may "
                             "(RELAY_MAX_SESSIONS): close some, and they go at their expiry")

    async def load_create(self) -> None:
        """Make sure Redis knows the create script, for `queue_create` (inside a MULTI, an
        EVALSHA of a script Redis does not know fails)."""
        await self.client.script_load(_CREATE.source)

    def queue_create(self, pipe: Pipeline, principal: str, cid: str, *, budget: SessionBudget,
                     ttl_ms: int | None, environment: str | None, created_at: str,
                     state_cid: str | None = None, state_size: int = 0) -> str:
        """`create` queued on a pipeline (several in one MULTI: a snapshot's branches); the new
        session's id. Its reply: the expiry (ms), 0 when the module is gone, -1 when the state
        is."""
        session_id = new_session_id()
        _CREATE.queue(pipe, *self._create_call(
            session_id, principal, cid, budget=budget, ttl_ms=ttl_ms, environment=environment,
            created_at=created_at, state_cid=state_cid, state_size=state_size))
        return session_id

    def _create_call(self, session_id: str, principal: str, cid: str, *, budget: SessionBudget,
                     ttl_ms: int | None, environment: str | None, created_at: str,
                     state_cid: str | None, state_size: int) -> tuple[list[str], list[Any]]:
        keys = self.keys
        return [
            keys.session(session_id), keys.sessions(principal), keys.session_expiry,
            keys.module(cid), keys.module_holds(cid),
        ], [
            keys.prefix, session_id, principal, cid, environment or "", created_at,
            ttl_ms or self.default_ttl_ms, _text(budget.max_gas), _text(budget.max_time),
            _text(budget.max_calls), state_cid or "", state_size, self.max_sessions,
        ]

    async def get(self, session_id: str) -> Session | None:
        fields = await self.client.hgetall(self.keys.session(session_id))
        if not fields:
            return None
        return Session(session_id, {k.decode(): v.decode() for k, v in fields.items()})

    async def owned(self, principal: str, session_id: str) -> Session:
        """The principal's session. Raises NotFound (also for another principal's: their ids
        are not ours to confirm)."""
        session = await self.get(session_id) if _plausible(session_id) else None
        if session is None or session.principal != principal:
            raise NotFound(f"no session {session_id}")
        return session

    async def callable(self, principal: str, session_id: str) -> Session:
        """The principal's session, open for calls. Raises NotFound, SessionClosed."""
        session = await self.owned(principal, session_id)
        if session.closed:
            raise SessionClosed(f"session {session_id} is closed")
        return session

    async def current(self, session_id: str) -> str | None:
        """The request id of the call running (or next to run), if any."""
        head: bytes | None = await self.client.lindex(self.keys.session_calls(session_id), 0)
        return head.decode() if head is not None else None

    async def unfinished(self, session_id: str) -> list[str]:
        calls = await self.client.lrange(self.keys.session_calls(session_id), 0, -1)
        return [call.decode() for call in calls]

    async def history(self, session_id: str) -> list[str]:
        """The request ids of its calls, oldest first (the last 1000)."""
        calls = await self.client.lrange(self.keys.session_history(session_id), 0, -1)
        return [call.decode() for call in calls]

    async def view(self, session: Session) -> SessionView:
        current = await self.current(session.session_id)
        status: SessionStatus
        if session.closed:
            status = "closed"
        elif current is not None:
            call_status = await self.client.hget(self.keys.execution(current), "status")
            status = "paused" if call_status == b"paused" else "running"
        elif session.exhausted:
            status = "exhausted"
        else:
            status = "idle"
        fields = session.fields
        last = fields.get("last_result")
        last_result: ExecuteResponse | None = decode_response(last) if last else None
        path = f"/sessions/{session.session_id}"
        return SessionView(
            session_id=session.session_id, cid=session.cid,
            environment=fields.get("environment") or None, status=status,
            calls=int(fields.get("calls", "0")), gas_used=session.gas_used,
            time_used=round(session.time_used, 3), budget=session.budget,
            state_cid=session.state_cid, state_size=int(fields.get("state_size") or 0),
            current=current, last_result=last_result, created_at=fields["created_at"],
            expires_at=rfc3339(int(fields["expires_ms"]) / 1000),
            links=SessionLinks(self_=path, calls=f"{path}/calls",
                               events=f"/intent/execute-wasm/events?session_id="
                                      f"{session.session_id}"))

    async def page(self, principal: str, cursor: int, limit: int,
                   ) -> tuple[list[SessionView], int | None]:
        """The principal's sessions, newest first, from offset `cursor`; and the next cursor."""
        ids = await self.client.zrevrange(self.keys.sessions(principal), cursor,
                                          cursor + limit)
        views = []
        for raw in ids[:limit]:
            session = await self.get(raw.decode())
            if session is not None:
                views.append(await self.view(session))
        return views, cursor + limit if len(ids) > limit else None

    async def close(self, principal: str, session_id: str) -> Session:
        """Mark it closed (further calls are refused); the caller cancels its calls. Raises
        NotFound."""
        session = await self.owned(principal, session_id)
        await self._set(principal, session_id, {"closed": "1"}, when_closed=True)
        return session

    async def set_budget(self, principal: str, session_id: str, budget: SessionBudget) -> None:
        """Raises NotFound, Conflict (closed)."""
        await self.owned(principal, session_id)
        await self._set(principal, session_id, {
            "budget_gas": _text(budget.max_gas), "budget_time": _text(budget.max_time),
            "budget_calls": _text(budget.max_calls)})

    async def _set(self, principal: str, session_id: str, fields: Mapping[str, str], *,
                   when_closed: bool = False) -> None:
        """Write `fields` into the principal's session only if it still exists (the sweep may
        have deleted it since it was read) and, unless `when_closed`, is open."""
        outcome = await _SET.run(self.client, [self.keys.session(session_id)], [
            principal, "1" if when_closed else "0",
            *[part for pair in fields.items() for part in pair]])
        if outcome == b"gone":
            raise NotFound(f"no session {session_id}")
        if outcome == b"closed":
            raise Conflict(f"session {session_id} is closed")

    async def expire(self) -> None:
        """Sweep every `SWEEP_INTERVAL_S`, forever (a gateway's supervised loop; every gateway
        runs one, and the expire script makes their sweeps of one session harmless)."""
        while True:
            while await self.sweep() == SWEEP_BATCH:
                pass  # a whole batch went: more may be due already
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def sweep(self) -> int:
        """Delete sessions whose idle time is over; how many."""
        now_s, now_us = await self.client.time()
        now_ms = now_s * 1000 + now_us // 1000
        due = await self.client.zrangebyscore(self.keys.session_expiry, 0, now_ms,
                                              start=0, num=SWEEP_BATCH)
        deleted = 0
        for raw in due:
            session_id = raw.decode()
            deleted += int(await _EXPIRE.run(self.client, [
                self.keys.session(session_id), self.keys.session_calls(session_id),
                self.keys.session_history(session_id), self.keys.session_expiry,
            ], [self.keys.prefix, session_id]))
        return deleted


def _plausible(session_id: str) -> bool:
    return session_id.startswith("ses_") and len(session_id) <= 64


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text else None
