"""The blocking client, `Relay`: generated from _async_client.py by scripts/unasync.py.
Do not edit; edit that file and run the script."""

from __future__ import annotations

import builtins
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from . import _core
from ._core import Config, drop_none, list_params
from ._errors import RelayError
from ._models import (
    Batch,
    Budget,
    BudgetUsage,
    Delivery,
    Environment,
    Event,
    Execution,
    Module,
    Page,
    Pipeline,
    Session,
    Snapshot,
    build,
)

# Each retry and reconnection is logged here (INFO), with the reason and the wait.
log = logging.getLogger("relay_client")


class Relay:
    """A client of one Relay gateway, that blocks.

    `url` and `api_key` default to `RELAY_URL` and `RELAY_API_KEY` (then
    `http://127.0.0.1:8000`, `relay dev`'s address). `timeout` is seconds per request (a sync
    execute waits up to the gateway's `RELAY_SYNC_WAIT`, 30 s by default, before it turns into
    waiting on the execution). `retries` is how many times a request is sent again after a
    connection error, a 503 or a 429 `rate-limited` (waiting its `Retry-After` when at most
    60 s). Every other refusal raises `RelayError` at once.

    Use it as `with Relay() as relay:` or call `close()`.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = _core.DEFAULT_TIMEOUT_S, retries: int = 3) -> None:
        self.config = Config.resolve(url, api_key, timeout, retries)
        self._http = httpx.Client(**self.config.client_options())
        self.modules = Modules(self)
        self.names = Names(self)
        self.executions = Executions(self)
        self.sessions = Sessions(self)
        self.snapshots = Snapshots(self)
        self.budgets = Budgets(self)
        self.batches = Batches(self)
        self.pipelines = Pipelines(self)
        self.environments = Environments(self)
        self.webhooks = Webhooks(self)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the client's connections."""
        self._http.close()

    def request(self, method: str, path: str, *, safe: bool = False,
                      **options: Any) -> httpx.Response:
        """Send one request with the client's retries; raise `RelayError` for any error answer.

        `safe` says repeating the request cannot do anything twice (it carries an idempotency
        key, or its method is idempotent), so it may be sent again even after a connection
        broke once it had been sent. `options` go to httpx (`json`, `params`, `headers`, ...).
        """
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **options)
            except httpx.TransportError as exc:
                if (attempt >= self.config.retries
                        or not _core.retriable_transport_error(exc, method, safe)):
                    raise RelayError.from_transport(exc) from exc
                delay, reason = _core.backoff_s(attempt), f"{type(exc).__name__}: {exc}"
            else:
                if not response.is_error:
                    return response
                retry_in = _core.retry_delay_s(response, attempt)
                if retry_in is None or attempt >= self.config.retries:
                    raise RelayError.from_response(response)
                delay, reason = retry_in, f"answered {response.status_code}"
            attempt += 1
            log.info("retrying %s %s in %.2f s (%s)", method, path, delay, reason)
            time.sleep(delay)

    def execute(self, ref: str, inputs: Sequence[Any] | None = None, *,
                      entrypoint: str | None = None, max_gas: int | None = None,
                      max_memory: int | None = None, max_time: int | None = None,
                      max_stack: int | None = None, idempotency_key: str | None = None,
                      **fields: Any) -> Execution:
        """Run `entrypoint` of module `ref` (a CID or `glyph://NAME@TAG`) with `inputs` and
        return its result once finished (`success`, `output`, `gas_used`, `duration` in ms,
        `error`). Limits: `max_gas` (fuel), `max_memory` (bytes), `max_time` (ms), `max_stack`
        (bytes). Other request fields (`environment`, `priority`, `memoize`, `step_gas`,
        `callback_url`, ...) go in `fields`. A module that traps is a result with
        `success=False`; a refused request raises `RelayError`.

        Without `idempotency_key` one is generated, so retries never run the module twice (and
        two calls are two executions)."""
        body = _core.execute_body(ref, list(inputs or []), entrypoint=entrypoint,
                                  max_gas=max_gas, max_memory=max_memory, max_time=max_time,
                                  max_stack=max_stack, idempotency_key=idempotency_key,
                                  extra=fields)
        response = self.request("POST", "/intent/execute-wasm", safe=True, json=body)
        if response.status_code == 202:  # not finished within the gateway's sync wait
            return self.handle(response.json()["request_id"]).wait()
        return Execution.from_json(response.json())

    def submit(self, ref: str, inputs: Sequence[Any] | None = None, *,
                     entrypoint: str | None = None, max_gas: int | None = None,
                     max_memory: int | None = None, max_time: int | None = None,
                     max_stack: int | None = None, idempotency_key: str | None = None,
                     **fields: Any) -> ExecutionHandle:
        """Queue an execution (the arguments of `execute`) and return at once a handle to
        follow and control it: `wait()`, `events()`, `pause()`, `resume()`, `step()`,
        `cancel()`."""
        body = _core.execute_body(ref, list(inputs or []), entrypoint=entrypoint,
                                  max_gas=max_gas, max_memory=max_memory, max_time=max_time,
                                  max_stack=max_stack, idempotency_key=idempotency_key,
                                  extra=fields)
        response = self.request("POST", "/intent/execute-wasm", safe=True, json=body,
                                      headers={"Prefer": "respond-async"})
        return self.handle(response.json()["request_id"])

    def handle(self, request_id: str) -> ExecutionHandle:
        """A handle on an execution already accepted (by its `request_id`)."""
        return ExecutionHandle(self, request_id)

    def events(self, *, request_id: str | Sequence[str] | None = None,
                     session_id: str | None = None, pipeline_id: str | None = None,
                     last_event_id: str | None = None) -> Iterator[Event]:
        """The caller's events as they come (`GET /intent/execute-wasm/events`), narrowed to
        executions, a session or a pipeline when asked; `last_event_id` starts after that event
        (`"0"`: every event still retained).

        The stream never ends by itself: when the connection drops (or the gateway restarts),
        the iterator reconnects with `Last-Event-ID` and goes on with no event missed or
        repeated. After 60 s without a connection it raises `RelayError`. An `events_lost`
        event says that events after `last_event_id` had already been trimmed.
        Close it (`close()`, or `contextlib.closing`) when you stop early: it holds one of
        the principal's open streams until then."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id or [])
        params = drop_none({"request_id": ids or None, "session_id": session_id,
                            "pipeline_id": pipeline_id})
        last = last_event_id
        failures = 0
        down_since: float | None = None
        while True:
            headers = {"Last-Event-ID": last} if last is not None else {}
            error: RelayError
            try:
                with self._http.stream("GET", _core.EVENTS_PATH, params=params,
                                             headers=headers,
                                             timeout=self.config.stream_timeout()) as response:
                    if response.is_error:
                        response.read()
                        error = RelayError.from_response(response)
                        delay = _core.retry_delay_s(response, failures)
                        if delay is None:
                            raise error
                    else:
                        failures, down_since = 0, None
                        decoder = _core.SseDecoder()
                        for line in response.iter_lines():
                            event = decoder.feed(line)
                            if event is not None:
                                if event.id:
                                    last = event.id
                                yield event
                        # The gateway ended the stream (shutting down, token expiry): resume.
                        error = RelayError.from_transport(ConnectionError("stream ended"))
                        delay = 0.0
            except httpx.TransportError as exc:
                error = RelayError.from_transport(exc)
                delay = _core.backoff_s(failures)
            failures += 1
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > _core.RECONNECT_WINDOW_S:
                raise error
            log.info("reconnecting the event stream after %s in %.2f s (%s)", last, delay,
                     error.detail or error.title)
            time.sleep(delay)


class ExecutionHandle:
    """One execution, by its `request_id`: follow it, wait for it, control it."""

    def __init__(self, relay: Relay, request_id: str) -> None:
        self.relay = relay
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.request_id!r})"

    def get(self) -> Execution:
        """Its state now (`GET /executions/{id}`)."""
        return self.relay.executions.get(self.request_id)

    def events(self) -> Iterator[Event]:
        """Its events from the first (`execution_queued`) to its terminal one
        (`execution_complete` or `execution_error`), live, resuming over dropped connections.
        Ends early at `events_lost` (its earlier events were trimmed; `get()` tells its
        state). The gateway finds its first event by replaying the events it retains
        (`RELAY_EVENTS_RETENTION`), so use `wait()` when only the result matters."""
        for event in self.relay.events(request_id=self.request_id, last_event_id="0"):
            yield event
            if event.terminal or event.type == "events_lost":
                return

    def wait(self, timeout_s: float | None = None) -> Execution:
        """Its result, once it has finished (completed, failed or cancelled); `TimeoutError`
        when it has not within `timeout_s` seconds (it goes on running: `cancel()` stops it).

        It asks `GET /executions/{id}`, at growing intervals up to half a second, rather than
        following its events: one small read each time, where a stream that must find the
        execution's first event would have the gateway replay all the events it retains."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        state = self.get()
        attempt = 0
        while not state.finished:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"execution {self.request_id} is still {state.status}")
            time.sleep(_core.poll_interval_s(attempt))
            attempt += 1
            state = self.get()
        return state

    def pause(self) -> None:
        """Suspend it in place (409 `RelayError` when it is not running)."""
        self.relay.executions.pause(self.request_id)

    def resume(self, additional_gas: int | None = None) -> None:
        """Continue it, with `additional_gas` more fuel when given (409 when not paused)."""
        self.relay.executions.resume(self.request_id, additional_gas)

    def step(self, gas: int | None = None) -> Execution:
        """Let it run `gas` more fuel (default: its `step_gas`) and return its state when it
        stopped: `paused` again, or finished."""
        return self.relay.executions.step(self.request_id, gas)

    def cancel(self) -> None:
        """Cancel it (409 when it has already finished)."""
        self.relay.executions.cancel(self.request_id)


