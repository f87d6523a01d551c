"""The Python SDK (clients/python, `relay_client`) against a real gateway over a socket, a real
executor and Redis: what a user of `Relay` and `AsyncRelay` sees.

The gateway (uvicorn) and the executor run in the test's event loop, so the blocking `Relay`
runs in a thread (`asyncio.to_thread`), as it would in a user's program beside a server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from relay_client import AsyncRelay, Event, Relay, RelayError, verify_webhook
from standardwebhooks.webhooks import Webhook

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    ROOT,
    Served,
    event_entries,
    running,
    serve,
    wait_for,
    with_settings,
)
from tests.relay.gateway.test_budgets import ROOT_KEY, admin_settings
from tests.relay.gateway.test_pipelines import SPIN_WAT
from tests.relay.gateway.test_sessions import COUNTER_WAT
from tests.relay.gateway.test_webhooks import LOCAL, Receiver

__all__ = ["admin_settings"]  # fixtures

LOOP_WAT = '(module (func (export "main") (loop br 0)))'
# Fuel is read where wasm code calls or returns: a loop that calls shows its gas as it runs.
CALLING_LOOP_WAT = """(module (func $tick) (func (export "main") (loop (call $tick) (br 0))))"""
TRAP_WAT = '(module (func (export "main") unreachable))'
SDK = ROOT / "clients" / "python"


@pytest.fixture
async def relay(served: Served, executor: Executor) -> AsyncIterator[AsyncRelay]:
    async with AsyncRelay(served.url, api_key=ALICE_KEY, timeout=30) as client:
        yield client


async def started_count(settings: Settings, request_id: str) -> int:
    """How many times the execution was started, from the events stream itself."""
    count = 0
    for _, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        if event["type"] == "execution_started" and event["request_id"] == request_id:
            count += 1
    return count


async def test_modules_names_execute_and_executions(relay: AsyncRelay, tmp_path: Path) -> None:
    path = tmp_path / "add.wat"
    path.write_text(ADD_WAT)
    module = await relay.modules.push(path, name="adder", tag="v1")
    assert module.cid.startswith("b") and module.size > 0
    assert module.exports == [{"name": "main", "params": ["i32", "i32"], "results": ["i32"]}]
    assert (await relay.modules.get(module.cid)).cid == module.cid
    assert module.cid in [m.cid for m in (await relay.modules.list()).items]
    assert (await relay.modules.push(ADD_WAT.encode())).cid == module.cid  # text or path

    await relay.names.set("adder", "latest", module.cid)
    assert await relay.names.get("adder") == {"v1": module.cid, "latest": module.cid}

    result = await relay.execute("glyph://adder@v1", [2, 3], max_gas=1_000_000)
    assert result.success is True and result.output == 5 and result.status == "completed"
    assert result.cid == module.cid and result.gas_used and result.gas_used > 0
    assert len(result.request_id) == 64 and result.error is None

    state = await relay.executions.get(result.request_id)
    assert state.status == "completed" and state.output == 5
    listed = await relay.executions.list(status="completed")
    assert result.request_id in [e.request_id for e in listed.items]

    trap = await relay.modules.push(TRAP_WAT.encode())
    failed = await relay.execute(trap.cid)
    assert failed.success is False and failed.status == "failed"
    assert failed.error is not None and failed.error.code == "trap"

    with pytest.raises(RelayError) as refused:  # a name still points at it
        await relay.modules.delete(module.cid)
    assert refused.value.status == 409
    await relay.modules.delete(trap.cid)
    with pytest.raises(RelayError) as gone:
        await relay.modules.get(trap.cid)
    assert gone.value.status == 404 and gone.value.slug == "not-found"


async def test_a_problem_raises_with_its_fields(relay: AsyncRelay) -> None:
    module = await relay.modules.push(ADD_WAT.encode())
    with pytest.raises(RelayError) as caught:
        await relay.execute(module.cid, [1, 2], max_gas=0)
    error = caught.value
    assert error.status == 400 and error.type == "/problems/invalid-request"
    assert error.title and "max_gas" in str(error.errors)
    assert [e["pointer"] for e in error.errors] == ["/policy/max_gas"]
    assert error.request_id and error.headers["content-type"].startswith(
        "application/problem+json")

    with pytest.raises(RelayError) as unauthenticated:
        async with AsyncRelay(relay.config.url, api_key="wrong", retries=0) as stranger:
            await stranger.modules.list()
    assert unauthenticated.value.status == 401 and unauthenticated.value.slug == "unauthenticated"


async def test_submit_gives_a_handle_to_follow_pause_resume_and_cancel(relay: AsyncRelay) -> None:
    loop = await relay.modules.push(LOOP_WAT.encode())
    handle = await relay.submit(loop.cid, max_gas=10**11, max_time=60_000)
    with pytest.raises(TimeoutError):
        await handle.wait(timeout_s=0.2)
    seen: list[Event] = []
    async for event in handle.events():
        seen.append(event)
        if event.type == "execution_started":
            await handle.pause()
        elif event.type == "execution_paused":
            assert (await handle.get()).status == "paused"
            await handle.resume(additional_gas=1000)
        elif event.type == "execution_resumed":
            await handle.cancel()
    types = [event.type for event in seen]
    assert types[0] == "execution_queued" and types[-1] == "execution_error"
    assert {"execution_started", "execution_paused", "execution_resumed"} <= set(types)
    assert all(event.request_id == handle.request_id for event in seen)

    result = await handle.wait()
    assert result.status == "cancelled" and result.error is not None
    assert result.error.code == "cancelled"
    with pytest.raises(RelayError) as finished:
        await handle.cancel()
    assert finished.value.status == 409


async def test_step_runs_a_paused_execution_by_so_much_gas(relay: AsyncRelay) -> None:
    loop = await relay.modules.push(CALLING_LOOP_WAT.encode())
    handle = await relay.submit(loop.cid, max_gas=10**11, max_time=60_000, step_gas=100_000)
    async for event in handle.events():
        if event.type == "execution_paused":
            break
    stepped = await handle.step(gas=200_000)
    assert stepped.status == "paused" and stepped.gas_used is not None
    assert stepped.gas_used >= 300_000
    await handle.cancel()
    assert (await handle.wait()).status == "cancelled"


def sync_scenario(url: str, module_path: Path) -> dict[str, Any]:
    """What a blocking program does; returns what it saw."""
    seen: dict[str, Any] = {}
    with Relay(url, api_key=ALICE_KEY, timeout=30) as relay:
        module = relay.modules.push(module_path, name="sync-adder")
        seen["exports"] = module.exports
        seen["names"] = relay.names.get("sync-adder")
        result = relay.execute("glyph://sync-adder", [40, 2])
        seen["output"], seen["success"] = result.output, result.success
        seen["listed"] = result.request_id in [
            e.request_id for e in relay.executions.list().items]
        handle = relay.submit(module.cid, [1, 1])
        seen["events"] = [event.type for event in handle.events()]
        seen["waited"] = handle.wait().output
        try:
            relay.execute("glyph://no-such-module", [])
        except RelayError as error:
            seen["problem"] = (error.status, error.slug, [e["pointer"] for e in error.errors])
    return seen


async def test_the_blocking_client_does_the_same(served: Served, executor: Executor,
                                                 tmp_path: Path) -> None:
    path = tmp_path / "add.wat"
    path.write_text(ADD_WAT)
    seen = await asyncio.to_thread(sync_scenario, served.url, path)
    assert seen["exports"][0]["name"] == "main"
    assert list(seen["names"]) == ["latest"]
    assert seen["output"] == 42 and seen["success"] is True and seen["listed"]
    assert seen["events"][0] == "execution_queued"
    assert seen["events"][-1] == "execution_complete" and seen["waited"] == 2
    assert seen["problem"] == (404, "not-found", ["/cid"])


class DropFirstAnswer:
    """A TCP proxy to a gateway that, on its first connection, passes the request on and then
    closes the connection as the answer starts, passing none of it: the request ran, and the
    client saw the connection break."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.connections = 0
        self.url = ""

    async def __aenter__(self) -> DropFirstAnswer:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _relay(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop = self.connections == 1
        upstream_r, upstream_w = await asyncio.open_connection(*self.target)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       cut: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if cut:
                        break
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(client_r, upstream_w, False),
                             pump(upstream_r, client_w, drop))


