"""Authentication: who is calling. Every route but health, readiness and metrics uses it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from starlette.requests import HTTPConnection

from relay.errors import Unauthenticated


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Authenticator:
    """API keys from `RELAY_API_KEYS`, looked up by their sha256 digest.

    Looking up a digest rather than comparing keys keeps the comparison's timing independent of
    how much of a guessed key is right, and keeps no plain key in memory.
    """

    def __init__(self, api_keys: Iterable[tuple[str, str]]) -> None:
        self._principals = {_digest(key): principal for principal, key in api_keys}

    def __call__(self, connection: HTTPConnection) -> str:
        """The caller's principal. Raises Unauthenticated."""
        key = connection.headers.get("x-api-key")
        if not key:
            raise Unauthenticated("send an API key in the X-API-Key header")
        principal = self._principals.get(_digest(key))
        if principal is None:
            raise Unauthenticated("unknown API key")
        return principal
