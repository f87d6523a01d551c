"""The OpenAPI 3.1 document of the HTTP API, generated rather than written.

Schemas come from the msgspec wire types (`relay.schemas`, `relay.errors`); error statuses, slugs
and headers from the `RelayError` classes; the rest from `OPERATIONS`, one entry per route of
`relay.gateway.app.ROUTES` (tests/relay/gateway/test_openapi.py fails when the two differ, so
the document never describes a route that does not exist, nor misses one that does).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from relay import schemas, webhooks
from relay.cid import NAME_PATTERN
from relay.errors import (
    BudgetExhausted,
    Conflict,
    Forbidden,
    IdempotencyKeyReuse,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RangeNotSatisfiable,
    RateLimited,
    RelayError,
    SessionClosed,
    SessionExhausted,
    TooManyPaused,
    TooManyStreams,
    Unauthenticated,
    Unavailable,
)
from relay.modules import MAX_PAGE_SIZE

JSON = "application/json"
PROBLEM = "application/problem+json"
WASM = "application/wasm"
OCTETS = "application/octet-stream"
METRICS = "text/plain; version=0.0.4"
EVENT_STREAM = "text/event-stream"
# One message of the stream (tools validate a text/event-stream per message, as OpenAPI 3.2's
# itemSchema says): `data` is the JSON of an Event, or of EventsLost.
SSE_MESSAGE: dict[str, Any] = {"type": "object", "properties": {
    "id": {"type": "string"}, "data": {"type": "string", "contentMediaType": JSON},
    "retry": {"type": "integer"}, "event": {"type": "string"}}}
REF = "#/components/schemas/{name}"


# Types the document names besides the bodies in OPERATIONS: the problem every error carries,
# and the bus events (for internal consumers).
DOCUMENTED: tuple[Any, ...] = (schemas.Problem, schemas.Event, schemas.EventsLost,
                                schemas.PipelineProgress, schemas.PipelineComplete)
NAMED = {schemas.Event: "Event"}


# --- The table ---


@dataclass(frozen=True)
class Reply:
    """A documented success response. `body` is a msgspec type, a JSON Schema, or None."""

    status: int
    description: str
    body: Any = None
    media_type: str = JSON
    headers: tuple[str, ...] = ()
    other_bodies: tuple[tuple[str, Any], ...] = ()
    """(media type, body) pairs the response may come as instead."""
    example: Any = None
    """An example of `body` (in `media_type`); the tests validate it against its schema."""


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    replies: tuple[Reply, ...]
    errors: tuple[type[RelayError], ...] = ()
    """Besides Unauthenticated, which every operation with `auth` gets."""
    body: tuple[tuple[str, Any], ...] = ()
    """(media type, msgspec type or JSON Schema) pairs of the request body."""
    body_required: bool = True
    body_examples: tuple[tuple[str, Any], ...] = ()
    """(media type, example) pairs of the request body; the tests validate them too."""
    parameters: tuple[str, ...] = ()
    """Keys of query and header PARAMETERS; path parameters come from `path`."""
    auth: bool = True
    url_token: bool = False
    """Also accepts `?access_token=` (event streams, for browsers' EventSource)."""
    rate_limited: bool = False


STORE = (Unavailable,)  # every route that reads or writes Redis
# Headers the refusals carry (their constructors set them, so they are listed here).
ERROR_HEADERS: dict[type[RelayError], tuple[str, ...]] = {
    Unauthenticated: ("WWW-Authenticate",), RateLimited: ("Retry-After",),
    BudgetExhausted: ("Retry-After",), RangeNotSatisfiable: ("Content-Range",),
    Unavailable: ("Retry-After",)}
REPLAYED = "Idempotent-Replayed"
ANY_JSON: dict[str, Any] = {"type": "object"}
ANY_VALUE: dict[str, Any] = {}
"""Any JSON value (an execution's inline output)."""


# --- Examples: what a session with `relay dev`'s calculator (glyph://calculator) and counter
# (glyph://counter) was answered, trimmed; tests/relay/gateway/test_openapi.py validates each
# against its schema ---


CALCULATOR = "bafkreigkhxyqgg4vjtzlezsppcwoa6rjbo6vdjdahd6ed5l7tz24ugybqu"
COUNTER = "bafkreicdf5lakzuborppjyrlxwho2sw5dwtolju4gk5t7bf6eejpyrgtbu"
STATE = "bafkreia2h5u6wasqc5ejlkvpzy2ne3scikk37vh4a3okfsbwf6wvayzcxa"
"""The counter's state after `add(5)`."""
REQUEST_ID = "2570f48f3811c4a1d8a87ddb86265d0735bd2280587fd3f5ce1e06b790f9f936"
CALL_ID = "1762367251244614686c1b15f0ef7433790b89364958708520616337c127e5a1"
SESSION_ID = "ses_ddac699217965d1bd7ee8499"
BATCH_ID = "bat_5e61fb8684380bf82517e818"
BATCH_ITEMS = ("82bc2825b1152886274292cbfedc9a6ca313294ddeb067ebe2b8a7b4beb98925",
               "29611068140f18c4a571e658e2853fc2635c5845cc32b5019eb4855f59299586")
BUDGET_ID = "bud_661f405a60b29e94eb82894b"
PIPELINE_ID = "d1cdc0f2dac5c5a2961a45d18445aa44"
AT = "2026-12-06T09:49:13.905Z"
IN_WASI = {"environment": {"name": "wasi", "version": 1}, "priority": "normal"}
ADD_FIVE_AND_THREE = {"cid": "glyph://calculator", "entrypoint": "add", "inputs": [5, 3]}
EXECUTED = {"success": True, "request_id": REQUEST_ID, "cid": CALCULATOR, "output": 8,
            "gas_used": 4, "duration": 0.428, "executed_at": AT, "error": None}
ACCEPTED = {"request_id": REQUEST_ID, "status": "queued", "links": {
    "self": f"/executions/{REQUEST_ID}",
    "events": f"/intent/execute-wasm/events?request_id={REQUEST_ID}"}}
EXECUTION = {**EXECUTED, "status": "completed", **IN_WASI}
PAUSED = {"request_id": REQUEST_ID, "status": "paused", "cid": CALCULATOR, "gas_used": 2,
          **IN_WASI}
CANCELLED = {**EXECUTION, "status": "cancelled", "success": False, "output": None,
             "gas_used": 2, "error": {"code": "cancelled",
                                      "message": "the execution was cancelled"}}
CALL_PAUSED = {**PAUSED, "request_id": CALL_ID, "cid": COUNTER, "session_id": SESSION_ID,
               "gas_used": 6}
CALLED = {"success": True, "request_id": CALL_ID, "cid": COUNTER, "output": 5, "gas_used": 9,
          "duration": 0.98, "executed_at": AT, "error": None, "session_id": SESSION_ID,
          "state_cid": STATE}
SESSION = {"session_id": SESSION_ID, "cid": COUNTER, "environment": "wasi", "status": "idle",
           "calls": 1, "gas_used": 9, "time_used": 0.98,
           "budget": {"max_gas": None, "max_time": None, "max_calls": 100},
           "state_cid": STATE, "state_size": 65536, "current": None, "last_result": CALLED,
           "created_at": "2026-12-06T09:49:14.959Z", "expires_at": "2026-12-07T09:49:14.973Z",
           "links": {"self": f"/sessions/{SESSION_ID}", "calls": f"/sessions/{SESSION_ID}/calls",
                     "events": f"/intent/execute-wasm/events?session_id={SESSION_ID}"}}
NEW_SESSION = {**SESSION, "calls": 0, "gas_used": 0, "time_used": 0.0, "state_cid": None,
               "state_size": 0, "last_result": None, "expires_at": "2026-12-07T09:49:14.960Z"}
SNAPSHOT = {"snapshot_id": "snp_c30df29fd2275dd976a758ba", "session_id": SESSION_ID,
            "cid": COUNTER, "state_cid": STATE, "size": 65536, "label": "after 5",
            "created_at": "2026-12-06T09:49:14.978Z"}
BRANCH = {**SESSION, "session_id": "ses_3476e19cc12e615af55c251a", "calls": 0, "gas_used": 0,
          "time_used": 0.0, "budget": {"max_gas": None, "max_time": None, "max_calls": None},
          "last_result": None, "links": {
              "self": "/sessions/ses_3476e19cc12e615af55c251a",
              "calls": "/sessions/ses_3476e19cc12e615af55c251a/calls",
              "events": "/intent/execute-wasm/events?session_id=ses_3476e19cc12e615af55c251a"}}
MODULE = {"cid": CALCULATOR, "size": 118, "exports": [
    {"name": name, "params": ["i32", "i32"], "results": ["i32"]}
    for name in ("add", "main", "sub", "mul", "div")], "imports": [], "wasi": False}
CALCULATOR_WAT = """(module
  (func $add (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1)))
  (func (export "main") (param i32 i32) (result i32)
    (call $add (local.get 0) (local.get 1)))
  (func (export "sub") (param i32 i32) (result i32)
    (i32.sub (local.get 0) (local.get 1)))
  (func (export "mul") (param i32 i32) (result i32)
    (i32.mul (local.get 0) (local.get 1)))
  (func (export "div") (param i32 i32) (result i32)
    (i32.div_s (local.get 0) (local.get 1))))
"""
BUDGET_LIMITS = {"window": 3_600_000, "max_gas": 1_000_000_000, "max_executions": 1000}
BUDGET = {"budget_id": BUDGET_ID, "principal": "alice", **BUDGET_LIMITS, "max_time": None,
          "created_by": "alice", "created_at": "2026-12-06T09:49:14.946Z"}
ENVIRONMENT: dict[str, Any] = {
    "name": "wasi", "version": 1,
    "description": "WASI with stdio, clocks and randomness, no env or args",
    "policy": {"max_gas": 1_000_000_000_000, "max_memory": 1_073_741_824, "max_time": 300_000,
               "max_stack": 1_048_576},
    "wasi": {"enabled": True, "env": {}, "args": [], "clock": True, "random": True},
    "max_output_bytes": 67_108_864}
NO_CLOCK = {"description": "Runs without a clock, 10 s at most", "policy": {"max_time": 10_000},
            "wasi": {"clock": False}}
PIPELINE = {"nodes": [{"id": "sum", "cid": "glyph://calculator", "entrypoint": "add",
                       "inputs": [2, 3]},
                      {"id": "double", "cid": "glyph://calculator", "entrypoint": "mul",
                       "inputs": [{"$ref": "sum"}, 2]}]}
PIPELINE_LINKS = {"self": f"/pipelines/{PIPELINE_ID}",
                  "events": f"/intent/execute-wasm/events?pipeline_id={PIPELINE_ID}"}
PROGRESS = {"total": 2, "pending": 0, "queued": 0, "running": 0, "retrying": 0, "completed": 2,
            "failed": 0, "skipped": 0, "cancelled": 0, "percent": 100.0}
PIPELINE_SUMMARY = {"pipeline_id": PIPELINE_ID, "status": "completed", "progress": PROGRESS,
                    "created_at": "2026-12-06T09:49:14.987Z",
                    "finished_at": "2026-12-06T09:49:14.997Z"}
PIPELINE_VIEW: dict[str, Any] = {**PIPELINE_SUMMARY, "nodes": {
    "sum": {"status": "completed", "attempts": 1, "needs": [], "output": 5, "cached": False,
            "request_id": "8797a284a9171611f714dc72eb3f824926632058d28613ffd9240679336cdd1a"},
    "double": {"status": "completed", "attempts": 1, "needs": ["sum"], "output": 10,
               "cached": False,
               "request_id": "ac7e872e7a70ca6f1c65a0bae027c5466a4df676f4ab86fd18894377b84700a2"}},
    "max_concurrency": 8, "fail_fast": False}
CANCELLED_PIPELINE = {**PIPELINE_VIEW, "status": "cancelled", "progress": {
    **PROGRESS, "completed": 1, "cancelled": 1, "percent": 50.0}, "nodes": {
    **PIPELINE_VIEW["nodes"], "double": {"status": "cancelled", "request_id": None,
                                         "attempts": 0, "needs": ["sum"]}}}
COMPLETE_EVENT = {"type": "execution_complete", "request_id": REQUEST_ID,
                  "timestamp": AT, "success": True, "duration": 0.428, "gas_used": 4,
                  "output": 8}
TOKEN = {"access_token": "rt1.eyJzdWIiOiJhbGljZSIsImV4cCI6MTc5NjU1MDg1NCwic2NvcGUiOiJzdW"
                         "JzY3JpYmUifQ.AMP7rxaJmQaW99IsSzL-B2zO3IjWC-rLcrAde3cVaZM",
         "expires_at": "2026-12-06T09:54:14Z"}
SECRET = {"secret": "whsec_6qVQ4Asu+sH6jJ04XzcZOwEXmR2IFBlrBArcuSyFfNU="}
DELIVERIES = {"items": [
    {"webhook_id": "1796550553905-0", "url": "https://hooks.example.com/relay", "attempt": 1,
     "status_code": 503, "error": None, "at": "2026-12-06T09:49:14.102Z",
     "next_attempt_at": "2026-12-06T09:49:19.102Z"},
    {"webhook_id": "1796550553905-0", "url": "https://hooks.example.com/relay", "attempt": 2,
     "status_code": 200, "error": None, "at": "2026-12-06T09:49:19.131Z",
     "next_attempt_at": None}], "next_cursor": None}
INDEX = {"service": "relay", "version": "0.1.0", "links": {
    "docs": "/docs", "console": "/console", "openapi": "/openapi.json",
    "health": "/intent/execute-wasm/health",
    "execute": "/intent/execute-wasm", "events": "/intent/execute-wasm/events"}}
METRICS_EXAMPLE = """# HELP relay_execute_wasm_success_total Executions that ran to the end.
# TYPE relay_execute_wasm_success_total counter
relay_execute_wasm_success_total 8
"""
CONSOLE_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Relay console</title>
<script type="module" src="console/console.js"></script></head>
<body><form id="sign-in"><label for="api-key">API key</label><input id="api-key"></form></body>
</html>
"""
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Relay API reference</title></head>
<body><div id="swagger-ui"></div><script src="docs/swagger-ui-bundle.js"></script></body>
</html>
"""


def _control_replies(done: str, example: dict[str, Any]) -> tuple[Reply, ...]:
    """Pause, resume and cancel answer alike: 200 once confirmed, 202 if not yet."""
    return (Reply(200, done, schemas.ExecutionState, example=example),
            Reply(202, "Asked of its executor, not yet confirmed: the state so far.",
                  schemas.ExecutionState))


OPERATIONS = (
    Operation(
        "POST", "/intent/execute-wasm", "executeWasm", "Run a function of a stored module",
        (Reply(200, "The result; a trap or broken limit is `success: false`.",
               schemas.ExecuteResponse, headers=(REPLAYED,), example=EXECUTED),
         Reply(202, "Accepted (`Prefer: respond-async`, or not finished within the sync wait).",
               schemas.Accepted, headers=("Location", REPLAYED), example=ACCEPTED)),
        (*STORE, InvalidRequest, Forbidden, NotFound, Conflict, PayloadTooLarge,
         IdempotencyKeyReuse, RateLimited, BudgetExhausted),
        body=((JSON, schemas.ExecuteRequest),), body_examples=((JSON, ADD_FIVE_AND_THREE),),
        parameters=("Idempotency-Key", "Prefer"),
        rate_limited=True,
    ),
    Operation(
        "POST", "/intent/execute-wasm/batch", "executeBatch",
        "Run many execute requests at once, each through the whole pipeline on its own",
        (Reply(200, "Every item's answer, in order: its execute answer, 202's body for one "
               "still running after the sync wait, or its problem (pointers into this body).",
               schemas.BatchResults, example={"batch_id": BATCH_ID, "results": [
                   {**EXECUTED, "request_id": BATCH_ITEMS[0]},
                   {**EXECUTED, "request_id": BATCH_ITEMS[1], "output": 15}]}),
         Reply(202, "Accepted (`Prefer: respond-async`): follow it at GET /batches/{batch_id}.",
               schemas.BatchAccepted, headers=("Location",),
               example={"batch_id": BATCH_ID, "links": {"self": f"/batches/{BATCH_ID}"}})),
        (*STORE, InvalidRequest, PayloadTooLarge),
        body=((JSON, schemas.BatchRequest),), body_examples=((JSON, {"items": [
            ADD_FIVE_AND_THREE, {**ADD_FIVE_AND_THREE, "entrypoint": "mul"}]}),),
        parameters=("Prefer",),
    ),
    Operation(
        "GET", "/batches/{batch_id}", "getBatch", "A batch: every item's status",
        (Reply(200, "The batch.", schemas.BatchView, example={
            "batch_id": BATCH_ID, "status": "completed", "total": 2, "completed": 2,
            "items": [{"request_id": item, "status": "completed"} for item in BATCH_ITEMS],
            "created_at": AT, "finished_at": "2026-12-06T09:49:13.927Z"}),),
        (*STORE, NotFound),
    ),
    Operation(
        "GET", "/executions", "listExecutions",
        "The caller's executions, newest first, optionally filtered",
        (Reply(200, "A page of executions, each as GET /executions/{request_id} shows it. A "
               "page looks at 5000 executions at most: with a rare filter it may hold fewer "
               "than `limit` and still have a `next_cursor`.", schemas.ExecutionPage,
               example={"items": [EXECUTION], "next_cursor": f"1796550553905:{REQUEST_ID}"}),),
        (*STORE, InvalidRequest),
        parameters=("status_filter", "session_filter", "pipeline_filter", "batch_filter",
                    "page_limit", "cursor"),
    ),
    Operation(
        "GET", "/executions/{request_id}", "getExecution", "An execution's state and result",
        (Reply(200, "Its state; once finished, the execute response's fields too.",
               schemas.ExecutionState, example=EXECUTION),),
        (*STORE, NotFound),
    ),
    Operation(
        "GET", "/executions/{request_id}/output", "getExecutionOutput",
        "A completed execution's output, streamed",
        (Reply(200, "All of it: the blob of its `output_ref` as stored (its `content_type`), "
               "or its inline output as JSON. `ETag` is the CID of these bytes.",
               {"type": "string", "format": "binary"}, OCTETS,
               headers=("ETag", "Accept-Ranges", "Content-Length"),
               other_bodies=((JSON, ANY_VALUE),), example="hello, world\n"),
         Reply(206, "The one byte range asked for (several ranges, or a stale `If-Range`: "
               "all of it, 200).", {"type": "string", "format": "binary"}, OCTETS,
               headers=("ETag", "Accept-Ranges", "Content-Length", "Content-Range"),
               other_bodies=((JSON, ANY_VALUE),)),
         Reply(304, "`If-None-Match` names its ETag: not sent again.", headers=("ETag",))),
        (*STORE, NotFound, Conflict, RangeNotSatisfiable),
        parameters=("Range", "If-Range", "If-None-Match"),
    ),
    Operation(
        "DELETE", "/executions/{request_id}", "cancelExecution",
        "Cancel a queued or running execution",
        _control_replies("Cancelled: its final state.", CANCELLED),
        (*STORE, NotFound, Conflict),
    ),
    Operation(
        "POST", "/executions/{request_id}/pause", "pauseExecution",
        "Suspend a running execution in place",
        _control_replies("Paused: its state.", PAUSED),
        (*STORE, NotFound, Conflict, TooManyPaused),
    ),
    Operation(
        "POST", "/executions/{request_id}/resume", "resumeExecution",
        "Continue a paused execution, optionally with more gas",
        _control_replies("Resumed: its state.", {**PAUSED, "status": "running"}),
        (*STORE, InvalidRequest, NotFound, Conflict, SessionExhausted, PayloadTooLarge,
         BudgetExhausted),
        body=((JSON, schemas.ResumeRequest),), body_required=False,
        body_examples=((JSON, {"additional_gas": 1_000_000}),),
    ),
    Operation(
        "POST", "/executions/{request_id}/step", "stepExecution",
        "Let a paused execution run until it has used `gas` more (default: its `step_gas`)",
        (Reply(200, "Stopped again: paused (`gas_used` where it stopped) or finished (the "
               "result).", schemas.ExecutionState, example={**PAUSED, "gas_used": 3}),
         Reply(202, "Not stopped within the sync wait: the state so far.",
               schemas.ExecutionState)),
        (*STORE, InvalidRequest, NotFound, Conflict, PayloadTooLarge),
        body=((JSON, schemas.StepRequest),), body_required=False,
        body_examples=((JSON, {"gas": 1}),),
    ),
    Operation(
        "GET", "/intent/execute-wasm/events", "events",
        "Server-Sent Events of the caller's executions",
        (Reply(200, "`text/event-stream`: each message has `id:` (the stream entry id) and one "
               "`data:` line, an Event (or EventsLost first, when history was trimmed), or "
               "a PipelineProgress or PipelineComplete.",
               SSE_MESSAGE, EVENT_STREAM, example={
                   "id": "1796550553905-0",
                   "data": msgspec.json.encode(COMPLETE_EVENT).decode()}),),
        (*STORE, InvalidRequest, Forbidden, NotFound, TooManyStreams),
        parameters=("request_id_query", "session_id_query", "pipeline_id_query", "last_event_id",
                    "Last-Event-ID"),
        url_token=True,
    ),
    Operation(
        "POST", "/auth/tokens", "mintAccessToken",
        "A short-lived subscribe-only token for event stream URLs",
        (Reply(200, "The token and when it expires (at most 5 minutes).",
               schemas.AccessToken, example=TOKEN),),
        (*STORE, Forbidden),
    ),
    Operation(
        "POST", "/modules", "uploadModule", "Validate and store a module, optionally naming it",
        (Reply(201, "Stored.", schemas.ModuleInfo, headers=("Location",), example=MODULE),
         Reply(200, "Already stored.", schemas.ModuleInfo, headers=("Location",),
               example=MODULE)),
        (*STORE, InvalidRequest, Forbidden, QuotaExceeded, PayloadTooLarge, RateLimited),
        body=((WASM, {"type": "string", "format": "binary", "contentMediaType": WASM}),
              ("text/plain", {"type": "string", "description": "WebAssembly text (WAT)"})),
        body_examples=(("text/plain", CALCULATOR_WAT),),
        parameters=("name_query", "tag_query"),
        rate_limited=True,
    ),
    Operation(
        "GET", "/modules", "listModules", "Stored modules, newest first",
        (Reply(200, "A page of modules.", schemas.ModulePage,
               example={"modules": [MODULE], "next_cursor": "1"}),),
        (*STORE, InvalidRequest),
        parameters=("limit", "cursor"),
    ),
    Operation(
        "GET", "/modules/{cid}", "getModule", "A module's metadata",
        (Reply(200, "The module.", schemas.ModuleInfo, example=MODULE),),
        (*STORE, InvalidRequest, Forbidden, NotFound),
    ),
    Operation(
        "DELETE", "/modules/{cid}", "deleteModule",
        "Delete a module (its uploader only; not while glyph names point at it, nor while a "
        "live session or snapshot uses it)",
        (Reply(204, "Deleted."),),
        (*STORE, InvalidRequest, Forbidden, NotFound, Conflict),
    ),
    Operation(
        "GET", "/modules/{cid}/wasm", "getModuleWasm", "A module's binary",
        # The magic number and version every module starts with (alone: the empty module).
        (Reply(200, "The binary module.", {"type": "string", "format": "binary"}, WASM,
               example="\u0000asm\u0001\u0000\u0000\u0000"),),
        (*STORE, InvalidRequest, Forbidden, NotFound),
    ),
    Operation(
        "PUT", "/names/{name}/{tag}", "bindName", "Bind (or move) a glyph name to a module",
        (Reply(200, "Bound.", schemas.NameBound,
               example={"name": "calculator", "tag": "v1", "cid": CALCULATOR}),),
        (*STORE, InvalidRequest, Forbidden, NotFound, PayloadTooLarge),
        body=((JSON, schemas.NameBinding),), body_examples=((JSON, {"cid": CALCULATOR}),),
    ),
    Operation(
        "GET", "/names/{name}", "getName", "A glyph name's tags",
        (Reply(200, "Each tag and the CID it names.", schemas.NameTags, example={
            "name": "calculator", "tags": {"latest": CALCULATOR, "v1": CALCULATOR}}),),
        (*STORE, InvalidRequest, Forbidden, NotFound),
    ),
    Operation(
        "POST", "/budgets", "createBudget",
        "Limit a principal's gas, time and executions per window (another's: admin only)",
        (Reply(201, "Created; its first window starts now.", schemas.Budget,
               headers=("Location",), example=BUDGET),),
        (*STORE, InvalidRequest, Forbidden, QuotaExceeded, PayloadTooLarge),
        body=((JSON, schemas.BudgetRequest),), body_examples=((JSON, BUDGET_LIMITS),),
    ),
    Operation(
        "GET", "/budgets", "listBudgets",
        "The caller's budgets and those it set for others, newest first",
        (Reply(200, "A page of budgets.", schemas.BudgetPage,
               example={"items": [BUDGET], "next_cursor": None}),),
        (*STORE, InvalidRequest),
        parameters=("page_limit", "cursor"),
    ),
    Operation(
        "GET", "/budgets/{budget_id}", "getBudget", "A budget",
        (Reply(200, "The budget.", schemas.Budget, example=BUDGET),),
        (*STORE, NotFound),
    ),
    Operation(
        "PUT", "/budgets/{budget_id}", "replaceBudget",
        "Replace a budget's window and limits (its creator only)",
        (Reply(200, "The budget; what its window used so far still counts.", schemas.Budget,
               example={**BUDGET, "max_gas": 2_000_000_000}),),
        (*STORE, InvalidRequest, Forbidden, NotFound, PayloadTooLarge),
        body=((JSON, schemas.BudgetRequest),),
        body_examples=((JSON, {**BUDGET_LIMITS, "max_gas": 2_000_000_000}),),
    ),
    Operation(
        "DELETE", "/budgets/{budget_id}", "deleteBudget", "Delete a budget (its creator only)",
        (Reply(204, "Deleted."),),
        (*STORE, Forbidden, NotFound),
    ),
    Operation(
        "GET", "/budgets/{budget_id}/usage", "getBudgetUsage",
        "What the budget's current window has used, reserved and left",
        (Reply(200, "The current window's use.", schemas.BudgetUsage, example={
            "window_start": "2026-12-06T09:49:14.946Z", "window_end": "2026-12-06T10:49:14.946Z",
            "gas_used": 12, "time_used": 1, "executions": 3, "reserved": {"gas": 0, "time": 0},
            "remaining": {"gas": 999_999_988, "time": None, "executions": 997}}),),
        (*STORE, NotFound),
    ),
    Operation(
        "GET", "/environments", "listEnvironments",
        "Every environment executions may name, shipped ones included, by name",
        (Reply(200, "A page of environments.", schemas.EnvironmentPage,
               example={"items": [ENVIRONMENT], "next_cursor": "1"}),),
        (*STORE, InvalidRequest),
        parameters=("page_limit", "cursor"),
    ),
    Operation(
        "GET", "/environments/{environment}", "getEnvironment",
        "An environment: its caps, WASI capabilities and version",
        (Reply(200, "The environment (omitted caps shown as the ceilings).",
               schemas.Environment, example=ENVIRONMENT),),
        (*STORE, NotFound),
    ),
    Operation(
        "PUT", "/environments/{environment}", "putEnvironment",
        "Create or replace an environment, raising its version (admin only)",
        (Reply(200, "The environment at its new version.", schemas.Environment, example={
            **ENVIRONMENT, **NO_CLOCK, "name": "no-clock", "version": 2,
            "policy": {**ENVIRONMENT["policy"], "max_time": 10_000},
            "wasi": {**ENVIRONMENT["wasi"], "clock": False}}),),
        (*STORE, InvalidRequest, Forbidden, Conflict, PayloadTooLarge),
        body=((JSON, schemas.EnvironmentRequest),), body_examples=((JSON, NO_CLOCK),),
    ),
    Operation(
        "DELETE", "/environments/{environment}", "deleteEnvironment",
        "Delete an environment (admin only; the shipped ones cannot be)",
        (Reply(204, "Deleted; executions already accepted in it still run in it."),),
        (*STORE, Forbidden, Conflict, NotFound),
    ),
    Operation(
        "GET", "/intent/execute-wasm/health", "health", "Health, features, limits, executors",
        (Reply(200, "Healthy or degraded.", schemas.Health, example={
            "status": "healthy", "executors": 1,
            "features": {"idempotency": True, "rate_limiting": True, "authorization": True,
                         "sse_events": True, "bus_events": True},
            "limits": {"rate_limit": 10, "rate_window": 60000, "idempotency_ttl": 300000}}),
         Reply(503, "Unhealthy.", schemas.Health)),
        auth=False,
    ),
    Operation(
        "POST", "/sessions", "createSession",
        "Start a session: an instance of a module whose state lives on between calls",
        (Reply(201, "Created, idle, with the module's fresh state.", schemas.SessionView,
               headers=("Location",), example=NEW_SESSION),),
        (*STORE, InvalidRequest, Forbidden, QuotaExceeded, NotFound, PayloadTooLarge),
        body=((JSON, schemas.CreateSession),),
        body_examples=((JSON, {"cid": "glyph://counter", "budget": {"max_calls": 100}}),),
    ),
    Operation(
        "GET", "/sessions", "listSessions", "The caller's sessions, newest first",
        (Reply(200, "A page of sessions.", schemas.SessionPage,
               example={"items": [SESSION], "next_cursor": None}),),
        (*STORE, InvalidRequest),
        parameters=("page_limit", "cursor"),
    ),
    Operation(
        "GET", "/sessions/{session_id}", "getSession",
        "A session: status, use, budget, committed state",
        (Reply(200, "The session.", schemas.SessionView, example=SESSION),),
        (*STORE, NotFound),
    ),
    Operation(
        "GET", "/sessions/{session_id}/state", "getSessionState",
        "The same as GET /sessions/{session_id}",
        (Reply(200, "The session.", schemas.SessionView, example=SESSION),),
        (*STORE, NotFound),
    ),
    Operation(
        "PATCH", "/sessions/{session_id}", "setSessionBudget",
        "Set a session's budget totals (below what is used, it stays exhausted)",
        (Reply(200, "The session.", schemas.SessionView, example={
            **SESSION, "budget": {"max_gas": None, "max_time": None, "max_calls": 200}}),),
        (*STORE, InvalidRequest, NotFound, Conflict, PayloadTooLarge),
        body=((JSON, schemas.PatchSession),),
        body_examples=((JSON, {"budget": {"max_calls": 200}}),),
    ),
    Operation(
        "DELETE", "/sessions/{session_id}", "closeSession",
        "Close a session: its calls are cancelled, further calls refused",
        (Reply(200, "Closed: the session.", schemas.SessionView,
               example={**SESSION, "status": "closed"}),),
        (*STORE, NotFound),
    ),
    Operation(
        "POST", "/sessions/{session_id}/calls", "callSession",
        "Call a function of the session's instance, from its last committed state",
        (Reply(200, "The result, with the state it left (`state_cid`); a failed call commits "
               "nothing.", schemas.ExecuteResponse, headers=(REPLAYED,), example=CALLED),
         Reply(202, "Accepted (`Prefer: respond-async`, or not finished within the sync wait).",
               schemas.Accepted, headers=("Location", REPLAYED))),
        (*STORE, InvalidRequest, Forbidden, NotFound, SessionClosed, SessionExhausted,
         PayloadTooLarge, IdempotencyKeyReuse, RateLimited, BudgetExhausted),
        body=((JSON, schemas.SessionCall),),
        body_examples=((JSON, {"entrypoint": "add", "inputs": [5]}),),
        parameters=("Idempotency-Key", "Prefer"),
        rate_limited=True,
    ),
    Operation(
        "POST", "/sessions/{session_id}/pause", "pauseSession",
        "Pause the session's current call in place",
        _control_replies("Paused: the call's state.", CALL_PAUSED),
        (*STORE, NotFound, Conflict, TooManyPaused),
    ),
    Operation(
        "POST", "/sessions/{session_id}/resume", "resumeSession",
        "Resume the session's current call, optionally with more gas",
        _control_replies("Resumed: the call's state.", {**CALL_PAUSED, "status": "running"}),
        (*STORE, InvalidRequest, NotFound, Conflict, SessionExhausted, PayloadTooLarge,
         BudgetExhausted),
        body=((JSON, schemas.ResumeRequest),), body_required=False,
        body_examples=((JSON, {"additional_gas": 1_000_000}),),
    ),
    Operation(
        "POST", "/sessions/{session_id}/step", "stepSession",
        "Let the session's paused current call run a step of gas",
        (Reply(200, "Stopped again (paused) or finished: the call's state.",
               schemas.ExecutionState, example={**CALL_PAUSED, "gas_used": 12}),
         Reply(202, "Not stopped within the sync wait: the call's state so far.",
               schemas.ExecutionState)),
        (*STORE, InvalidRequest, NotFound, Conflict, PayloadTooLarge),
        body=((JSON, schemas.StepRequest),), body_required=False,
        body_examples=((JSON, {"gas": 1}),),
    ),
    Operation(
        "POST", "/sessions/{session_id}/snapshots", "createSnapshot",
        "Snapshot a session's last committed state (a running call is not waited for)",
        (Reply(201, "Taken; it lives until deleted (`state_cid` null: the module's fresh "
               "state).", schemas.Snapshot, headers=("Location",), example=SNAPSHOT),),
        (*STORE, InvalidRequest, QuotaExceeded, NotFound, PayloadTooLarge),
        body=((JSON, schemas.CreateSnapshot),), body_required=False,
        body_examples=((JSON, {"label": "after 5"}),),
    ),
    Operation(
        "GET", "/snapshots", "listSnapshots", "The caller's snapshots, newest first",
        (Reply(200, "A page of snapshots.", schemas.SnapshotPage,
               example={"items": [SNAPSHOT], "next_cursor": None}),),
        (*STORE, InvalidRequest),
        parameters=("page_limit", "cursor"),
    ),
    Operation(
        "GET", "/snapshots/{snapshot_id}", "getSnapshot", "A snapshot",
        (Reply(200, "The snapshot.", schemas.Snapshot, example=SNAPSHOT),),
        (*STORE, NotFound),
    ),
    Operation(
        "DELETE", "/snapshots/{snapshot_id}", "deleteSnapshot",
        "Delete a snapshot (sessions restored from it live on)",
        (Reply(204, "Deleted."),),
        (*STORE, NotFound),
    ),
    Operation(
        "POST", "/snapshots/{snapshot_id}/restore", "restoreSnapshot",
        "Branch: new sessions, each starting from the snapshot's state",
        (Reply(201, "The new sessions, idle, independent of each other and of the original.",
               schemas.Branches, example={"items": [BRANCH]}),),
        (*STORE, InvalidRequest, Forbidden, QuotaExceeded, NotFound, Conflict, PayloadTooLarge),
        body=((JSON, schemas.RestoreSnapshot),), body_required=False,
        body_examples=((JSON, {"branch_count": 1}),),
    ),
    Operation(
        "POST", "/pipelines", "createPipeline",
        "Run a DAG of executions: nodes whose inputs may refer to other nodes' outputs",
        (Reply(202, "Accepted, running; its first nodes are queued.", schemas.PipelineAccepted,
               headers=("Location", REPLAYED), example={
                   "pipeline_id": PIPELINE_ID, "status": "running", "links": PIPELINE_LINKS}),),
        (*STORE, InvalidRequest, Forbidden, IdempotencyKeyReuse, PayloadTooLarge),
        body=((JSON, schemas.CreatePipeline),), body_examples=((JSON, PIPELINE),),
        parameters=("Idempotency-Key",),
    ),
    Operation(
        "GET", "/pipelines", "listPipelines", "The caller's pipelines, newest first",
        (Reply(200, "A page of pipelines.", schemas.PipelinePage,
               example={"items": [PIPELINE_SUMMARY], "next_cursor": None}),),
        (*STORE, InvalidRequest),
        parameters=("page_limit", "cursor"),
    ),
    Operation(
        "GET", "/pipelines/{pipeline_id}", "getPipeline",
        "A pipeline: its status, progress and every node's state",
        (Reply(200, "The pipeline.", schemas.PipelineView, example=PIPELINE_VIEW),),
        (*STORE, NotFound),
    ),
    Operation(
        "DELETE", "/pipelines/{pipeline_id}", "cancelPipeline",
        "Cancel a pipeline: pending nodes at once, running ones where they run",
        (Reply(200, "Cancelled: the pipeline, ended.", schemas.PipelineView,
               example=CANCELLED_PIPELINE),
         Reply(202, "Cancelling: the pipeline so far (its running nodes have not ended yet).",
               schemas.PipelineView)),
        (*STORE, NotFound, Conflict),
    ),
    Operation(
        "GET", "/executions/{request_id}/deliveries", "listExecutionDeliveries",
        "Every attempt to deliver the execution's events to its callback_url, oldest first",
        (Reply(200, "A page of attempts.", webhooks.DeliveryPage, example=DELIVERIES),),
        (*STORE, InvalidRequest, NotFound),
        parameters=("page_limit", "cursor"),
    ),
    Operation(
        "GET", "/pipelines/{pipeline_id}/deliveries", "listPipelineDeliveries",
        "Every attempt to deliver the pipeline's events to its callback_url, oldest first",
        (Reply(200, "A page of attempts.", webhooks.DeliveryPage, example=DELIVERIES),),
        (*STORE, InvalidRequest, NotFound),
        parameters=("page_limit", "cursor"),
    ),
    Operation(
        "GET", "/webhooks/secret", "getWebhookSecret",
        "The caller's webhook signing secret (made now if it has none yet)",
        (Reply(200, "The current secret: `whsec_` and base64 of 32 bytes.",
               webhooks.WebhookSecret, example=SECRET),),
        STORE,
    ),
    Operation(
        "POST", "/webhooks/secret", "rotateWebhookSecret",
        "Replace the caller's webhook signing secret; the old one still signs during the "
        "grace period (RELAY_WEBHOOK_ROTATION_GRACE)",
        (Reply(200, "The new secret.", webhooks.WebhookSecret,
               example={"secret": "whsec_Zq1V6e0LmC3Jv9Xk2pTt8yQwR4sN7uHb5aDf0gEi1oM="}),),
        STORE,
    ),
    Operation("GET", "/", "index", "Links to the API's entry points",
              (Reply(200, "The links.", schemas.Index, example=INDEX),), auth=False),
    Operation("GET", "/healthz", "healthz", "Liveness",
              (Reply(200, "Alive.", schemas.Liveness, example={"status": "ok"}),), auth=False),
    Operation(
        "GET", "/readyz", "readyz", "Readiness",
        (Reply(200, "Redis is reachable and every background loop runs.",
                schemas.Readiness, example={"status": "ready", "redis": True}),),
        STORE, auth=False,
    ),
    Operation("GET", "/metrics", "metrics", "Prometheus metrics",
              (Reply(200, "Counters, histograms and gauges.", {"type": "string"}, METRICS,
                     example=METRICS_EXAMPLE),),
              STORE, auth=False),
    Operation("GET", "/openapi.json", "openapi", "This document",
              (Reply(200, "OpenAPI 3.1.", ANY_JSON, example={
                  "openapi": "3.1.0", "info": {"title": "Relay", "version": "0.1.0"},
                  "paths": {"/intent/execute-wasm": {"post": {"operationId": "executeWasm"}}}}),),
              auth=False),
    Operation("GET", "/console", "console",
              "The web console: upload, run, watch and steer modules in a browser",
              (Reply(200, "The page; its script and style come from /console/{file}. It asks "
                     "for an API key and keeps it in the tab's sessionStorage.",
                     {"type": "string"}, "text/html", example=CONSOLE_PAGE),), auth=False),
    Operation("GET", "/console/{file}", "consoleFile",
              "A file of the console, or the JavaScript SDK (relay-client.js, relay-client.d.ts)",
              (Reply(200, "The file, with an ETag (If-None-Match answers 304).",
                     {"type": "string"}, "text/javascript",
                     other_bodies=(("text/css", {"type": "string"}),
                                   ("application/typescript", {"type": "string"})),
                     example='import { Relay, RelayError } from "./relay-client.js";'),),
              (NotFound,), auth=False),
    Operation("GET", "/docs", "docs", "This document as an interactive page (Swagger UI)",
              (Reply(200, "The page; its scripts and styles come from /docs/{asset}.",
                     {"type": "string"}, "text/html", example=DOCS_PAGE),), auth=False),
    Operation("GET", "/docs/{asset}", "docsAsset", "A script, style or image of the /docs page",
              (Reply(200, "The file.", {"type": "string"}, "text/css",
                     other_bodies=(("text/javascript", {"type": "string"}),
                                   ("image/png", {"type": "string"})),
                     example=".swagger-ui .wrapper{box-sizing:border-box;margin:0 auto}"),),
              (NotFound,), auth=False),
)


def _string(description: str, **schema: Any) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string", **schema}}


def _parameter(where: str, name: str, description: str, schema: dict[str, Any],
               ) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "description": description,
            "schema": schema}


