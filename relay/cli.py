"""The `relay` command: `dev` (the whole system), `gateway`, `executor`, `webhooks`, `keys`,
and the client commands (relay.cli_client)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

from relay import cli_client, logs, relay_version
from relay import settings as settings_module
from relay.connection import EmbeddedRedis
from relay.settings import Settings, SettingsError

# Package data (pyproject.toml), so an installed Relay has them wherever site-packages is.
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# (file, name, tags): what `relay dev` registers so the README's first curl works.
EXAMPLES = (
    ("calculator.wat", "calculator", ("quantum", "latest")),
    ("fib.wat", "fib", ("latest",)),
    ("echo.wat", "echo", ("latest",)),
    ("counter.wat", "counter", ("latest",)),
)
DEV_PRINCIPAL = "dev"
# `relay dev` is for trying things at a terminal, where production's 10 executes a minute is hit
# within the README's first few curls; RELAY_RATE_LIMIT still sets it.
DEV_RATE_LIMIT = 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"relay {relay_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("dev", "embedded Redis + gateway + one executor + example modules"),
                       ("gateway", "the HTTP gateway")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)
    commands.add_parser("executor", help="a sandboxed executor reading the bus")
    commands.add_parser("webhooks", help="a webhook deliverer alone (every gateway runs one)")
    keys = commands.add_parser("keys", help="API keys stored in Redis").add_subparsers(
        dest="keys_command", required=True)
    keys.add_parser("create", help="create a key for PRINCIPAL; it is printed once").add_argument(
        "principal")
    keys.add_parser("list", help="list stored keys (ids and principals, never keys)")
    keys.add_parser("revoke", help="revoke the key with this id").add_argument("id")
    cli_client.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command in cli_client.COMMANDS:  # a client: the server's settings are not its own
        sys.exit(cli_client.main(args))
    try:
        settings = settings_module.load()
    except SettingsError as exc:
        parser.exit(2, f"relay: configuration error: {exc}\n")
    if args.command == "dev" and "RELAY_LOG_FORMAT" not in os.environ:
        # At a terminal, text reads better; services default to JSON lines for collectors.
        os.environ["RELAY_LOG_FORMAT"] = "text"
        settings = msgspec.structs.replace(settings, log_format="text")
    logs.configure(settings.log_level, settings.log_format)
    # SIGTERM must unwind like Ctrl-C does, so what a command started (the embedded Redis, the
    # executor of `relay dev`) is stopped: uvicorn, once it has shut down, re-raises the
    # SIGTERM it caught, which by default would end the process on the spot.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "dev":
            dev(settings, args.host, args.port)
        elif args.command == "keys":
            with redis_for(settings) as settings:
                run_event_loop(manage_keys(settings, args))
        elif args.command == "gateway":
            with redis_for(settings) as settings:
                serve_gateway(settings, args.host, args.port)
        elif args.command == "webhooks":
            with redis_for(settings) as settings:
                run_webhooks(settings)
        else:
            with redis_for(settings) as settings:
                run_executor(settings)
    except Terminated:
        # Everything is cleaned up: now end as a SIGTERM would (its exit status, for the caller).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds every `finally` on its way out, like KeyboardInterrupt."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


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


def serve_gateway(settings: Settings, host: str, port: int,
                  sock: socket.socket | None = None) -> None:
    """Serve on `host:port`, or on `sock` when the caller has bound it already."""
    import uvicorn

    from relay.gateway.app import create_app

    app = create_app(settings)
    # Thousands of open event streams are hundreds of thousands of long-lived objects: keep
    # what start-up made out of the collector's sight, and collect the young less often.
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Open event streams would hold the graceful shutdown until its timeout: end them
            # as soon as the server stops taking requests (the lifespan ends only after).
            super().handle_exit(sig, frame)
            gateway = getattr(app.state, "gateway", None)
            with contextlib.suppress(RuntimeError):  # no loop running: nothing is open
                loop = asyncio.get_running_loop()
                if gateway is not None:
                    loop.call_soon_threadsafe(gateway.fan_in.begin_shutdown)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    Server(config).run(sockets=None if sock is None else [sock])


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host:port`, as uvicorn would make it. Raises OSError (a busy port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


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


def run_webhooks(settings: Settings) -> None:
    """The webhook deliverer on its own (relay.deliverer): for deployments that want to scale
    deliveries apart from the gateways, which each run one too."""
    import redis

    from relay.connection import connect
    from relay.deliverer import Deliverer
    from relay.keys import Keys
    from relay.metrics import Metrics
    from relay.supervise import Supervisor
    from relay.webhooks import Webhooks

    async def serve() -> None:
        assert settings.redis_url is not None
        client = connect(settings.redis_url)
        keys = Keys(settings.prefix)
        metrics = Metrics(client, keys)
        webhooks = Webhooks(client, keys, schedule=settings.webhook_schedule_ms,
                            rotation_grace_ms=settings.webhook_rotation_grace_ms)
        deliverer = Deliverer(client, keys, settings, webhooks, metrics)
        supervisor = Supervisor("relay.webhooks")
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopped.set)
        supervisor.start("webhook events", deliverer.consume)
        supervisor.start("webhook deliveries", deliverer.deliver)
        supervisor.start("metrics", metrics.run)
        logging.getLogger("relay.webhooks").info("webhook deliverer %s reading the bus",
                                                 deliverer.consumer)
        try:
            await stopped.wait()
        finally:
            await supervisor.stop()
            await deliverer.aclose()
            with contextlib.suppress(redis.RedisError):
                await metrics.flush()
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


async def manage_keys(settings: Settings, args: argparse.Namespace) -> None:
    from relay.apikeys import StoredKeys
    from relay.connection import connect
    from relay.keys import Keys
    from relay.principals import RULE, is_principal

    assert settings.redis_url is not None
    client = connect(settings.redis_url)
    stored = StoredKeys(client, Keys(settings.prefix))
    try:
        if args.keys_command == "create":
            if not is_principal(args.principal):
                raise SystemExit(f"relay: {args.principal!r} is not a principal name: {RULE}")
            new = await stored.create(args.principal)
            print(f"{new.key}\n\nkey id {new.id} for principal {args.principal!r}: keep the key "
                  "now, it is not shown again; `relay keys revoke ID` revokes it.",
                  file=sys.stdout)
        elif args.keys_command == "list":
            records = await stored.list()
            if not records:
                print("no stored keys (`relay keys create PRINCIPAL` makes one; keys from "
                      "RELAY_API_KEYS are not stored, so not listed)")
            for record in records:
                print(f"{record.id}  {record.principal}  {record.created_at}")
        else:
            revoked = await stored.revoke(args.id)
            if revoked is None:
                raise SystemExit(f"relay: no key with id {args.id}")
            print(f"revoked key {revoked.id} of {revoked.principal!r}")
    finally:
        await client.aclose()


def dev(settings: Settings, host: str, port: int) -> None:
    """Everything on one machine: the settings' Redis (or an embedded one), one executor in its
    own process (so wasm and HTTP use both cores), the gateway in this one."""
    # The port first: when it is busy, nothing is started and "running" is never printed.
    try:
        sock = listen(host, port)
    except OSError as exc:
        raise SystemExit(f"relay: cannot listen on {host}:{port}: {exc.strerror} (is another "
                         "`relay dev` running? --port P picks another port)") from None
    if "RELAY_RATE_LIMIT" not in os.environ:
        settings = msgspec.structs.replace(settings, rate_limit=DEV_RATE_LIMIT)
    limit = (f"{settings.rate_limit} executes per {settings.rate_window_ms // 1000} s "
             "and principal" if settings.rate_limit else "off")
    with sock, redis_for(settings) as settings:
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
            at = "" if url == "http://127.0.0.1:8000" else f" --url {url}"  # the CLI's default
            print(
                f"\nRelay is running at {url}\n"
                f"  API key ({principal}): {key}\n"
                f"  Redis: {redis_url}\n"
                f"  Rate limit: {limit} (RELAY_RATE_LIMIT; `relay gateway` defaults to 10)\n"
                f"  Console: {url}/console (sign in with the key above)\n"
                f"  API reference: {url}/docs\n\n"
                f"Try:\n  curl -s {url}/intent/execute-wasm -H 'X-API-Key: {key}' "
                "-H 'Content-Type: application/json' "
                "-d '{\"cid\": \"glyph://calculator@quantum\", \"inputs\": [5, 3]}'\n"
                "or, with the client commands (`pip install -e clients/python`), from here:\n"
                f"  relay execute{at} glyph://calculator@quantum 5 3\n",
                flush=True,
            )
            serve_gateway(settings, host, port, sock)
        finally:
            executor.send_signal(signal.SIGTERM)
            try:
                executor.wait(timeout=10)
            except subprocess.TimeoutExpired:
                executor.kill()


def dev_key(data_dir: Path) -> str:
    """The persistent dev key: created once, kept (mode 600) so every start prints the same."""
    path = data_dir / cli_client.DEV_KEY_FILE
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
