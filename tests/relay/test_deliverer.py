"""The deliverer's attempts over real TLS (a throwaway CA from trustme, receivers on
127.0.0.1): the certificate is checked against the URL's host name, which is also the SNI and
the Host header, while the connection goes to the address the SSRF guard checked."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trustme
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from relay import connection
from relay.deliverer import Deliverer
from relay.keys import Keys
from relay.metrics import Metrics
from relay.settings import Settings
from relay.webhooks import Due, Webhooks
from tests.conftest import with_settings


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


class TlsReceiver:
    """An HTTPS receiver on 127.0.0.1 whose certificate names `name`; notes the SNI and the
    headers of what it gets."""

    def __init__(self, ca: trustme.CA, name: str) -> None:
        self.names: list[str | None] = []
        self.headers: list[dict[str, str]] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        context.sni_callback = lambda _sock, sni, _ctx: self.names.append(sni)  # type: ignore
        self.server = HTTPServer(host="127.0.0.1", port=0, ssl_context=context)
        self.server.expect_request("/hook", method="POST").respond_with_handler(self.answer)
        self.server.start()

    def answer(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        return Response("", status=204)

    def stop(self) -> None:
        self.server.clear()
        self.server.stop()


@pytest.fixture
def receivers(ca: trustme.CA) -> Iterator[dict[str, TlsReceiver]]:
    started = {"right": TlsReceiver(ca, "localhost"), "wrong": TlsReceiver(ca, "other.example")}
    yield started
    for receiver in started.values():
        receiver.stop()


@pytest.fixture
async def deliverers(settings: Settings, ca: trustme.CA
                     ) -> AsyncIterator[tuple[Deliverer, Deliverer]]:
    """One deliverer trusting the CA, one trusting only the usual roots."""
    local = with_settings(settings, webhook_allow_private=True)
    assert local.redis_url is not None
    client = connection.connect(local.redis_url)
    keys = Keys(local.prefix)
    webhooks = Webhooks(client, keys, schedule=(1000,), rotation_grace_ms=0)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    made = (Deliverer(client, keys, local, webhooks, Metrics(client, keys), verify=trusting),
            Deliverer(client, keys, local, webhooks, Metrics(client, keys)))
    yield made
    for deliverer in made:
        await deliverer.aclose()
    await client.aclose()


def _due(url: str) -> Due:
    return Due("1765000000000-0", url, "alice", b'{"type":"execution_complete"}',
               "unused", 1)


async def test_tls_names_the_urls_host_and_verifies_it(
        receivers: dict[str, TlsReceiver], deliverers: tuple[Deliverer, Any]) -> None:
    trusting, _ = deliverers
    right = receivers["right"]
    status, error, _ = await trusting.attempt(_due(f"https://localhost:{right.server.port}/hook"))
    assert (status, error) == (204, None)
    assert right.names == ["localhost"]
    assert right.headers[0]["Host"] == f"localhost:{right.server.port}"


async def test_a_certificate_for_another_name_is_refused(
        receivers: dict[str, TlsReceiver], deliverers: tuple[Deliverer, Any]) -> None:
    trusting, _ = deliverers
    wrong = receivers["wrong"]
    status, error, _ = await trusting.attempt(_due(f"https://localhost:{wrong.server.port}/hook"))
    assert status is None and error is not None and "certificate" in error.lower(), error
    assert wrong.headers == []


async def test_a_certificate_from_an_unknown_ca_is_refused(
        receivers: dict[str, TlsReceiver], deliverers: tuple[Any, Deliverer]) -> None:
    _, untrusting = deliverers
    right = receivers["right"]
    status, error, _ = await untrusting.attempt(
        _due(f"https://localhost:{right.server.port}/hook"))
    assert status is None and error is not None and "certificate" in error.lower(), error
    assert right.headers == []


async def test_each_attempt_checks_the_url_again(settings: Settings) -> None:
    """A URL accepted once (say while RELAY_WEBHOOK_ALLOW_PRIVATE was set, or while its name
    resolved elsewhere) is refused by the attempt's own check, and nothing is sent."""
    server = HTTPServer(host="127.0.0.1", port=0)
    got: list[str] = []
    server.expect_request("/hook").respond_with_handler(
        lambda request: (got.append(request.path), Response("", status=204))[1])
    server.start()
    assert settings.redis_url is not None
    client = connection.connect(settings.redis_url)
    keys = Keys(settings.prefix)
    strict = with_settings(settings, webhook_allow_http=True)  # private addresses refused
    deliverer = Deliverer(client, keys, strict,
                          Webhooks(client, keys, schedule=(1000,), rotation_grace_ms=0),
                          Metrics(client, keys))
    try:
        status, error, _ = await deliverer.attempt(_due(f"http://127.0.0.1:{server.port}/hook"))
    finally:
        await deliverer.aclose()
        await client.aclose()
        server.clear()
        server.stop()
    assert status is None and error is not None and error.startswith("refused: "), error
    assert got == []


async def test_an_attempt_ends_at_its_timeout_however_slowly_the_receiver_answers(
        settings: Settings) -> None:
    """A receiver that answers a byte every 50 ms never trips a read timeout; the attempt
    still ends at RELAY_WEBHOOK_TIMEOUT, well within the lease that keeps peers off it."""
    answers: list[asyncio.Task[None]] = []

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answers.append(asyncio.create_task(drip(reader, writer)))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert settings.redis_url is not None
    client = connection.connect(settings.redis_url)
    keys = Keys(settings.prefix)
    local = with_settings(settings, webhook_allow_http=True, webhook_allow_private=True,
                          webhook_timeout_ms=500)
    deliverer = Deliverer(client, keys, local,
                          Webhooks(client, keys, schedule=(1000,), rotation_grace_ms=0),
                          Metrics(client, keys))
    began = time.monotonic()
    try:
        status, error, _ = await deliverer.attempt(_due(f"http://127.0.0.1:{port}/hook"))
    finally:
        elapsed = time.monotonic() - began
        await deliverer.aclose()
        await client.aclose()
        for task in answers:
            task.cancel()
        server.close()
    assert (status, error) == (None, "timeout")
    assert 0.45 <= elapsed < 1.5, elapsed
