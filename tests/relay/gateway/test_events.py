"""Server-Sent Events and the WebSocket, over a real socket, with a real executor."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from executor.worker import Executor
from relay.gateway.fanin import EventFanIn, data_and_user, for_clients
from relay.keys import Keys
from relay.settings import Settings
from relay.tokens import AccessTokens
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    Served,
    assert_problem,
    event_entries,
    serve,
    upload,
    wait_for,
)

# Streams write caught-up events straight to the server's transport, and uvloop's (which
# `relay gateway` runs) is not asyncio's.
pytestmark = pytest.mark.both_loops

EVENTS = "/intent/execute-wasm/events"
TERMINAL = {"execution_complete", "execution_error"}


@dataclass
class Message:
    id: str | None = None
    data: str | None = None
    retry: int | None = None
    event: str | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


async def sse_messages(response: httpx.Response) -> AsyncIterator[Message]:
    """Parse a text/event-stream into messages (comments are kept on the next message)."""
    message = Message()
    async for line in response.aiter_lines():
        if line == "":
            if message.data is not None or message.retry is not None:
                yield message
            message = Message()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            message.comments.append(value)
        elif name == "data":
            assert message.data is None, "one data line per message"
            message.data = value
        elif name == "id":
            message.id = value
        elif name == "retry":
            message.retry = int(value)
        elif name == "event":
            message.event = value


async def collect(response: httpx.Response, until: Any, timeout_s: float = 15
                  ) -> list[Message]:
    """Messages until `until(messages)` is true."""
    messages: list[Message] = []
    async with asyncio.timeout(timeout_s):
        async for message in sse_messages(response):
            messages.append(message)
            if until(messages):
                return messages
    raise AssertionError(f"the stream ended early: {messages}")


def terminals(count: int) -> Any:
    return lambda ms: sum(m.data is not None and m.json["type"] in TERMINAL
                          for m in ms) >= count


def data_messages(count: int) -> Any:
    return lambda ms: sum(m.data is not None for m in ms) >= count


def client(served: Served, key: str | None = ALICE_KEY) -> httpx.AsyncClient:
    headers = {"X-API-Key": key} if key else {}
    return httpx.AsyncClient(base_url=served.url, headers=headers,
                             timeout=httpx.Timeout(30, read=30))


async def submit(http: httpx.AsyncClient, cid: str, inputs: list[Any]) -> str:
    response = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                               json={"cid": cid, "inputs": inputs})
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


async def test_lifecycle_events_in_order(served: Served, executor: Executor) -> None:
    async with client(served) as http:
        module = await upload(http, ADD_WAT)
        async with http.stream("GET", EVENTS) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["cache-control"] == "no-store"
            assert stream.headers["x-accel-buffering"] == "no"
            request_id = await submit(http, module["cid"], [2, 3])
            messages = await collect(stream, terminals(1))
    assert messages[0].retry is not None and messages[0].data is None  # retry: once, first
    events = [m for m in messages if m.data is not None]
    assert all(m.event is None for m in events)  # no event: line, so onmessage sees them all
    types = [m.json["type"] for m in events]
    assert types == ["execution_queued", "execution_started", "execution_complete"]
    assert {m.json["request_id"] for m in events} == {request_id}
    assert events[-1].json["output"] == 5
    ids = [tuple(map(int, m.id.split("-"))) for m in events if m.id]
    assert len(ids) == len(events) and ids == sorted(ids)
    assert all("timestamp" in m.json for m in events)
    # wasm_exec_completed is for bus consumers, not for clients of the stream
    assert "wasm_exec_completed" not in types


async def test_replay_from_any_id_equals_the_tail(served: Served, executor: Executor) -> None:
    async with client(served) as http:
        module = await upload(http, ADD_WAT)
        for n in range(3):
            await submit(http, module["cid"], [n, n])
        async def all_done() -> bool:
            async with http.stream("GET", EVENTS, params={"last_event_id": "0"}) as stream:
                try:
                    await collect(stream, terminals(3), timeout_s=1)
                    return True
                except TimeoutError:
                    return False

        await wait_for(all_done, timeout_s=15, interval_s=0.1)
        async with http.stream("GET", EVENTS, params={"last_event_id": "0"}) as stream:
            full = [m for m in await collect(stream, terminals(3)) if m.data]
        assert len(full) == 9
        for index, message in enumerate(full[:-1]):
            headers = {"Last-Event-ID": message.id or ""}
            expected = full[index + 1:]
            async with http.stream("GET", EVENTS, headers=headers) as stream:
                tail = [m for m in await collect(stream, data_messages(len(expected)))
                        if m.data]
            assert [(m.id, m.data) for m in tail] == [(m.id, m.data) for m in expected]


async def test_replay_then_live_without_gap_or_duplicate(served: Served,
                                                        executor: Executor) -> None:
    async with client(served) as http:
        module = await upload(http, ADD_WAT)
        first = await submit(http, module["cid"], [1, 1])
        await wait_for(lambda: _status(http, first, "completed"), timeout_s=10)
        async with http.stream("GET", EVENTS, params={"last_event_id": "0"}) as stream:
            second = await submit(http, module["cid"], [2, 2])
            messages = [m for m in await collect(stream, terminals(2)) if m.data]
    ids = [m.id for m in messages]
    assert len(ids) == len(set(ids)), "no duplicate"
    assert [m.json["request_id"] for m in messages] == [first] * 3 + [second] * 3


class ChunkedReader:
    """A raw HTTP/1.1 client of one event stream that checks the chunked framing strictly:
    events written straight to the connection (streams.uvicorn_wire) must be chunks like any
    other."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.body = b""
        self.chunks = 0

    async def head(self) -> dict[str, str]:
        status = await self.reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return headers

    async def chunk(self) -> None:
        size_line = await self.reader.readline()
        assert size_line.endswith(b"\r\n") and size_line[:-2], size_line
        size = int(size_line[:-2], 16)
        assert size > 0, "the response ended"
        self.body += await self.reader.readexactly(size)
        self.chunks += 1
        assert await self.reader.readexactly(2) == b"\r\n", "a chunk must end with CRLF"

    def events(self) -> list[tuple[str, str]]:
        """(id, data) of every event message so far."""
        found = []
        for message in self.body.decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in message.splitlines()
                          if line.startswith(("id: ", "data: ")))
            if "data" in fields:
                found.append((fields["id"], fields["data"]))
        return found

    async def until(self, done: Any, timeout_s: float = 15) -> None:
        async with asyncio.timeout(timeout_s):
            while not done(self.events()):
                await self.chunk()


