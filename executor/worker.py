"""The executor: read requests from the bus, run them in the sandbox, publish what happened.

Any number of executors, on any number of hosts, share `relay:requests` through the consumer
group `executors`. Each holds at most `concurrency + prefetch` entries: enough that its Redis
round trips carry batches, few enough that little waits behind a busy thread while a peer idles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor

import msgspec
import redis
import redis.asyncio as aioredis

from executor.cache import CompiledModules, ModuleGone
from executor.sandbox import LinkError, Outcome, Sandbox
from relay.bus import Bus
from relay.keys import Keys
from relay.metrics import Metrics
from relay.modules import ModuleStore
from relay.schemas import (
    ErrorCode,
    ErrorInfo,
    ExecuteResponse,
    WasmExecRequested,
    decode_requested,
    now_iso,
)
from relay.settings import Settings

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
                       requests_retention=settings.requests_retention)
        self.sandbox = Sandbox()
        self.modules = CompiledModules(self.sandbox, ModuleStore(client, keys))
        self.metrics = Metrics(client, keys)
        self._threads = ThreadPoolExecutor(settings.executor_concurrency,
                                           thread_name_prefix="wasm")
        self.slots = settings.executor_concurrency + settings.executor_prefetch
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop reading new work; `run` returns once what is running has finished."""
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        """Serve until `stop()`; with `burst`, return as soon as the stream has nothing new."""
        await self.bus.ensure_group()
        background = [asyncio.create_task(self._heartbeat()),
                      asyncio.create_task(self.metrics.run())]
        try:
            while not self._stopping.is_set():
                free = self.slots - len(self._running)
                if free <= 0:
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    entries = await self.bus.read(self.name, free, self.read_block_ms)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("cannot read the bus, retrying: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                if burst and not entries and not self._running:
                    break
                for entry_id, data in entries:
                    task = asyncio.create_task(self._handle(entry_id, data))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
            if self._running:
                await asyncio.wait(self._running)
        finally:
            for task in background:
                task.cancel()
            with contextlib.suppress(redis.RedisError):
                await self.metrics.flush()
            self._threads.shutdown(wait=False, cancel_futures=True)
            self.sandbox.close()

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.bus.heartbeat(self.name)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_S)

    async def _handle(self, entry_id: bytes, data: bytes) -> None:
        try:
            request = decode_requested(data)
        except msgspec.DecodeError:
            log.error("dropping a malformed request entry %s", entry_id.decode())
            await self.bus.ack(entry_id)
            return
        # `start` and the run overlap: the round trip costs no latency. The run's result is only
        # published after `start` said the execution is ours (no result exists yet), so a
        # redelivered duplicate at worst runs once more in the dark and publishes nothing.
        start = asyncio.create_task(self.bus.start(request.request_id, self.name, now_iso()))
        try:
            response = await self._execute(request)
            if not await start:
                await self.bus.ack(entry_id)  # finished already (a redelivered duplicate)
                return
            if await self.bus.finish(entry_id, request, response,
                                     self.settings.idempotency_ttl_ms):
                self.metrics.observe_execution(
                    response.error.code if response.error else None, response.duration,
                    response.gas_used)
        except redis.RedisError:
            # The entry stays pending in the group; it is not lost.
            log.exception("bus error while handling %s", request.request_id)
        finally:
            if not start.done():
                start.cancel()

    async def _execute(self, request: WasmExecRequested) -> ExecuteResponse:
        executed_at = now_iso()
        try:
            prepared = await self.modules.get(request.cid)
            command = prepared.uses_wasi and request.entrypoint == "_start"
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._threads,
                lambda: self.sandbox.run(prepared, request.entrypoint, request.inputs,
                                         request.policy, command=command,
                                         max_output_bytes=self.settings.max_output_bytes),
            )
        except ModuleGone as exc:
            outcome = _failed("module_not_found", str(exc))
        except LinkError as exc:
            outcome = _failed("invalid_module", str(exc))
        except redis.RedisError:
            raise
        except Exception as exc:
            log.exception("internal error running %s", request.request_id)
            outcome = _failed("internal", f"{type(exc).__name__}: {exc}")
        return ExecuteResponse(
            success=outcome.error is None,
            request_id=request.request_id,
            cid=request.cid,
            output=outcome.output,
            gas_used=outcome.gas_used,
            duration=outcome.duration_ms,
            executed_at=executed_at,
            error=outcome.error,
        )


def _failed(code: ErrorCode, message: str) -> Outcome:
    return Outcome(None, 0, 0.0, ErrorInfo(code, message))
