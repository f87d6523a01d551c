"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

Every operation of `GET /openapi.json` gets generated requests, valid and invalid, sent with
alice's API key (`X-API-Key`) to the real app in-process (schemathesis's ASGI transport, which
runs the app's lifespan on its own event loop thread) while a real executor runs, so executes
complete. Each response must:
- not be a server error: no 5xx (503 `unavailable` is for an unreachable Redis or a full queue,
  neither of which happens here);
- have a status code, media type, body and headers that the document declares for it;
- answer a method the path does not have with 405 and an `Allow` listing the ones it has;
- refuse the request without credentials, or with bad ones, where the document requires them;
- if it is an error (4xx/5xx), be RFC 9457 `application/problem+json` with `type`, `title`,
  `status` (the HTTP status) and `detail`.

The generators lean towards what exists (seeded modules in every CID form and by glyph name,
executions, batches, sessions, snapshots, budgets and pipelines seeded or made during the run)
and make runnable bodies (executes and session calls, sessions of the counter seed, restores of
a few branches, budgets that refuse nothing, pipelines of the seeds) about half of the time, so the
success paths are fuzzed too, not only the refusals; only values that conform to the document
are replaced, so a request schemathesis made invalid on purpose stays invalid (the coverage
phase, which the generation hooks do not reach, gets seeded session, snapshot, budget and
pipeline ids in every other case; a DELETE of a pipeline names one that may be running). The
event stream never ends: it is read for READ_TIMEOUT_S, then cut. The WebSocket routes are
not in the document, so they are not fuzzed. Every operation's test has its own key prefix and
its own seeds; what a fuzzed delete, close, cancel or budget change takes away is made again
(`keep_seeds`).