@pytest.mark.parametrize("http_impl", ["httptools", "h11"])
async def test_live_events_are_the_same_written_straight_or_through_asgi(
        settings: Settings, executor: Executor, http_impl: str) -> None:
    """Over httptools (what `relay gateway` runs) a caught-up stream's events are written
    straight to its connection; over h11 they go through ASGI. Either way the client gets
    well-formed chunks carrying exactly the retained events, in order, replay then live."""
    def ended(count: int) -> Any:
        return lambda events: sum(json.loads(data)["type"] in TERMINAL
                                  for _, data in events) >= count

    async with serve(settings, http=http_impl) as served, client(served) as http:
        module = await upload(http, ADD_WAT)
        first = await submit(http, module["cid"], [1, 1])
        await wait_for(lambda: _status(http, first, "completed"), timeout_s=10)
        address = urlsplit(served.url)
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        try:
            writer.write(f"GET {EVENTS}?last_event_id=0 HTTP/1.1\r\nHost: x\r\n"
                         f"X-API-Key: {ALICE_KEY}\r\n\r\n".encode())
            stream = ChunkedReader(reader)
            assert (await stream.head())["transfer-encoding"] == "chunked"
            await stream.until(ended(1))  # the replay
            second = await submit(http, module["cid"], [2, 2])
            await stream.until(ended(2))  # live
            # Caught up (the first live event past the replay went through the stream's task,
            # which drops what the replay sent already): the rest may take the wire.
            fan_in: EventFanIn = served.gateway.fan_in
            (subscriber,) = fan_in._subscribers["alice"]
            assert (subscriber.wire is not None) == (http_impl == "httptools")
        finally:
            writer.close()
    retained = await _client_events(settings, "alice")
    assert stream.events() == retained
    assert [json.loads(data)["request_id"] for _, data in retained] == [first] * 3 + [second] * 3


