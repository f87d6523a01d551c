"""The JavaScript SDK (clients/typescript) against a real gateway over a socket, a real executor
and Redis: `node --test clients/typescript/test/` runs with RELAY_URL and RELAY_API_KEY set, and
`tsc --strict` checks its hand-written declarations by compiling a program that uses them."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from executor.worker import Executor
from relay.settings import Settings
from tests.conftest import ALICE_KEY, ROOT, Served, serve, with_settings
from tests.relay.gateway.test_budgets import ROOT_KEY, admin_settings
from tests.relay.gateway.test_webhooks import LOCAL

__all__ = ["admin_settings"]  # fixtures

SDK = ROOT / "clients" / "typescript"
NODE = shutil.which("node")


def find_tsc() -> str | None:
    """tsc on PATH, else the one scripts/test installs into clients/typescript/node_modules."""
    local = SDK / "node_modules" / ".bin" / "tsc"
    return shutil.which("tsc") or (str(local) if local.is_file() else None)


def webhook_vectors() -> str:
    """Deliveries signed by the Standard Webhooks reference library: a fresh one carrying two
    signatures (a rotation), and one ten minutes old."""
    secret = "whsec_" + base64.b64encode(b"s" * 32).decode()
    other = "whsec_" + base64.b64encode(b"o" * 32).decode()
    body = '{"type":"execution_complete","request_id":"r"}'
    now = datetime.now(UTC)
    old = now - timedelta(minutes=10)

    def headers(at: datetime, *secrets: str) -> dict[str, str]:
        return {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(int(at.timestamp())),
                "Webhook-Signature": " ".join(Webhook(s).sign("msg_1", at, body)
                                              for s in secrets)}

    return json.dumps({"secret": secret, "other": other, "body": body,
                       "fresh": headers(now, other, secret), "stale": headers(old, secret)})


async def run(*command: str, env: dict[str, str] | None = None,
              timeout_s: float = 100) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=SDK, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.skipif(NODE is None, reason="node is not installed (Debian's nodejs package)")
async def test_the_javascript_sdk_against_a_real_gateway(admin_settings: Settings,
                                                         executor: Executor) -> None:
    """root is an administrator (environments); webhooks may go to http://127.0.0.1."""
    assert NODE is not None
    async with serve(with_settings(admin_settings, **LOCAL)) as served:
        env = {**os.environ, "RELAY_URL": served.url, "RELAY_API_KEY": ALICE_KEY,
               "RELAY_ADMIN_KEY": ROOT_KEY, "RELAY_TEST_LOCAL_WEBHOOKS": "1",
               "RELAY_TEST_WEBHOOK_VECTORS": webhook_vectors(), "NO_COLOR": "1"}
        # The files by name: node >= 21 reads --test's arguments as globs, not directories.
        files = sorted(str(path) for path in (SDK / "test").glob("*.test.js"))
        assert files
        status, text = await run(NODE, "--test", "--test-reporter=spec", *files, env=env)
    print(text)  # shown by pytest -s, or -rP
    assert status == 0, text
    assert "ℹ fail 0" in text and "ℹ pass 0" not in text, text
    assert "ℹ skipped 0" in text, text  # every test had what it needs


@pytest.mark.skipif(find_tsc() is None,
                    reason="no tsc: on PATH or in clients/typescript/node_modules "
                           "(scripts/test installs it there when npm is present)")
async def test_the_declarations_compile_under_strict_typescript() -> None:
    """test/types-check.ts uses every part of the API with the types it should have, and marks
    misuses with @ts-expect-error: a declaration that is missing, wrong or too loose fails."""
    tsc = find_tsc()
    assert tsc is not None
    status, text = await run(tsc, "--noEmit", "--strict", "--target", "es2022", "--module",
                             "nodenext", "--moduleResolution", "nodenext", "--lib",
                             "es2022,dom,dom.iterable", str(Path("test") / "types-check.ts"))
    assert status == 0, text


async def test_the_package_declares_an_es_module_with_types() -> None:
    package = json.loads((SDK / "package.json").read_text())
    assert package["type"] == "module"
    assert (SDK / package["types"]).is_file()
    assert (SDK / package["exports"]["."]["import"]).is_file()
    assert not package.get("dependencies")


@pytest.mark.skipif(NODE is None, reason="node is not installed (Debian's nodejs package)")
async def test_the_readmes_javascript_quick_start_runs(served: Served,
                                                       executor: Executor) -> None:
    assert NODE is not None
    section = (ROOT / "README.md").read_text().split("### From JavaScript", 1)[1]
    code = section.split("```js\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "RELAY_URL": served.url, "RELAY_API_KEY": ALICE_KEY}
    # An ES module given on the command line resolves its imports from the working directory.
    process = await asyncio.create_subprocess_exec(
        NODE, "--input-type=module", "-e", code, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        output, errors = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, errors.decode()
    lines = output.decode().splitlines()
    assert lines[0].startswith("execution_queued") and lines[-1] == "832040", lines
