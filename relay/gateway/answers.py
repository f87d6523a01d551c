"""How an admitted execution (an execute, a session call) is answered.

Sync (the default): the result once the execution ends, or 202 when it takes longer than
`RELAY_SYNC_WAIT`. `Prefer: respond-async`: 202 at once, with where to follow it.
"""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from relay.gateway.http import json_response
from relay.gateway.state import Gateway
from relay.pipeline.run import Admission
from relay.schemas import Accepted, Links, decode_completed, encode, response_from_completed


async def answer(gw: Gateway, admission: Admission) -> Response:
    """The answer to an admitted execution (or session call): its result, a replay, or 202."""
    request_id, headers = admission.request_id, admission.headers
    if admission.result is not None:
        return json_response(admission.result, headers=headers)
    if admission.completion is None:
        return _accepted(request_id, headers)
    try:
        result = await wait_result(gw, request_id, admission.completion)
    finally:
        gw.fan_in.release(request_id, admission.completion)
    if result is None:
        return _accepted(request_id, headers)
    return json_response(result, headers=headers)


async def wait_result(gw: Gateway, request_id: str, completion: asyncio.Future[bytes],
                       ) -> bytes | None:
    # A timer of the loop's that fails the wait: what asyncio.timeout does, at half its cost
    # (a few µs a sync request).
    expiry = asyncio.get_running_loop().call_later(gw.settings.sync_wait_ms / 1000, _expire,
                                                   completion)
    try:
        event = await completion
        return encode(response_from_completed(decode_completed(event)))
    except TimeoutError:
        # One last look, in case the fan-in was reconnecting when the result landed.
        stored: bytes | None = await gw.client.hget(gw.keys.execution(request_id), "result")
        return stored
    finally:
        expiry.cancel()


def _expire(completion: asyncio.Future[bytes]) -> None:
    if not completion.done():
        completion.set_exception(TimeoutError())


def accepted_body(request_id: str) -> bytes:
    """202's body: where to follow the execution."""
    return encode(Accepted(request_id=request_id, links=Links(
        self_=f"/executions/{request_id}",
        events=f"/intent/execute-wasm/events?request_id={request_id}")))


def _accepted(request_id: str, headers: dict[str, str]) -> Response:
    return json_response(accepted_body(request_id), 202,
                         {**headers, "Location": f"/executions/{request_id}"})
