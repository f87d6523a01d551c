"""`/pipelines`: DAGs of executions (relay.pipelines; advanced by relay.scheduler).

`POST /pipelines` checks everything before anything runs: the body, the graph (duplicate ids,
references, cycles), each node as an execute request (its module, entrypoint, literal inputs
against the signature, policy), then `execute` on every node's module. A node whose module is
not stored is a 400 (pointer `/nodes/N/cid`), like every other node that is not a valid
execute request, so one answer lists every problem of the body. Another principal's pipeline
is 404 on every route.
"""

from __future__ import annotations

import asyncio
import hashlib

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from relay.errors import (
    Conflict,
    FieldError,
    IdempotencyKeyReuse,
    InvalidRequest,
    NotFound,
    decode_body,
)
from relay.gateway.http import json_response, list_limit, list_offset
from relay.gateway.state import Gateway, gateway_of
from relay.modules import StoredModule, memoizable, runs_as_command
from relay.pipeline import validate
from relay.pipelines import NodeSpec, check_graph, literal_of, pipeline_id_for, ref_of
from relay.policy import ModuleResource
from relay.schemas import (
    ExecuteRequest,
    Links,
    PipelineAccepted,
    PipelineNode,
    decode_create_pipeline,
    encode,
)
from relay.webhooks import check_callback

MAX_ERRORS = 100
"""Field errors listed in one answer, at most."""
STOP_WAIT_S = 5.0
"""How long DELETE waits for the pipeline's running nodes to end."""