async def test_events_read_together_go_out_in_one_write(served: Served,
                                                        settings: Settings) -> None:
    """Entries the fan-in reads in one go reach a caught-up stream as one chunk (so a fan-in
    that fell behind catches up), in order, each its own SSE message."""
    address = urlsplit(served.url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    redis_client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        writer.write(f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ALICE_KEY}\r\n\r\n"
                     .encode())
        stream = ChunkedReader(reader)
        await stream.head()
        await stream.chunk()  # retry:
        fan_in: EventFanIn = served.gateway.fan_in
        await wait_for(lambda: any(s.wire for s in fan_in._subscribers.get("alice", ())),
                       timeout_s=5)
        async with redis_client.pipeline(transaction=True) as burst:  # appended at once
            for n in range(5):
                data = (f'{{"type":"execution_progress","request_id":"{n:064x}",'
                        f'"progress":{n},"gas_used":{n},"timestamp":"2026-01-01T00:00:00.000Z"}}')
                burst.xadd(Keys(settings.prefix).events, {"data": data, "user": "alice"})
            await burst.execute()
        chunks_before = stream.chunks
        await stream.until(lambda events: len(events) == 5)
    finally:
        writer.close()
        await redis_client.aclose()
    assert stream.chunks - chunks_before == 1
    assert stream.events() == await _client_events(settings, "alice")
    assert [json.loads(data)["progress"] for _, data in stream.events()] == list(range(5))


async def _client_events(settings: Settings, principal: str) -> list[tuple[str, str]]:
    """(id, data) of `principal`'s client events in the stream, as SSE should carry them."""
    return [(entry_id.decode(), fields[b"data"].decode())
            for entry_id, fields in await event_entries(settings)
            if fields[b"user"] == principal.encode() and for_clients(fields[b"data"])]


async def _status(http: httpx.AsyncClient, request_id: str, status: str) -> bool:
    return bool((await http.get(f"/executions/{request_id}")).json()["status"] == status)


async def test_each_principal_sees_only_its_own(served: Served, executor: Executor) -> None:
    async with client(served) as alice, client(served, BOB_KEY) as bob:
        module = await upload(alice, ADD_WAT)
        async with bob.stream("GET", EVENTS, params={"last_event_id": "0"}) as everything:
            alice_id = await submit(alice, module["cid"], [5, 5])
            guessed = bob.stream("GET", EVENTS, params={"request_id": alice_id,
                                                        "last_event_id": "0"})
            async with guessed as narrowed:
                bob_id = await submit(bob, module["cid"], [6, 6])
                seen = [m for m in await collect(everything, terminals(1)) if m.data]
                narrowed_task = asyncio.create_task(collect(narrowed, lambda ms: any(
                    m.data for m in ms)))
                await asyncio.sleep(0)  # let it start; it must see nothing
                done, _ = await asyncio.wait({narrowed_task}, timeout=1.0)
                narrowed_task.cancel()
        assert not done, "bob saw an event of alice's execution by guessing its id"
        assert {m.json["request_id"] for m in seen} == {bob_id}
        assert (await bob.get(f"/executions/{alice_id}")).status_code == 404


async def test_filter_by_request_id(served: Served, executor: Executor) -> None:
    async with client(served) as http:
        module = await upload(http, ADD_WAT)
        wanted = await submit(http, module["cid"], [7, 1])
        await submit(http, module["cid"], [7, 2])
        async with http.stream("GET", EVENTS, params={"request_id": wanted,
                                                      "last_event_id": "0"}) as stream:
            messages = [m for m in await collect(stream, terminals(1)) if m.data]
    assert {m.json["request_id"] for m in messages} == {wanted}


async def test_bad_last_event_id_and_filter_are_400(served: Served) -> None:
    async with client(served) as http:
        assert_problem(await http.get(EVENTS, headers={"Last-Event-ID": "yesterday"}), 400,
                       "invalid-request")
        assert_problem(await http.get(EVENTS, params={"request_id": "nope"}), 400,
                       "invalid-request")


