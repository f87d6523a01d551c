"""API keys created with `relay keys create`: stored as sha256 digests, never as keys.

A key is shown once, when it is created. Its id (the first 12 hex digits of its digest) names it
afterwards, for listing and revoking, without revealing it.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import NamedTuple

import redis.asyncio as aioredis

from relay.keys import Keys
from relay.schemas import StoredKey, decode_stored_key, encode, now_iso

KEY_PREFIX = "relay_"
ID_LENGTH = 12


class NewKey(NamedTuple):
    key: str
    id: str


class StoredKeys:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.hash = keys.api_keys

    async def create(self, principal: str) -> NewKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_digest = hashlib.sha256(key.encode()).hexdigest()
        record = StoredKey(principal=principal, id=key_digest[:ID_LENGTH], created_at=now_iso())
        await self.client.hset(self.hash, key_digest, encode(record))
        return NewKey(key, record.id)

    async def principal(self, key_digest: bytes) -> str | None:
        raw = await self.client.hget(self.hash, key_digest.hex())
        return None if raw is None else decode_stored_key(raw).principal

    async def kept(self, key_digests: list[bytes]) -> set[bytes]:
        """Those of `key_digests` still stored (not revoked), in one round trip."""
        found = await self.client.hmget(self.hash, [key_digest.hex() for key_digest in key_digests])
        return {key_digest for key_digest, raw in zip(key_digests, found, strict=True)
                if raw is not None}

    async def list(self) -> list[StoredKey]:
        stored = await self.client.hgetall(self.hash)
        records = [decode_stored_key(raw) for raw in stored.values()]
        return sorted(records, key=lambda record: (record.principal, record.created_at))

    async def revoke(self, key_id: str) -> StoredKey | None:
        """Delete the key with this id; None when there is none."""
        for field, raw in (await self.client.hgetall(self.hash)).items():
            record = decode_stored_key(raw)
            if record.id == key_id:
                await self.client.hdel(self.hash, field)
                return record
        return None