async def create_pipeline(request: Request) -> Response:
    """authenticate (401) → the body (413, 400) → the graph and every node (400) → `execute`
    on every node's module (403) → stored, its first nodes queued: 202."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    raw = await validate.read_body(request, gw.settings.max_request_bytes)
    body = decode_body(decode_create_pipeline, raw)
    header_key = request.headers.get("idempotency-key")
    if header_key is not None and body.idempotency_key not in (None, header_key):
        raise InvalidRequest.at("/idempotency_key",
                                "the Idempotency-Key header and idempotency_key differ")
    if len(body.nodes) > gw.settings.max_pipeline_nodes:
        raise InvalidRequest.at("/nodes", f"{len(body.nodes)} nodes; a pipeline has at most "
                                f"{gw.settings.max_pipeline_nodes}")
    graph = check_graph(body.nodes)
    specs, resources = await _check_nodes(gw, principal, body.nodes)
    callback = await check_callback(body.callback_url, body.callback_events, "pipeline",
                                    allow_http=gw.settings.webhook_allow_http,
                                    allow_private=gw.settings.webhook_allow_private)
    for resource in resources:
        gw.authorizer.require(principal, "execute", resource)
    key = body.idempotency_key or header_key
    pipeline_id = pipeline_id_for(principal, key)
    fingerprint = hashlib.sha256(encode(msgspec.structs.replace(body, idempotency_key=None))
                                 ).hexdigest()
    if callback is not None:
        await gw.webhooks.ensure_secret(principal)
    created = await gw.pipelines.create(
        pipeline_id, principal, body.nodes, specs, graph, max_concurrency=body.max_concurrency,
        fail_fast=body.fail_fast, fingerprint=fingerprint, callback_url=body.callback_url,
        callback_events=body.callback_events)
    headers = {"Location": f"/pipelines/{pipeline_id}"}
    if not created.new:
        if created.fingerprint != fingerprint:
            raise IdempotencyKeyReuse("this idempotency key was used with a different pipeline")
        headers["Idempotent-Replayed"] = "true"
    else:
        await gw.scheduler.apply(pipeline_id, created.reply)
    links = Links(self_=f"/pipelines/{pipeline_id}",
                  events=f"/intent/execute-wasm/events?pipeline_id={pipeline_id}")
    return json_response(PipelineAccepted(pipeline_id=pipeline_id, links=links), 202, headers)


async def _check_nodes(gw: Gateway, principal: str, nodes: list[PipelineNode],
                       ) -> tuple[list[NodeSpec], list[ModuleResource]]:
    """Each node as an execute request; raises InvalidRequest listing the problems of every
    node (pointers under `/nodes/N`)."""
    caps = gw.policies.caps(principal)
    modules: dict[str, StoredModule | None] = {}
    resources: dict[tuple[str, str], ModuleResource] = {}
    specs: list[NodeSpec] = []
    errors: list[FieldError] = []
    for index, node in enumerate(nodes):
        at = f"/nodes/{index}"
        try:
            environment = await gw.environments.resolve(node.environment)
            cid, name = await gw.modules.resolve(node.cid)
            if cid not in modules:
                modules[cid] = await gw.modules.stored(cid)
            stored = modules[cid]
            if stored is None:
                raise InvalidRequest.at("/cid", f"no module {cid}")
            info = stored.info
            validate.check_environment(environment.run, info)
            validate.check_depth(node.inputs)
            entrypoint = validate.entrypoint_of(info, node.entrypoint)
            params = None
            if not runs_as_command(info, entrypoint):
                validate.check_results(info, entrypoint)
                params = next(e for e in info.exports if e.name == entrypoint).params
                _check_literals(node, params)
            policy = validate.effective_policy(ExecuteRequest(cid=cid, policy=node.policy),
                                               gw.settings, caps,
                                               environment.environment.policy)
            validate.check_priority(node.priority, caps)
        except (InvalidRequest, NotFound) as error:
            errors.extend(FieldError(at + e.pointer, e.detail) for e in error.errors or
                          [FieldError("", error.detail)])
            if len(errors) >= MAX_ERRORS:
                break
            continue
        label = name.name if name else ""
        resources.setdefault((cid, label), ModuleResource(cid, label, stored.owner))
        specs.append(NodeSpec(
            cid=cid, entrypoint=entrypoint, inputs=node.inputs, policy=policy, params=params,
            explicit=[f for f in ("max_gas", "max_time") if getattr(node.policy, f) is not None],
            memoize=node.memoize, memoizable=memoizable(info), environment=environment.run,
            priority=node.priority))
    if errors:
        raise InvalidRequest(errors[0].detail, errors=errors[:MAX_ERRORS])
    return specs, list(resources.values())


def _check_literals(node: PipelineNode, params: list[str]) -> None:
    """The input count, and each literal input against its parameter's type (references are
    checked once resolved, when the node is queued: `invalid_input`)."""
    if len(node.inputs) != len(params):
        raise InvalidRequest.at("/inputs", f"the export takes {len(params)} inputs "
                                f"({', '.join(params)}), got {len(node.inputs)}")
    errors = []
    for index, (kind, item) in enumerate(zip(params, node.inputs, strict=True)):
        if ref_of(item) is not None:
            continue
        problem = validate.input_problem(kind, literal_of(item)[1])
        if problem is not None:
            errors.append(FieldError(f"/inputs/{index}", problem))
    if errors:
        raise InvalidRequest(errors[0].detail, errors=errors)


async def get_pipeline(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    return json_response(await gw.pipelines.view(principal, request.path_params["pipeline_id"]))


async def list_pipelines(request: Request) -> Response:
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    limit = list_limit(request)
    cursor = list_offset(request)
    return json_response(await gw.pipelines.page(principal, cursor, limit))


async def cancel_pipeline(request: Request) -> Response:
    """Cancel it: pending and retrying nodes at once, queued and running ones where they are.
    200 with the pipeline once it has ended (within a few seconds), else 202 with it so far;
    409 when it had ended already."""
    gw = gateway_of(request)
    principal = await gw.authenticate(request)
    pipeline_id = request.path_params["pipeline_id"]
    outcome, reply = await gw.pipelines.stop(principal, pipeline_id)
    if outcome == "finished":
        view = await gw.pipelines.view(principal, pipeline_id)
        raise Conflict(f"the pipeline has already ended ({view.status})")
    await gw.scheduler.apply(pipeline_id, reply)
    deadline = asyncio.get_running_loop().time() + STOP_WAIT_S
    while True:
        view = await gw.pipelines.view(principal, pipeline_id)
        if view.status != "running" or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    return json_response(view, 200 if view.status != "running" else 202)