NAME = {"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$"}
PARAMETERS = {
    "request_id": _parameter("path", "request_id", "The execution's id.",
                             {"type": "string", "pattern": "^[0-9a-f]{64}$"}),
    "cid": _parameter("path", "cid", "A CIDv1 (any multibase) or a CIDv0 (`Qm…`).",
                      {"type": "string"}),
    "name": _parameter("path", "name", "A glyph name.", NAME),
    "tag": _parameter("path", "tag", "A tag of the name.", NAME),
    "name_query": _parameter("query", "name", "Also bind this glyph name to the module.", NAME),
    "tag_query": _parameter("query", "tag", "The tag to bind (needs `name`; default `latest`).",
                            NAME),
    "limit": _parameter("query", "limit", "Modules per page.",
                        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE,
                         "default": 50}),
    "cursor": _parameter("query", "cursor", "`next_cursor` of the previous page.",
                         {"type": "string"}),
    # What the body's `idempotency_key` takes; filled in from its schema by `document`.
    "Idempotency-Key": _parameter("header", "Idempotency-Key",
                                  "As `idempotency_key` in the body (if both are sent, equal).",
                                  {}),
    "environment": _parameter("path", "environment", "An environment's name.", NAME),
    # The files relay/gateway/routes/docs.py serves (tests/relay/gateway/test_docs_page.py).
    "asset": _parameter("path", "asset", "A file of the /docs page.",
                        {"type": "string", "enum": ["swagger-ui.css", "swagger-ui-bundle.js",
                                                    "favicon-32x32.png", "relay-docs.js"]}),
    # The files relay/gateway/routes/console.py serves.
    "file": _parameter("path", "file", "A file of the /console page or the JavaScript SDK.",
                       {"type": "string", "enum": ["console.js", "console.css",
                                                   "relay-client.js", "relay-client.d.ts"]}),
    "batch_id": _parameter("path", "batch_id", "The batch's id.",
                           {"type": "string", "pattern": "^bat_[0-9a-f]{24}$"}),
    "budget_id": _parameter("path", "budget_id", "The budget's id.",
                            {"type": "string", "pattern": "^bud_[0-9a-f]{24}$"}),
    "session_id": _parameter("path", "session_id", "The session's id.",
                             {"type": "string", "pattern": "^ses_[0-9a-f]{24}$"}),
    "snapshot_id": _parameter("path", "snapshot_id", "The snapshot's id.",
                              {"type": "string", "pattern": "^snp_[0-9a-f]{24}$"}),
    "pipeline_id": _parameter("path", "pipeline_id", "The pipeline's id.",
                              {"type": "string", "pattern": "^[0-9a-f]{32}$"}),
    "pipeline_id_query": _parameter("query", "pipeline_id",
                                    "Only this pipeline's events (its nodes' and its own).",
                                    {"type": "string"}),
    "session_id_query": _parameter("query", "session_id", "Only this session's calls' events.",
                                   {"type": "string"}),
    "status_filter": _parameter("query", "status", "Only executions in this status.",
                                {"enum": ["queued", "running", "paused", "completed", "failed",
                                          "cancelled"]}),
    "session_filter": _parameter("query", "session_id", "Only this session's calls.",
                                 {"type": "string"}),
    "pipeline_filter": _parameter("query", "pipeline_id", "Only this pipeline's nodes.",
                                  {"type": "string"}),
    "batch_filter": _parameter("query", "batch_id", "Only this batch's items.",
                               {"type": "string"}),
    "page_limit": _parameter("query", "limit", "Items per page.",
                             {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
    "request_id_query": _parameter("query", "request_id",
                                   "Only these executions' events (repeatable).",
                                   {"type": "string", "pattern": "^[0-9a-f]{64}$"}),
    "last_event_id": _parameter("query", "last_event_id",
                                "As the Last-Event-ID header; `0` replays all that is retained.",
                                {"type": "string", "pattern": r"^\d+(-\d+)?$"}),
    "Last-Event-ID": _parameter("header", "Last-Event-ID",
                                "Replay what came after this id, then continue live.",
                                {"type": "string", "pattern": r"^\d+(-\d+)?$"}),
    "Prefer": _parameter("header", "Prefer", "`respond-async` answers 202 at once.",
                         {"type": "string", "examples": ["respond-async"]}),
    "Range": _parameter("header", "Range", "One byte range, e.g. `bytes=0-1023` or `bytes=-10`.",
                        {"type": "string", "examples": ["bytes=0-1023"]}),
    "If-Range": _parameter("header", "If-Range",
                           "Honour `Range` only while the ETag is still this one.",
                           {"type": "string"}),
    "If-None-Match": _parameter("header", "If-None-Match",
                                "ETags the client holds: 304 if one is current.",
                                {"type": "string"}),
}
HEADERS = {
    "X-Request-Id": {**_string("The gateway's correlation id for logs."), "required": True},
    "Location": {**_string("Where the resource is."), "required": True},
    REPLAYED: _string("`true` when this request did not start the execution.", enum=["true"]),
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                    "schema": {"type": "integer", "minimum": 0}},
    # Absent only where no limit applies (RELAY_RATE_LIMIT=0 and no limit of the principal's).
    "RateLimit": _string('Remaining quota, e.g. `"default";r=9;t=42`.'),
    "RateLimit-Policy": _string('The quota policy, e.g. `"default";q=10;w=60`.'),
    "WWW-Authenticate": {**_string("The accepted schemes."), "required": True},
    "ETag": {**_string('The CID of the bytes, quoted: `"bafk…"`.'), "required": True},
    "Accept-Ranges": {**_string("Byte ranges may be asked for.", enum=["bytes"]),
                      "required": True},
    "Content-Length": {"description": "Bytes of the body.", "required": True,
                       "schema": {"type": "integer", "minimum": 0}},
    "Content-Range": {**_string("`bytes first-last/size`, or `bytes */size` with a 416."),
                      "required": True},
}
SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
}
# Accepted by the event streams only: a token from POST /auth/tokens, never a key or a JWT.
URL_TOKEN = {"accessToken": {"type": "apiKey", "in": "query", "name": "access_token"}}


