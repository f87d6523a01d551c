"""Wire types shared by gateway and executor: HTTP bodies, bus entries and events.

Validation is decoding: request types forbid unknown fields and carry their constraints, so a
body that decodes is well-formed. Encoders and decoders are built once here.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

PositiveInt = Annotated[int, Meta(gt=0)]
Priority = Literal["high", "normal", "low"]
"""Which requests stream an execution waits on; executors take high before normal before low."""
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
"""Highest first."""


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every body a client sends: unknown fields are a 400, never ignored."""


class Policy(Request):
    max_memory: PositiveInt | None = None
    max_gas: PositiveInt | None = None
    max_time: PositiveInt | None = None
    max_stack: PositiveInt | None = None
    """Bytes of wasm stack; deeper recursion ends the run with `stack_overflow`."""


class ExecuteRequest(Request):
    cid: Annotated[str, Meta(min_length=1, max_length=512)]
    entrypoint: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    inputs: list[Any] = msgspec.field(default_factory=list)
    policy: Policy = msgspec.field(default_factory=Policy)
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    step_gas: PositiveInt | None = None
    """Pause in place once this much more gas is used (from the start, then from each step)."""
    memoize: bool = False
    """Answer with a stored result of the same computation when there is one (relay.memo)."""
    callback_url: Annotated[str, Meta(min_length=1, max_length=2048)] | None = None
    """POST the execution's events here (relay.webhooks), signed by the principal's secret."""
    callback_events: list[Annotated[str, Meta(min_length=1, max_length=64)]] | None = None
    environment: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    """The environment to run in (relay.environments); default RELAY_DEFAULT_ENVIRONMENT."""
    priority: Priority = "normal"
    """At most the principal's `max_priority` (principals.toml)."""


class NameBinding(Request):
    cid: Annotated[str, Meta(min_length=1, max_length=512)]


DEFAULT_MAX_STACK = 1048576
"""`RELAY_MAX_STACK`'s default: the wasm stack every execution had before `max_stack`."""


class EffectivePolicy(msgspec.Struct, kw_only=True):
    """The limits an execution runs under, after defaults and ceilings."""

    max_memory: int
    max_gas: int
    max_time: int
    max_stack: int = DEFAULT_MAX_STACK
    """Bytes of wasm stack. Entries written before it existed ran with the default."""


ErrorCode = Literal["out_of_gas", "timeout", "memory_limit", "stack_overflow", "trap",
                   "exit_nonzero", "cancelled", "module_not_found", "invalid_module", "internal",
                   "invalid_input"]
"""`invalid_input`: an input resolved at run time (a pipeline reference) does not fit the
export's signature; the execution never ran."""
ExecutionStatus = Literal["queued", "running", "paused", "completed", "failed", "cancelled"]


class StackFrame(msgspec.Struct):
    """One wasm function on the call stack of a trap."""

    func_index: int
    """In the module's function index space (imported functions first)."""
    func_name: str | None
    """From the module's name section; null without one."""
    module_offset: int | None
    """Byte offset, in the module as uploaded, of the instruction it was at; null when the
    runtime does not know it (a stack overflow caught on entering the function)."""


MAX_FRAMES = 32


class ErrorInfo(msgspec.Struct):
    code: ErrorCode
    message: str
    frames: list[StackFrame] | UnsetType = UNSET
    """Where the module was when it trapped, innermost first, at most MAX_FRAMES."""


class OutputRef(msgspec.Struct, kw_only=True):
    """An output too large to answer inline (over RELAY_INLINE_OUTPUT_BYTES): a blob stored by
    content (relay.blobs), read at `GET /executions/{id}/output`."""

    cid: str
    size: int
    content_type: str
    """`application/octet-stream` (a WASI command's stdout, as written) or `application/json`
    (a function's result)."""


class InputRef(msgspec.Struct, kw_only=True):
    """An input passed by reference: a pipeline node's `$ref` to a large output. The executor
    reads the blob into the run's stdin in place of `inputs[index]` (null on the bus)."""

    index: int
    cid: str
    size: int


