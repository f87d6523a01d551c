"""Authentication: who is calling. Every route but health, readiness and metrics uses it.

Three kinds of credentials:
- `X-API-Key` from `RELAY_API_KEYS` (held in memory) or created with `relay keys create`
  (stored in Redis as sha256 digests only);
- `Authorization: Bearer <JWT>`: HS256 with `RELAY_JWT_SECRET`, RS256/ES256 with
  `RELAY_JWT_PUBLIC_KEY`; `exp` and `sub` required, `aud` checked when configured.

Keys are looked up by their digest, never compared as text: the lookup's timing does not depend
on how much of a guessed key is right, and no plain key is kept anywhere.

An event stream outlives the moment its credentials were checked, so `credential` also says
what ends them: a stored key's digest (it can be revoked while the stream is open) or a JWT's
`exp`.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import NamedTuple

import jwt
from starlette.requests import HTTPConnection

from relay.apikeys import StoredKeys
from relay.errors import Unauthenticated
from relay.principals import RULE, is_principal
from relay.settings import Settings

_HMAC_ALGORITHMS = ("HS256",)
_PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Credential(NamedTuple):
    """Who a caller is, and what ends that while a stream it opened stays open."""

    principal: str
    expires_at: float = math.inf
    """Unix time (s) the credential expires: a JWT's `exp`, an access token's; inf for keys."""
    stored_key: bytes | None = None
    """The sha256 digest of a key made by `relay keys create`, which may be revoked at run
    time; None for every other credential (`RELAY_API_KEYS` cannot be revoked while running)."""
    controls: bool = True
    """Whether it may pause, resume and cancel: an access token only subscribes."""


class Authenticator:
    def __init__(self, settings: Settings, stored: StoredKeys) -> None:
        self._configured = {digest(key): principal for principal, key in settings.api_keys}
        self._stored = stored
        self._cache_s = settings.stored_key_cache_ms / 1000
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._jwt_keys: dict[str, str] = {}
        if settings.jwt_secret:
            self._jwt_keys.update(dict.fromkeys(_HMAC_ALGORITHMS, settings.jwt_secret))
        if settings.jwt_public_key:
            self._jwt_keys.update(dict.fromkeys(_PUBLIC_KEY_ALGORITHMS, settings.jwt_public_key))
        self._audience = settings.jwt_audience

    async def __call__(self, connection: HTTPConnection) -> str:
        """The caller's principal. Raises Unauthenticated."""
        return (await self.credential(connection)).principal

    async def credential(self, connection: HTTPConnection) -> Credential:
        """The caller's principal and what ends its credential. Raises Unauthenticated."""
        key = connection.headers.get("x-api-key")
        if key is not None:
            key_digest = digest(key)
            principal = self._configured.get(key_digest)
            if principal is not None:
                return Credential(principal)
            return Credential(await self._stored_key(key_digest), stored_key=key_digest)
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return self._bearer(token.strip())
        raise Unauthenticated("send an API key in X-API-Key, or a bearer token in Authorization")

    async def _stored_key(self, key_digest: bytes) -> str:
        cached = self._cache.get(key_digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        principal = await self._stored.principal(key_digest)
        if principal is None:
            self._cache.pop(key_digest, None)
            raise Unauthenticated("unknown API key")
        if self._cache_s:
            if len(self._cache) > 10_000:  # bounded: forget everything rather than grow
                self._cache.clear()
            self._cache[key_digest] = (principal, time.monotonic() + self._cache_s)
        return principal

    def forget(self, key_digest: bytes) -> None:
        """Drop a stored key from the cache: it was found revoked, so the next request with it
        asks Redis (and is refused) rather than trusting the cache until it expires."""
        self._cache.pop(key_digest, None)

    def _bearer(self, token: str) -> Credential:
        if not self._jwt_keys:
            raise Unauthenticated("bearer tokens are not accepted here (no JWT key configured)")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            # One algorithm at a time, with the key made for it: no `none`, and no HS256 token
            # "signed" with the RSA public key.
            key = self._jwt_keys.get(str(algorithm))
            if key is None:
                raise Unauthenticated(f"bearer tokens signed with {algorithm} are not accepted")
            claims = jwt.decode(
                token, key, algorithms=[str(algorithm)], audience=self._audience,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the bearer token is for another audience") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid bearer token: {exc}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the bearer token has no subject")
        if not is_principal(subject):
            raise Unauthenticated(f"the bearer token's subject is not a principal name ({RULE})")
        return Credential(subject, expires_at=float(claims["exp"]))