class _Resource:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay


class Modules(_Resource):
    """Stored modules (`/modules`)."""

    def push(self, source: bytes | str | os.PathLike[str], *, name: str | None = None,
                   tag: str | None = None) -> Module:
        """Upload a module: `source` is its bytes (binary wasm or WAT text) or a file path.
        With `name` (and `tag`, default `latest`), binds `glyph://name@tag` to it."""
        data, content_type = _core.module_content(source)
        response = self.relay.request(
            "POST", "/modules", safe=True, content=data,
            params=drop_none({"name": name, "tag": tag}),
            headers={"Content-Type": content_type})
        return build(Module, response.json())

    def get(self, cid: str) -> Module:
        """A stored module's description: exports, imports, size."""
        return build(Module, (self.relay.request("GET", f"/modules/{cid}")).json())

    def list(self, *, limit: int | None = None,
                   cursor: str | None = None) -> Page[Module]:
        """One page of the modules the caller may run, newest first."""
        body = (self.relay.request("GET", "/modules",
                                         params=list_params(limit, cursor))).json()
        return Page([build(Module, item) for item in body["modules"]], body.get("next_cursor"))

    def wasm(self, cid: str) -> bytes:
        """The module's binary."""
        return (self.relay.request("GET", f"/modules/{cid}/wasm")).content

    def delete(self, cid: str) -> None:
        """Delete a module (409 while a name, session or snapshot uses it)."""
        self.relay.request("DELETE", f"/modules/{cid}")


