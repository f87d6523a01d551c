"""`/snapshots` and `POST /sessions/{id}/snapshots`: a session's committed state kept until
deleted, and branches restored from it (relay.snapshots). Another principal's snapshot, or
session, is 404 on every route."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from relay.errors import decode_body
from relay.gateway.http import json_response, list_limit, list_offset
from relay.gateway.state import gateway_of
from relay.pipeline.validate import read_body
from relay.schemas import (
    Branches,
    CreateSnapshot,
    RestoreSnapshot,
    SnapshotPage,
    decode_create_snapshot,
    decode_restore_snapshot,
    now_iso,
)


async def create_snapshot(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    label = (decode_body(decode_create_snapshot, body) if body.strip() else CreateSnapshot()).label
    session = await gw.sessions.owned(principal, request.path_params["session_id"])
    snapshot = await gw.snapshots.create(session, label, now_iso())
    return json_response(snapshot, 201, {"Location": f"/snapshots/{snapshot.snapshot_id}"})


async def list_snapshots(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    cursor = list_offset(request)
    limit = list_limit(request)
    items, next_cursor = await gw.snapshots.page(principal, cursor, limit)
    return json_response(SnapshotPage(
        items=items, next_cursor=None if next_cursor is None else str(next_cursor)))


async def get_snapshot(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(await gw.snapshots.owned(principal, request.path_params["snapshot_id"]))


async def delete_snapshot(request: Request) -> Response:
    """204, as deleting a module: the snapshot is gone (a session's DELETE answers 200 with the
    session because it only closes it). Its branches live on: they hold the state too."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    await gw.snapshots.delete(principal, request.path_params["snapshot_id"])
    return Response(status_code=204)


async def restore_snapshot(request: Request) -> Response:
    """Branches: new sessions from the snapshot's state. Authorized as creating a session is
    (`execute` on the module), since each is one."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    body = await read_body(request, gw.settings.max_request_bytes)
    restore = decode_body(decode_restore_snapshot, body) if body.strip() else RestoreSnapshot()
    snapshot = await gw.snapshots.owned(principal, request.path_params["snapshot_id"])
    gw.authorizer.require(principal, "execute", await gw.authorizer.module(snapshot.cid))
    session_ids = await gw.snapshots.restore(principal, snapshot, restore.branch_count,
                                             budget=restore.budget, created_at=now_iso())
    sessions = await gw.snapshots.sessions_of(session_ids)
    views = await asyncio.gather(*(gw.sessions.view(session) for session in sessions))
    return json_response(Branches(items=list(views)), 201)
