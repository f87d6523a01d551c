"""The Redis connections `relay.connection.connect` makes: a short socket timeout that never
cuts a blocking read (over a link, relay.redislink) short."""

from __future__ import annotations

import time

from relay.connection import SOCKET_TIMEOUT_S, connect
from relay.settings import Settings


async def test_a_blocking_read_longer_than_the_socket_timeout_returns_empty(
        settings: Settings) -> None:
    assert settings.redis_url is not None
    client = connect(settings.redis_url)
    link = client.reader_link()
    stream = f"{settings.prefix}:empty"
    try:
        block_ms = int(SOCKET_TIMEOUT_S * 1000) + 400
        began = time.monotonic()
        assert not await link.execute("XREAD", "BLOCK", block_ms, "STREAMS", stream, "$",
                                      block_ms=block_ms)
        took = time.monotonic() - began
        assert block_ms / 1000 - 0.05 < took < block_ms / 1000 + SOCKET_TIMEOUT_S
        # The link goes back to the usual timeout for what follows, pipelines included.
        _, length = await link.pipeline([("XADD", stream, "*", "n", 1), ("XLEN", stream)])
        assert length == 1
        assert len(await link.execute("XREAD", "BLOCK", block_ms, "STREAMS", stream, "0",
                                      block_ms=block_ms)) == 1
        # A blocking read in a pipeline (the executor's read and take) waits its block too.
        began = time.monotonic()
        assert await link.pipeline([("XREAD", "BLOCK", block_ms, "STREAMS", stream, "$"),
                                    ("XLEN", stream)], block_ms=block_ms) == [None, 1]
        assert time.monotonic() - began > block_ms / 1000 - 0.05
    finally:
        await client.aclose()
