"""The `relay` command: `dev` (the whole system), `gateway`, `executor`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgspec

from relay import settings as settings_module
from relay.connection import EmbeddedRedis
from relay.settings import Settings, SettingsError

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
# (file, name, tags): what `relay dev` registers so the README's first curl works.
EXAMPLES = (
    ("calculator.wat", "calculator", ("quantum", "latest")),
    ("fib.wat", "fib", ("latest",)),
    ("echo.wat", "echo", ("latest",)),
)
DEV_PRINCIPAL = "dev"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("dev", "embedded Redis + gateway + one executor + example modules"),
                       ("gateway", "the HTTP gateway")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)
    commands.add_parser("executor", help="a sandboxed executor reading the bus")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RELAY_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = settings_module.load()
    except SettingsError as exc:
        parser.exit(2, f"relay: configuration error: {exc}\n")
    if args.command == "dev":
        dev(settings, args.host, args.port)
    elif args.command == "gateway":
        with redis_for(settings) as settings:
            serve_gateway(settings, args.host, args.port)
    else:
        with redis_for(settings) as settings:
            run_executor(settings)


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[Settings]:
    """`settings` with a Redis URL: `REDIS_URL`, or an embedded server run for the duration."""
    if settings.redis_url is not None:
        yield settings
        return
    embedded = EmbeddedRedis(settings.data_dir)
    url = embedded.start()
    try:
        yield msgspec.structs.replace(settings, redis_url=url)
    finally:
        embedded.stop()


def serve_gateway(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from relay.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)


def run_executor(settings: Settings) -> None:
    from executor.worker import Executor
    from relay.connection import connect

    async def serve() -> None:
        assert settings.redis_url is not None
        client = connect(settings.redis_url)
        executor = Executor(settings, client)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, executor.stop)
        logging.getLogger("relay.executor").info("executor %s reading the bus", executor.name)
        try:
            await executor.run()
        finally:
            await client.aclose()

    run_event_loop(serve())


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (it comes with uvicorn[standard]): its sockets cost
    the executor markedly less CPU per Redis round trip than asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def dev(settings: Settings, host: str, port: int) -> None:
    """Everything on one machine: the settings' Redis (or an embedded one), one executor in its
    own process (so wasm and HTTP use both cores), the gateway in this one."""
    with redis_for(settings) as settings:
        redis_url = settings.redis_url
        assert redis_url is not None
        if not settings.api_keys:
            settings = msgspec.structs.replace(
                settings, api_keys=((DEV_PRINCIPAL, dev_key(Path(settings.data_dir))),))
        principal, key = settings.api_keys[0]
        env = {**os.environ, "REDIS_URL": redis_url, "RELAY_STREAM_PREFIX": settings.prefix}
        executor = subprocess.Popen([sys.executable, "-m", "relay", "executor"], env=env)
        try:
            asyncio.run(register_examples(settings, principal))
            url = f"http://{host}:{port}"
            print(
                f"\nRelay is running at {url}\n"
                f"  API key ({principal}): {key}\n"
                f"  Redis: {redis_url}\n\n"
                f"Try:\n  curl -s {url}/intent/execute-wasm -H 'X-API-Key: {key}' "
                "-H 'Content-Type: application/json' "
                "-d '{\"cid\": \"glyph://calculator@quantum\", \"inputs\": [5, 3]}'\n",
                flush=True,
            )
            serve_gateway(settings, host, port)
        finally:
            executor.send_signal(signal.SIGTERM)
            try:
                executor.wait(timeout=10)
            except subprocess.TimeoutExpired:
                executor.kill()


def dev_key(data_dir: Path) -> str:
    """The persistent dev key: created once, kept (mode 600) so every start prints the same."""
    path = data_dir / "dev-api-key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "relay_dev_" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    return key


async def register_examples(settings: Settings, principal: str) -> None:
    from relay.connection import connect
    from relay.errors import RelayError
    from relay.keys import Keys
    from relay.modules import ModuleStore, inspect, to_binary

    assert settings.redis_url is not None
    client = connect(settings.redis_url)
    store = ModuleStore(client, Keys(settings.prefix))
    try:
        for filename, name, tags in EXAMPLES:
            wasm = to_binary((EXAMPLES_DIR / filename).read_bytes())
            info = inspect(wasm)
            await store.put(info, wasm, principal)
            for tag in tags:
                try:
                    await store.bind(name, tag, info.cid, principal)
                except RelayError as exc:
                    logging.warning("example %s@%s not bound: %s", name, tag, exc.detail)
    finally:
        await client.aclose()


if __name__ == "__main__":
    main()
