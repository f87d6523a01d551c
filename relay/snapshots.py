"""Snapshots of sessions, and branches: new sessions restored from one.

A snapshot is a Redis hash (`Keys.snapshot`) naming a session's last committed state and holding
a reference to it (relay.states: a state is stored once, whatever the number of sessions and
snapshots that hold it) and a hold on its module (which cannot be deleted while held). It lives
until deleted: it has no expiry. Restoring creates sessions that start from its state, each with
its own reference, so deleting the snapshot leaves them working.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Mapping

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, WatchError

from relay.bus import Script
from relay.errors import Conflict, NotFound, QuotaExceeded
from relay.keys import Keys
from relay.schemas import SessionBudget, Snapshot
from relay.sessions import Session, Sessions

_CREATE = Script.named("snapshot_create", libs=("states",))
_DELETE = Script.named("snapshot_delete", libs=("states",))
RESTORE_ATTEMPTS = 50
"""A restore retries when its snapshot changed under it (only a delete changes one: the retry
then answers 404), when the principal's sessions changed under it (another restore or create,
on any gateway: the retry checks the quota again) or Redis forgot the create script meanwhile
(a restart)."""
RESTORE_BACKOFF_S = 0.002
"""Up to this times the attempt number (at most RESTORE_BACKOFF_MAX_S), at random, between
attempts that lost a race: restores racing each other take turns instead of colliding again
(measured: 32 at once through two gateways all succeed; ten attempts were not always enough)."""
RESTORE_BACKOFF_MAX_S = 0.02


def new_snapshot_id() -> str:
    return "snp_" + secrets.token_hex(12)


class Snapshots:
    """Snapshots in Redis: take, read, list, delete, restore as branches."""

    def __init__(self, client: aioredis.Redis, keys: Keys, sessions: Sessions,
                 max_snapshots: int) -> None:
        self.client = client
        self.keys = keys
        self.sessions = sessions
        self.max_snapshots = max_snapshots
        """Snapshots one principal may keep."""

    async def create(self, session: Session, label: str | None, created_at: str) -> Snapshot:
        """Snapshot the session's last committed state, atomically with the session as it is
        now (a call that commits later is not in it). Raises NotFound when the session expired
        meanwhile."""
        snapshot_id = new_snapshot_id()
        keys = self.keys
        taken = await _CREATE.run(self.client, [
            keys.session(session.session_id), keys.snapshot(snapshot_id),
            keys.snapshots(session.principal), keys.module_holds(session.cid),
        ], [
            keys.prefix, snapshot_id, session.principal, session.session_id, session.cid,
            created_at, self.max_snapshots, *([] if label is None else [label]),
        ])
        if taken == 0:
            raise NotFound(f"no session {session.session_id}")
        if taken == -1:
            raise QuotaExceeded(f"you keep {self.max_snapshots} snapshots, as many as you may "
                                "(RELAY_MAX_SNAPSHOTS): delete some first")
        state_cid, size = taken
        return Snapshot(snapshot_id=snapshot_id, session_id=session.session_id, cid=session.cid,
                        state_cid=state_cid.decode() or None, size=int(size), label=label,
                        created_at=created_at)

    async def owned(self, principal: str, snapshot_id: str) -> Snapshot:
        """The principal's snapshot. Raises NotFound (also for another principal's: their ids
        are not ours to confirm)."""
        fields = (await self.client.hgetall(self.keys.snapshot(snapshot_id))
                  if _plausible(snapshot_id) else {})
        snapshot = _snapshot(snapshot_id, fields)
        if snapshot is None or fields[b"principal"].decode() != principal:
            raise NotFound(f"no snapshot {snapshot_id}")
        return snapshot

    async def page(self, principal: str, cursor: int, limit: int,
                   ) -> tuple[list[Snapshot], int | None]:
        """The principal's snapshots, newest first, from offset `cursor`; and the next cursor.
        Two round trips whatever the page's size."""
        ids = [raw.decode() for raw in await self.client.zrevrange(
            self.keys.snapshots(principal), cursor, cursor + limit)]
        pipe = self.client.pipeline(transaction=False)
        for snapshot_id in ids[:limit]:
            pipe.hgetall(self.keys.snapshot(snapshot_id))
        found = await pipe.execute() if ids else []
        items = [snapshot for snapshot in (_snapshot(snapshot_id, fields) for snapshot_id, fields
                                           in zip(ids, found, strict=False))
                 if snapshot is not None]  # one deleted meanwhile is left out
        return items, cursor + limit if len(ids) > limit else None

    async def delete(self, principal: str, snapshot_id: str) -> None:
        """Delete it, dropping its reference to its state and its hold on its module. Raises
        NotFound."""
        snapshot = await self.owned(principal, snapshot_id)
        keys = self.keys
        deleted = await _DELETE.run(self.client, [
            keys.snapshot(snapshot_id), keys.snapshots(principal),
            keys.module_holds(snapshot.cid),
        ], [keys.prefix, snapshot_id, principal, snapshot.cid])
        if not deleted:
            raise NotFound(f"no snapshot {snapshot_id}")  # deleted meanwhile

    async def restore(self, principal: str, snapshot: Snapshot, count: int, *,
                      budget: SessionBudget, created_at: str) -> list[str]:
        """Create `count` sessions of the snapshot's module, each starting from its state with
        a reference of its own, in the session's environment, all or none, in one transaction;
        their ids. Raises NotFound when the snapshot was deleted meanwhile, QuotaExceeded,
        Conflict when concurrent changes to the principal's sessions won every attempt.

        Optimistic: the transaction runs only if the snapshot (which holds the state and the
        module, so that each branch's reference can be taken) was not deleted since it was
        read, nor the principal's sessions (the quota) changed; a few hundred microseconds of
        script work for 64 branches (they share the state: no page is copied)."""
        key = self.keys.snapshot(snapshot.snapshot_id)
        for attempt in range(RESTORE_ATTEMPTS):
            await self.sessions.load_create()
            async with self.client.pipeline(transaction=True) as pipe:
                held = self.keys.sessions(principal)
                await pipe.watch(key, held)
                owner, environment = await pipe.hmget(key, ["principal", "environment"])
                if owner != principal.encode():
                    raise NotFound(f"no snapshot {snapshot.snapshot_id}")  # deleted meanwhile
                if await pipe.zcard(held) + count > self.sessions.max_sessions:
                    raise self.sessions.quota_exceeded()  # all the branches or none
                pipe.multi()
                ids = [self.sessions.queue_create(
                    pipe, principal, snapshot.cid, budget=budget, ttl_ms=None,
                    environment=(environment or b"").decode() or None, created_at=created_at,
                    state_cid=snapshot.state_cid, state_size=snapshot.size)
                    for _ in range(count)]
                try:
                    replies = await pipe.execute(raise_on_error=False)
                except WatchError:
                    await asyncio.sleep(random.uniform(
                        0, min(RESTORE_BACKOFF_S * (attempt + 1), RESTORE_BACKOFF_MAX_S)))
                    continue
            if any(isinstance(reply, NoScriptError) for reply in replies):
                continue  # nothing was created: every reply is that error
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            if any(reply <= 0 for reply in replies):  # the snapshot holds both: impossible
                raise RuntimeError(f"the module or state of snapshot {snapshot.snapshot_id} "
                                   "is gone")
            return ids
        # Not a 404: the snapshot is there, but other changes to the principal's sessions kept
        # winning the race.
        raise Conflict("your sessions changed while the branches were made (other restores or "
                       "new sessions at the same time); nothing was created: retry")

    async def sessions_of(self, session_ids: list[str]) -> list[Session]:
        """The sessions' records in one round trip (the caller's own: no owner check)."""
        pipe = self.client.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.hgetall(self.keys.session(session_id))
        return [Session(session_id, {k.decode(): v.decode() for k, v in fields.items()})
                for session_id, fields in zip(session_ids, await pipe.execute(), strict=True)
                if fields]


def _snapshot(snapshot_id: str, fields: Mapping[bytes, bytes]) -> Snapshot | None:
    if not fields:
        return None
    label = fields.get(b"label")
    return Snapshot(snapshot_id=snapshot_id, session_id=fields[b"session_id"].decode(),
                    cid=fields[b"cid"].decode(), state_cid=fields[b"state_cid"].decode() or None,
                    size=int(fields[b"size"]), label=None if label is None else label.decode(),
                    created_at=fields[b"created_at"].decode())


def _plausible(snapshot_id: str) -> bool:
    return snapshot_id.startswith("snp_") and len(snapshot_id) <= 64