async def test_a_retry_after_a_dropped_connection_does_not_run_twice(
        served: Served, executor: Executor, settings: Settings) -> None:
    async with AsyncRelay(served.url, api_key=ALICE_KEY) as direct:
        module = await direct.modules.push(ADD_WAT.encode())
    async with DropFirstAnswer(served.url) as proxy, \
            AsyncRelay(proxy.url, api_key=ALICE_KEY) as relay:
        result = await relay.execute(module.cid, [20, 22])
        assert proxy.connections == 2  # the execute was sent again
    assert result.success is True and result.output == 42
    assert await started_count(settings, result.request_id) == 1


async def test_rate_limited_is_retried_after_retry_after(settings: Settings,
                                                         executor: Executor) -> None:
    limited = with_settings(settings, rate_limit=1, rate_window_ms=1000)
    async with serve(limited) as gateway, \
            AsyncRelay(gateway.url, api_key=ALICE_KEY) as relay, \
            AsyncRelay(gateway.url, api_key=ALICE_KEY, retries=0) as impatient:
        module = await relay.modules.push(ADD_WAT.encode())
        assert (await relay.execute(module.cid, [1, 2])).output == 3
        with pytest.raises(RelayError) as caught:
            await impatient.execute(module.cid, [1, 2])
        assert caught.value.status == 429 and caught.value.slug == "rate-limited"
        assert int(caught.value.headers["retry-after"]) >= 1
        # The patient client waits out Retry-After and gets its result.
        assert (await relay.execute(module.cid, [2, 2])).output == 4


