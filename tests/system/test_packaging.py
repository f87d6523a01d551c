"""A plain, non-editable `pip install .` carries what `relay dev` and `relay gateway` read at start.

The rest of the suite runs on the editable install, which finds `relay/examples` and
`relay/policies` in the source tree whether or not the package declares them; only an install
into another directory shows that they ship as package data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import ROOT

# What the Dockerfile copies into its build: the project as a user's `pip install .` sees it.
# The JavaScript SDK's source is there because relay/console links to it (symbolic links, kept
# as links in the copy, as git checks them out).
SOURCES = ("pyproject.toml", "README.md", "relay", "executor", "clients/typescript/src")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built and installed (no dependencies: the venv has them) into a directory of
    its own. The build runs on a copy, so it leaves no build/ or egg-info in the working tree;
    pip builds in an isolated environment, as a user's `pip install .` does (the venv's own
    setuptools may be older than pyproject.toml's build requirement)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    target = tmp_path_factory.mktemp("site-packages")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-compile", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def installed_env(target: Path, **extra: str) -> dict[str, str]:
    """The venv's interpreter (for the dependencies) importing `relay` from `target` first. No
    RELAY_* or REDIS_URL from the caller: the defaults are what is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "REDIS_URL"}
    env.update(PYTHONPATH=str(target), RELAY_LOG_LEVEL="WARNING", **extra)
    return env


# Run by the installed package: what `relay dev` registers and what `relay gateway` loads, each
# exactly as the CLI and the settings find it.
CHECK_DATA = """
import json, relay
from relay import cli, settings
from relay.modules import inspect, to_binary
from relay.policy import ModuleResource, Policies

examples = {}
for filename, name, tags in cli.EXAMPLES:
    info = inspect(to_binary((cli.EXAMPLES_DIR / filename).read_bytes()))
    examples[name] = [export.name for export in info.exports]
loaded = settings.load({})
policies = Policies(loaded.policy_dir)
print(json.dumps({
    "relay": relay.__file__,
    "examples_dir": str(cli.EXAMPLES_DIR),
    "examples": examples,
    "policy_dir": loaded.policy_dir,
    "policy_error": policies.error,
    "alice_may_execute": policies.authorize(
        "alice", "execute", ModuleResource("bafkreiexample", "calculator", "bob")),
}))
"""


def test_the_installed_package_carries_the_examples_and_the_default_policies(
        installed: Path, tmp_path: Path) -> None:
    # cwd outside the repository: `python -c` puts the cwd first on sys.path.
    done = subprocess.run([sys.executable, "-c", CHECK_DATA], env=installed_env(installed),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["relay"]).is_relative_to(installed), (
        f"imported {found['relay']}, not the installed copy")
    assert Path(found["examples_dir"]).is_relative_to(installed)
    assert set(found["examples"]) == {"calculator", "fib", "echo", "counter"}
    assert "main" in found["examples"]["calculator"]
    assert Path(found["policy_dir"]).is_relative_to(installed)
    assert found["policy_error"] is None
    assert found["alice_may_execute"] is True, "the shipped default.cedar lets principals execute"


def test_relay_dev_from_the_installed_package_answers_the_readme_seed(
        installed: Path, tmp_path: Path) -> None:
    """The README's first command and first curl, run from the installed copy: start-up reads
    the examples and the default policies from site-packages, not from a source tree."""
    port = free_port()
    data = tmp_path / "data"
    embedded = redis.Redis(unix_socket_path=str(data / "redis" / "redis.sock"), socket_timeout=1)
    dev = subprocess.Popen(
        [sys.executable, "-m", "relay", "dev", "--port", str(port)],
        env=installed_env(installed, RELAY_DATA_DIR=str(data)), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        key = _dev_key(dev)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key},
                          timeout=30) as http:
            _wait_until_serving(http, dev)
            seed = http.post("/intent/execute-wasm", json={
                "cid": "glyph://calculator@quantum", "inputs": [5, 3]})
        assert seed.status_code == 200, seed.text
        assert seed.json()["output"] == 8
        # The console and the SDK it runs on, as files of the installed package.
        sdk = ROOT / "clients" / "typescript" / "src"
        for path, source in (("/console", None), ("/console/console.js", None),
                             ("/console/relay-client.js", sdk / "index.js"),
                             ("/console/relay-client.d.ts", sdk / "index.d.ts")):
            answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30)
            assert answer.status_code == 200, path
            if source is not None:
                assert answer.content == source.read_bytes(), path
        console = installed / "relay" / "console"
        assert not (console / "relay-client.js").is_symlink(), "the wheel holds the file itself"
    finally:
        _stop(dev, embedded)


def _dev_key(dev: subprocess.Popen[str]) -> str:
    assert dev.stdout is not None
    for line in dev.stdout:
        if "API key" in line:
            return line.rsplit(": ", 1)[1].strip()
    _, stderr = dev.communicate(timeout=10)
    raise AssertionError(f"relay dev printed no API key; it said:\n{stderr}")


def _wait_until_serving(http: httpx.Client, dev: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while True:
        if dev.poll() is not None:
            assert dev.stderr is not None
            raise AssertionError(f"relay dev exited before serving:\n{dev.stderr.read()}")
        with contextlib.suppress(httpx.TransportError):
            if http.get("/healthz").status_code == 200:
                return
        assert time.monotonic() < deadline, "relay dev never served /healthz"
        time.sleep(0.05)


def _stop(dev: subprocess.Popen[str], embedded: redis.Redis) -> None:
    """SIGTERM stops the executor and the embedded Redis too (tests/system/test_processes.py proves
    it); whatever failed, nothing is left running."""
    children = [int(pid) for pid in subprocess.run(
        ["pgrep", "-P", str(dev.pid)], capture_output=True, text=True).stdout.split()]
    if dev.poll() is None:
        dev.send_signal(signal.SIGTERM)
        try:
            dev.wait(30)
        except subprocess.TimeoutExpired:
            dev.kill()
            dev.wait()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(redis.RedisError):
        embedded.shutdown(nosave=True)
    for stream in (dev.stdout, dev.stderr):
        if stream is not None:
            stream.close()
