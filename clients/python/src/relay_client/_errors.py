"""The one exception the SDK raises: an RFC 9457 problem answered by the gateway, or a
connection that could not be made (status 0)."""

from __future__ import annotations

from typing import Any

import httpx


class RelayError(Exception):
    """A request Relay refused or could not answer.

    `status` is the HTTP status (0 when no answer came: connection refused, reset, timed out),
    `type` the problem's slug URI such as `/problems/rate-limited`, `errors` the pointers of an
    invalid request (`[{"pointer": "/policy/max_gas", "detail": ...}]`), `request_id` the
    gateway's correlation id, `headers` the response's headers (empty without a response).
    """

    def __init__(self, status: int, type: str, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None, request_id: str | None = None,
                 headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}" if status else f"{title}: {detail}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.request_id = request_id
        self.headers = headers or {}
        self.body = body or {}

    @property
    def slug(self) -> str:
        """The last part of `type`: `rate-limited`, `not-found`, ..."""
        return self.type.rsplit("/", 1)[-1]

    @classmethod
    def from_response(cls, response: httpx.Response) -> RelayError:
        """The problem in `response` (any error status); a body that is not a problem (a
        proxy's HTML page) still gives the status and the start of its text."""
        headers = dict(response.headers)
        request_id = response.headers.get("x-request-id")
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "type" in body:
            return cls(status=int(body.get("status") or response.status_code),
                       type=str(body["type"]), title=str(body.get("title", "")),
                       detail=str(body.get("detail", "")), errors=body.get("errors"),
                       request_id=body.get("request_id") or request_id, headers=headers,
                       body=body)
        return cls(status=response.status_code, type="about:blank",
                   title=response.reason_phrase, detail=response.text[:500],
                   request_id=request_id, headers=headers)

    @classmethod
    def from_transport(cls, exc: Exception) -> RelayError:
        return cls(status=0, type="about:blank", title="Connection failed",
                   detail=f"{type(exc).__name__}: {exc}")