def _headers(names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"}
            for name in ("X-Request-Id", *names)}


def _errors(operation: Operation) -> dict[str, Any]:
    """One problem+json response per status, its `type` pinned to the classes' slugs."""
    errors = ((Unauthenticated,) if operation.auth else ()) + operation.errors
    responses: dict[str, Any] = {}
    for status in sorted({error.status for error in errors}):
        same = [error for error in errors if error.status == status]
        headers = sorted({name for error in same for name in ERROR_HEADERS.get(error, ())})
        schema = {"allOf": [{"$ref": REF.format(name="Problem")}], "properties": {
            "type": {"enum": [f"/problems/{error.slug}" for error in same]},
            "status": {"const": status}}}
        responses[str(status)] = {
            "description": "; ".join(f"{error.title} (`{error.slug}`)" for error in same),
            "headers": _headers(headers),
            "content": {PROBLEM: {"schema": schema}},
        }
    return responses


def _operation(operation: Operation, schema_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    def schema(body: Any) -> dict[str, Any]:
        return body if isinstance(body, dict) else schema_of[body]

    limited = ("RateLimit", "RateLimit-Policy") if operation.rate_limited else ()
    responses: dict[str, Any] = {}
    for reply in operation.replies:
        response: dict[str, Any] = {"description": reply.description,
                                    "headers": _headers((*reply.headers, *limited))}
        if reply.body is not None:
            response["content"] = {media_type: {"schema": schema(body)} for media_type, body
                                   in ((reply.media_type, reply.body), *reply.other_bodies)}
            if reply.example is not None:
                response["content"][reply.media_type]["example"] = reply.example
        responses[str(reply.status)] = response
    for status, response in _errors(operation).items():
        # Refused before the limit is counted (401), or unable to count it (503).
        if limited and status not in (str(Unauthenticated.status), str(Unavailable.status)):
            response["headers"].update(_headers(limited))
        responses[status] = response
    parameters = re.findall(r"\{(\w+)\}", operation.path) + list(operation.parameters)
    result: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "responses": dict(sorted(responses.items())),
    }
    if parameters:
        result["parameters"] = [{"$ref": f"#/components/parameters/{name}"}
                                for name in parameters]
    if operation.body:
        examples = dict(operation.body_examples)
        result["requestBody"] = {"required": operation.body_required, "content": {
            media_type: {"schema": schema(body)} | (
                {"example": examples[media_type]} if media_type in examples else {})
            for media_type, body in operation.body}}
    if not operation.auth:
        result["security"] = []
    elif operation.url_token:
        result["security"] = [{name: []} for name in (*SECURITY_SCHEMES, *URL_TOKEN)]
    return result