class Names(_Resource):
    """Glyph names (`glyph://NAME@TAG`)."""

    def set(self, name: str, tag: str, cid: str) -> dict[str, Any]:
        """Bind (or move) `name@tag` to the module `cid`."""
        response = self.relay.request("PUT", f"/names/{name}/{tag}", json={"cid": cid})
        result: dict[str, Any] = response.json()
        return result

    def get(self, name: str) -> dict[str, str]:
        """The tags of `name`, each with the CID it names."""
        body = (self.relay.request("GET", f"/names/{name}")).json()
        tags: dict[str, str] = body.get("tags", {})
        return tags


class Executions(_Resource):
    """Executions by `request_id` (`/executions`)."""

    def get(self, request_id: str) -> Execution:
        """An execution's status, and its result once finished."""
        response = self.relay.request("GET", f"/executions/{request_id}")
        return Execution.from_json(response.json())

    def list(self, *, status: str | None = None, session_id: str | None = None,
                   pipeline_id: str | None = None, batch_id: str | None = None,
                   limit: int | None = None, cursor: str | None = None) -> Page[Execution]:
        """One page of the caller's executions, newest first, filtered when asked."""
        params = list_params(limit, cursor, status=status, session_id=session_id,
                             pipeline_id=pipeline_id, batch_id=batch_id)
        body = (self.relay.request("GET", "/executions", params=params)).json()
        return Page([Execution.from_json(item) for item in body["items"]],
                    body.get("next_cursor"))

    def output(self, request_id: str) -> bytes:
        """A completed execution's output as stored: a large output's blob, else its JSON."""
        return (self.relay.request("GET", f"/executions/{request_id}/output")).content

    def deliveries(self, request_id: str, *, limit: int | None = None,
                         cursor: str | None = None) -> Page[Delivery]:
        """Every webhook delivery attempt for the execution."""
        body = (self.relay.request("GET", f"/executions/{request_id}/deliveries",
                                         params=list_params(limit, cursor))).json()
        return Page([build(Delivery, item) for item in body["items"]], body.get("next_cursor"))

    def cancel(self, request_id: str) -> None:
        """Cancel a queued, running or paused execution (409 once finished)."""
        self.relay.request("DELETE", f"/executions/{request_id}")

    def pause(self, request_id: str) -> None:
        """Suspend a running execution in place (409 when not running)."""
        self.relay.request("POST", f"/executions/{request_id}/pause")

    def resume(self, request_id: str, additional_gas: int | None = None) -> None:
        """Continue a paused execution, raising its gas budget by `additional_gas`."""
        body = drop_none({"additional_gas": additional_gas})
        self.relay.request("POST", f"/executions/{request_id}/resume", json=body)

    def step(self, request_id: str, gas: int | None = None) -> Execution:
        """Let a paused execution use `gas` more fuel; its state once it stopped."""
        response = self.relay.request("POST", f"/executions/{request_id}/step",
                                            json=drop_none({"gas": gas}))
        return Execution.from_json(response.json())