Bounded: FUZZ_EXAMPLES generated requests per operation (more for execute and pipelines) plus
schemathesis's examples and coverage cases, with a fixed seed: about 1,650 requests, ~25 s
(half of it the event stream's reads).
`bench/fuzz.py` reuses this kit (checks, seeds, generation hooks) against `relay dev` with many
more and a new seed every run; what it finds goes into FOUND, replayed here every run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import pytest
import schemathesis
import wasmtime
from hypothesis import HealthCheck
from hypothesis import strategies as st
from multiformats import CID, multibase
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from starlette.applications import Starlette

from executor.worker import Executor
from relay import connection
from relay.gateway.app import create_app
from relay.openapi import document
from relay.settings import Settings
from tests.conftest import ALICE_KEY, ROOT, with_settings

FUZZ_EXAMPLES = 12
"""Generated requests per operation in the fuzzing phase (EXECUTE_EXAMPLES for execute,
PIPELINE_EXAMPLES for POST /pipelines)."""
EXECUTE_EXAMPLES = 40
PIPELINE_EXAMPLES = 30
"""Those of `POST /pipelines`: about a quarter are runnable (half are invalid on purpose, half
of the rest arbitrary), and 12 made two or three."""
READ_TIMEOUT_S = 1.0
"""How long a response (in practice, the event stream's) is read before it is cut."""
CANCEL_TIMEOUT_S = 8.0
"""How long a `DELETE /pipelines/{id}` is waited for: it answers once the pipeline's running
nodes have ended, or after 5 s (202)."""
SEED = int(os.environ.get("RELAY_FUZZ_SEED", "20240115"))
"""The suite's runs are reproducible (RELAY_FUZZ_SEED picks another seed, to look further by
hand); bench/fuzz.py draws a new seed every run."""
EXECUTE_PATH = "/intent/execute-wasm"


# --- the checks ---


@schemathesis.check
def problem_json(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                 case: schemathesis.Case) -> bool | None:
    """Every error (4xx/5xx) is RFC 9457 problem+json with `type`, `title`, `status`, `detail`."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.split(";")[0].strip() == "application/problem+json", (
        f"{response.status_code} with Content-Type {content_type!r}, not application/problem+json")
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} with a body that is not JSON: "
                             f"{response.content[:200]!r}") from None
    assert isinstance(body, dict), f"the problem is not a JSON object: {body!r}"
    missing = [name for name in ("type", "title", "status", "detail") if name not in body]
    assert not missing, f"the problem lacks {missing}: {body!r}"
    assert isinstance(body["type"], str) and body["type"].startswith("/problems/"), (
        f"`type` is not /problems/<slug>: {body!r}")
    assert isinstance(body["title"], str) and body["title"], f"empty `title`: {body!r}"
    assert isinstance(body["detail"], str) and body["detail"], f"empty `detail`: {body!r}"
    assert body["status"] == response.status_code, (
        f"`status` {body['status']!r} in a {response.status_code} response")
    return None


CHECKS: list[Callable[..., bool | None]] = [
    not_a_server_error, status_code_conformance, content_type_conformance,
    response_schema_conformance, response_headers_conformance, unsupported_method,
    allow_header_conformance, ignored_auth, problem_json]


# --- what exists, and generation that leans towards it ---


SPIN_WAT = '(module (func (export "main") (loop $spin (br $spin))))'
# The sessions' module: state (a global and a memory) that a call changes, and no `_start`.
COUNTER_WAT = """(module (global $n (mut i64) (i64.const 0)) (memory 1)
  (func (export "add") (param i64) (result i64)
    (global.set $n (i64.add (global.get $n) (local.get 0)))
    (i64.store (i32.const 0) (global.get $n))
    (global.get $n)))"""
SESSION_MODULE = "fuzz-counter"
SEED_MODULES = {  # glyph name (tag `latest`) -> WAT; names `relay dev` does not use
    "fuzz-calc": (ROOT / "relay" / "examples" / "calculator.wat").read_text(),
    "fuzz-echo": (ROOT / "relay" / "examples" / "echo.wat").read_text(),
    "fuzz-spin": SPIN_WAT,
    SESSION_MODULE: COUNTER_WAT,
}
LOOSE_WAT = '(module (func (export "main") (result i32) i32.const 7))'
"""A seed module stored without a name: a named module cannot be deleted (409), this one can."""
SEED_BINARIES = [bytes(wasmtime.wat2wasm(wat)) for wat in SEED_MODULES.values()]
"""What binary uploads start from: not the loose seed, which an upload with `?name=` would name
(after which no delete would succeed)."""


CALLS_PATH = "/sessions/{session_id}/calls"
GENEROUS_BUDGET = {"max_gas": 10**15, "max_time": 10**12, "max_executions": 10**9}
"""The seeded budget's limits: every execution of the run counts toward it, none is refused."""
LOOSE_LIMITS = {"max_gas": 10**14, "max_time": 10**9, "max_executions": 10**6}
"""A budget's limits at least these never refuse a run's executions (each may reserve up to
RELAY_MAX_GAS, 10^12, and bench/fuzz.py runs tens of thousands); a fuzzed budget under them
is made generous again (`keep_seeds`), so executes and session calls keep working."""
SESSION_GONE = ("/problems/session-closed", "/problems/session-exhausted")
SEED_ENVIRONMENT = "fuzz-env"
"""An environment the run's caller (an administrator, so that PUT and DELETE can succeed)
made: a DELETE names it (the shipped ones are 409), and `keep_seeds` makes it again."""
ADMIN_ALICE = ('permit (principal == User::"alice", action == Action::"admin", '
               'resource == Relay::"gateway");')
SEED_PIPELINE = {"max_concurrency": 2, "nodes": [
    {"id": "sum", "cid": "glyph://fuzz-calc", "entrypoint": "add", "inputs": [2, 3]},
    {"id": "count", "cid": f"glyph://{SESSION_MODULE}", "entrypoint": "add",
     "inputs": [{"$ref": "sum"}]},
    {"id": "trap", "cid": "glyph://fuzz-calc", "entrypoint": "div", "inputs": [{"$ref": "sum"}, 0],
     "retries": 10, "retry_on": ["trap"], "memoize": False}]}
"""A pipeline of the calculator and counter seeds that runs for about 8 minutes at almost no
cost, so a DELETE has one to cancel: two nodes complete (the second from the first's output),
the third traps (a division by zero) and waits ever longer (0.5 s x 2^k) between its 11
attempts."""


def _object(response: schemathesis.Response) -> dict[str, Any]:
    """The response's body as a JSON object ({} when it is not one)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _recent() -> collections.deque[str]:
    return collections.deque(maxlen=32)


@dataclass
class Seeds:
    """What the server holds, for the generators to name: modules in every reference form, and
    the latest executions, sessions, snapshots and budgets (seeded, then recorded from responses
    as the run goes; one deleted, closed or used up is forgotten, and `keep_seeds` makes new
    ones when none is left)."""

    modules: dict[str, str] = field(default_factory=dict)
    """glyph name -> canonical CID."""
    loose: list[str] = field(default_factory=list)
    """CIDs of seed modules no name points at."""
    request_ids: collections.deque[str] = field(default_factory=_recent)
    sessions: collections.deque[str] = field(default_factory=_recent)
    """Sessions that take calls: neither closed nor used up."""
    snapshots: collections.deque[str] = field(default_factory=_recent)
    budgets: collections.deque[str] = field(default_factory=_recent)
    pipelines: collections.deque[str] = field(default_factory=_recent)
    """Pipelines, running or ended (a cancelled one still answers GET)."""
    batches: collections.deque[str] = field(default_factory=_recent)
    """Batches (seeded, or made by a fuzzed batch): they are never deleted."""
    environments: collections.deque[str] = field(default_factory=_recent)
    """Environments the caller made (not the shipped ones, which cannot be deleted)."""
    running: collections.deque[str] = field(default_factory=_recent)
    """Pipelines a DELETE may find running (the seeded one runs for minutes, SEED_PIPELINE)."""
    cancelled: list[str] = field(default_factory=list)
    """Pipelines a fuzzed DELETE cancelled, to check that GET still answers them."""
    principal: str = ""
    """The caller's principal (what a budget's `principal` defaults to)."""
    tight: list[str] = field(default_factory=list)
    """Budgets a fuzzed create or replace left under LOOSE_LIMITS."""
    modules_lost: bool = False
    """A seed module was deleted."""

    def references(self, name: str) -> list[str]:
        """Every way to name module `name` in an execute request."""
        cid = CID.decode(self.modules[name])
        return [str(cid), cid.encode("base58btc"), cid.encode("base36"),
                multibase.encode(cid.digest, "base58btc")[1:],  # CIDv0: the bare multihash
                f"glyph://{name}@latest", f"glyph://{name}"]

    def by_parameter(self, method: str) -> dict[str, collections.deque[str]]:
        """Path parameter -> the ids it takes in a request of `method` (a DELETE of a pipeline
        names a running one: an ended one is 409)."""
        running = method.upper() == "DELETE"
        return {"session_id": self.sessions, "snapshot_id": self.snapshots,
                "budget_id": self.budgets, "environment": self.environments,
                "batch_id": self.batches,
                "pipeline_id": self.running if running else self.pipelines}

    def wanting(self) -> bool:
        """Something the generators need is gone, or a budget may refuse executions."""
        return (self.modules_lost or not self.sessions or not self.snapshots
                or not self.budgets or not self.running or not self.environments
                or bool(self.tight)
                or bool(self.cancelled))

    def record(self, case: schemathesis.Case, response: schemathesis.Response) -> None:
        """Remember what a response created (executions, session calls, sessions, branches,
        snapshots, budgets), and forget what it deleted, closed or found used up."""
        label, status = case.operation.label, response.status_code
        ids = case.path_parameters or {}
        if status >= 300:
            if "session_id" in ids and _object(response).get("type") in SESSION_GONE:
                _discard(self.sessions, ids["session_id"])
            if label == "DELETE /pipelines/{pipeline_id}" and status == 409:  # it had ended
                _discard(self.running, ids["pipeline_id"])
            return
        body = _object(response)
        if label in (f"POST {EXECUTE_PATH}", f"POST {CALLS_PATH}"):
            _append(self.request_ids, body.get("request_id"))
        elif label == "POST /sessions":
            _append(self.sessions, body.get("session_id"))
        elif label == f"POST {EXECUTE_PATH}/batch":
            _append(self.batches, body.get("batch_id"))
        elif label == "POST /snapshots/{snapshot_id}/restore":
            for branch in body.get("items") or ():
                _append(self.sessions, branch.get("session_id"))
        elif label == "POST /sessions/{session_id}/snapshots":
            _append(self.snapshots, body.get("snapshot_id"))
        elif label in ("POST /budgets", "PUT /budgets/{budget_id}"):
            if label == "POST /budgets":
                _append(self.budgets, body.get("budget_id"))
            if _tight(body) and isinstance(body.get("budget_id"), str):
                self.tight.append(body["budget_id"])
        elif label == "POST /pipelines":
            _append(self.pipelines, body.get("pipeline_id"))
            _append(self.running, body.get("pipeline_id"))
        elif label == "DELETE /pipelines/{pipeline_id}":
            _discard(self.running, ids["pipeline_id"])
            if body.get("status") == "cancelled":
                self.cancelled.append(ids["pipeline_id"])
        elif label == "DELETE /snapshots/{snapshot_id}":
            _discard(self.snapshots, ids["snapshot_id"])
        elif label == "DELETE /budgets/{budget_id}":
            _discard(self.budgets, ids["budget_id"])
        elif label == "PUT /environments/{environment}":
            if ids["environment"] not in self.environments:
                _append(self.environments, ids["environment"])
        elif label == "DELETE /environments/{environment}":
            _discard(self.environments, ids["environment"])
        elif label == "DELETE /modules/{cid}":
            self.modules_lost = True
        if "session_id" in ids and body.get("status") in ("closed", "exhausted"):
            _discard(self.sessions, ids["session_id"])


def _tight(budget: dict[str, Any]) -> bool:
    return any(isinstance(budget.get(name), int) and budget[name] < limit
               for name, limit in LOOSE_LIMITS.items())


def _append(recent: collections.deque[str], value: Any) -> None:
    if isinstance(value, str):
        recent.append(value)


def _discard(recent: collections.deque[str], value: str) -> None:
    while value in recent:
        recent.remove(value)


SEEDS = Seeds()


def seed_modules(client: Any) -> None:
    """Store the seed modules under their names (again, after a fuzzed delete), through
    `client`: a requests session with credentials, whose URLs are relative to the server."""
    for name, wat in SEED_MODULES.items():
        stored = client.post("/modules", data=wat.encode(), params={"name": name},
                             headers={"Content-Type": "text/plain"})
        assert stored.status_code in (200, 201), stored.text
        SEEDS.modules[name] = stored.json()["cid"]
    stored = client.post("/modules", data=LOOSE_WAT.encode(),
                         headers={"Content-Type": "text/plain"})
    assert stored.status_code in (200, 201), stored.text
    SEEDS.loose[:] = [stored.json()["cid"]]
    SEEDS.modules_lost = False


def seed_session(client: Any) -> None:
    """A session of the counter seed, called once (so it has a committed state to snapshot)."""
    created = client.post("/sessions", json={"cid": SEEDS.modules[SESSION_MODULE]})
    assert created.status_code == 201, created.text
    session_id = created.json()["session_id"]
    called = client.post(f"/sessions/{session_id}/calls",
                         json={"entrypoint": "add", "inputs": [5]}, timeout=20)
    assert called.status_code == 200 and called.json()["output"] == 5, called.text
    SEEDS.sessions.append(session_id)
    SEEDS.request_ids.append(called.json()["request_id"])


def keep_seeds(client: Any) -> None:
    """Make again what the run lost (see Seeds.wanting), through `client` (see seed_modules):
    the seed modules, a session, a snapshot of it, a generous budget of the caller's, a running
    pipeline; make generous the budgets a fuzzed request left tight; and check that the
    pipelines a fuzzed DELETE cancelled still answer GET, cancelled."""
    if SEEDS.modules_lost:
        seed_modules(client)
    if not SEEDS.sessions:
        seed_session(client)
    if not SEEDS.snapshots:
        taken = client.post(f"/sessions/{SEEDS.sessions[-1]}/snapshots", json={"label": "fuzz"})
        assert taken.status_code == 201, taken.text
        SEEDS.snapshots.append(taken.json()["snapshot_id"])
    if not SEEDS.budgets:
        made = client.post("/budgets", json=GENEROUS_BUDGET)
        assert made.status_code == 201, made.text
        SEEDS.budgets.append(made.json()["budget_id"])
        SEEDS.principal = made.json()["principal"]
    if not SEEDS.running:
        seed_pipeline(client)
    if not SEEDS.environments:
        made = client.put(f"/environments/{SEED_ENVIRONMENT}", json={})
        assert made.status_code == 200, made.text
        SEEDS.environments.append(SEED_ENVIRONMENT)
    while SEEDS.cancelled:  # a cancelled pipeline is still there, ended, for GET to show
        pipeline_id = SEEDS.cancelled.pop()
        shown = client.get(f"/pipelines/{pipeline_id}")
        assert shown.status_code == 200 and shown.json()["status"] == "cancelled", shown.text
    while SEEDS.tight:
        loosened = client.put(f"/budgets/{SEEDS.tight.pop()}", json=GENEROUS_BUDGET)
        assert loosened.status_code in (200, 404), loosened.text  # 404: deleted meanwhile


def seed_pipeline(client: Any) -> None:
    """SEED_PIPELINE, once its trap node waits for a retry: a DELETE landing while an attempt
    is ending may wait the whole 5 s for a cancel's confirmation that never comes (the attempt
    ended first), one in the backoff answers at once."""
    made = client.post("/pipelines", json=SEED_PIPELINE)
    assert made.status_code == 202, made.text
    pipeline_id = made.json()["pipeline_id"]
    deadline = time.monotonic() + 10
    while (shown := client.get(f"/pipelines/{pipeline_id}").json())["nodes"]["trap"][
            "status"] != "retrying":
        assert time.monotonic() < deadline, f"the seed pipeline's trap never retried: {shown}"
        time.sleep(0.02)
    SEEDS.pipelines.append(pipeline_id)
    SEEDS.running.append(pipeline_id)


def seed(client: Any) -> None:
    """Store the seed modules, run one execution, and make a session (called once), a snapshot
    of it and a budget, through `client` (see seed_modules)."""
    vars(SEEDS).update(vars(Seeds()))  # in place: bench/fuzz.py holds SEEDS by name
    seed_modules(client)
    ran = client.post(EXECUTE_PATH, json={"cid": "glyph://fuzz-calc", "inputs": [2, 3]}, timeout=20)
    assert ran.status_code == 200 and ran.json()["output"] == 5, ran.text
    SEEDS.request_ids.append(ran.json()["request_id"])
    batch = client.post(f"{EXECUTE_PATH}/batch", json={"items": [
        {"cid": "glyph://fuzz-calc", "inputs": [2, 3]}, {"cid": "glyph://fuzz-calc"}]}, timeout=20)
    assert batch.status_code == 200, batch.text
    SEEDS.batches.append(batch.json()["batch_id"])
    keep_seeds(client)


@functools.cache
def _validator(path: str, method: str, location: str) -> jsonschema.Draft202012Validator:
    """Validates one request part (`body`, or parameters `path`/`header`/`query` as an object)
    of an operation against the document."""
    doc = document()
    operation = doc["paths"][path][method.lower()]
    if location == "body":
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
    else:
        parameters = [doc["components"]["parameters"][ref["$ref"].rsplit("/", 1)[1]]
                      for ref in operation.get("parameters", ())]
        mine = [p for p in parameters if p["in"] == location]
        schema = {"type": "object", "properties": {p["name"]: p["schema"] for p in mine},
                  "required": [p["name"] for p in mine if p.get("required")]}
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def conforms(context: schemathesis.HookContext | schemathesis.Case, location: str,
             value: Any) -> bool:
    """`value` is a valid request part of the context's (or case's) operation: schemathesis did
    not make it invalid on purpose, so another valid value may take its place without turning a
    negative case positive."""
    operation = context.operation
    if operation is None or not SEEDS.modules:
        return False
    if location == "header" and isinstance(value, dict):  # header names are case-insensitive
        names = {p.lower(): p for p in _validator(operation.path, operation.method, location)
                 .schema["properties"]}
        value = {names.get(k.lower(), k): v for k, v in value.items()}
    return bool(_validator(operation.path, operation.method, location).is_valid(value))


def recent(ids: collections.deque[str]) -> st.SearchStrategy[str]:
    """One of the latest 8 of `ids` (not empty)."""
    return st.sampled_from(list(ids)[-8:])


def seeded_module() -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(SEEDS.modules))


I32 = st.integers(-(2**31), 2**31 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=8)


def runnable_execute(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """An execute request of seed module `name` that passes validation (mostly)."""
    if name == "fuzz-calc":
        entrypoints = st.sampled_from(["main", "add", "sub", "mul", "div"])
        inputs: st.SearchStrategy[Any] = st.lists(I32, min_size=2, max_size=2)
    elif name == "fuzz-echo":
        entrypoints, inputs = st.just("_start"), st.lists(JSON_VALUES, max_size=4)
    elif name == SESSION_MODULE:
        entrypoints, inputs = st.just("add"), st.tuples(I64).map(list)
    else:  # spins until its time or gas runs out: keep it short
        entrypoints, inputs = st.just("main"), st.just([])
    max_time = st.integers(20, 300) if name == "fuzz-spin" else st.integers(100, 5000)
    policy = st.fixed_dictionaries({"max_time": max_time}, optional={
        "max_gas": st.integers(1, 10**9), "max_memory": st.integers(2**17, 2**26)})
    return st.fixed_dictionaries(
        {"cid": st.sampled_from(SEEDS.references(name)), "inputs": inputs, "policy": policy},
        optional={"entrypoint": entrypoints,
                  "idempotency_key": st.text(min_size=1, max_size=40)})


def runnable_session() -> st.SearchStrategy[dict[str, Any]]:
    """A `POST /sessions` of the counter seed, in any reference form, that passes validation."""
    return st.fixed_dictionaries(
        {"cid": st.sampled_from(SEEDS.references(SESSION_MODULE))},
        optional={"budget": SESSION_BUDGETS, "ttl": st.integers(60_000, 86_400_000)})


def runnable_call() -> st.SearchStrategy[dict[str, Any]]:
    """A session call of the counter's `add` that passes validation (mostly: a reused
    idempotency key with another body is 422)."""
    policy = st.fixed_dictionaries({}, optional={
        "max_time": st.integers(100, 5000), "max_gas": st.integers(10**4, 10**9),
        "max_memory": st.integers(2**17, 2**26)})
    return st.fixed_dictionaries(
        {"entrypoint": st.just("add"), "inputs": st.tuples(I64).map(list)},
        optional={"policy": policy, "idempotency_key": st.text(min_size=1, max_size=40)})


def runnable_restore() -> st.SearchStrategy[dict[str, Any]]:
    """A few branches (a restore of up to 64 is valid too: the generated bodies have those)."""
    return st.fixed_dictionaries({"branch_count": st.integers(1, 3)},
                                 optional={"budget": SESSION_BUDGETS})


def runnable_pipeline() -> st.SearchStrategy[dict[str, Any]]:
    """A `POST /pipelines` of one to three nodes of the calculator and counter seeds, the later
    ones maybe referring to the first one's output (an i32, which fits both)."""
    calc = st.sampled_from(SEEDS.references("fuzz-calc"))
    counter = st.sampled_from(SEEDS.references(SESSION_MODULE))
    first_ref = st.just({"$ref": "a"})
    first = st.fixed_dictionaries({"id": st.just("a"), "cid": calc,
                                   "inputs": st.lists(I32, min_size=2, max_size=2)},
                                  optional={"entrypoint": st.sampled_from(["main", "add", "mul"])})
    later_calc = st.fixed_dictionaries(
        {"cid": calc, "inputs": st.tuples(first_ref | I32, I32).map(list)},
        optional={"entrypoint": st.sampled_from(["main", "add", "sub", "mul"])})
    later_counter = st.fixed_dictionaries(
        {"cid": counter, "inputs": st.tuples(first_ref | I64).map(list)},
        optional={"entrypoint": st.just("add")})
    later = st.tuples(later_calc | later_counter, st.fixed_dictionaries({}, optional={
        "retries": st.integers(0, 2), "memoize": st.booleans()})).map(
        lambda found: {**found[0], **found[1]})
    nodes = st.tuples(first, st.lists(later, max_size=2)).map(
        lambda found: [found[0], *({**node, "id": f"n{i}"} for i, node in enumerate(found[1]))])
    return st.fixed_dictionaries({"nodes": nodes}, optional={
        "max_concurrency": st.integers(1, 3), "fail_fast": st.booleans(),
        "idempotency_key": st.text(min_size=1, max_size=40)})


