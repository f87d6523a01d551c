"""Short-lived access tokens for event streams, minted by `POST /auth/tokens`.

Browsers' EventSource (and WebSocket) cannot send headers, so these two accept a token in the
URL. Only these tokens: an API key or a user's JWT in a URL would end up in proxy logs and
browser history for far longer than five minutes. A token is subscribe-only, bound to its
principal, and signed with a secret every gateway shares (`RELAY_TOKEN_SECRET`, or one made
once and kept in Redis).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import NamedTuple

import msgspec
import redis.asyncio as aioredis

from relay.errors import Unauthenticated
from relay.schemas import TokenClaims, decode_token_claims, encode

PREFIX = "rt1"
MAX_TTL_S = 300


class Verified(NamedTuple):
    principal: str
    expires_at: float
    """Unix time the token expires, when a stream using it must end."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AccessTokens:
    def __init__(self, secret: bytes, ttl_s: int = MAX_TTL_S) -> None:
        self._secret = secret
        self.ttl_s = min(ttl_s, MAX_TTL_S)

    @staticmethod
    async def shared_secret(client: aioredis.Redis, key: str, configured: str | None) -> bytes:
        """`configured`, or the deployment's secret in Redis (made by the first gateway)."""
        if configured:
            return configured.encode()
        await client.set(key, secrets.token_bytes(32), nx=True)
        secret: bytes = await client.get(key)
        return secret

    def mint(self, principal: str) -> tuple[str, int]:
        """A subscribe-only token for `principal`, and when it expires (Unix seconds)."""
        expires_at = int(time.time()) + self.ttl_s
        payload = _b64(encode(TokenClaims(sub=principal, exp=expires_at,
                                                   scope="subscribe")))
        return f"{PREFIX}.{payload}.{self._sign(payload)}", expires_at

    def verify(self, token: str) -> Verified:
        """Raises Unauthenticated unless `token` is one of ours, unexpired."""
        prefix, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        if prefix != PREFIX or not payload or not signature:
            raise Unauthenticated("access_token is not an access token from POST /auth/tokens")
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise Unauthenticated("access_token is not valid")
        try:
            claims = decode_token_claims(_unb64(payload))
        except (ValueError, msgspec.DecodeError):
            raise Unauthenticated("access_token is not valid") from None
        if claims.scope != "subscribe" or claims.exp <= time.time():
            raise Unauthenticated("access_token has expired; mint another")
        return Verified(claims.sub, float(claims.exp))

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())