def _webhooks(schema_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The requests Relay sends to a `callback_url` (relay.deliverer): Standard Webhooks 1.0."""
    def header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "header", "required": True, "description": description,
                "schema": schema}

    return {"event": {"post": {
        "operationId": "receiveEvent",
        "summary": "An event a callback_url asked for (callback_events), signed by the "
                   "principal's secret (GET /webhooks/secret)",
        "description": "The event's JSON as the event stream carries it (a batch's "
                       "`batch_complete` too). Answer 2xx to end the delivery, 410 to stop "
                       "it; anything else, a timeout or a connection error is retried on "
                       "RELAY_WEBHOOK_SCHEDULE, or after a longer Retry-After. At least once: "
                       "deduplicate by webhook-id.",
        "parameters": [
            header("webhook-id", "The event's id on relay:events, the same on every attempt.",
                   {"type": "string"}),
            header("webhook-timestamp", "Unix seconds of this attempt.",
                   {"type": "string", "pattern": "^[0-9]+$"}),
            header("webhook-signature", "`v1,<base64 HMAC-SHA256 over "
                   "\"<id>.<timestamp>.<body>\">`, keyed by the base64-decoded secret; "
                   "space-separated, one per secret, during a rotation's grace period.",
                   {"type": "string"}),
            header("relay-attempt", "1 for the first attempt, 2 for the first retry, ...",
                   {"type": "string", "pattern": "^[1-9][0-9]*$"}),
        ],
        "requestBody": {"required": True, "content": {JSON: {"schema": {"oneOf": [
            schema_of[schemas.Event], schema_of[schemas.PipelineProgress],
            schema_of[schemas.PipelineComplete]]}, "example": COMPLETE_EVENT}}},
        "responses": {
            "2XX": {"description": "Received: the delivery ends."},
            "410": {"description": "Gone: the delivery stops, never retried."},
            "default": {"description": "Anything else: retried."},
        },
        "security": [],
    }}}


def _version() -> str:
    try:
        return importlib.metadata.version("relay")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, built once. Callers must not mutate it."""
    bodies = [body for op in OPERATIONS
              for body in [*(r.body for r in op.replies), *(b for _, b in op.body)]
              if body is not None and not isinstance(body, dict)]
    types = list(dict.fromkeys([*DOCUMENTED, *bodies]))
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    for kind, ref in zip(types, refs, strict=True):
        if kind in NAMED:  # a union: msgspec inlines it, the document names it
            components[NAMED[kind]] = ref
    schema_of = {kind: ({"$ref": REF.format(name=NAMED[kind])} if kind in NAMED else ref)
                 for kind, ref in zip(types, refs, strict=True)}
    key_schema = components["ExecuteRequest"]["properties"]["idempotency_key"]["anyOf"][0]
    parameters = {**PARAMETERS, "Idempotency-Key": {**PARAMETERS["Idempotency-Key"],
                                                    "schema": key_schema}}
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(
            operation, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Relay", "version": _version(),
                 "description": "Run untrusted WebAssembly behind an HTTP API."},
        "security": [{name: []} for name in SECURITY_SCHEMES],
        "paths": paths,
        "webhooks": _webhooks(schema_of),
        "components": {"schemas": dict(sorted(components.items())), "parameters": parameters,
                       "headers": HEADERS,
                       "securitySchemes": {**SECURITY_SCHEMES, **URL_TOKEN}},
    }


@functools.cache
def document_bytes() -> bytes:
    """`document()` as JSON."""
    return msgspec.json.encode(document())
