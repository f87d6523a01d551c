"""`/executions/{request_id}`: an execution's state and output; cancel, pause, resume and step
it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from relay import cid
from relay.batches import BatchStore
from relay.blobs import BlobStore
from relay.errors import Conflict, NotFound, decode_body
from relay.gateway import listing
from relay.gateway.byteranges import not_modified, requested_range
from relay.gateway.http import json_response, list_limit
from relay.gateway.state import gateway_of
from relay.pipeline.validate import read_body
from relay.schemas import Action, ExecutionPage, OutputRef, decode_resume, decode_step, encode


async def list_executions(request: Request) -> Response:
    """The caller's executions, newest first; `?status=`, `?session_id=`, `?pipeline_id=` and
    `?batch_id=` narrow them (relay.gateway.listing)."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    wanted = listing.filters_of(request.query_params)
    limit, cursor = list_limit(request), listing.cursor_of(request.query_params.get("cursor"))
    batch_id = request.query_params.get("batch_id")
    only = (None if batch_id is None else await BatchStore(
        gw.client, gw.keys, events_retention=gw.settings.events_retention,
    ).request_ids(principal, batch_id))
    items, next_cursor = await listing.page(gw.client, gw.keys, gw.controller, principal,
                                            wanted, limit, cursor, only)
    return json_response(ExecutionPage(items=items, next_cursor=next_cursor))


async def get_execution(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(await gw.controller.state(principal, request.path_params["request_id"]))


async def get_output(request: Request) -> Response:
    """The output of a completed execution: its blob (`output_ref`) streamed as stored, or its
    inline output as JSON; `ETag` is the CID of the bytes, one byte range may be asked for.
    404 for an execution that is unknown, another principal's, or ended without an output
    (failed, cancelled); 409 for one not finished yet (its output may still come)."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    request_id = request.path_params["request_id"]
    state = await gw.controller.state(principal, request_id)
    if state.status in ("failed", "cancelled"):
        raise NotFound(f"execution {request_id} has no output: it {state.status}")
    if state.status != "completed":
        raise Conflict(f"execution {request_id} is {state.status}: its output comes once it "
                       f"has completed")
    if isinstance(state.output_ref, OutputRef):
        ref = state.output_ref
        blobs = BlobStore(gw.client, gw.keys)
        if await blobs.size(ref.cid) is None:
            raise NotFound(f"the output of execution {request_id} has expired")
        return _representation(request, ref.size, ref.cid, ref.content_type,
                               lambda start, end: blobs.read(ref.cid, start, end))
    body = encode(state.output)
    return _representation(request, len(body), cid.compute(body), "application/json",
                           lambda start, end: _once(body[start:end]))


def _representation(request: Request, size: int, content_cid: str, content_type: str,
                    read: Callable[[int, int], AsyncIterator[bytes]]) -> Response:
    """`read`'s bytes, whole or the range asked for, streamed (one chunk held at a time)."""
    etag = f'"{content_cid}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    if not_modified(request.headers, etag):
        return Response(status_code=304, headers=headers)
    part = requested_range(request.headers, size, etag)
    start, end = part or (0, size)
    headers["Content-Length"] = str(end - start)
    if part is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":  # the headers only: nothing read
        return Response(status_code=206 if part else 200, headers=headers,
                        media_type=content_type)
    return StreamingResponse(read(start, end), 206 if part else 200, headers,
                             media_type=content_type)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def cancel_execution(request: Request) -> Response:
    return await _control(request, "cancel")


async def pause_execution(request: Request) -> Response:
    return await _control(request, "pause")


async def resume_execution(request: Request) -> Response:
    return await _control(request, "resume")


async def step_execution(request: Request) -> Response:
    """200 with the state once the step has stopped (paused again, or finished), 202 with the
    state so far if it has not within RELAY_SYNC_WAIT."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    gas = decode_body(decode_step, body).gas if body.strip() else None
    stopped, state = await gw.controller.step(principal, request.path_params["request_id"], gas,
                                              gw.settings.sync_wait_ms / 1000)
    return json_response(state, 200 if stopped else 202)


async def _control(request: Request, action: Action) -> Response:
    """200 with the state once the executor confirmed, 202 with the state so far if it has not
    within a few seconds."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    additional_gas = 0
    if action == "resume":
        body = await read_body(request, gw.settings.max_request_bytes)
        if body.strip():
            additional_gas = decode_body(decode_resume, body).additional_gas
    confirmed, state = await gw.controller.act(principal, request.path_params["request_id"],
                                               action, additional_gas)
    return json_response(state, 200 if confirmed else 202)