class ExecuteResponse(msgspec.Struct, kw_only=True):
    success: bool
    request_id: str
    cid: str
    output: Any
    output_ref: OutputRef | UnsetType = UNSET
    """Set when `output` is null because it is stored as a blob."""
    gas_used: int
    duration: float
    executed_at: str
    error: ErrorInfo | None
    session_id: str | UnsetType = UNSET
    """A session call's: its session, and the state it committed (unchanged when it failed)."""
    state_cid: str | UnsetType | None = UNSET
    cached: bool | UnsetType = UNSET
    """A `memoize` request's: whether it was answered from a stored result (relay.memo)."""
    memo_of: str | UnsetType = UNSET
    """A memo hit's producing request_id (principal scope only)."""


class Links(msgspec.Struct, rename={"self_": "self"}):
    self_: str
    events: str


class Accepted(msgspec.Struct, kw_only=True):
    request_id: str
    status: Literal["queued"] = "queued"
    links: Links


class EnvironmentRef(msgspec.Struct, kw_only=True):
    """Which environment, at which version, an execution was accepted in."""

    name: str
    version: int


class ExecutionState(msgspec.Struct, kw_only=True):
    """`GET /executions/{id}`: the state, and every result field once it has finished."""

    request_id: str
    status: ExecutionStatus
    cid: str
    success: bool | UnsetType = UNSET
    output: Any = UNSET
    output_ref: OutputRef | UnsetType = UNSET
    gas_used: int | UnsetType = UNSET
    duration: float | UnsetType = UNSET
    executed_at: str | UnsetType = UNSET
    error: ErrorInfo | UnsetType | None = UNSET
    session_id: str | UnsetType = UNSET
    pipeline_id: str | UnsetType = UNSET
    state_cid: str | UnsetType | None = UNSET
    cached: bool | UnsetType = UNSET
    memo_of: str | UnsetType = UNSET
    environment: EnvironmentRef | UnsetType = UNSET
    priority: Priority = "normal"
    batch_id: str | UnsetType = UNSET


class ExecutionPage(msgspec.Struct, kw_only=True):
    """`GET /executions`."""

    items: list[ExecutionState]
    next_cursor: str | None


class FunctionSignature(msgspec.Struct, kw_only=True):
    name: str
    params: list[str]
    results: list[str]


class ImportInfo(msgspec.Struct, kw_only=True):
    module: str
    name: str
    kind: str


class ModuleInfo(msgspec.Struct, kw_only=True):
    cid: str
    size: int
    exports: list[FunctionSignature]
    imports: list[ImportInfo]
    wasi: bool


class ModulePage(msgspec.Struct, kw_only=True):
    modules: list[ModuleInfo]
    next_cursor: str | None


class NameTags(msgspec.Struct, kw_only=True):
    name: str
    tags: dict[str, str]


class NameBound(msgspec.Struct, kw_only=True):
    name: str
    tag: str
    cid: str


class HealthFeatures(msgspec.Struct, kw_only=True):
    idempotency: bool
    rate_limiting: bool
    authorization: bool
    sse_events: bool
    bus_events: bool


class HealthLimits(msgspec.Struct, kw_only=True):
    rate_limit: int
    rate_window: int
    idempotency_ttl: int


class Health(msgspec.Struct, kw_only=True):
    status: Literal["healthy", "degraded", "unhealthy"]
    features: HealthFeatures
    limits: HealthLimits
    executors: int
    policy_error: str | UnsetType = UNSET
    """Why a policy file was not loaded (the last good set is in force)."""
    loops_down: list[str] | UnsetType = UNSET
    """Background loops of this gateway that failed and wait to be restarted."""
    redis_memory_full: bool | UnsetType = UNSET
    """True while Redis is at (95 % or more of) its `maxmemory`: writes are refused (503)."""


class Index(msgspec.Struct, kw_only=True):
    """`GET /`: what this is, and where to go from here."""

    service: Literal["relay"] = "relay"
    version: str
    """The Relay release serving the request."""
    links: dict[str, str]


class Liveness(msgspec.Struct):
    status: Literal["ok"] = "ok"


