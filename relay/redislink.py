"""`RedisLink`: a lean Redis connection for the execute path. Commands are written at once on
one socket and their replies handed back in order (RESP2 pipelining), parsed by hiredis.

redis-py's asyncio client spends about 90 µs of CPU on one EVALSHA round trip (a pool checkout,
a task per write to time it out, its response callbacks); a link spends about 25
(`bench/bench_link.py`). A sync execute makes six such trips (the gateway's accept and its
fan-in's two reads, the executor's take, start and settle), so those run on links and the rest
of Relay keeps redis-py. Errors are redis-py's own exception classes, so callers catch one
family, and a link connects to the same server, database and credentials as the redis-py
client it is made from (`RedisLink.of`).

One link is shared by every caller of a process; a reader that blocks (`XREAD ... BLOCK`) gets
a link of its own, since the commands behind it would wait for it. A caller that is cancelled
leaves the connection in step: its reply is read and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any, cast

import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.backoff import ExponentialBackoff

Command = Sequence[Any]
"""A command and its arguments: str, bytes, int or float."""


def fields_of(flat: list[Any]) -> dict[Any, Any]:
    """A reply listing field, value, field, value... (a stream entry's fields) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Call:
    __slots__ = ("count", "future", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], count: int) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    """One connection: the calls written on it, oldest first, each waiting for its replies."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Error replies become redis-py's exceptions (NoScriptError, OutOfMemoryError, ...),
        # returned in place, as a redis-py pipeline's `raise_on_error=False` gives them.
        self._reader = hiredis.Reader(replyError=BaseParser.parse_error,
                                      protocolError=redis.exceptions.InvalidResponse)
        self._calls: collections.deque[_Call] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: redis.ConnectionError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        calls = self._calls
        try:
            while (reply := self._reader.gets()) is not False:
                call = calls[0]  # IndexError: a reply nobody asked for
                call.replies.append(reply)
                if len(call.replies) == call.count:
                    calls.popleft()
                    if not call.future.done():
                        call.future.set_result(call.replies)
        except (IndexError, redis.exceptions.InvalidResponse) as exc:
            self.drop(redis.ConnectionError(f"Redis sent what was not asked for: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.drop(redis.ConnectionError(
            "Connection to Redis closed" + (f": {exc}" if exc else "")))

    def drop(self, error: redis.ConnectionError) -> None:
        """Close the connection; every call waiting on it fails with `error`."""
        if self.lost is None:
            self.lost = error
        if self.transport is not None:
            self.transport.abort()
        while self._calls:
            call = self._calls.popleft()
            if not call.future.done():
                call.future.set_exception(self.lost)

    def send(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write `count` packed commands; the future gets their replies."""
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        self._calls.append(_Call(future, count))
        self.transport.write(packed)
        return future


