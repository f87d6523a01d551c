"""`GET /executions`: the caller's executions, newest first, filtered, a page at a time.

The accept script lists every new execution in its principal's sorted set (Keys.executions),
as `<acceptance ms>-<sequence>:<request id>` (its `execution_queued` id's, which only grows)
in lex order, so a page starts exactly after the member the cursor names, however many
executions were accepted in the same millisecond or since. (Members listed before the sequence
was added, `<acceptance ms>:<request id>`, are still read, and their cursors taken.) A page
reads the records of a batch of ids at a time to filter them, and drops from the set the ids
whose record has expired. It stops at `limit` matches or after SCAN_MAX ids, so a rare filter
answers in bounded time: `items` may then be short, and `next_cursor` goes on from there.
"""

from __future__ import annotations

import re
from typing import Any

import redis.asyncio as aioredis

from relay.errors import InvalidRequest
from relay.gateway.control import Controller
from relay.keys import Keys
from relay.schemas import ExecutionState

FILTERS = {"status": "status", "session_id": "session", "pipeline_id": "pipeline"}
"""Query parameter -> the record field it must equal. (`batch_id` is the batch's own list.)"""
STATUSES = frozenset({"queued", "running", "paused", "completed", "failed", "cancelled"})
SCAN_MAX = 5000
"""Ids one page looks at, at most."""
BATCH = 200
CURSOR = re.compile(r"\d{13}(-\d{10})?:[A-Za-z0-9_.:-]{1,200}")


def filters_of(query: Any) -> dict[str, str]:
    """The record fields and values the query asks for. Raises InvalidRequest."""
    unknown = sorted(set(query) - {*FILTERS, "batch_id", "limit", "cursor"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter {unknown[0]!r}; the filters are "
                             + ", ".join([*FILTERS, "batch_id"]))
    wanted = {field: query[name] for name, field in FILTERS.items() if name in query}
    if "status" in wanted and wanted["status"] not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(sorted(STATUSES))}")
    return wanted


def cursor_of(raw: str | None) -> str | None:
    """Raises InvalidRequest."""
    if raw is not None and not CURSOR.fullmatch(raw):
        raise InvalidRequest("cursor is not one this endpoint gave")
    return raw


async def page(client: aioredis.Redis, keys: Keys, controller: Controller, principal: str,
               wanted: dict[str, str], limit: int, cursor: str | None,
               only: set[str] | None = None) -> tuple[list[ExecutionState], str | None]:
    """Up to `limit` of the principal's executions matching `wanted` (and among `only`, if
    given), newest first, after `cursor`; and the cursor of the next page (None: none)."""
    if only is not None and not only:
        return [], None
    listed = keys.executions(principal)
    fields = list(wanted)
    top = "+" if cursor is None else "(" + cursor
    matches: list[tuple[str, str]] = []  # (member, request id)
    scanned = 0
    while scanned < SCAN_MAX and len(matches) <= limit:
        members = await client.zrevrangebylex(listed, top, "-", start=0,
                                              num=min(BATCH, SCAN_MAX - scanned))
        if not members:
            return await _views(controller, principal, matches, limit), None
        scanned += len(members)
        top = "(" + members[-1].decode()
        pipe = client.pipeline(transaction=False)
        for member in members:
            pipe.hmget(keys.execution(_request_id(member)), ["principal", *fields])
        gone = []
        for member, (owner, *values) in zip(members, await pipe.execute(), strict=True):
            if owner is None:
                gone.append(member)
            elif (only is None or _request_id(member) in only) and all(
                    value is not None and value.decode() == wanted[field]
                    for field, value in zip(fields, values, strict=True)):
                matches.append((member.decode(), _request_id(member)))
        if gone:
            await client.zrem(listed, *gone)
    views = await _views(controller, principal, matches, limit)
    if len(matches) > limit:
        return views, matches[limit - 1][0]
    return views, top[1:]  # looked at SCAN_MAX ids: the next page goes on from the last


async def _views(controller: Controller, principal: str, matches: list[tuple[str, str]],
                 limit: int) -> list[ExecutionState]:
    """The page's executions (those expired since they were matched left out)."""
    return await controller.states(principal, [request_id for _, request_id in matches[:limit]])


def _request_id(member: bytes) -> str:
    return member.decode().partition(":")[2]