def generous_budget() -> st.SearchStrategy[dict[str, Any]]:
    """A budget of the caller's own (another's needs admin) that refuses no execution."""
    limits = {name: st.integers(limit, GENEROUS_BUDGET[name])
              for name, limit in LOOSE_LIMITS.items()}
    return st.fixed_dictionaries({}, optional={
        "principal": st.just(SEEDS.principal), "window": st.integers(1000, 366 * 86_400_000),
        **limits})


SESSION_BUDGETS = st.fixed_dictionaries({}, optional={
    "max_gas": st.integers(10**10, 10**13), "max_time": st.integers(10**5, 10**8),
    "max_calls": st.integers(100, 10**6)})
"""A session's or a branch's budget that a run's calls do not use up."""
RUNNABLE_BODIES: dict[str, Callable[[], st.SearchStrategy[dict[str, Any]]]] = {
    "POST /sessions": runnable_session, f"POST {CALLS_PATH}": runnable_call,
    "POST /snapshots/{snapshot_id}/restore": runnable_restore,
    "POST /budgets": generous_budget, "PUT /budgets/{budget_id}": generous_budget,
    "POST /pipelines": runnable_pipeline}
"""Operation -> a body it accepts, given what SEEDS holds."""


_coverage_cases = itertools.count()


def name_seeds_in_coverage(case: schemathesis.Case) -> None:
    """Every other case of the coverage phase (made without the generation hooks) that names a
    session, snapshot, budget or pipeline by a valid id gets a seeded one (a running pipeline
    for a DELETE): without it, every variation of such a route's body and query would be
    refused with 404 before it is read."""
    ids = {name: seeded for name, seeded in SEEDS.by_parameter(case.operation.method).items()
           if name in (case.path_parameters or {})}
    if not ids or case.meta is None or case.meta.phase.name != "coverage" or \
            not conforms(case, "path", case.path_parameters) or next(_coverage_cases) % 2:
        return
    for name, seeded in ids.items():
        if seeded:
            case.path_parameters[name] = seeded[-1]