class Sessions(_Resource):
    """Stateful instances of a module (`/sessions`): each call starts from the state the last
    successful one committed."""

    def create(self, cid: str, *, environment: str | None = None,
                     budget: dict[str, int] | None = None, ttl: int | None = None) -> Session:
        """Open a session on module `cid`; `budget` `{"max_gas", "max_time", "max_calls"}`
        totals over its calls, `ttl` ms of idleness before it expires."""
        body = drop_none({"cid": cid, "environment": environment, "budget": budget, "ttl": ttl})
        return build(Session, (self.relay.request("POST", "/sessions", json=body)).json())

    def call(self, session_id: str, entrypoint: str, inputs: Sequence[Any] | None = None,
                   *, max_gas: int | None = None, max_memory: int | None = None,
                   max_time: int | None = None, max_stack: int | None = None,
                   idempotency_key: str | None = None, **fields: Any) -> Execution:
        """Call `entrypoint` in the session and return its result (with `state_cid`) once its
        state is committed. Without `idempotency_key` one is generated so that a retry is
        never a second call."""
        policy = drop_none({"max_gas": max_gas, "max_memory": max_memory, "max_time": max_time,
                            "max_stack": max_stack})
        body = drop_none({"entrypoint": entrypoint, "inputs": list(inputs or []),
                          "policy": policy or None,
                          "idempotency_key": idempotency_key or _core.new_idempotency_key(),
                          **fields})
        response = self.relay.request("POST", f"/sessions/{session_id}/calls", safe=True,
                                            json=body)
        if response.status_code == 202:
            return self.relay.handle(response.json()["request_id"]).wait()
        return Execution.from_json(response.json())

    def get(self, session_id: str) -> Session:
        """The session's status, usage and last committed state."""
        response = self.relay.request("GET", f"/sessions/{session_id}")
        return build(Session, response.json())

    def list(self, *, limit: int | None = None,
                   cursor: str | None = None) -> Page[Session]:
        """One page of the caller's sessions."""
        body = (self.relay.request("GET", "/sessions",
                                         params=list_params(limit, cursor))).json()
        return Page([build(Session, item) for item in body["items"]], body.get("next_cursor"))

    def update(self, session_id: str, *, budget: dict[str, int]) -> Session:
        """Set new budget totals (`{"max_gas", "max_time", "max_calls"}`) for the session's
        calls: more to go on once it is exhausted, or less."""
        response = self.relay.request("PATCH", f"/sessions/{session_id}",
                                            json={"budget": budget})
        return build(Session, response.json())

    def close(self, session_id: str) -> None:
        """Close the session, cancelling its calls."""
        self.relay.request("DELETE", f"/sessions/{session_id}")

    def pause(self, session_id: str) -> None:
        """Pause the session's current call (409 when there is none)."""
        self.relay.request("POST", f"/sessions/{session_id}/pause")

    def resume(self, session_id: str, additional_gas: int | None = None) -> None:
        """Resume the session's current call."""
        self.relay.request("POST", f"/sessions/{session_id}/resume",
                                 json=drop_none({"additional_gas": additional_gas}))

    def step(self, session_id: str, gas: int | None = None) -> Execution:
        """Step the session's current call by `gas` fuel."""
        response = self.relay.request("POST", f"/sessions/{session_id}/step",
                                            json=drop_none({"gas": gas}))
        return Execution.from_json(response.json())

    def snapshot(self, session_id: str, label: str | None = None) -> Snapshot:
        """Keep the session's last committed state as a snapshot."""
        response = self.relay.request("POST", f"/sessions/{session_id}/snapshots",
                                            json=drop_none({"label": label}))
        return build(Snapshot, response.json())


