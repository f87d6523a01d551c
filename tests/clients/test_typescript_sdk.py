"""The JavaScript SDK (clients/typescript) against a real gateway over a socket, a real executor
and Redis: `node --test clients/typescript/test/` runs with RELAY_URL and RELAY_API_KEY set."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from executor.worker import Executor
from tests.conftest import ALICE_KEY, ROOT, Served

SDK = ROOT / "clients" / "typescript"
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed (Debian's nodejs package)")
async def test_the_javascript_sdk_against_a_real_gateway(served: Served,
                                                         executor: Executor) -> None:
    assert NODE is not None
    env = {**os.environ, "RELAY_URL": served.url, "RELAY_API_KEY": ALICE_KEY,
           "NO_COLOR": "1"}
    # The files by name: node >= 21 reads --test's arguments as globs, not directories.
    files = sorted(str(path) for path in (SDK / "test").glob("*.test.js"))
    assert files
    process = await asyncio.create_subprocess_exec(
        NODE, "--test", "--test-reporter=spec", *files, cwd=SDK, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=100)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    print(text)  # shown by pytest -s, or -rP
    assert process.returncode == 0, text
    assert "ℹ fail 0" in text and "ℹ pass 0" not in text, text


async def test_the_package_declares_an_es_module_with_types() -> None:
    import json

    package = json.loads((SDK / "package.json").read_text())
    assert package["type"] == "module"
    assert (SDK / package["types"]).is_file()
    assert (SDK / package["exports"]["."]["import"]).is_file()
    assert not package.get("dependencies")
