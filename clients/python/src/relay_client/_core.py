"""What the sync and async clients share: configuration, request bodies, when and how long to
wait before a retry, the SSE decoder and webhook signature verification. No I/O here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._errors import RelayError
from ._models import Event

DEFAULT_URL = "http://127.0.0.1:8000"
EVENTS_PATH = "/intent/execute-wasm/events"
# A sync execute waits up to RELAY_SYNC_WAIT (30 s by default) before the gateway answers 202:
# the default read timeout outlasts it.
DEFAULT_TIMEOUT_S = 60.0
# Retry-After longer than this is not waited for: the error is raised for the caller to decide.
MAX_RETRY_AFTER_S = 60.0
# The gateway pings open streams every 15 s: a read that waits longer means a dead connection.
STREAM_READ_TIMEOUT_S = 45.0
# How long an event stream keeps reconnecting (a gateway restart, Redis away) before raising.
RECONNECT_WINDOW_S = 60.0
SAFE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})


@dataclass(frozen=True)
class Config:
    url: str
    api_key: str | None
    timeout_s: float
    retries: int

    @classmethod
    def resolve(cls, url: str | None, api_key: str | None, timeout: float,
                retries: int) -> Config:
        """Arguments first, then `RELAY_URL` / `RELAY_API_KEY`, then the `relay dev` URL."""
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        return cls(url=(url or os.environ.get("RELAY_URL") or DEFAULT_URL).rstrip("/"),
                   api_key=api_key or os.environ.get("RELAY_API_KEY") or None,
                   timeout_s=timeout, retries=retries)

    def client_options(self) -> dict[str, Any]:
        headers = {"User-Agent": "relay-client-python/0.1.0"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        return {"base_url": self.url, "headers": headers, "timeout": self.timeout_s,
                # Relay is reached directly; the environment's proxy settings would send the
                # API key through a third party.
                "trust_env": False}

    def stream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, read=max(self.timeout_s, STREAM_READ_TIMEOUT_S))


def backoff_s(attempt: int) -> float:
    """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s, ... capped at 8 s, each times a
    uniform factor in [0.5, 1] so that many clients do not come back at once."""
    return float(min(8.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.0))


def poll_interval_s(attempt: int) -> float:
    """Waiting for an execution's end: 50 ms, 100 ms, 200 ms, then every 500 ms."""
    return min(0.5, 0.05 * 2.0**attempt)


def retry_delay_s(response: httpx.Response, attempt: int) -> float | None:
    """Seconds to wait before retrying a refused request, or None when it must not be retried:
    only 503 and 429 `rate-limited` are (nothing ran), and only when Retry-After is at most
    60 s (a budget's 429 `budget-exhausted` is not retried: its window may last a day)."""
    if response.status_code == 429:
        try:
            slug = str(response.json().get("type", "")).rsplit("/", 1)[-1]
        except ValueError:
            return None
        if slug != "rate-limited":
            return None
    elif response.status_code != 503:
        return None
    retry_after = response.headers.get("retry-after")
    if retry_after is None:
        return backoff_s(attempt)
    try:
        seconds = float(retry_after)
    except ValueError:
        return backoff_s(attempt)
    return seconds if seconds <= MAX_RETRY_AFTER_S else None


def retriable_transport_error(exc: httpx.TransportError, method: str, safe: bool) -> bool:
    """A request that never reached the gateway may always be sent again; one that may have
    (a reset or a timeout after sending) only when repeating it cannot run anything twice."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return safe or method in SAFE_METHODS


def new_idempotency_key() -> str:
    return f"relay-client-{uuid.uuid4().hex}"


def drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def execute_body(ref: str, inputs: list[Any] | None, *, entrypoint: str | None,
                 max_gas: int | None, max_memory: int | None, max_time: int | None,
                 max_stack: int | None, idempotency_key: str | None,
                 extra: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of an execute request; an idempotency key is made here when none is given, so
    every retry of this request carries the same one and the gateway runs it once."""
    policy = drop_none({"max_gas": max_gas, "max_memory": max_memory, "max_time": max_time,
                        "max_stack": max_stack})
    body = drop_none({"cid": ref, "entrypoint": entrypoint, "inputs": inputs or [],
                      "idempotency_key": idempotency_key or new_idempotency_key(), **extra})
    if policy:
        body["policy"] = policy
    return body


def module_content(source: bytes | str | os.PathLike[str]) -> tuple[bytes, str]:
    """The bytes to upload and their content type: a path (str or PathLike) is read; content
    that starts with the wasm magic is binary, anything else WAT text."""
    data = source if isinstance(source, bytes) else open(source, "rb").read()  # noqa: SIM115
    kind = "application/wasm" if data.startswith(b"\0asm") else "text/plain"
    return data, kind


def list_params(limit: int | None, cursor: str | None, **filters: Any) -> dict[str, Any]:
    return drop_none({"limit": limit, "cursor": cursor, **filters})


class SseDecoder:
    """Server-Sent Events, line by line (the WHATWG parsing rules Relay's stream needs: `id:`,
    `data:` lines, comments and `retry:`, a blank line ends a message)."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """The event that `line` completes, if any."""
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            message = json.loads(data)
            if not isinstance(message, dict):
                return None
            return Event(id=self.last_id or "", type=str(message.get("type", "")),
                         data=message)
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes | str,
                   tolerance_s: int = 300) -> dict[str, Any]:
    """Check a Relay webhook delivery (Standard Webhooks 1.0) and return its JSON event.

    `secret` is the principal's `whsec_…` secret (`GET /webhooks/secret`), `headers` the
    delivery's headers (any case), `body` its raw body, as received. Raises ValueError when no
    `v1` signature matches or `webhook-timestamp` is more than `tolerance_s` seconds away from
    now (a replayed delivery). Receivers should still deduplicate by `webhook-id`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        webhook_id = lowered["webhook-id"]
        timestamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as exc:
        raise ValueError(f"missing header {exc.args[0]}") from None
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise ValueError("webhook-timestamp is not a number") from None
    if abs(time.time() - sent_at) > tolerance_s:
        raise ValueError("webhook-timestamp is too far from now")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    payload = body.encode() if isinstance(body, str) else body
    signed = f"{webhook_id}.{timestamp}.".encode() + payload
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in signatures.split():
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            event: dict[str, Any] = json.loads(payload)
            return event
    raise ValueError("no signature matches the secret")


def raise_for(response: httpx.Response) -> None:
    if response.is_error:
        raise RelayError.from_response(response)