class Snapshots(_Resource):
    """Saved session states (`/snapshots`), each restorable into new sessions."""

    def create(self, session_id: str, label: str | None = None) -> Snapshot:
        """Snapshot a session's last committed state (as `sessions.snapshot`)."""
        return self.relay.sessions.snapshot(session_id, label)

    def get(self, snapshot_id: str) -> Snapshot:
        """A snapshot (404 once deleted or another principal's)."""
        response = self.relay.request("GET", f"/snapshots/{snapshot_id}")
        return build(Snapshot, response.json())

    def list(self, *, limit: int | None = None,
                   cursor: str | None = None) -> Page[Snapshot]:
        """One page of the caller's snapshots."""
        body = (self.relay.request("GET", "/snapshots",
                                         params=list_params(limit, cursor))).json()
        return Page([build(Snapshot, item) for item in body["items"]], body.get("next_cursor"))

    def delete(self, snapshot_id: str) -> None:
        """Delete a snapshot; sessions restored from it are not affected."""
        self.relay.request("DELETE", f"/snapshots/{snapshot_id}")

    def restore(self, snapshot_id: str, *, branch_count: int = 1,
                      budget: dict[str, int] | None = None) -> builtins.list[Session]:
        """`branch_count` (1-64) new sessions, each starting from the snapshot's state."""
        body = drop_none({"branch_count": branch_count, "budget": budget})
        response = self.relay.request("POST", f"/snapshots/{snapshot_id}/restore",
                                            json=body)
        return [build(Session, item) for item in response.json()["items"]]