async def test_a_retry_after_over_a_minute_raises_at_once(settings: Settings,
                                                          executor: Executor) -> None:
    slow = with_settings(settings, rate_limit=1, rate_window_ms=600_000)
    async with serve(slow) as gateway, AsyncRelay(gateway.url, api_key=ALICE_KEY) as relay:
        module = await relay.modules.push(ADD_WAT.encode())
        await relay.execute(module.cid, [1, 2])
        started = time.monotonic()
        with pytest.raises(RelayError) as caught:
            await relay.execute(module.cid, [1, 2])
        assert time.monotonic() - started < 5
    assert caught.value.slug == "rate-limited"
    assert int(caught.value.headers["retry-after"]) > 60


async def test_events_survive_a_gateway_restart_with_no_gap_or_duplicate(
        settings: Settings, executor: Executor) -> None:
    received: list[Event] = []
    async with serve(settings) as replica, AsyncRelay(replica.url, api_key=ALICE_KEY) as other:
        module = await other.modules.push(ADD_WAT.encode())
        async with contextlib.AsyncExitStack() as stack:
            gateway = await stack.enter_async_context(serve(settings))
            port = int(gateway.url.rsplit(":", 1)[1])
            relay = AsyncRelay(gateway.url, api_key=ALICE_KEY)
            stream = relay.events()

            async def collect() -> None:
                async for event in stream:
                    received.append(event)

            collector = asyncio.create_task(collect())
            await asyncio.sleep(0)

            def ended(request_id: str) -> bool:
                return any(e.request_id == request_id and e.terminal for e in received)

            first = await relay.execute(module.cid, [1, 1])
            await wait_for(lambda: ended(first.request_id))
            await stack.aclose()  # the gateway goes away with the stream open

            during = await other.execute(module.cid, [2, 2])  # while the client is cut off
            async with serve(settings, port=port):
                after = await other.execute(module.cid, [3, 3])
                await wait_for(lambda: ended(after.request_id), timeout_s=20)
                collector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collector
                await relay.aclose()
    wanted = {first.request_id, during.request_id, after.request_id}
    expected = []
    for entry_id, fields in await event_entries(settings):
        event = json.loads(fields[b"data"])
        if event.get("request_id") in wanted and event["type"].startswith("execution_"):
            expected.append(entry_id.decode())
    got = [e.id for e in received if e.request_id in wanted]
    assert got == expected
    assert len(set(got)) == len(got)
    assert ended(during.request_id)


