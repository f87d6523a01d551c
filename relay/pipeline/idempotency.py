"""Idempotency: one execution per principal and key, and what a repeated request gets.

A request's id is derived from its principal and idempotency key (or, without a key, from the
request itself), so every gateway finds the same execution record for the same request. The
accept script (`relay.bus`) claims that record atomically; this stage decides what a request
that found one already gets: a replay of the stored result, a join of the running execution,
or 422 when an explicit key comes back with a different request.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import msgspec

from relay.bus import Accepted
from relay.errors import IdempotencyKeyReuse
from relay.metrics import Metrics
from relay.schemas import DEFAULT_MAX_STACK, EffectivePolicy, encode

REPLAYED = {"Idempotent-Replayed": "true"}
"""On every answer to a request that did not start its execution."""


def fingerprint(cid: str, entrypoint: str, inputs: list[Any], policy: EffectivePolicy,
                session_id: str | None = None, step_gas: int | None = None,
                memoize: bool = False, environment: str | None = None,
                priority: str = "normal") -> str:
    """sha256 of the canonical request: resolved CID, entrypoint, inputs, effective policy (and
    the session of a session call, the environment as `name@version`, the priority)."""
    limits = msgspec.structs.asdict(policy)
    if policy.max_stack == DEFAULT_MAX_STACK:  # left out: v1 requests keep their fingerprints
        del limits["max_stack"]
    canonical: dict[str, Any] = {"cid": cid, "entrypoint": entrypoint, "inputs": inputs,
                                 "policy": limits}
    if session_id is not None:
        canonical["session_id"] = session_id
    if step_gas is not None:  # absent when not set: v1 requests keep their fingerprints
        canonical["step_gas"] = step_gas
    if memoize:  # likewise
        canonical["memoize"] = True
    if environment is not None:  # likewise (None: v1's)
        canonical["environment"] = environment
    if priority != "normal":  # likewise
        canonical["priority"] = priority
    return hashlib.sha256(encode(canonical)).hexdigest()


def request_id(principal: str, key: str, scope: str | None = None) -> str:
    """The execution's id: sha256 of the principal and the key (or fingerprint); a session
    call's explicit key is scoped to its session."""
    # Length-prefixed, so no (principal, key) pair can collide with another; a scoped one starts
    # with a letter where an unscoped one starts with a digit.
    text = f"{len(principal)}:{principal}{key}"
    if scope is not None:
        text = f"s{len(principal)}:{principal}{len(scope)}:{scope}{key}"
    return hashlib.sha256(text.encode()).hexdigest()


class Repeat(NamedTuple):
    """A request that found its execution already accepted."""

    result: bytes | None
    """The stored response once it has finished (a replay), else None (a join)."""


def repeat_of(accepted: Accepted, fingerprint: str, explicit_key: bool,
              metrics: Metrics) -> Repeat | None:
    """None when the request is new. Raises IdempotencyKeyReuse (422)."""
    if not accepted.existing:
        return None
    if explicit_key and accepted.fingerprint != fingerprint:
        raise IdempotencyKeyReuse("this idempotency key was used with a different request")
    metrics.count("idempotent_hit")
    return Repeat(accepted.result)