def install_hooks(schema: Any) -> None:
    """Make `schema`'s generated requests name what SEEDS holds, about half of the time."""

    @schema.hook
    def flatmap_path_parameters(context: schemathesis.HookContext,
                                path_parameters: Any) -> st.SearchStrategy[Any]:
        if not conforms(context, "path", path_parameters):
            return st.just(path_parameters)
        real: dict[str, st.SearchStrategy[str]] = {}
        if "request_id" in path_parameters:
            real["request_id"] = recent(SEEDS.request_ids)
        for name, ids in SEEDS.by_parameter(context.operation.method).items():
            if name in path_parameters and ids:
                real[name] = recent(ids)
        if "cid" in path_parameters:
            real["cid"] = seeded_module().flatmap(
                lambda name: st.sampled_from(SEEDS.references(name)[:4]))
        if context.operation.method.upper() == "DELETE" and "cid" in path_parameters:
            # A named module cannot be deleted (409): a valid delete names the loose one.
            return st.sampled_from(SEEDS.loose).map(
                lambda cid: {**path_parameters, "cid": cid})
        if "name" in path_parameters:
            real["name"] = seeded_module()
        if "tag" in path_parameters:
            real["tag"] = st.sampled_from(["latest", "v1", "fuzz"])
        if not real:
            return st.just(path_parameters)
        return st.one_of(st.fixed_dictionaries(real).map(
            lambda found: {**path_parameters, **found}), st.just(path_parameters))

    @schema.hook
    def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        operation = context.operation
        if operation is None or not SEEDS.modules:
            return st.just(body)
        if operation.path == "/modules" and isinstance(body, str):  # WAT: any text is valid
            return st.one_of(st.just(body), st.sampled_from(list(SEED_MODULES.values())))
        if operation.label in RUNNABLE_BODIES:
            if not conforms(context, "body", body):
                return st.just(body)
            return st.one_of(RUNNABLE_BODIES[operation.label](), st.just(body))
        if operation.path not in (EXECUTE_PATH, "/names/{name}/{tag}") or \
                not conforms(context, "body", body):
            return st.just(body)
        if operation.path != EXECUTE_PATH:
            return st.one_of(st.just(body), seeded_module().map(
                lambda name: {**body, "cid": SEEDS.modules[name]}))
        some_reference = seeded_module().flatmap(
            lambda name: st.sampled_from(SEEDS.references(name)))
        runnable = seeded_module().flatmap(runnable_execute)
        # Hypothesis starts from, and shrinks towards, the first choice.
        return st.sampled_from([runnable, some_reference.map(lambda cid: {**body, "cid": cid}),
                                runnable, st.just(body)]).flatmap(lambda choice: choice)

    @schema.hook
    def flatmap_headers(context: schemathesis.HookContext,
                        headers: Any) -> st.SearchStrategy[Any]:
        operation = context.operation
        if operation is None or operation.path not in (EXECUTE_PATH, CALLS_PATH) or \
                not conforms(context, "header", headers):
            return st.just(headers)
        plain = {k: v for k, v in headers.items()
                 if k.lower() not in ("prefer", "idempotency-key")}
        return st.sampled_from([headers, plain, {**plain, "Prefer": "respond-async"}])