async def test_events_lost_when_history_was_trimmed(settings: Settings, served: Served) -> None:
    keys = Keys(settings.prefix)
    redis_client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        first = await redis_client.xadd(keys.events, {"data": b"{}", "user": b"nobody"})
        for _ in range(300):
            await redis_client.xadd(keys.events, {"data": b"{}", "user": b"nobody"})
        await redis_client.xtrim(keys.events, maxlen=10)
    finally:
        await redis_client.aclose()
    async with client(served) as http, http.stream(
            "GET", EVENTS, headers={"Last-Event-ID": first.decode()}) as stream:
        messages = await collect(stream, lambda ms: any(m.data for m in ms))
    lost = next(m for m in messages if m.data)
    assert lost.json["type"] == "events_lost"
    assert lost.json["oldest_id"] > first.decode()


async def test_access_token_in_the_url(served: Served, executor: Executor) -> None:
    async with client(served) as http, client(served, None) as browser:
        minted = await http.post("/auth/tokens")
        assert minted.status_code == 200
        token = minted.json()["access_token"]
        assert minted.json()["expires_at"].endswith("Z")
        module = await upload(http, ADD_WAT)
        async with browser.stream("GET", EVENTS, params={"access_token": token}) as stream:
            assert stream.status_code == 200
            await submit(http, module["cid"], [8, 8])
            messages = await collect(stream, terminals(1))
        assert any(m.data for m in messages)
        for credential in (ALICE_KEY, "rt1.forged.signature", "not-a-token"):
            refused = await browser.get(EVENTS, params={"access_token": credential})
            assert_problem(refused, 401, "unauthenticated")
        # An access token is for streams only, not a credential for the API.
        other = await browser.get("/modules", params={"access_token": token})
        assert_problem(other, 401, "unauthenticated")


async def test_expired_token_is_refused_and_ends_the_stream(served: Served) -> None:
    tokens: AccessTokens = served.gateway.tokens
    # `exp` is whole seconds from a truncated now: a 1 s token may live under a millisecond.
    short = AccessTokens(tokens._secret, ttl_s=3)
    token, _ = short.mint("alice")
    async with client(served, None) as browser:
        async with browser.stream("GET", EVENTS, params={"access_token": token}) as stream:
            assert stream.status_code == 200
            started = time.monotonic()
            async for _ in stream.aiter_lines():
                pass  # the server ends the stream when the token expires
            assert time.monotonic() - started < 5
        refused = await browser.get(EVENTS, params={"access_token": token})
        assert_problem(refused, 401, "unauthenticated")


async def test_disconnect_frees_the_subscription(served: Served) -> None:
    fan_in: EventFanIn = served.gateway.fan_in
    async with client(served) as http:
        streams = [http.stream("GET", EVENTS) for _ in range(3)]
        opened = [await s.__aenter__() for s in streams]
        await wait_for(lambda: fan_in.subscriber_count == 3, timeout_s=5)
        for stream, response in zip(streams, opened, strict=True):
            await stream.__aexit__(None, None, None)
            del response
    await wait_for(lambda: fan_in.subscriber_count == 0, timeout_s=5)


async def test_slow_subscriber_is_dropped_while_a_fast_one_keeps_up(settings: Settings) -> None:
    keys = Keys(settings.prefix)
    redis_client = aioredis.Redis.from_url(settings.redis_url or "")
    fan_in = EventFanIn(redis_client, keys, queue_capacity=10)
    fan_in.start(b"0-0")
    following = asyncio.create_task(fan_in.follow())
    slow = fan_in.subscribe("alice", None)
    fast = fan_in.subscribe("alice", None)
    received: list[bytes] = []

    async def read_fast() -> None:
        while len(received) < 100:
            for item in await fast.take(100):
                assert item is not None, "the fast subscriber was dropped"
                assert not isinstance(item, str)
                received.append(item.id)

    reader = asyncio.create_task(read_fast())
    try:
        for n in range(100):
            await redis_client.xadd(keys.events, {"data": f'{{"n":{n}}}'.encode(),
                                                  "user": b"alice"})
        await asyncio.wait_for(reader, 10)
        items = await slow.take(100)
        assert items[-1] is None, "the slow subscriber was told to go"
        assert len(items) <= 10, "its queue never grew past its bound"
        assert len(received) == 100
    finally:
        reader.cancel()
        fan_in.stop()
        following.cancel()
        await asyncio.wait({following}, timeout=1.0)
        await redis_client.aclose()


