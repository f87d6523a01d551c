"""The Redis client `relay.connection.connect` makes: a short socket timeout that never cuts a
blocking read short."""

from __future__ import annotations

import time

from relay.connection import SOCKET_TIMEOUT_S, connect
from relay.settings import Settings


async def test_a_blocking_read_longer_than_the_socket_timeout_returns_empty(
        settings: Settings) -> None:
    assert settings.redis_url is not None
    client = connect(settings.redis_url)
    stream = f"{settings.prefix}:empty"
    try:
        block_ms = int(SOCKET_TIMEOUT_S * 1000) + 400
        began = time.monotonic()
        assert not await client.xread({stream: "$"}, block=block_ms)
        took = time.monotonic() - began
        assert block_ms / 1000 - 0.05 < took < block_ms / 1000 + SOCKET_TIMEOUT_S
        # The connection goes back to the usual timeout for what follows, pipelines included.
        pipe = client.pipeline(transaction=False)
        pipe.xadd(stream, {"n": 1})
        pipe.xlen(stream)
        assert (await pipe.execute())[1] == 1
        assert len(await client.xread({stream: "0"}, block=block_ms)) == 1
        # A blocking read in a pipeline (the executor's read and take) waits its block too.
        pipe = client.pipeline(transaction=False)
        pipe.xread({stream: "$"}, block=block_ms)
        pipe.xlen(stream)
        began = time.monotonic()
        assert await pipe.execute() == [[], 1]
        assert time.monotonic() - began > block_ms / 1000 - 0.05
    finally:
        await client.aclose()