def mutated_binaries() -> st.SearchStrategy[bytes]:
    """Binary uploads: the seeds, the seeds truncated or with a byte changed, random bytes."""
    base = st.sampled_from(SEED_BINARIES)

    def truncate(data: bytes, at: int) -> bytes:
        return data[: at % (len(data) + 1)]

    def change(data: bytes, at: int, value: int) -> bytes:
        at %= len(data)
        return data[:at] + bytes([value]) + data[at + 1:]

    return st.one_of(
        base,
        st.builds(truncate, base, st.integers(0, 10_000)),
        st.builds(change, base, st.integers(0, 10_000), st.integers(0, 255)),
        st.binary(max_size=256),
        st.binary(max_size=64).map(lambda tail: b"\0asm\x01\0\0\0" + tail))


schemathesis.openapi.media_type("application/wasm", mutated_binaries())


CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    # Through the document's `apiKey` scheme (not a plain header): `ignored_auth` takes it away.
    "auth": {"openapi": {"apiKey": {"api_key": ALICE_KEY}}},
    "request-timeout": READ_TIMEOUT_S,
    "max-stream-events": 8,
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    # Credentials come from `auth` only: a generated bad token next to a good key would be
    # judged (by `ignored_auth`) as bad credentials accepted.
    "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES, "database": "none",
                   "with-security-parameters": False},
    "operations": [{"include-operation-id": "executeWasm",
                    "generation": {"max-examples": EXECUTE_EXAMPLES}},
                   {"include-operation-id": "createPipeline",
                    "generation": {"max-examples": PIPELINE_EXAMPLES}}],
})