class Budgets(_Resource):
    """Limits on a principal's executions over fixed windows (`/budgets`)."""

    def create(self, *, principal: str | None = None, window: int | None = None,
                     max_gas: int | None = None, max_time: int | None = None,
                     max_executions: int | None = None) -> Budget:
        """A budget for `principal` (default: the caller) over `window` ms."""
        body = drop_none({"principal": principal, "window": window, "max_gas": max_gas,
                          "max_time": max_time, "max_executions": max_executions})
        return build(Budget, (self.relay.request("POST", "/budgets", json=body)).json())

    def get(self, budget_id: str) -> Budget:
        """A budget its principal or its creator can see."""
        return build(Budget, (self.relay.request("GET", f"/budgets/{budget_id}")).json())

    def list(self, *, limit: int | None = None,
                   cursor: str | None = None) -> Page[Budget]:
        """One page of the budgets the caller is bound by or has set."""
        body = (self.relay.request("GET", "/budgets",
                                         params=list_params(limit, cursor))).json()
        return Page([build(Budget, item) for item in body["items"]], body.get("next_cursor"))

    def update(self, budget_id: str, *, principal: str | None = None,
                     window: int | None = None, max_gas: int | None = None,
                     max_time: int | None = None, max_executions: int | None = None) -> Budget:
        """Replace the budget's limits (only its creator may)."""
        body = drop_none({"principal": principal, "window": window, "max_gas": max_gas,
                          "max_time": max_time, "max_executions": max_executions})
        response = self.relay.request("PUT", f"/budgets/{budget_id}", json=body)
        return build(Budget, response.json())

    def delete(self, budget_id: str) -> None:
        """Delete a budget (only its creator may)."""
        self.relay.request("DELETE", f"/budgets/{budget_id}")

    def usage(self, budget_id: str) -> BudgetUsage:
        """What the current window has used, reserved and has left."""
        response = self.relay.request("GET", f"/budgets/{budget_id}/usage")
        return build(BudgetUsage, response.json())


class Batches(_Resource):
    """Many executions in one request (`POST /intent/execute-wasm/batch`)."""

    def run(self, items: Sequence[dict[str, Any]], *, callback_url: str | None = None,
                  wait: bool = True) -> Batch:
        """Run `items` (execute request bodies: `cid`, `inputs`, `policy`, ...). With `wait`,
        answers every item's result or problem in order (`results`); else returns at once with
        the `batch_id` for `get`. Items without an idempotency key get one, so a retry of the
        batch runs nothing twice."""
        body = drop_none({"items": [{"idempotency_key": _core.new_idempotency_key(), **item}
                                    for item in items], "callback_url": callback_url})
        headers = {} if wait else {"Prefer": "respond-async"}
        response = self.relay.request("POST", "/intent/execute-wasm/batch", safe=True,
                                            json=body, headers=headers)
        return build(Batch, response.json())

    def get(self, batch_id: str) -> Batch:
        """The batch's status and its items' states."""
        return build(Batch, (self.relay.request("GET", f"/batches/{batch_id}")).json())


