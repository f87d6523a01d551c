"""The README's first curl, end to end through Redis and a real executor."""

from __future__ import annotations

import httpx

from executor.worker import Executor
from tests.conftest import ADD_WAT, upload


async def test_sync_execute_returns_the_sum(http: httpx.AsyncClient, executor: Executor) -> None:
    module = await upload(http, ADD_WAT, name="calculator", tag="quantum")
    response = await http.post("/intent/execute-wasm",
                               json={"cid": "glyph://calculator@quantum", "inputs": [5, 3]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert body["output"] == 8
    assert body["cid"] == module["cid"]
    assert len(body["request_id"]) == 64
    assert body["error"] is None
    assert response.headers["x-request-id"]