# --- the suite's run: the app in schemathesis's event loop, an executor in its own ---


class CurrentApp:
    """The gateway of the running test. Schemathesis binds a schema's operations to one ASGI app
    when it collects them; every test points this one at its own gateway (own key prefix)."""

    def __init__(self) -> None:
        self.app: Starlette | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.app is not None, "no gateway: the test must use the fuzz_app fixture"
        await self.app(scope, receive, send)


CURRENT_APP = CurrentApp()
schema = schemathesis.openapi.from_dict(document(), config=CONFIG)
schema.app = CURRENT_APP
install_hooks(schema)
STATUSES: collections.Counter[tuple[str, int]] = collections.Counter()
"""(operation, status) of every response of the run, for the last test."""
FAILED: set[str] = set()
"""Operations whose fuzz test failed (so stopped early)."""


@pytest.fixture
def executor_thread(settings: Settings) -> Iterator[Executor]:
    """A real executor on its own thread and event loop (the fuzz test is synchronous)."""
    redis_url = settings.redis_url
    assert redis_url is not None
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        client = connection.connect(redis_url)
        worker = Executor(settings, client, name="fuzz-executor", read_block_ms=100)
        state.update(worker=worker, loop=asyncio.get_running_loop())
        ready.set()
        try:
            await worker.run()
        finally:
            await client.aclose()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="fuzz-executor", daemon=True)
    thread.start()
    assert ready.wait(10), "the executor did not start"
    if "error" in state:
        raise state["error"]
    worker: Executor = state["worker"]
    yield worker
    loop: asyncio.AbstractEventLoop = state["loop"]
    loop.call_soon_threadsafe(worker.cancel_running)
    loop.call_soon_threadsafe(worker.stop)
    thread.join(15)
    assert not thread.is_alive(), "the executor did not stop"
    assert "error" not in state, state.get("error")