class Pipelines(_Resource):
    """DAGs of executions (`/pipelines`)."""

    def create(self, nodes: Sequence[dict[str, Any]], *,
                     max_concurrency: int | None = None, fail_fast: bool | None = None,
                     idempotency_key: str | None = None, **fields: Any) -> Pipeline:
        """Start a pipeline of `nodes` (`{"id", "cid", "inputs", ...}`, inputs may hold
        `{"$ref": "node_id"}`); returns at once (status `running`)."""
        body = drop_none({"nodes": list(nodes), "max_concurrency": max_concurrency,
                          "fail_fast": fail_fast,
                          "idempotency_key": idempotency_key or _core.new_idempotency_key(),
                          **fields})
        response = self.relay.request("POST", "/pipelines", safe=True, json=body)
        return build(Pipeline, response.json())

    def get(self, pipeline_id: str) -> Pipeline:
        """The pipeline's status, progress and every node's state."""
        response = self.relay.request("GET", f"/pipelines/{pipeline_id}")
        return build(Pipeline, response.json())

    def list(self, *, limit: int | None = None,
                   cursor: str | None = None) -> Page[Pipeline]:
        """One page of the caller's pipelines."""
        body = (self.relay.request("GET", "/pipelines",
                                         params=list_params(limit, cursor))).json()
        return Page([build(Pipeline, item) for item in body["items"]], body.get("next_cursor"))

    def delete(self, pipeline_id: str) -> None:
        """Cancel the pipeline."""
        self.relay.request("DELETE", f"/pipelines/{pipeline_id}")

    def wait(self, pipeline_id: str,
                   on_progress: Callable[[Event], Any] | None = None) -> Pipeline:
        """The pipeline once finished; `on_progress` is called with each `pipeline_progress`
        event (`node`, `node_status`, `progress`) as it comes."""
        for event in self.relay.events(pipeline_id=pipeline_id, last_event_id="0"):
            if event.type == "pipeline_progress" and on_progress is not None:
                on_progress(event)
            if event.type in ("pipeline_complete", "events_lost"):
                break
        state = self.get(pipeline_id)
        attempt = 0
        while not state.finished:  # only after events_lost
            time.sleep(_core.backoff_s(min(attempt, 2)))
            attempt += 1
            state = self.get(pipeline_id)
        return state


class Environments(_Resource):
    """Named presets of caps and WASI capabilities (`/environments`)."""

    def list(self, *, limit: int | None = None,
                   cursor: str | None = None) -> Page[Environment]:
        """One page of the environments (the shipped `wasi` and `pure` among them)."""
        body = (self.relay.request("GET", "/environments",
                                         params=list_params(limit, cursor))).json()
        return Page([build(Environment, item) for item in body["items"]],
                    body.get("next_cursor"))

    def get(self, name: str) -> Environment:
        """An environment by name: its caps, WASI capabilities and version."""
        response = self.relay.request("GET", f"/environments/{name}")
        return build(Environment, response.json())

    def put(self, name: str, definition: dict[str, Any]) -> Environment:
        """Create or change an environment (administrators only); `definition` holds
        `description`, `policy`, `wasi`, `max_output_bytes` and, to guard against a concurrent
        change, the `version` it was read at."""
        response = self.relay.request("PUT", f"/environments/{name}", json=definition)
        return build(Environment, response.json())

    def delete(self, name: str) -> None:
        """Delete an environment (administrators only; a shipped one is 409)."""
        self.relay.request("DELETE", f"/environments/{name}")


class Webhooks(_Resource):
    """The caller's webhook signing secret and delivery logs."""

    def secret(self) -> str:
        """The current `whsec_…` secret (for `verify_webhook`)."""
        return str((self.relay.request("GET", "/webhooks/secret")).json()["secret"])

    def rotate_secret(self) -> str:
        """A new secret; deliveries are signed by both for the rotation grace period."""
        return str((self.relay.request("POST", "/webhooks/secret")).json()["secret"])

    def deliveries(self, request_id: str | None = None, *, pipeline_id: str | None = None,
                         limit: int | None = None, cursor: str | None = None) -> Page[Delivery]:
        """Delivery attempts of an execution's (or, with `pipeline_id`, a pipeline's) events."""
        path = (f"/pipelines/{pipeline_id}/deliveries" if pipeline_id is not None
                else f"/executions/{request_id}/deliveries")
        body = (self.relay.request("GET", path, params=list_params(limit, cursor))).json()
        return Page([build(Delivery, item) for item in body["items"]], body.get("next_cursor"))
