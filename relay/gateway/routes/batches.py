"""`POST /intent/execute-wasm/batch` and `GET /batches/{batch_id}` (relay.batches).

Each item goes through the execute pipeline on its own, after the caller is authenticated
once: counted by the rate limiter (all of them in one round trip), validated, made idempotent
and authorized as its own request. A refused item is answered by its problem and never fails
the batch. Sync, the answer waits up to `RELAY_SYNC_WAIT` for every item and gives each its
execute answer (202's body for one still running); async, it is 202 at once.
"""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from relay.batches import BatchStore, Item, new_batch_id
from relay.errors import FieldError, InvalidRequest, RelayError, decode_body
from relay.gateway.answers import accepted_body, wait_result
from relay.gateway.http import json_response
from relay.gateway.state import Gateway, gateway_of
from relay.pipeline.ratelimit import Counted
from relay.pipeline.run import Admission
from relay.pipeline.validate import read_body
from relay.schemas import BatchAccepted, BatchLinks, BatchRequest, decode_response
from relay.webhooks import check_callback

_decode_batch = msgspec.json.Decoder(BatchRequest).decode


async def execute_batch(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    batch = decode_body(_decode_batch, body)
    if not 1 <= len(batch.items) <= gw.settings.max_batch:
        raise InvalidRequest.at("/items", f"a batch has 1 to {gw.settings.max_batch} items, "
                                f"not {len(batch.items)}")
    callback = await check_callback(batch.callback_url, batch.callback_events, "batch",
                                    allow_http=gw.settings.webhook_allow_http,
                                    allow_private=gw.settings.webhook_allow_private)
    if callback is not None:
        await gw.pipeline.webhooks.ensure_secret(principal)
    sync = "respond-async" not in request.headers.get("prefer", "")
    verdicts = await gw.pipeline.rate_limiter.hit_many(principal, len(batch.items))
    batch_id = new_batch_id()
    outcomes = await asyncio.gather(*(
        _admit(gw, principal, bytes(item), Counted(verdict, gw.metrics), sync, batch_id, index)
        for index, (item, verdict) in enumerate(zip(batch.items, verdicts, strict=True))))
    items = [Item(request_id=outcome.request_id) if isinstance(outcome, Admission)
             else Item(problem=msgspec.json.decode(outcome)) for outcome in outcomes]
    ended = {outcome.request_id: _ended_as(outcome.result) for outcome in outcomes
             if isinstance(outcome, Admission) and outcome.result is not None}
    await _store(gw).create(batch_id, principal, items, ended,
                            callback.url if callback else None,
                            callback.events if callback else None)
    if not sync:
        for outcome in outcomes:
            if isinstance(outcome, Admission) and outcome.completion is not None:
                gw.fan_in.release(outcome.request_id, outcome.completion)
        location = f"/batches/{batch_id}"
        return json_response(BatchAccepted(batch_id=batch_id, links=BatchLinks(self_=location)),
                             202, {"Location": location})
    answers = await asyncio.gather(*(_answer(gw, outcome) for outcome in outcomes))
    return json_response(b'{"batch_id":"' + batch_id.encode() + b'","results":['
                         + b",".join(answers) + b"]}")


async def get_batch(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(await _store(gw).view(principal, request.path_params["batch_id"]))


def _store(gw: Gateway) -> BatchStore:
    return BatchStore(gw.client, gw.keys, events_retention=gw.settings.events_retention)


async def _admit(gw: Gateway, principal: str, body: bytes, rate: Counted, sync: bool,
                 batch_id: str, index: int) -> Admission | bytes:
    """The item's admission, or its problem's JSON (with pointers into the batch's body)."""
    try:
        return await gw.pipeline.admit_body(principal, body, None, rate, sync=sync,
                                            batch_id=batch_id)
    except RelayError as error:
        if error.errors:
            error.errors = [FieldError(f"/items/{index}{field.pointer}", field.detail)
                            for field in error.errors]
        return msgspec.json.encode(error.problem(None))


async def _answer(gw: Gateway, outcome: Admission | bytes) -> bytes:
    """An item's place in the sync answer: its result (a replay's, or once it ended), 202's
    body while it runs, or its problem."""
    if not isinstance(outcome, Admission):
        return outcome
    if outcome.result is not None:
        return outcome.result
    if outcome.completion is None:
        return accepted_body(outcome.request_id)
    try:
        result = await wait_result(gw, outcome.request_id, outcome.completion)
    finally:
        gw.fan_in.release(outcome.request_id, outcome.completion)
    return result if result is not None else accepted_body(outcome.request_id)


def _ended_as(result: bytes) -> str:
    response = decode_response(result)
    if response.error is None:
        return "completed"
    return "cancelled" if response.error.code == "cancelled" else "failed"