def test_the_sdk_installs_alone_and_imports(tmp_path: Path) -> None:
    """A fresh virtual environment with the SDK and httpx only: it imports, and neither
    wasmtime nor redis came with it."""
    source = tmp_path / "relay-client"  # built from a copy: no build/ left in the tree
    shutil.copytree(SDK, source, ignore=shutil.ignore_patterns("*.egg-info", "build",
                                                                "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", str(source)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    probe = ("import importlib.util, relay_client; "
             "print(relay_client.Relay.__name__, relay_client.AsyncRelay.__name__, "
             "importlib.util.find_spec('wasmtime'), importlib.util.find_spec('redis'))")
    shown = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert shown.stdout.split() == ["Relay", "AsyncRelay", "None", "None"], shown.stderr


def test_the_blocking_client_is_generated_from_the_async_one() -> None:
    done = subprocess.run([sys.executable, str(SDK / "scripts" / "unasync.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_sessions_snapshots_and_branches(relay: AsyncRelay) -> None:
    module = await relay.modules.push(COUNTER_WAT.encode())
    session = await relay.sessions.create(module.cid, budget={"max_calls": 20})
    assert session.status == "idle" and session.state_cid is None
    assert (await relay.sessions.call(session.session_id, "add", [5])).output == 5
    second = await relay.sessions.call(session.session_id, "add", [2])
    assert second.output == 7 and second.state_cid and second.session_id == session.session_id
    now = await relay.sessions.get(session.session_id)
    assert now.calls == 2 and now.state_cid == second.state_cid
    assert session.session_id in [s.session_id for s in (await relay.sessions.list()).items]

    snapshot = await relay.snapshots.create(session.session_id, label="seven")
    assert snapshot.state_cid == second.state_cid and snapshot.label == "seven"
    assert (await relay.snapshots.get(snapshot.snapshot_id)).session_id == session.session_id
    assert snapshot.snapshot_id in [s.snapshot_id for s in (await relay.snapshots.list()).items]
    branches = await relay.snapshots.restore(snapshot.snapshot_id, branch_count=3)
    assert len({b.session_id for b in branches}) == 3
    for n, branch in enumerate(branches):  # each goes on from 7 on its own
        assert (await relay.sessions.call(branch.session_id, "add", [n])).output == 7 + n

    await relay.sessions.close(session.session_id)
    assert (await relay.sessions.get(session.session_id)).status == "closed"
    with pytest.raises(RelayError) as closed:
        await relay.sessions.call(session.session_id, "add", [1])
    assert closed.value.status == 409 and closed.value.slug == "session-closed"
    await relay.snapshots.delete(snapshot.snapshot_id)
    with pytest.raises(RelayError) as deleted:
        await relay.snapshots.get(snapshot.snapshot_id)
    assert deleted.value.status == 404


async def test_a_session_out_of_calls_goes_on_once_its_budget_is_raised(
        relay: AsyncRelay) -> None:
    module = await relay.modules.push(COUNTER_WAT.encode())
    session = await relay.sessions.create(module.cid, budget={"max_calls": 1})
    assert (await relay.sessions.call(session.session_id, "add", [3],
                                      max_stack=65_536)).output == 3
    with pytest.raises(RelayError) as exhausted:
        await relay.sessions.call(session.session_id, "add", [4])
    assert exhausted.value.status == 409 and exhausted.value.slug == "session-exhausted"
    raised = await relay.sessions.update(session.session_id, budget={"max_calls": 2})
    assert raised.status == "idle" and raised.budget["max_calls"] == 2
    assert (await relay.sessions.call(session.session_id, "add", [4])).output == 7


async def test_a_session_call_retried_after_a_dropped_connection_is_one_call(
        served: Served, executor: Executor) -> None:
    """Session calls without a key are never deduplicated by the gateway: only the key the SDK
    generates keeps the retry from being a second call."""
    async with AsyncRelay(served.url, api_key=ALICE_KEY) as direct:
        module = await direct.modules.push(COUNTER_WAT.encode())
        session = await direct.sessions.create(module.cid)
        async with DropFirstAnswer(served.url) as proxy, \
                AsyncRelay(proxy.url, api_key=ALICE_KEY) as relay:
            result = await relay.sessions.call(session.session_id, "add", [10])
            assert proxy.connections == 2
        assert result.output == 10
        assert (await direct.sessions.get(session.session_id)).calls == 1
        assert (await direct.sessions.call(session.session_id, "calls")).output == 1


async def test_a_session_call_is_paused_stepped_and_resumed(relay: AsyncRelay) -> None:
    module = await relay.modules.push(COUNTER_WAT.encode())
    session = await relay.sessions.create(module.cid)
    call = asyncio.create_task(relay.sessions.call(session.session_id, "work", [50_000_000],
                                                   step_gas=1_000_000))

    async def paused() -> bool:
        return (await relay.sessions.get(session.session_id)).status == "paused"

    await wait_for(paused)
    stepped = await relay.sessions.step(session.session_id, gas=1_000_000)
    assert stepped.status == "paused" and (stepped.gas_used or 0) >= 2_000_000
    await relay.sessions.resume(session.session_id)
    result = await asyncio.wait_for(call, 30)
    assert result.success is True and result.output == 50_000_000
    with pytest.raises(RelayError) as idle:
        await relay.sessions.pause(session.session_id)
    assert idle.value.status == 409


async def test_budgets_are_created_read_changed_used_and_deleted(relay: AsyncRelay) -> None:
    budget = await relay.budgets.create(max_executions=5, window=60_000)
    assert budget.principal == "alice" and budget.max_executions == 5
    assert (await relay.budgets.get(budget.budget_id)).window == 60_000
    assert budget.budget_id in [b.budget_id for b in (await relay.budgets.list()).items]
    changed = await relay.budgets.update(budget.budget_id, max_executions=10, window=60_000)
    assert changed.max_executions == 10
    module = await relay.modules.push(ADD_WAT.encode())
    await relay.execute(module.cid, [1, 2])
    usage = await relay.budgets.usage(budget.budget_id)
    assert usage.executions == 1 and usage.remaining["executions"] == 9 and usage.gas_used > 0
    await relay.budgets.delete(budget.budget_id)
    with pytest.raises(RelayError) as gone:
        await relay.budgets.get(budget.budget_id)
    assert gone.value.status == 404


async def test_batches_run_and_get(relay: AsyncRelay) -> None:
    module = await relay.modules.push(ADD_WAT.encode())
    ran = await relay.batches.run([{"cid": module.cid, "inputs": [1, 2]},
                                   {"cid": module.cid, "inputs": [1, 2],
                                    "policy": {"max_gas": 0}}])
    assert ran.results[0]["output"] == 3
    assert ran.results[1]["status"] == 400  # a refused item never fails the batch
    queued = await relay.batches.run([{"cid": module.cid, "inputs": [n, n]} for n in range(3)],
                                     wait=False)

    async def completed() -> bool:
        return (await relay.batches.get(queued.batch_id)).status == "completed"

    await wait_for(completed)
    batch = await relay.batches.get(queued.batch_id)
    assert batch.total == 3 and [i["status"] for i in batch.items] == ["completed"] * 3
    listed = await relay.executions.list(batch_id=queued.batch_id)
    assert len(listed.items) == 3


async def test_pipelines_run_and_wait_with_progress(relay: AsyncRelay) -> None:
    add = await relay.modules.push(ADD_WAT.encode())
    progress: list[Event] = []
    pipeline = await relay.pipelines.create([
        {"id": "a", "cid": add.cid, "inputs": [1, 2]},
        {"id": "b", "cid": add.cid, "inputs": [{"$ref": "a"}, 10]}])
    assert pipeline.status == "running"
    done = await relay.pipelines.wait(pipeline.pipeline_id, on_progress=progress.append)
    assert done.status == "completed" and done.nodes["b"]["output"] == 13
    assert done.progress["percent"] == 100
    assert {(e.data["node"], e.data["node_status"]) for e in progress} >= {
        ("a", "completed"), ("b", "completed")}
    listed = await relay.pipelines.list()
    assert pipeline.pipeline_id in [p.pipeline_id for p in listed.items]

    spin = await relay.modules.push(SPIN_WAT.encode())
    slow = await relay.pipelines.create([{"id": "spin", "cid": spin.cid,
                                          "inputs": [2_000_000_000],
                                          "policy": {"max_time": 60_000}}])
    await relay.pipelines.delete(slow.pipeline_id)
    assert (await relay.pipelines.wait(slow.pipeline_id)).status == "cancelled"


async def test_environments_are_listed_read_and_changed_by_an_administrator(
        admin_settings: Settings, executor: Executor) -> None:
    async with serve(admin_settings) as gateway, \
            AsyncRelay(gateway.url, api_key=ROOT_KEY) as root, \
            AsyncRelay(gateway.url, api_key=ALICE_KEY) as alice:
        names = [e.name for e in (await alice.environments.list()).items]
        assert {"wasi", "pure"} <= set(names)
        assert (await alice.environments.get("pure")).wasi["enabled"] is False
        made = await root.environments.put("tight", {"description": "small",
                                                      "policy": {"max_gas": 1000}})
        assert made.version == 1 and made.policy["max_gas"] == 1000
        with pytest.raises(RelayError) as forbidden:
            await alice.environments.put("tight", {"policy": {"max_gas": 5}})
        assert forbidden.value.status == 403
        module = await alice.modules.push(ADD_WAT.encode())
        with pytest.raises(RelayError) as over:
            await alice.execute(module.cid, [1, 2], environment="tight", max_gas=5000)
        assert over.value.status == 400
        await root.environments.delete("tight")
        with pytest.raises(RelayError) as gone:
            await alice.environments.get("tight")
        assert gone.value.status == 404


async def test_webhook_secrets_deliveries_and_verification(
        settings: Settings, executor: Executor, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 200)
    async with serve(with_settings(settings, **LOCAL)) as gateway, \
            AsyncRelay(gateway.url, api_key=ALICE_KEY) as relay:
        secret = await relay.webhooks.rotate_secret()
        assert secret.startswith("whsec_") and await relay.webhooks.secret() == secret
        module = await relay.modules.push(ADD_WAT.encode())
        result = await relay.execute(module.cid, [1, 2], callback_url=receiver.url)
        await wait_for(lambda: receiver.got, timeout_s=20)
        _, headers, body = receiver.got[0]
        event = verify_webhook(secret, headers, body)
        assert event["type"] == "execution_complete"
        assert event["request_id"] == result.request_id
        with pytest.raises(ValueError):
            verify_webhook(secret, headers, body.replace(b"complete", b"error"))
        with pytest.raises(ValueError):
            verify_webhook(await relay.webhooks.rotate_secret(), headers, body)

        async def logged() -> bool:
            page = await relay.webhooks.deliveries(result.request_id)
            return any(d.status_code == 200 for d in page.items)

        await wait_for(logged)
        page = await relay.executions.deliveries(result.request_id)
        assert page.items[0].url == receiver.url and page.items[0].attempt == 1


async def test_an_execute_not_finished_within_the_sync_wait_is_waited_for(
        settings: Settings, executor: Executor) -> None:
    """The gateway answers 202 after its sync wait; the SDK's execute still returns the result."""
    async with serve(with_settings(settings, sync_wait_ms=50)) as gateway, \
            AsyncRelay(gateway.url, api_key=ALICE_KEY) as relay:
        spin = await relay.modules.push(SPIN_WAT.encode())
        result = await relay.execute(spin.cid, [500_000_000], max_gas=10**11, max_time=60_000)
    assert result.success is True and result.output == 500_000_000
    assert result.duration is not None and result.duration > 50
    assert result.raw["status"] == "completed"  # read from GET /executions, not the execute


def sync_sessions_and_pipelines(url: str, counter: bytes, add: bytes) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with Relay(url, api_key=ALICE_KEY) as relay:
        session = relay.sessions.create(relay.modules.push(counter).cid)
        relay.sessions.call(session.session_id, "add", [4])
        snapshot = relay.sessions.snapshot(session.session_id)
        [branch] = relay.snapshots.restore(snapshot.snapshot_id)
        seen["branch"] = relay.sessions.call(branch.session_id, "add", [1]).output
        cid = relay.modules.push(add).cid
        pipeline = relay.pipelines.create([{"id": "x", "cid": cid, "inputs": [1, 1]},
                                           {"id": "y", "cid": cid,
                                            "inputs": [{"$ref": "x"}, {"$ref": "x"}]}])
        nodes: list[str] = []
        done = relay.pipelines.wait(pipeline.pipeline_id,
                                    on_progress=lambda event: nodes.append(event.data["node"]))
        seen["pipeline"] = (done.status, done.nodes["y"]["output"], set(nodes))
    return seen


async def test_the_blocking_client_runs_sessions_and_pipelines(served: Served,
                                                               executor: Executor) -> None:
    seen = await asyncio.to_thread(sync_sessions_and_pipelines, served.url,
                                   COUNTER_WAT.encode(), ADD_WAT.encode())
    assert seen["branch"] == 5
    assert seen["pipeline"] == ("completed", 4, {"x", "y"})


async def test_the_readmes_python_quick_start_runs(served: Served, executor: Executor,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RELAY_URL", served.url)
    monkeypatch.setenv("RELAY_API_KEY", ALICE_KEY)
    monkeypatch.chdir(ROOT)
    section = (ROOT / "README.md").read_text().split("### From Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    await asyncio.to_thread(exec, code, {})
    assert capsys.readouterr().out.splitlines()[-1] == "832040"


async def test_unavailable_is_retried_until_the_gateway_takes_the_work(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """A queue over RELAY_MAX_QUEUE is 503 with Retry-After: the SDK waits and sends the
    execute again until an executor has drained the queue."""
    caplog.set_level(logging.INFO, logger="relay_client")
    full = with_settings(settings, max_queue=1)
    async with serve(full) as gateway, AsyncRelay(gateway.url, api_key=ALICE_KEY) as relay, \
            AsyncRelay(gateway.url, api_key=ALICE_KEY, retries=0) as impatient:
        module = await relay.modules.push(ADD_WAT.encode())
        first = await relay.submit(module.cid, [1, 1])  # no executor yet: it stays queued
        with pytest.raises(RelayError) as refused:
            await impatient.execute(module.cid, [2, 2])
        assert refused.value.status == 503 and refused.value.slug == "unavailable"
        patient = asyncio.create_task(relay.execute(module.cid, [3, 3]))
        await wait_for(lambda: any("answered 503" in r.getMessage() for r in caplog.records))
        async with running(full, "late"):
            result = await asyncio.wait_for(patient, 30)
            assert (await first.wait()).output == 2
    assert result.success is True and result.output == 6
    assert await started_count(settings, result.request_id) == 1


def test_verify_webhook_agrees_with_the_reference_and_refuses_old_deliveries() -> None:
    """Signed by the Standard Webhooks reference library: accepted with headers in any case,
    with a second (rotated) signature beside it; refused when older than the tolerance."""
    secret = "whsec_" + base64.b64encode(b"s" * 32).decode()
    other = "whsec_" + base64.b64encode(b"o" * 32).decode()
    body = b'{"type":"execution_complete","request_id":"r"}'
    now = datetime.now(UTC)
    signature = Webhook(secret).sign("msg_1", now, body.decode())
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(int(now.timestamp())),
               "Webhook-Signature": f"{Webhook(other).sign('msg_1', now, body.decode())} "
                                    f"{signature}"}
    assert verify_webhook(secret, headers, body)["request_id"] == "r"
    assert verify_webhook(other, headers, body.decode())["type"] == "execution_complete"
    old = now - timedelta(minutes=10)
    stale = {"webhook-id": "msg_1", "webhook-timestamp": str(int(old.timestamp())),
             "webhook-signature": Webhook(secret).sign("msg_1", old, body.decode())}
    with pytest.raises(ValueError, match="timestamp"):
        verify_webhook(secret, stale, body)
    with pytest.raises(ValueError, match="webhook-id"):
        verify_webhook(secret, {}, body)