async def test_unauthenticated_stream_is_401(served: Served) -> None:
    async with client(served, None) as browser:
        assert_problem(await browser.get(EVENTS), 401, "unauthenticated")


# --- WebSocket ---


def ws_url(served: Served, request_id: str) -> str:
    return served.url.replace("http", "ws", 1) + f"/ws/executions/{request_id}"


async def test_websocket_streams_one_executions_events(served: Served,
                                                      executor: Executor) -> None:
    async with client(served) as http:
        module = await upload(http, ADD_WAT)
        request_id = await submit(http, module["cid"], [20, 22])
        async with ws_connect(ws_url(served, request_id),
                              additional_headers={"X-API-Key": ALICE_KEY}) as ws:
            events = [json.loads(message) async for message in ws]
    types = [e["type"] for e in events]
    assert types[0] == "execution_queued" and types[-1] == "execution_complete"
    assert events[-1]["output"] == 42
    assert {e["request_id"] for e in events} == {request_id}


async def test_websocket_refuses_strangers(served: Served, executor: Executor) -> None:
    async with client(served) as http:
        module = await upload(http, ADD_WAT)
        request_id = await submit(http, module["cid"], [1, 2])
    for headers, code in (({"X-API-Key": BOB_KEY}, 4404), ({}, 4401),
                          ({"X-API-Key": "wrong"}, 4401)):
        async with ws_connect(ws_url(served, request_id), additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == code


async def test_gateway_sigterm_ends_streams_with_a_retry_hint(processes: Any) -> None:
    import signal

    url = processes.gateway()
    gateway = processes.running[-1]
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": ALICE_KEY},
                                 timeout=30) as http, http.stream("GET", EVENTS) as stream:
        messages = sse_messages(stream)
        first = await anext(messages)
        assert first.retry is not None
        gateway.send_signal(signal.SIGTERM)
        began = time.monotonic()
        rest = [m async for m in messages]
        ended_s = time.monotonic() - began
    assert rest and rest[-1].retry is not None and rest[-1].retry < first.retry
    assert "gateway shutting down" in rest[-1].comments
    assert ended_s < 5
    # It exits (uvicorn re-raises the SIGTERM it handled once it has shut down cleanly).
    assert await asyncio.to_thread(gateway.wait, 10) in (0, -signal.SIGTERM)