class Readiness(msgspec.Struct):
    status: Literal["ready"] = "ready"
    redis: bool = True


# --- The bus: one tagged union, the `type` field first in every entry. ---


class BusMessage(msgspec.Struct, tag_field="type", kw_only=True):
    request_id: str
    timestamp: str
    session_id: str | UnsetType | None = UNSET
    """The session a call's events belong to (absent outside sessions)."""
    pipeline_id: str | UnsetType | None = UNSET
    """The pipeline a node's events belong to (absent outside pipelines)."""


class RunEnvironment(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The environment an execution was accepted in (relay.environments), as its executor needs
    it: carried in the request, so that no executor reads environments from Redis, and a run
    keeps the version it was accepted with whatever changes after."""

    name: str
    version: int
    wasi: bool = True
    """False: no WASI at all (a module importing any was refused at validation)."""
    env: dict[str, str] = {}
    args: list[str] = []
    """The whole argv the module sees (`args_get`), the first included."""
    clock: bool = True
    random: bool = True
    max_output_bytes: int | None = None
    """Lowers RELAY_MAX_OUTPUT_BYTES for this run (None: it stands)."""


class WasmExecRequested(BusMessage, tag="wasm_exec_requested", kw_only=True):
    cid: str
    entrypoint: str
    inputs: list[Any]
    policy: EffectivePolicy
    user_id: str
    session_id: str | None = None  # always on the bus (v1), null outside sessions
    pipeline_id: str | None = None
    """The pipeline a node's execution belongs to (relay.pipelines), null outside pipelines."""
    batch_id: str | UnsetType = UNSET
    """The batch an item's execution belongs to (relay.batches), absent outside batches."""
    step_gas: int | None = None
    """Set: the run pauses (reason `step`) once it has used this much gas, then again after
    each `step` that gives no gas of its own."""
    memoize: bool | UnsetType = UNSET
    """True: its response says `cached` (relay.memo); absent otherwise, as in v1."""
    environment: RunEnvironment | UnsetType = UNSET
    """The environment it runs in (absent only in entries queued before environments existed:
    they run as v1 did)."""
    input_refs: list[InputRef] | UnsetType = UNSET
    """Inputs the executor reads from blobs (a pipeline node's references to large outputs)."""
    priority: Priority | UnsetType = UNSET
    """Absent for `normal`, so a v1 request's entry is as it was; high and low entries wait on
    their own streams (relay.keys.Keys.requests_of)."""


class ExecutionQueued(BusMessage, tag="execution_queued", kw_only=True):
    cid: str
    # Last, so the accept script can append the position it computes (see `queued_template`).
    position: int = 0


class ExecutionStarted(BusMessage, tag="execution_started", kw_only=True):
    executor_node: str


class ExecutionProgress(BusMessage, tag="execution_progress", kw_only=True):
    progress: float
    """Gas used as a share of the gas budget, 0-100."""
    gas_used: int


class ExecutionOutput(BusMessage, tag="execution_output", kw_only=True):
    stream: Literal["stdout", "stderr"]
    data: str


PauseReason = Literal["request", "step"]


class ExecutionPaused(BusMessage, tag="execution_paused", kw_only=True):
    reason: PauseReason = "request"
    """`request`: asked for (pause); `step`: a step used its gas."""
    gas_used: int = 0
    """Gas used when it stopped, as seen at the pause (fuel is read where wasm code leaves it,
    at calls and returns)."""


class ExecutionResumed(BusMessage, tag="execution_resumed", kw_only=True):
    pass


class ExecutionComplete(BusMessage, tag="execution_complete", kw_only=True):
    success: bool = True
    duration: float
    gas_used: int
    output: Any
    output_ref: OutputRef | UnsetType = UNSET
    cached: bool | UnsetType = UNSET
    """As the execution's response says (a memoize request's)."""


class ExecutionError(BusMessage, tag="execution_error", kw_only=True):
    error: ErrorInfo


class WasmExecCompleted(WasmExecRequested, tag="wasm_exec_completed", kw_only=True):
    success: bool
    output: Any
    output_ref: OutputRef | UnsetType = UNSET
    error: ErrorInfo | None
    gas_used: int
    duration: float
    executed_at: str
    state_cid: str | UnsetType | None = UNSET
    """A session call's state after it (the one it committed, or the one it started from)."""
    cached: bool | UnsetType = UNSET
    memo_of: str | UnsetType = UNSET
    """As ExecuteResponse's (relay.memo)."""


Event = (
    WasmExecRequested
    | ExecutionQueued
    | ExecutionStarted
    | ExecutionProgress
    | ExecutionOutput
    | ExecutionPaused
    | ExecutionResumed
    | ExecutionComplete
    | ExecutionError
    | WasmExecCompleted
)
TERMINAL_TYPES = frozenset({"execution_complete", "execution_error"})


class EventsLost(msgspec.Struct, tag_field="type", tag="events_lost"):
    """First message of a stream resumed from an id older than what is retained."""

    oldest_id: str


class AccessToken(msgspec.Struct, kw_only=True):
    access_token: str
    expires_at: str


NonNegativeInt = Annotated[int, Meta(ge=0)]


class ResumeRequest(Request):
    additional_gas: NonNegativeInt = 0


class StepRequest(Request):
    """`POST /executions/{id}/step`: run this much more gas (default: the execution's
    `step_gas`)."""

    gas: PositiveInt | None = None


Action = Literal["pause", "resume", "cancel", "step"]


class WsCommand(Request):
    """A control message a client sends on `/ws/executions/{id}`."""

    action: Action
    additional_gas: NonNegativeInt = 0
    gas: PositiveInt | None = None
    """For `step`: as `StepRequest.gas`."""


class FieldError(msgspec.Struct):
    """Where in a request body a problem is (a JSON pointer), and what it is."""

    pointer: str
    detail: str


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem document, the body of every error response."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str | None = None
    errors: list[FieldError] | None = None
    retry_after: int | None = None


class ControlError(msgspec.Struct, tag_field="type", tag="control_error"):
    """The WebSocket's answer to a control message it refused, shaped like a problem."""

    status: int
    detail: str


class StoredKey(msgspec.Struct):
    """An API key made by `relay keys create`, as kept in Redis (never the key itself)."""

    principal: str
    id: str
    created_at: str


class TokenClaims(msgspec.Struct, forbid_unknown_fields=True):
    """The signed payload of an access token from `POST /auth/tokens`."""

    sub: str
    exp: int
    scope: str


class ControlMessage(msgspec.Struct, kw_only=True):
    """What the gateway publishes on `relay:control` for the executor running an execution."""

    request_id: str
    action: Action
    additional_gas: Annotated[int, Meta(ge=0)] = 0
    gas: Annotated[int, Meta(ge=1)] | None = None
    """For `step`: the gas to run before pausing again (the gateway fills in the default)."""


class ControlRefused(BusMessage, tag="control_refused", kw_only=True):
    """An executor's answer to a control request it refused (a pause beyond
    `RELAY_EXECUTOR_MAX_PAUSED`), for the gateway waiting on it: an entry of `relay:events`
    with an empty `user`, so no client stream carries it."""

    action: Action
    detail: str


class EventHead(msgspec.Struct):
    """The fields the gateway's fan-in needs to route an event, decoded cheaply."""

    type: str
    request_id: str = ""
    session_id: str | None = None
    pipeline_id: str | None = None
    batch_id: str | None = None


MAX_SESSION_TTL_MS = 366 * 86_400_000
"""A session's longest `ttl` (as a budget's longest window): a year idle."""


BUDGET_MAX_LIMIT = 10**15
"""Largest budget limit (a budget's, a session's): sums stay exact in the scripts' Lua numbers
(2^53), and the gateway's and executor's sums of time in floats."""
BudgetLimit = Annotated[int, Meta(gt=0, le=BUDGET_MAX_LIMIT)]


class SessionBudget(Request):
    """A session's totals over all its calls; an omitted one is unlimited. Bounded as a
    budget's limits are: the gateway and executor count time used in floats."""

    max_gas: BudgetLimit | None = None
    max_time: BudgetLimit | None = None
    max_calls: BudgetLimit | None = None


class CreateSession(Request):
    cid: Annotated[str, Meta(min_length=1, max_length=512)]
    environment: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    budget: SessionBudget = msgspec.field(default_factory=SessionBudget)
    ttl: Annotated[int, Meta(gt=0, le=MAX_SESSION_TTL_MS)] | None = None
    """Idle milliseconds before it expires. Bounded, so that its expiry is a time (Redis's
    scripts count in doubles, and `expires_at` has a four-digit year)."""


class SessionCall(Request):
    entrypoint: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    inputs: list[Any] = msgspec.field(default_factory=list)
    policy: Policy = msgspec.field(default_factory=Policy)
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    step_gas: PositiveInt | None = None
    callback_url: Annotated[str, Meta(min_length=1, max_length=2048)] | None = None
    callback_events: list[Annotated[str, Meta(min_length=1, max_length=64)]] | None = None
    priority: Priority = "normal"


class PatchSession(Request):
    budget: SessionBudget


class SessionLinks(msgspec.Struct, rename={"self_": "self"}):
    self_: str
    calls: str
    events: str


SessionStatus = Literal["idle", "running", "paused", "exhausted", "closed"]


class SessionView(msgspec.Struct, kw_only=True):
    """A session as `GET /sessions/{id}` shows it."""

    session_id: str
    cid: str
    environment: str | None
    status: SessionStatus
    calls: int
    gas_used: int
    time_used: float
    budget: SessionBudget
    state_cid: str | None
    state_size: int
    current: str | None
    last_result: ExecuteResponse | None
    created_at: str
    expires_at: str
    links: SessionLinks


class SessionPage(msgspec.Struct, kw_only=True):
    items: list[SessionView]
    next_cursor: str | None


MAX_BRANCHES = 64


class CreateSnapshot(Request):
    """`POST /sessions/{id}/snapshots` (an empty body is `{}`)."""

    label: Annotated[str, Meta(max_length=256)] | None = None


class RestoreSnapshot(Request):
    """`POST /snapshots/{id}/restore` (an empty body is `{}`)."""

    branch_count: Annotated[int, Meta(ge=1, le=MAX_BRANCHES)] = 1
    budget: SessionBudget = msgspec.field(default_factory=SessionBudget)
    """Each branch's own totals (what the original used does not count)."""


class Snapshot(msgspec.Struct, kw_only=True):
    """A session's committed state, kept until deleted; `state_cid` null is the module's fresh
    state (a session never called)."""

    snapshot_id: str
    session_id: str
    cid: str
    state_cid: str | None
    size: int
    label: str | None
    created_at: str


class SnapshotPage(msgspec.Struct, kw_only=True):
    """`GET /snapshots`: the caller's snapshots, newest first."""

    items: list[Snapshot]
    next_cursor: str | None


class Branches(msgspec.Struct, kw_only=True):
    """`POST /snapshots/{id}/restore`: the new sessions, each from the snapshot's state."""

    items: list[SessionView]


class BudgetRequest(Request):
    """`POST /budgets` and `PUT /budgets/{id}`: limits per window; an omitted one is unlimited
    (a budget with none only meters)."""

    principal: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    """Whose executions it counts (default: the caller's; another's needs `admin`)."""
    window: Annotated[int, Meta(ge=1000, le=366 * 86_400_000)] = 86_400_000
    """Milliseconds; windows are back to back from `created_at`."""
    max_gas: BudgetLimit | None = None
    max_time: BudgetLimit | None = None
    """Milliseconds of execution, summed."""
    max_executions: BudgetLimit | None = None


class Budget(msgspec.Struct, kw_only=True):
    budget_id: str
    principal: str
    window: int
    max_gas: int | None
    max_time: int | None
    max_executions: int | None
    created_by: str
    created_at: str


class BudgetPage(msgspec.Struct, kw_only=True):
    """`GET /budgets`: the caller's budgets and those it set for others, newest first."""

    items: list[Budget]
    next_cursor: str | None


class BudgetReserved(msgspec.Struct, kw_only=True):
    """What running executions hold until they end (then it becomes what they used)."""

    gas: int
    time: int


class BudgetRemaining(msgspec.Struct, kw_only=True):
    """What the window still allows (null: no such limit)."""

    gas: int | None
    time: int | None
    executions: int | None


class BudgetUsage(msgspec.Struct, kw_only=True):
    """`GET /budgets/{id}/usage`: the current window's use. `executions` counts the running
    ones; `gas_used` and `time_used` count finished ones (duration rounded up to ms)."""

    window_start: str
    window_end: str
    gas_used: int
    time_used: int
    executions: int
    reserved: BudgetReserved
    remaining: BudgetRemaining


MAX_PIPELINE_CONCURRENCY = 64
MAX_NODE_RETRIES = 10
NodeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
RetryCode = Literal["out_of_gas", "timeout", "memory_limit", "stack_overflow", "trap",
                    "exit_nonzero"]
"""The error codes a node may ask to be retried on (`internal` always is)."""
NodeStatus = Literal["pending", "queued", "running", "retrying", "completed", "failed",
                     "skipped", "cancelled"]
PipelineStatus = Literal["running", "completed", "failed", "cancelled"]


class PipelineNode(Request):
    """One node of `POST /pipelines`: an execute request whose inputs may be references to
    other nodes' outputs (`{"$ref": id, "pointer"?}`) or literals (`{"$literal": value}`)."""

    id: NodeId
    cid: Annotated[str, Meta(min_length=1, max_length=512)]
    entrypoint: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    inputs: list[Any] = msgspec.field(default_factory=list)
    policy: Policy = msgspec.field(default_factory=Policy)
    environment: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    retries: Annotated[int, Meta(ge=0, le=MAX_NODE_RETRIES)] = 0
    retry_on: list[RetryCode] = msgspec.field(default_factory=list)
    memoize: bool = True
    priority: Priority = "normal"


class CreatePipeline(Request):
    nodes: Annotated[list[PipelineNode], Meta(min_length=1)]
    max_concurrency: Annotated[int, Meta(ge=1, le=MAX_PIPELINE_CONCURRENCY)] = 8
    fail_fast: bool = False
    callback_url: Annotated[str, Meta(min_length=1, max_length=2048)] | None = None
    callback_events: list[Annotated[str, Meta(min_length=1, max_length=64)]] | None = None
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class PipelineAccepted(msgspec.Struct, kw_only=True):
    pipeline_id: str
    status: Literal["running"] = "running"
    links: Links


class PipelineNodeState(msgspec.Struct, kw_only=True):
    status: NodeStatus
    request_id: str | None
    """The execution of its latest attempt (null before its first)."""
    attempts: int
    needs: list[str]
    """The nodes whose outputs it takes (its `$ref`s), in declaration order: the graph's edges."""
    output: Any = UNSET
    output_ref: Any = UNSET
    """A large output's blob (`{cid, size, content_type}`), as an execution's `output_ref`."""
    error: ErrorInfo | UnsetType | None = UNSET
    cached: bool | UnsetType = UNSET


class PipelineProgressCounts(msgspec.Struct, kw_only=True):
    total: int
    pending: int
    queued: int
    running: int
    retrying: int
    completed: int
    failed: int
    skipped: int
    cancelled: int
    percent: float
    """Nodes that have ended (completed, failed, skipped or cancelled), as a share of all."""


class PipelineView(msgspec.Struct, kw_only=True):
    """`GET /pipelines/{id}`."""

    pipeline_id: str
    status: PipelineStatus
    progress: PipelineProgressCounts
    nodes: dict[str, PipelineNodeState]
    max_concurrency: int
    fail_fast: bool
    created_at: str
    finished_at: str | None


class PipelineSummary(msgspec.Struct, kw_only=True):
    """An item of `GET /pipelines` (without its nodes: `GET /pipelines/{id}` has them)."""

    pipeline_id: str
    status: PipelineStatus
    progress: PipelineProgressCounts
    created_at: str
    finished_at: str | None


class PipelinePage(msgspec.Struct, kw_only=True):
    items: list[PipelineSummary]
    next_cursor: str | None


class PipelineProgress(msgspec.Struct, tag_field="type", tag="pipeline_progress", kw_only=True):
    """A node's change of status (written by the pipeline scripts, relay/lua/pipeline_*)."""

    pipeline_id: str
    node: str
    node_status: NodeStatus
    progress: float
    """The pipeline's `percent`, after this change."""
    timestamp: str


class PipelineComplete(msgspec.Struct, tag_field="type", tag="pipeline_complete", kw_only=True):
    """A pipeline's one terminal event."""

    pipeline_id: str
    status: PipelineStatus
    timestamp: str


MAX_ENV_ENTRIES = 128
"""Most `env` variables, and most `args`, an environment may have."""
MAX_ENV_TEXT = 4096
"""Longest value of an `env` variable, or argument (characters)."""
EnvKey = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
EnvText = Annotated[str, Meta(max_length=MAX_ENV_TEXT)]
"""(Without NUL, which relay.environments checks: WASI passes them as C strings.)"""


class EnvironmentLimits(Request):
    """An environment's caps, each lowering its global ceiling (RELAY_MAX_*) and the default of
    an execution that asks for none; an omitted one is the global ceiling."""

    max_gas: PositiveInt | None = None
    max_memory: PositiveInt | None = None
    max_time: PositiveInt | None = None
    max_stack: PositiveInt | None = None


class EnvironmentWasi(Request):
    enabled: bool = True
    env: Annotated[dict[EnvKey, EnvText], Meta(max_length=MAX_ENV_ENTRIES)] = {}
    args: Annotated[list[EnvText], Meta(max_length=MAX_ENV_ENTRIES)] = []
    clock: bool = True
    """Offer `clock_time_get`, `clock_res_get` and `poll_oneoff` (sleeps)."""
    random: bool = True
    """Offer `random_get`."""


class EnvironmentRequest(Request):
    """`PUT /environments/{name}`: the whole environment (what is omitted takes its default).
    `name` and `version` may be sent back as `GET` shows them: the name must be the path's,
    and a version must be the current one (else 409: someone changed it meanwhile)."""

    name: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    version: PositiveInt | None = None
    description: Annotated[str, Meta(max_length=1024)] = ""
    policy: EnvironmentLimits = msgspec.field(default_factory=EnvironmentLimits)
    wasi: EnvironmentWasi = msgspec.field(default_factory=EnvironmentWasi)
    max_output_bytes: PositiveInt | None = None
    """Lowers RELAY_MAX_OUTPUT_BYTES (omitted: that ceiling)."""


class EnvironmentPolicy(msgspec.Struct, kw_only=True):
    max_gas: int
    max_memory: int
    max_time: int
    max_stack: int


class Environment(msgspec.Struct, kw_only=True):
    """An environment as `GET /environments/{name}` shows it: omitted caps filled in with the
    global ceilings in force."""

    name: str
    version: int
    description: str
    policy: EnvironmentPolicy
    wasi: EnvironmentWasi
    max_output_bytes: int


class EnvironmentPage(msgspec.Struct, kw_only=True):
    items: list[Environment]
    next_cursor: str | None


encode = msgspec.json.Encoder().encode
decode_environment_request = msgspec.json.Decoder(EnvironmentRequest).decode
decode_create_pipeline = msgspec.json.Decoder(CreatePipeline).decode
decode_budget_request = msgspec.json.Decoder(BudgetRequest).decode
decode_execute_request = msgspec.json.Decoder(ExecuteRequest).decode
decode_create_session = msgspec.json.Decoder(CreateSession).decode
decode_session_call = msgspec.json.Decoder(SessionCall).decode
decode_patch_session = msgspec.json.Decoder(PatchSession).decode
decode_create_snapshot = msgspec.json.Decoder(CreateSnapshot).decode
decode_restore_snapshot = msgspec.json.Decoder(RestoreSnapshot).decode
decode_name_binding = msgspec.json.Decoder(NameBinding).decode
decode_requested = msgspec.json.Decoder(WasmExecRequested).decode
decode_completed = msgspec.json.Decoder(WasmExecCompleted).decode
decode_event = msgspec.json.Decoder(Event).decode
decode_head = msgspec.json.Decoder(EventHead).decode
decode_module_info = msgspec.json.Decoder(ModuleInfo).decode
decode_response = msgspec.json.Decoder(ExecuteResponse).decode
decode_resume = msgspec.json.Decoder(ResumeRequest).decode
decode_step = msgspec.json.Decoder(StepRequest).decode
decode_paused = msgspec.json.Decoder(ExecutionPaused).decode
decode_control = msgspec.json.Decoder(ControlMessage).decode
decode_control_refused = msgspec.json.Decoder(ControlRefused).decode
decode_ws_command = msgspec.json.Decoder(WsCommand).decode
decode_stored_key = msgspec.json.Decoder(StoredKey).decode
decode_token_claims = msgspec.json.Decoder(TokenClaims).decode


def queued_template(request_id: str, cid: str, timestamp: str,
                    session_id: str | None = None, pipeline_id: str | None = None) -> bytes:
    """`execution_queued` JSON without its position value and closing brace.

    The position is only known inside the accept script, which appends `<n>}`.
    """
    body = encode(ExecutionQueued(request_id=request_id, cid=cid, timestamp=timestamp,
                                  session_id=session_id or UNSET,
                                  pipeline_id=pipeline_id or UNSET))
    assert body.endswith(b'"position":0}')
    return body[:-2]


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /intent/execute-wasm/batch`: each item an execute request body, checked on its
    own (relay.pipeline.validate)."""

    items: list[msgspec.Raw]
    callback_url: str | None = None
    callback_events: list[str] | None = None


class BatchLinks(msgspec.Struct, rename={"self_": "self"}):
    self_: str


class BatchAccepted(msgspec.Struct, kw_only=True):
    """`POST /intent/execute-wasm/batch` with `Prefer: respond-async`: 202."""

    batch_id: str
    links: BatchLinks


class BatchResults(msgspec.Struct, kw_only=True):
    """`POST /intent/execute-wasm/batch`: 200, each item's answer in item order."""

    batch_id: str
    results: list[Any]
    """Each item's execute answer (an ExecuteResponse, or an Accepted body for one still
    running after the sync wait), or the Problem it was refused with (with its `status`)."""


class BatchItemState(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str | None
    """Null for an item refused (its `problem` says why)."""
    status: str
    """The execution's status, or `refused`, or `expired` (it ended unseen and its record
    is gone)."""
    problem: dict[str, Any] | None = None


class BatchView(msgspec.Struct, kw_only=True):
    """`GET /batches/{id}`."""

    batch_id: str
    status: Literal["running", "completed"]
    total: int
    completed: int
    """Items that have ended, refused ones included."""
    items: list[BatchItemState]
    created_at: str
    finished_at: str | None


def response_from_completed(event: WasmExecCompleted) -> ExecuteResponse:
    """The execute response for a finished run; executor and gateway both build it from here,
    so the stored body and the one sent live are byte-identical."""
    return ExecuteResponse(
        success=event.success,
        request_id=event.request_id,
        cid=event.cid,
        output=event.output,
        output_ref=event.output_ref,
        gas_used=event.gas_used,
        duration=event.duration,
        executed_at=event.executed_at,
        error=event.error,
        session_id=UNSET if event.session_id is None else event.session_id,
        state_cid=event.state_cid,
        cached=event.cached,
        memo_of=event.memo_of,
    )


_second: tuple[int, str] = (0, "1970-01-01T00:00:00")
"""The last second `rfc3339` formatted: a run's events are stamped within the same one."""


def rfc3339(unix_s: float, *, millis: bool = True) -> str:
    """A Unix time as RFC 3339 UTC, the one time format of every body, event and log line:
    `2024-01-15T10:30:00.123Z` (or `...:00Z` without `millis`)."""
    global _second
    second, whole = _second
    if math.floor(unix_s) != second:
        second = math.floor(unix_s)
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, whole)
    return f"{whole}.{int(unix_s * 1000) % 1000:03d}Z" if millis else whole + "Z"


def now_iso() -> str:
    """The current time, as `rfc3339` writes it."""
    return rfc3339(time.time())
