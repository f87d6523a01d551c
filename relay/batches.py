"""Batches: many execute requests in one (`POST /intent/execute-wasm/batch`).

Each item is admitted as an execute request of its own (relay.pipeline.run), in order; the
batch is what ties their answers together. Redis holds (relay.keys.Keys.batch):
- `batch:<id>`: hash {principal, created_at, total, items, status, finished_at, callback_url,
  callback_events}; `items` is the JSON list of what each item became: `{"request_id"}`, or
  `{"problem"}` for an item refused;
- `batch:<id>:waiting`: the request ids of accepted items that have not ended;
- `batch:<id>:ended`: request id -> how it ended (`completed`, `failed`, `cancelled`).

Items are published with `batch_id`, so their completions carry it: the pipeline scheduler's
consumer passes each to `ended`, whose script ends the batch with one `batch_complete` event
when nothing waits any more. An item that joined an execution started outside the batch has no
`batch_id` on its completion: reading the batch notices it ended.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
import redis.asyncio as aioredis

from relay.bus import Script
from relay.errors import NotFound
from relay.keys import Keys
from relay.schemas import BatchItemState, BatchView, now_iso

KEEP_MS = 7 * 86_400_000
"""How long a batch is kept after it was created or ended (as a finished pipeline is)."""
FINISHED = ("completed", "failed", "cancelled")

_CREATE = Script.named("batch_create", libs=("events", "batches"))
_ENDED = Script.named("batch_ended", libs=("events", "batches"))


class Item(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What an item became, as the batch keeps it."""

    request_id: str | None = None
    problem: dict[str, Any] | None = None


_decode_items = msgspec.json.Decoder(list[Item]).decode


def new_batch_id() -> str:
    return "bat_" + secrets.token_hex(12)


class BatchStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, events_retention: int) -> None:
        self.client = client
        self.keys = keys
        self.events_retention = events_retention

    async def create(self, batch_id: str, principal: str, items: list[Item],
                     ended: dict[str, str], callback_url: str | None,
                     callback_events: list[str] | None) -> None:
        """Keep the batch; `ended`: how the items that have ended already did (replays)."""
        accepted = [request_id for request_id in dict.fromkeys(
            item.request_id for item in items) if request_id is not None]
        await _CREATE.run(self.client, [self.keys.batch(batch_id), self.keys.events], [
            batch_id, principal, now_iso(), len(items), msgspec.json.encode(items), KEEP_MS,
            self.events_retention, callback_url or "",
            msgspec.json.encode(callback_events) if callback_events is not None else "",
            *[part for request_id in accepted for part in (request_id, ended.get(request_id, ""))],
        ])

    async def ended(self, batch_id: str, request_id: str, status: str) -> None:
        """An item's execution ended (`status`): the batch ends with the last one."""
        await _ENDED.run(self.client, [self.keys.batch(batch_id), self.keys.events], [
            batch_id, request_id, status, now_iso(), self.events_retention, KEEP_MS])

    async def view(self, principal: str, batch_id: str) -> BatchView:
        """`GET /batches/{id}`. Raises NotFound (another principal's too)."""
        key = self.keys.batch(batch_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(key, ["principal", "items", "status", "created_at", "finished_at"])
        pipe.hgetall(f"{key}:ended")
        (owner, raw_items, status, created_at, finished_at), ended_raw = await pipe.execute()
        if owner is None or owner.decode() != principal:
            raise NotFound(f"no batch {batch_id}")
        items = _decode_items(raw_items)
        ended = {name.decode(): value.decode() for name, value in ended_raw.items()}
        running = [request_id for request_id in dict.fromkeys(
            item.request_id for item in items) if request_id and request_id not in ended]
        now = await self._statuses(running)
        unseen = {request_id: state for request_id, state in now.items()
                  if state in FINISHED or state == "expired"}
        for request_id, state in unseen.items():
            await self.ended(batch_id, request_id, state)  # its completion passed unseen
            ended[request_id] = state
        if unseen:  # the last of them may have ended the batch
            status, finished_at = await self.client.hmget(key, ["status", "finished_at"])
        states = [BatchItemState(request_id=None, status="refused", problem=item.problem)
                  if item.request_id is None else
                  BatchItemState(request_id=item.request_id,
                                 status=ended.get(item.request_id)
                                 or now.get(item.request_id, "queued"))
                  for item in items]
        done = sum(state.status in (*FINISHED, "refused", "expired") for state in states)
        return BatchView(batch_id=batch_id, status=status.decode(), total=len(states),
                         completed=done, items=states, created_at=created_at.decode(),
                         finished_at=finished_at.decode() if finished_at else None)

    async def request_ids(self, principal: str, batch_id: str) -> set[str]:
        """The request ids of the principal's batch (none for another's or an unknown one)."""
        owner, raw_items = await self.client.hmget(self.keys.batch(batch_id),
                                                   ["principal", "items"])
        if owner is None or owner.decode() != principal:
            return set()
        return {item.request_id for item in _decode_items(raw_items) if item.request_id}

    async def _statuses(self, request_ids: list[str]) -> dict[str, str]:
        """Each execution's status as its record says (`expired` when it has none left)."""
        if not request_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hget(self.keys.execution(request_id), "status")
        found = await pipe.execute()
        return {request_id: status.decode() if status else "expired"
                for request_id, status in zip(request_ids, found, strict=True)}
