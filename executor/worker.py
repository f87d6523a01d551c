"""The executor: read requests from the bus, run them in the sandbox, publish what happened.

Any number of executors, on any number of hosts, share the requests streams (`relay:requests`,
and `:high` and `:low` beside it) through the consumer group `executors`, taking high before
normal before low, save that an entry waiting longer than RELAY_PRIORITY_STARVATION_MS goes
before every one accepted after it (relay.bus.Bus.read). Each holds at most
`concurrency + prefetch` entries running or waiting to run (and, for a round trip, up to as
many more whose runs ended, their results being written: `Executor.free_slots`): enough that
its Redis round trips carry batches, few enough that little waits behind a busy thread while a
peer idles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis
from msgspec import UNSET

from executor.cache import CompiledModules, ModuleGone
from executor.control import NoPlace, PausePlaces
from executor.diskcache import DiskModules
from executor.progress import LiveRun
from executor.sandbox import LargeOutput, LinkError, Outcome, Refused, Sandbox
from executor.sessions import SessionCall, SessionStates
from relay.blobs import BlobGone, BlobStore
from relay.bus import Bus, Commit
from relay.environments import refusal
from relay.keys import Keys
from relay.metrics import Metrics
from relay.modules import ModuleStore, runs_as_command
from relay.schemas import (
    ControlRefused,
    ErrorCode,
    ErrorInfo,
    ExecuteResponse,
    OutputRef,
    WasmExecRequested,
    decode_control,
    decode_requested,
    encode,
    now_iso,
)
from relay.settings import Settings
from relay.supervise import Supervisor

log = logging.getLogger("relay.executor")

READ_BLOCK_MS = 1000
HEARTBEAT_S = 1.0


class Executor:
    def __init__(self, settings: Settings, client: aioredis.Redis, *,
                 name: str | None = None, read_block_ms: int = READ_BLOCK_MS) -> None:
        self.settings = settings
        self.read_block_ms = read_block_ms
        """How long one read waits for work, so also how long `stop()` may take to be seen."""
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        keys = Keys(settings.prefix)
        self.bus = Bus(client, keys, events_retention=settings.events_retention,
                       requests_retention=settings.requests_retention,
                       starvation_ms=settings.priority_starvation_ms)
        self.sandbox = Sandbox(max_table_elements=settings.max_table_elements,
                               max_stack_bytes=settings.max_stack_bytes)
        self.metrics = Metrics(client, keys)
        self.modules = CompiledModules(self.sandbox, ModuleStore(client, keys),
                                       disk=module_cache(settings, self.sandbox),
                                       metrics=self.metrics)
        self.sessions = SessionStates(client, keys, max_state_bytes=settings.max_state_bytes,
                                      orphan_ttl_ms=settings.idempotency_ttl_ms)
        self.blobs = BlobStore(client, keys)
        self._threads = ThreadPoolExecutor(settings.executor_concurrency,
                                           thread_name_prefix="wasm")
        self.slots = settings.executor_concurrency + settings.executor_prefetch
        self.max_paused = (settings.executor_concurrency - 1
                           if settings.executor_max_paused is None
                           else settings.executor_max_paused)
        """Paused runs held at once: by default one thread always stays free for other work."""
        self.pause_places = PausePlaces(self.max_paused)
        """Shared by every run's control: pauses asked for and step pauses alike."""
        self._running: set[asyncio.Task[None]] = set()
        self._settling = 0
        """Of `_running`, those whose run has ended (see `free_slots`)."""
        self._run_ended: asyncio.Future[None] | None = None
        """Resolved when a run ends while the read loop waits for a slot."""
        self._live: dict[str, LiveRun] = {}
        """The executions this executor is running, for the control channel."""
        self._held: set[bytes] = set()
        """Entries this executor holds (running or about to): their leases are renewed."""
        self._requests: dict[bytes, str] = {}
        """Entry id -> request id, for the entries held."""
        self._abandoned: set[bytes] = set()
        """Entries held but no longer to be settled here (taken over, or handed back)."""
        self._replies: set[asyncio.Task[None]] = set()
        """Refusals of control requests being published."""
        self._client = client
        self._keys = keys
        self._stopping = asyncio.Event()
        self.supervisor = Supervisor("relay.executor")
        """Runs the background loops (heartbeat, metrics, control, leases) while `run` serves."""

    def stop(self) -> None:
        """Stop taking work; `run` returns once what runs has finished, or after the drain
        grace, having handed the rest back for peers to run."""
        self._stopping.set()

    def cancel_running(self) -> None:
        """End every run in progress now (each settles as `cancelled`)."""
        for live in self._live.values():
            live.control.cancel()

    async def run(self, *, burst: bool = False) -> None:
        """Serve until `stop()`; with `burst`, return as soon as the stream has nothing new.
        The modules of RELAY_PRELOAD are made ready first, before any work is taken."""
        while True:
            try:
                await self.bus.ensure_group()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis not reachable yet (starting beside it, or a blip): wait for it, as the
                # read loop below does, rather than die before taking any work.
                if self._stopping.is_set():
                    return
                log.warning("cannot reach Redis to start, retrying: %s", exc)
                await asyncio.sleep(0.5)
        if self.settings.preload:
            ready = await self.modules.preload(self.settings.preload)
            log.info("preloaded %d of %d modules (RELAY_PRELOAD)", ready,
                     len(self.settings.preload))
        self.supervisor.start("heartbeat", self._heartbeat)
        self.supervisor.start("metrics", self.metrics.run)
        self.supervisor.start("control", self._follow_control)
        self.supervisor.start("leases", self._keep_leases)
        next_reclaim = 0.0
        try:
            while not self._stopping.is_set():
                free = self.free_slots()
                if free <= 0:
                    self._run_ended = asyncio.get_running_loop().create_future()
                    await asyncio.wait({self._run_ended, *self._running},
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    if time.monotonic() >= next_reclaim:
                        next_reclaim = time.monotonic() + self.settings.lease_ms / 3000
                        free -= await self._reclaim(free)
                        if free <= 0:
                            continue
                    entries = await self.bus.read(self.name, free, self.read_block_ms)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("cannot read the bus, retrying: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                if burst and not entries and not self._running:
                    break
                if self._stopping.is_set():
                    # Stopped while the read waited: these are not ours to start any more.
                    with contextlib.suppress(redis.RedisError):
                        await self.bus.hand_back(self.name, [entry_id for entry_id, _ in entries])
                    break
                for entry_id, data in entries:
                    self._spawn(entry_id, data)
                    # One run a pass of the loop, each one's settle written as soon as the run
                    # ends: spawned together, a batch's settles went out together once all of
                    # it had run, and the gateway, waiting for the batch, idled meanwhile. At
                    # 16 callers takes are often 8 entries. (Also: the runs begin before the
                    # next read is sent; that round trip is not theirs to wait for.)
                    await asyncio.sleep(0)
            await self._drain()
        finally:
            await self.supervisor.stop()
            await self.bus.close_reader()
            with contextlib.suppress(redis.RedisError):
                await self.metrics.flush()
            self._threads.shutdown(wait=False, cancel_futures=True)
            self.sandbox.close()

    def free_slots(self) -> int:
        """Entries to take now: `slots` less those running or waiting for a thread. Those
        whose run ended wait only on Redis (their settle), so they hold no slot: a trivial run
        ends in microseconds and its settle takes a round trip, and counting it made the
        executor take a fraction of what it could run. Up to `slots` of them, so that a slow
        Redis cannot have it hold ever more entries."""
        return min(self.slots - (len(self._running) - self._settling),
                   2 * self.slots - len(self._running))

    def _spawn(self, entry_id: bytes, data: bytes) -> None:
        self._held.add(entry_id)
        task = asyncio.create_task(self._handle(entry_id, data))
        self._running.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._held.discard(entry_id)
            self._abandoned.discard(entry_id)

        task.add_done_callback(done)

    async def _drain(self) -> None:
        """Let what runs finish within the grace; hand back the rest, unsettled."""
        if not self._running:
            return
        _, late = await asyncio.wait(self._running, timeout=self.settings.drain_grace_ms / 1000)
        if not late:
            return
        handed_back = list(self._held)
        self._abandoned.update(handed_back)
        self.cancel_running()
        await asyncio.wait(late)
        with contextlib.suppress(redis.RedisError):
            await self.bus.hand_back(self.name, handed_back)
        log.warning("drain grace over: handed %d executions back to peers", len(handed_back))

    async def _reclaim(self, free: int) -> int:
        """Take over entries whose executor stopped renewing them; returns how many."""
        again, dead = await self.bus.reclaim(self.name, self.settings.lease_ms, free,
                                             self.settings.max_deliveries)
        for entry_id, data in again:
            log.info("taking over %s from an executor that stopped", entry_id.decode())
            self._spawn(entry_id, data)
        for entry_id, data in dead:
            await self._give_up(entry_id, data)
        return len(again)

    async def _give_up(self, entry_id: bytes, data: bytes) -> None:
        """Dead-letter an entry delivered too often, and end its execution with `internal` so
        no caller waits forever (and a retry of the request runs again)."""
        reason = f"given up after {self.settings.max_deliveries} deliveries"
        log.error("%s: %s", entry_id.decode(), reason)
        await self.bus.dead_letter(entry_id, data, reason)
        try:
            request = decode_requested(data)
        except msgspec.DecodeError:
            await self.bus.ack(entry_id)
            return
        response = ExecuteResponse(
            success=False, request_id=request.request_id, cid=request.cid, output=None,
            gas_used=0, duration=0.0, executed_at=now_iso(),
            error=ErrorInfo("internal", f"the execution could not be completed: {reason}"))
        await self.bus.finish(entry_id, request, response, self.settings.idempotency_ttl_ms,
                              self.name)

    async def _keep_leases(self) -> None:
        """Renew the lease on every entry held, about three times a lease; a run whose entry a
        peer took over (this executor stalled) is stopped and will write nothing."""
        while True:
            await asyncio.sleep(self.settings.lease_ms / 3000)
            held = list(self._held)
            try:
                kept = await self.bus.renew(self.name, held)
            except redis.RedisError as exc:
                log.warning("cannot renew leases: %s", exc)
                continue
            for entry_id in set(held) - kept:
                if entry_id in self._held and entry_id not in self._abandoned:
                    log.warning("lost %s to a peer; stopping its run", entry_id.decode())
                    self._abandoned.add(entry_id)
                    request_id = self._requests.get(entry_id)
                    live = self._live.get(request_id) if request_id else None
                    if live is not None:
                        live.control.cancel()

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.bus.heartbeat(self.name)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_S)

    async def _follow_control(self) -> None:
        """Pause, resume, step and cancel requests from any gateway, for the runs that are
        ours."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.control)
                async for message in pubsub.listen():
                    self._apply(message["data"])
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("control channel lost, resubscribing: %s", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(redis.RedisError):
                    await pubsub.aclose()

    def _apply(self, data: bytes) -> None:
        # One bad message is skipped, never allowed to end the loop: every later pause, resume,
        # step and cancel of this executor's runs goes through it.
        try:
            message = decode_control(data)
        except msgspec.DecodeError as exc:
            log.error("skipping a malformed control message: %s", exc)
            return
        live = self._live.get(message.request_id)
        if live is None:
            return  # another executor's run
        try:
            if message.action == "pause":
                self._pause(live)
            elif message.action == "resume":
                live.control.resume(message.additional_gas)
            elif message.action == "step":
                # The gateway sends the gas, its default filled in; a paused run's step holds
                # no new place (it gives its own back while it runs).
                gas = message.gas or live.request.step_gas
                if gas is not None:
                    live.control.step(gas)
            else:
                live.control.cancel()
        except Exception:
            log.exception("skipping control message %s that failed", message)

    def _pause(self, live: LiveRun) -> None:
        """Pause a run, unless `max_paused` runs are paused (or pausing) here already
        (`pause_places`): each holds its thread, and a principal pausing and resuming forever
        would hold them all. A refusal is answered to the gateway that asked."""
        try:
            live.control.pause()
            return
        except NoPlace as exc:
            detail = str(exc)
        refusal = ControlRefused(
            request_id=live.request.request_id, action="pause", timestamp=now_iso(),
            detail=detail)
        task = asyncio.create_task(self.bus.refuse(refusal))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _handle(self, entry_id: bytes, data: bytes) -> None:
        try:
            request = decode_requested(data)
        except msgspec.DecodeError:
            log.error("dropping a malformed request entry %s", entry_id.decode())
            await self.bus.ack(entry_id)
            return
        self._requests[entry_id] = request.request_id
        try:
            await self._run_entry(entry_id, request)
        finally:
            del self._requests[entry_id]

    async def _run_entry(self, entry_id: bytes, request: WasmExecRequested) -> None:
        live = LiveRun(self.bus, request, entry_id, executor_node=self.name,
                       max_pause_ms=self.settings.max_pause_ms,
                       max_output_bytes=self._output_cap(request),
                       pause_places=self.pause_places)
        settling = False
        try:
            response, commit = await self._execute(request, live)
            # The run is over: what is left is Redis's, and takes no slot from the next run.
            settling = True
            self._settling += 1
            if self._run_ended is not None and not self._run_ended.done():
                self._run_ended.set_result(None)
            if entry_id in self._abandoned:
                return  # taken over by a peer, or handed back: theirs to settle
            # The result is only published once `execution_started` was (or along with it,
            # by the settle script), and only if the execution was still ours to run: a
            # redelivered duplicate at worst ran once more in the dark and publishes nothing.
            if live.announced and not await live.announce():
                if live.verdict == "finished":  # finished already, or cancelled while queued
                    await self.bus.ack(entry_id)
                return  # parked (the script acknowledged it) or a peer's now: nothing to do
            assert response is not None
            if await self.bus.finish(entry_id, request, response,
                                     self.settings.idempotency_ttl_ms, self.name,
                                     started=None if live.announced else live.started,
                                     commit=commit):
                self.metrics.observe_execution(
                    response.error.code if response.error else None, response.duration,
                    response.gas_used)
        except redis.RedisError:
            # The entry stays pending in the group; it is not lost.
            log.exception("bus error while handling %s", request.request_id)
        finally:
            if settling:
                self._settling -= 1

    async def _execute(self, request: WasmExecRequested, live: LiveRun,
                       ) -> tuple[ExecuteResponse | None, Commit | None]:
        """Run it, and for a successful session call store its new state; None when it is not
        to run here after all (`live.verdict` says why)."""
        executed_at = live.started.timestamp
        control = live.control
        self._live[request.request_id] = live
        session: SessionCall | None = None
        commit: Commit | None = None
        command = False
        try:
            module = await self.modules.get(request.cid)
            prepared = module.prepared
            command = runs_as_command(module.info, request.entrypoint)
            environment = request.environment or None
            if environment is not None and (problem := refusal(environment, module.info)):
                raise Refused(ErrorInfo("invalid_module", problem))  # the gateway checked it
            policy = request.policy
            if request.session_id is not None:
                # Its state and its start: two round trips at once. (Run in a thread, it has
                # to be announced anyway.)
                announced = live.announce()
                session = await self.sessions.begin(request)
                policy = session.policy
                if not await announced:
                    self.sessions.release(session, request.session_id)
                    return None, None  # not ours to run (parked, taken over, finished)
            if live.announced and not await live.announce():
                return None, None  # announced while the module was fetched, and not ours
            inputs = await self._inputs(request)
            # Tried inline (at most 10 ms on this loop) without a place: most runs end there.
            # Not a session call: its state is restored and captured in a controlled run; nor
            # a stepped one: it pauses, in a thread.
            inline = (self.sandbox.try_inline(prepared, request.entrypoint, inputs, policy)
                      if session is None and request.step_gas is None else None)
            if inline is not None:
                outcome = inline
            elif not await live.announce():
                # No place: its principal has `max_active` running or paused already, so the
                # entry waits parked and the thread stays free for others' work.
                return None, None
            else:
                inline_bytes = self.settings.inline_output_bytes
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._threads,
                    lambda: self.sandbox.run(prepared, request.entrypoint, inputs, policy,
                                             command=command,
                                             max_output_bytes=self._output_cap(request),
                                             control=control, state=session,
                                             inline_output_bytes=inline_bytes,
                                             environment=environment),
                )
            if session is not None and outcome.error is None:
                commit = await self.sessions.commit(session, request.session_id or "",
                                                    keep=not prepared.uses_wasi)
        except Refused as exc:
            outcome = Outcome(None, 0, 0.0, exc.error)
        except ModuleGone as exc:
            outcome = _failed("module_not_found", str(exc))
        except LinkError as exc:
            outcome = _failed("invalid_module", str(exc))
        except redis.RedisError:
            raise
        except Exception as exc:
            log.exception("internal error running %s", request.request_id)
            outcome = _failed("internal", f"{type(exc).__name__}: {exc}")
        finally:
            del self._live[request.request_id]
            await live.close()
            control.release()
        output_ref = None
        if outcome.error is None:
            output_ref = await self._store_large(outcome.output, command)
        response = ExecuteResponse(
            success=outcome.error is None,
            request_id=request.request_id,
            cid=request.cid,
            output=None if output_ref else outcome.output,
            output_ref=output_ref or UNSET,
            gas_used=outcome.gas_used,
            duration=outcome.duration_ms,
            executed_at=executed_at,
            error=outcome.error,
        )
        if request.session_id is not None:
            response.session_id = request.session_id
            base = commit.base if commit else session.base if session else ""
            response.state_cid = (commit.state_cid if commit else base) or None
        return response, commit

    async def _inputs(self, request: WasmExecRequested) -> list[Any]:
        """The run's inputs, those passed by reference read from their blobs (a pipeline
        node's references to large outputs): JSON goes to stdin as written (a msgspec.Raw, never
        decoded here), anything else as a string, as it would have been answered inline."""
        if not request.input_refs:
            return request.inputs
        inputs = list(request.inputs)
        for ref in request.input_refs:
            data = bytearray()
            try:
                async for part in self.blobs.read(ref.cid, 0, ref.size):
                    data += part
            except BlobGone:
                raise Refused(ErrorInfo("invalid_input", f"input {ref.index} was a large output "
                                        "that has expired")) from None
            try:
                msgspec.json.decode(data, type=msgspec.Raw)  # is it JSON? (builds nothing)
                inputs[ref.index] = msgspec.Raw(data)
            except msgspec.DecodeError:
                inputs[ref.index] = data.decode("utf-8", "replace")
        return inputs

    def _output_cap(self, request: WasmExecRequested) -> int:
        """RELAY_MAX_OUTPUT_BYTES, lowered by the request's environment."""
        environment = request.environment or None
        if environment is None or environment.max_output_bytes is None:
            return self.settings.max_output_bytes
        return min(self.settings.max_output_bytes, environment.max_output_bytes)

    async def _store_large(self, output: Any, command: bool) -> OutputRef | None:
        """An output over RELAY_INLINE_OUTPUT_BYTES stored as a blob, before the settle names it
        (relay.blobs): a command's stdout as written, or a function's result as JSON. None for
        an output answered inline. Raises redis.RedisError (the entry then stays pending)."""
        if isinstance(output, LargeOutput):
            data: bytes | memoryview = output.data
            content_type = "application/octet-stream"
        elif not command and isinstance(output, list):  # several results: the only large kind
            data = encode(output)
            content_type = "application/json"
            if len(data) <= self.settings.inline_output_bytes:
                return None
        else:
            return None
        cid = await self.blobs.put(data, self.settings.idempotency_ttl_ms)
        return OutputRef(cid=cid, size=len(data), content_type=content_type)


def module_cache(settings: Settings, sandbox: Sandbox) -> DiskModules | None:
    """The disk cache of compiled modules the settings ask for (RELAY_MODULE_CACHE_DIR, by
    default RELAY_DATA_DIR/modules), or None: turned off (RELAY_MODULE_CACHE_BYTES=0), or not
    usable (logged)."""
    if settings.module_cache_bytes == 0:
        return None
    directory = settings.module_cache_dir or os.path.join(settings.data_dir, "modules")
    return DiskModules.open(directory, settings.module_cache_bytes, sandbox.fingerprint)


def _failed(code: ErrorCode, message: str) -> Outcome:
    return Outcome(None, 0, 0.0, ErrorInfo(code, message))