@contextlib.contextmanager
def alices_client() -> Iterator[Any]:
    """A requests session with alice's key to the current gateway (its lifespan started once,
    by the first)."""
    with asgi.get_client(CURRENT_APP) as client:
        client.headers["X-API-Key"] = ALICE_KEY
        yield client


@pytest.fixture
def fuzz_app(settings: Settings, executor_thread: Executor,
             tmp_path: Path) -> Iterator[Starlette]:
    """The gateway, its lifespan run by schemathesis (shut down afterwards), seeded. Its
    caller, alice, is an administrator, so that environments can be made and deleted."""
    shutil.copy(ROOT / "relay" / "policies" / "default.cedar", tmp_path / "default.cedar")
    (tmp_path / "admin.cedar").write_text(ADMIN_ALICE)
    application = create_app(with_settings(settings, policy_dir=str(tmp_path)))
    CURRENT_APP.app = application
    try:
        with alices_client() as client:  # starts the gateway's lifespan
            seed(client)
        yield application
    finally:
        asgi.shutdown_lifespans()
        CURRENT_APP.app = None


@schema.parametrize()
@hypothesis.settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case: schemathesis.Case, fuzz_app: Starlette) -> None:
    name_seeds_in_coverage(case)
    timeout = CANCEL_TIMEOUT_S if case.operation.label == "DELETE /pipelines/{pipeline_id}" \
        else READ_TIMEOUT_S
    response = case.call(timeout=timeout)
    STATUSES[(case.operation.label, response.status_code)] += 1
    SEEDS.record(case, response)
    try:
        case.validate_response(response, checks=CHECKS, transport_kwargs={"timeout": timeout})
    except BaseException:
        FAILED.add(case.operation.label)
        raise
    if SEEDS.wanting():  # e.g. a fuzzed delete took the last seeded snapshot
        with alices_client() as client:
            keep_seeds(client)