async def test_quiet_streams_get_keep_alive_comments(served: Served,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.gateway import fanin as events

    monkeypatch.setattr(events, "PING_S", 0.2)  # the contract's 15 s, shortened for the test
    async with client(served) as http, http.stream("GET", EVENTS) as stream:
        pings = 0
        async with asyncio.timeout(5):
            async for line in stream.aiter_lines():
                pings += line == ": ping"
                if pings == 2:
                    break
    assert pings == 2


async def test_a_client_that_reads_nothing_is_cut_off(served: Served, settings: Settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that stops reading fills its socket, then its stream's queue: the stream is
    dropped, and since it is stuck in a send, its task is cancelled after STUCK_S and the
    connection closed, instead of holding its buffers forever."""
    import socket
    from urllib.parse import urlsplit

    from relay.gateway import fanin as events

    monkeypatch.setattr(events, "STUCK_S", 0.5)
    fan_in: EventFanIn = served.gateway.fan_in
    address = urlsplit(served.url)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(10)

    def open_stream() -> bytes:  # in a thread: the gateway serves from this test's loop
        stuck.connect((address.hostname, address.port))
        stuck.sendall(f"GET {EVENTS} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ALICE_KEY}\r\n\r\n"
                      .encode())
        return stuck.recv(64)

    assert (await asyncio.to_thread(open_stream)).startswith(b"HTTP/1.1 200")
    await wait_for(lambda: fan_in.subscriber_count == 1, timeout_s=5)
    redis_client = aioredis.Redis.from_url(settings.redis_url or "")
    try:
        # Far more than the socket buffers and the queue (256) hold: 400 events of 60 KB.
        pad = "x" * 60_000
        for n in range(400):
            data = (f'{{"type":"execution_progress","request_id":"{n:064x}","progress":0,'
                    f'"gas_used":{n},"timestamp":"2026-01-01T00:00:00.000Z","pad":"{pad}"}}')
            await redis_client.xadd(Keys(settings.prefix).events,
                                    {"data": data.encode(), "user": b"alice"})
        await wait_for(lambda: fan_in.subscriber_count == 0, timeout_s=20)
    finally:
        await redis_client.delete(Keys(settings.prefix).events)
        await redis_client.aclose()

    def read_to_the_end() -> None:
        while stuck.recv(1 << 20):
            pass  # what was buffered, then the end: the gateway closed the connection

    await asyncio.to_thread(read_to_the_end)
    stuck.close()


async def test_a_request_id_stream_resumes_from_the_executions_index(
        served: Served, executor: Executor, settings: Settings) -> None:
    """With `?request_id=`, the replay reads each named execution's own list of events: the
    same events, in order, after the given id, as a scan would find."""
    async with client(served) as http:
        module = await upload(http, ADD_WAT)
        first = await submit(http, module["cid"], [30, 1])
        second = await submit(http, module["cid"], [30, 2])
        await submit(http, module["cid"], [30, 3])  # not asked for
        for request_id in (first, second):
            await wait_for(lambda r=request_id: _status(http, r, "completed"), timeout_s=10)
        wanted = [(entry_id, data) for entry_id, data in await _client_events(settings, "alice")
                  if json.loads(data)["request_id"] in (first, second)]
        params = {"request_id": [first, second], "last_event_id": wanted[0][0]}
        async with http.stream("GET", EVENTS, params=params) as stream:
            messages = [m for m in await collect(stream, data_messages(len(wanted) - 1))
                        if m.data]
    assert [(m.id, m.data) for m in messages] == wanted[1:]


async def test_a_closed_websocket_frees_its_place_at_once(served: Served,
                                                         executor: Executor) -> None:
    """An execution may publish nothing for long (a loop that makes no calls): the socket's
    stream ends when the client leaves, not at the execution's next event."""
    fan_in: EventFanIn = served.gateway.fan_in
    async with client(served) as http:
        module = await upload(http, '(module (func (export "main") (loop br 0)))')
        accepted = await http.post("/intent/execute-wasm", headers={"Prefer": "respond-async"},
                                   json={"cid": module["cid"],
                                         "policy": {"max_gas": 10**11, "max_time": 60_000}})
        request_id = accepted.json()["request_id"]
        await wait_for(lambda: _status(http, request_id, "running"), timeout_s=10)
        async with ws_connect(ws_url(served, request_id),
                              additional_headers={"X-API-Key": ALICE_KEY}) as ws:
            await ws.recv()
            assert served.gateway.streams.held == fan_in.subscriber_count == 1
        await wait_for(lambda: served.gateway.streams.held == fan_in.subscriber_count == 0,
                       timeout_s=2)
        await http.delete(f"/executions/{request_id}")


def test_an_entry_s_data_and_user_are_read_whatever_the_order_of_its_fields() -> None:
    # The order the scripts write them in is read in place; any other (a writer of another
    # version, a field more) by name.
    assert data_and_user([b"data", b"{}", b"user", b"alice"]) == (b"{}", b"alice")
    assert data_and_user([b"user", b"alice", b"data", b"{}"]) == (b"{}", b"alice")
    assert data_and_user([b"data", b"{}", b"user", b"alice", b"x", b"1"]) == (b"{}", b"alice")
    assert data_and_user([b"data", b"{}"]) == (b"{}", b"")
    with pytest.raises(KeyError):  # the fan-in fails on it, and is restarted past it
        data_and_user([b"user", b"alice"])
