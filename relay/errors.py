"""One error hierarchy: what a client can act on, each kind with its status and stable slug.

`relay.gateway.problems` is the one place these become responses (problem+json, WebSocket
close codes and `control_error` messages).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgspec

# FieldError is re-exported: errors are raised with the field pointers they are about.
from relay.schemas import FieldError as FieldError
from relay.schemas import Problem


class RelayError(Exception):
    """An error a client can act on. `slug` is stable and documented."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def problem(self, request_id: str | None) -> Problem:
        return Problem(
            type=f"/problems/{self.slug}",
            title=self.title,
            status=self.status,
            detail=self.detail,
            request_id=request_id,
            errors=self.errors,
        )


class InvalidRequest(RelayError):
    status, slug, title = 400, "invalid-request", "Invalid request"

    @classmethod
    def at(cls, pointer: str, detail: str) -> InvalidRequest:
        """One error about one place in the body (a JSON pointer)."""
        return cls(detail, errors=[FieldError(pointer, detail)])


class Unauthenticated(RelayError):
    status, slug, title = 401, "unauthenticated", "Missing or bad credentials"

    def __init__(self, detail: str, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'ApiKey realm="relay", Bearer realm="relay"')


class Forbidden(RelayError):
    status, slug, title = 403, "forbidden", "Forbidden"


class QuotaExceeded(RelayError):
    """The principal has as many modules, or bytes of modules, stored as it may (or sessions,
    or snapshots)."""

    status, slug, title = 403, "quota-exceeded", "Quota exceeded"


class NotFound(RelayError):
    status, slug, title = 404, "not-found", "Not found"


class MethodNotAllowed(RelayError):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"


class Conflict(RelayError):
    status, slug, title = 409, "conflict", "Conflict"


class SessionClosed(RelayError):
    """A call on a session that was closed (`DELETE /sessions/{id}`)."""

    status, slug, title = 409, "session-closed", "Session closed"


class SessionExhausted(RelayError):
    """A call on a session whose budget is used up, or asking for more than remains."""

    status, slug, title = 409, "session-exhausted", "Session budget exhausted"


class TooManyPaused(RelayError):
    """A pause the executor running the execution refused: it holds as many paused executions
    as it may (`RELAY_EXECUTOR_MAX_PAUSED`). The execution goes on running."""

    status, slug, title = 409, "too-many-paused", "Too many paused executions"


class PayloadTooLarge(RelayError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(RelayError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class RangeNotSatisfiable(RelayError):
    """A Range no byte of the representation is in (`Content-Range: bytes */<size>` says its
    size)."""

    status, slug, title = 416, "range-not-satisfiable", "Range not satisfiable"

    def __init__(self, detail: str, size: int, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers["Content-Range"] = f"bytes */{size}"


class IdempotencyKeyReuse(RelayError):
    status, slug, title = 422, "idempotency-key-reuse", "Idempotency key reused"


class TooManyStreams(RelayError):
    """One event stream more than the principal may hold open (`RELAY_MAX_STREAMS`). No
    Retry-After: a place frees as soon as the principal closes one of its streams."""

    status, slug, title = 429, "too-many-streams", "Too many open event streams"


class RetryLater(RelayError):
    """A refusal that says when to try again: `Retry-After`, and `retry_after` in the body."""

    def __init__(self, detail: str, retry_after_s: int, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after_s = retry_after_s
        self.headers["Retry-After"] = str(retry_after_s)

    def problem(self, request_id: str | None) -> Problem:
        problem = super().problem(request_id)
        problem.retry_after = self.retry_after_s
        return problem


class RateLimited(RetryLater):
    status, slug, title = 429, "rate-limited", "Too many requests"


class BudgetExhausted(RetryLater):
    """No room left in a budget of the principal's for an execution (or more gas) in the
    budget's current window. `Retry-After`: when the window ends if it is used up; 1 when only
    running executions' reservations stand in the way (they free within their max_time)."""

    status, slug, title = 429, "budget-exhausted", "Budget exhausted"


class Unavailable(RelayError):
    status, slug, title = 503, "unavailable", "Service unavailable"

    def __init__(self, detail: str, retry_after_s: int = 1, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after_s))


T = TypeVar("T")
MAX_JSON_DEPTH = 64
"""Levels of nesting a JSON body may have (the contract's "Sandbox guarantees")."""
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
# Messages about one field of an object, pointed at that field rather than at the object.
_FIELD_MESSAGE = re.compile(r"Object (?:contains unknown|missing required) field `(.*)`")


def pointer_from_msgspec(message: str) -> tuple[str, str]:
    """Split a msgspec ValidationError message into (JSON pointer, detail).

    msgspec says e.g. "Expected `int` > 0 - at `$.policy.max_gas`"; the contract wants
    `/policy/max_gas`. A message without a path is about the whole body (pointer "").
    """
    detail, sep, where = message.rpartition(" - at `")
    if not sep:
        detail, where = message, "$`"
    parts = [field or index for field, index in _PATH_PART.findall(where[1:-1])]
    field = _FIELD_MESSAGE.fullmatch(detail)
    if field:
        parts.append(field.group(1))
    return "".join(f"/{part}" for part in parts), detail


def decode_body(decode: Callable[[bytes], T], body: bytes) -> T:
    """Decode a JSON body with a msgspec decoder. Raises InvalidRequest pointing at the first
    problem (a JSON pointer, `""` for the whole body)."""
    try:
        return decode(body)
    except RecursionError:
        # msgspec gives up (about 1,000 levels) before Python's stack would.
        raise InvalidRequest.at("", f"the body is nested deeper than {MAX_JSON_DEPTH} levels"
                                ) from None
    except msgspec.ValidationError as exc:
        pointer, detail = pointer_from_msgspec(str(exc))
        raise InvalidRequest.at(pointer, detail) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest.at("", f"the body is not valid JSON: {exc}") from None