# What `bench/fuzz.py` found that the bounded run above does not reach with its seed, replayed on
# every run: (method, path, the parts of the request).
FOUND: list[tuple[str, str, dict[str, Any]]] = [
    # `str.isdigit()` is true for superscript digits, which `int()` refuses.
    ("GET", "/modules", {"query": {"cursor": "\u00b3"}}),
    ("GET", "/modules", {"query": {"limit": "\u00b2"}}),
    # A ttl whose expiry Redis's scripts could only hold as a float: 500, and the session it
    # wrote made every later `GET /sessions` 500 too (now 400: at most 366 days).
    ("POST", "/sessions", {"body": {"cid": f"glyph://{SESSION_MODULE}",
                                    "ttl": 75100387956961898678714368}}),
]


@pytest.mark.parametrize(("method", "path", "parts"), FOUND,
                         ids=[f"{m} {p} {parts}" for m, p, parts in FOUND])
def test_what_the_bench_found(method: str, path: str, parts: dict[str, Any],
                              fuzz_app: Starlette) -> None:
    case = schema[path][method].Case(headers={"X-API-Key": ALICE_KEY}, **parts)
    response = case.call(timeout=READ_TIMEOUT_S)
    case.validate_response(response, checks=CHECKS, transport_kwargs={"timeout": READ_TIMEOUT_S})


# Need a running or paused execution (or session call) at that moment, which a short run does
# not reliably have: the seeds' executions and session calls are quick and over by then, and
# only a generated `step_gas` leaves one paused (steps, resumes and the session's pause,
# resume and step act on the session's current call: 409 without one).
MAY_NEVER_SUCCEED = {"DELETE /executions/{request_id}", "POST /executions/{request_id}/pause",
                     "POST /executions/{request_id}/resume", "POST /executions/{request_id}/step",
                     "POST /sessions/{session_id}/pause", "POST /sessions/{session_id}/resume",
                     "POST /sessions/{session_id}/step"}


def test_fuzzing_got_past_the_refusals() -> None:
    """The run above was not all 4xx: every operation (but those that need an execution to be
    running at that moment, or failed) answered 2xx at least once, and executes gave results."""
    if not STATUSES:
        pytest.skip("the fuzz test did not run in this session")
    labels = {f"{method.upper()} {path}" for path, item in document()["paths"].items()
              for method in item}
    ran = {label for label, _ in STATUSES}
    never_ok = sorted(label for label in (labels & ran) - MAY_NEVER_SUCCEED - FAILED
                      if not any(200 <= status < 300 for (op, status) in STATUSES if op == label))
    assert not never_ok, f"never answered 2xx: {never_ok}; statuses: {dict(STATUSES)}"
    if f"POST {EXECUTE_PATH}" in ran - FAILED:
        assert STATUSES[(f"POST {EXECUTE_PATH}", 200)] >= 3, dict(STATUSES)