class RedisLink:
    def __init__(self, *, path: str | None = None, host: str = "localhost", port: int = 6379,
                 db: int = 0, username: str | None = None, password: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, timeout_s: float = 0.8,
                 connect_timeout_s: float = 1.0, retries: int = 3) -> None:
        """`timeout_s`: how long a reply may take (beyond the block time of a blocking read)
        before the connection is given up and the caller gets redis.TimeoutError; a lost
        connection is opened again and the call sent again, `retries` times at most, as
        redis-py does (every script Relay runs is safe to run twice)."""
        self._path = path
        self._host, self._port = host, port
        self._ssl = ssl_context
        self._where = path or f"{host}:{port}"
        handshake: list[Command] = []
        if password:
            handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            handshake.append(("SELECT", db))
        self._handshake = handshake
        self.timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._retries = retries
        self._backoff = ExponentialBackoff(cap=0.25, base=0.02)
        self._protocol: _Protocol | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def of(cls, client: aioredis.Redis) -> RedisLink:
        """A link to the server, database and user of `client` (its pool's settings)."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        timeout_s = kwargs.get("socket_timeout") or 0.8
        common: dict[str, Any] = {
            "db": int(kwargs.get("db") or 0), "username": kwargs.get("username"),
            "password": kwargs.get("password"), "timeout_s": timeout_s,
            "connect_timeout_s": kwargs.get("socket_connect_timeout") or timeout_s}
        if issubclass(pool.connection_class, UnixDomainSocketConnection):
            return cls(path=kwargs["path"], **common)
        context = None
        if issubclass(pool.connection_class, SSLConnection):
            # redis-py's own context from the URL's ssl_* options (CA, cert_reqs, ...).
            context = pool.connection_class(**kwargs).ssl_context.get()
        return cls(host=kwargs.get("host", "localhost"), port=int(kwargs.get("port", 6379)),
                   ssl_context=context, **common)

    async def execute(self, *command: Any, block_ms: int | None = None) -> Any:
        """One command's reply; an error reply is raised."""
        [reply] = await self.pipeline([command], block_ms=block_ms)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Command], *,
                       block_ms: int | None = None) -> list[Any]:
        """Every command's reply, in order, written at once; an error reply is returned in its
        place. `block_ms`: the longest `BLOCK` among them (0: forever), added to the time the
        replies may take."""
        if not commands:
            return []
        packed = b"".join([hiredis.pack_command(tuple(command)) for command in commands])
        timeout_s = None if block_ms == 0 else self.timeout_s + (block_ms or 0) / 1000
        attempt = 0
        while True:
            try:
                protocol = self._protocol
                if protocol is None or protocol.lost is not None:
                    protocol = await self._connected()
                return await self._replies(protocol, protocol.send(packed, len(commands)),
                                           timeout_s)
            except redis.ConnectionError:
                attempt += 1
                if attempt > self._retries or self._closed:
                    raise
                await asyncio.sleep(self._backoff.compute(attempt))

    async def _replies(self, protocol: _Protocol, future: asyncio.Future[list[Any]],
                       timeout_s: float | None) -> list[Any]:
        if timeout_s is None:
            return await future
        # A timer rather than asyncio.timeout(): a third of the cost, on every call.
        timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, protocol, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, protocol: _Protocol, future: asyncio.Future[list[Any]]) -> None:
        """The server stalls (or the network dropped it): the caller gets redis.TimeoutError,
        and the connection is given up, so the next call opens a new one rather than queueing
        behind this. Not when the reply came in meanwhile (the loop ran late, busy past the
        deadline, and read it just before this timer): the connection is in step, and dropping
        it would fail the calls behind, to be sent again, and run twice."""
        if future.done():
            return
        future.set_exception(redis.TimeoutError(f"Timeout reading from {self._where}"))
        protocol.drop(redis.ConnectionError("Redis did not answer in time"))

    async def _connected(self) -> _Protocol:
        async with self._lock:
            if self._closed:
                raise redis.ConnectionError("the link is closed")
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                protocol = await self._open()
                if self._closed:  # closed while it connected: nothing may use it now
                    protocol.drop(redis.ConnectionError("the link is closed"))
                    raise redis.ConnectionError("the link is closed")
                self._protocol = protocol
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(
                        lambda: _Protocol(loop), self._path)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(loop), self._host, self._port, ssl=self._ssl)
                if self._handshake:
                    packed = b"".join(hiredis.pack_command(tuple(c)) for c in self._handshake)
                    for reply in await protocol.send(packed, len(self._handshake)):
                        if isinstance(reply, Exception):
                            protocol.drop(redis.ConnectionError("handshake refused"))
                            raise reply
        except (OSError, TimeoutError) as exc:
            raise redis.ConnectionError(
                f"Error connecting to Redis at {self._where}: {exc or 'timed out'}") from exc
        return protocol

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        self._closed = True
        if self._protocol is not None:
            self._protocol.drop(redis.ConnectionError("the link is closed"))
            self._protocol = None
