"""Typed results. Each keeps the whole JSON body in `raw`, so fields the gateway adds later
are reachable before the SDK names them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

TERMINAL_EVENTS = frozenset({"execution_complete", "execution_error"})
FINISHED = frozenset({"completed", "failed", "cancelled"})


def build(cls: type[T], data: dict[str, Any]) -> T:
    """An instance of the dataclass `cls` from a JSON object: the fields it names, the whole
    object in `raw`; unknown keys are kept in `raw` only."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in data.items() if k in names and k != "raw"}
    result: T = cls(**values, raw=data)  # type: ignore[call-arg]
    return result


@dataclass
class ExecutionError:
    """Why an execution did not succeed: `code` is one of `out_of_gas`, `timeout`,
    `memory_limit`, `stack_overflow`, `trap`, `exit_nonzero`, `cancelled`, `module_not_found`,
    `invalid_module`, `invalid_input`, `internal`; `frames` the trap's backtrace."""

    code: str
    message: str
    frames: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Execution:
    """An execution's result or state (`POST /intent/execute-wasm`, `GET /executions/{id}`).

    `status` is `queued`, `running`, `paused`, `completed`, `failed` or `cancelled`; `success`,
    `output`, `gas_used` (fuel), `duration` (ms) and `error` are set once it has finished.
    """

    request_id: str
    status: str = ""
    success: bool | None = None
    cid: str | None = None
    output: Any = None
    output_ref: dict[str, Any] | None = None
    gas_used: int | None = None
    duration: float | None = None
    executed_at: str | None = None
    error: ExecutionError | None = None
    cached: bool | None = None
    session_id: str | None = None
    state_cid: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Execution:
        data = dict(data)
        error = data.get("error")
        result = build(cls, {**data, "error": None})
        result.raw = data
        if isinstance(error, dict):
            result.error = ExecutionError(code=str(error.get("code", "")),
                                          message=str(error.get("message", "")),
                                          frames=list(error.get("frames") or []))
        if not result.status and result.success is not None:
            # The execute answer has no status: a finished run is completed or failed.
            cancelled = result.error is not None and result.error.code == "cancelled"
            result.status = ("completed" if result.success
                             else "cancelled" if cancelled else "failed")
        return result

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass
class Module:
    """A stored module (`POST /modules`, `GET /modules/{cid}`): its CIDv1, size in bytes,
    exports `[{"name", "params", "results"}]`, imports and whether it is a WASI module."""

    cid: str
    size: int = 0
    exports: list[dict[str, Any]] = field(default_factory=list)
    imports: list[dict[str, Any]] = field(default_factory=list)
    wasi: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Event:
    """One message of the event stream: `id` is its stream id (what `Last-Event-ID` resumes
    from), `type` such as `execution_progress`, `data` the whole JSON message."""

    id: str
    type: str
    data: dict[str, Any]

    @property
    def request_id(self) -> str | None:
        value = self.data.get("request_id")
        return value if isinstance(value, str) else None

    @property
    def terminal(self) -> bool:
        """True for an execution's last event (`execution_complete`, `execution_error`)."""
        return self.type in TERMINAL_EVENTS


@dataclass
class Page(Generic[T]):
    """One page of a list endpoint: `items`, and `next_cursor` (None on the last page): pass
    it as `cursor=` to get the next one."""

    items: list[T]
    next_cursor: str | None = None


@dataclass
class Session:
    """A stateful instance (`/sessions`): status `idle`, `running`, `paused`, `exhausted` or
    `closed`; `state_cid` the last committed state (None before the first call)."""

    session_id: str
    cid: str | None = None
    environment: str | None = None
    status: str = ""
    state_cid: str | None = None
    calls: int | None = None
    gas_used: int | None = None
    budget: dict[str, Any] | None = None
    created_at: str | None = None
    expires_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Snapshot:
    """A session's committed state kept under `snapshot_id`."""

    snapshot_id: str
    session_id: str | None = None
    cid: str | None = None
    state_cid: str | None = None
    size: int | None = None
    label: str | None = None
    created_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Budget:
    """Limits over a fixed window (ms) of a principal's executions."""

    budget_id: str
    principal: str | None = None
    window: int | None = None
    max_gas: int | None = None
    max_time: int | None = None
    max_executions: int | None = None
    created_by: str | None = None
    created_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BudgetUsage:
    """What a budget's current window has used and what remains."""

    window_start: str
    window_end: str
    gas_used: int = 0
    time_used: int = 0
    executions: int = 0
    reserved: dict[str, Any] = field(default_factory=dict)
    remaining: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Batch:
    """A batch: `results` (sync run: each item's execute answer or problem, in item order) or
    `items` and `status` (`GET /batches/{id}`)."""

    batch_id: str
    status: str | None = None
    total: int | None = None
    completed: int | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Pipeline:
    """A DAG of executions: status `running`, `completed`, `failed` or `cancelled`;
    `progress` counts nodes by status (and `percent`); `nodes` maps node ids to their state."""

    pipeline_id: str
    status: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    finished_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass
class Environment:
    """A named preset of caps and WASI capabilities executions run in."""

    name: str
    version: int = 0
    description: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    wasi: dict[str, Any] = field(default_factory=dict)
    max_output_bytes: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Delivery:
    """One attempt at delivering a webhook."""

    webhook_id: str
    url: str = ""
    attempt: int = 0
    status_code: int | None = None
    error: str | None = None
    at: str | None = None
    next_attempt_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
