"""`POST /intent/execute-wasm` is served past Starlette's router and middleware
(relay.gateway.app.direct_execute). What they gave every route still holds for it: refusals are
problems, a crash is a 500 with the request id, and each request writes one access line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from executor.worker import Executor
from relay import logs
from relay.gateway.app import create_app
from relay.gateway.routes import execute as execute_route
from relay.settings import Settings
from tests.conftest import ADD_WAT, ALICE_KEY, assert_problem, client_for, upload, with_settings

PATH = "/intent/execute-wasm"


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """What `relay.access` writes, as the gateway's own handler formats it (JSON lines)."""
    out = io.StringIO()
    handler = logs.LoopBatchedHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    access = logging.getLogger("relay.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        yield out
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


@pytest.fixture
async def logging_app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(with_settings(settings, access_log=True))
    async with application.router.lifespan_context(application):
        yield application


def lines_for(out: io.StringIO, path: str) -> list[dict[str, Any]]:
    logging.getLogger("relay.access").handlers[-1].flush()
    return [line for line in map(json.loads, out.getvalue().splitlines())
            if line["path"] == path]


async def test_an_execute_and_a_refused_one_each_write_one_access_line(
        logging_app: Any, executor: Executor, access_lines: io.StringIO) -> None:
    async with client_for(logging_app, ALICE_KEY) as http:
        module = await upload(http, ADD_WAT)
        done = await http.post(PATH, json={"cid": module["cid"], "inputs": [40, 2]})
        refused = await http.post(PATH, content=b"{not json",
                                  headers={"Content-Type": "application/json"})
    assert done.status_code == 200 and done.json()["output"] == 42
    assert_problem(refused, 400, "invalid-request")
    first, second = lines_for(access_lines, PATH)
    for line, response in ((first, done), (second, refused)):
        assert line["logger"] == "relay.access" and line["method"] == "POST"
        assert line["status"] == response.status_code
        assert line["message"] == f"POST {PATH} {response.status_code}"
        assert line["request_id"] == response.headers["x-request-id"]
        assert line["duration_ms"] > 0


async def test_a_crash_in_the_execute_route_is_a_500_problem_with_the_request_id(
        logging_app: Any, access_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(execute_route, "gateway_of", crash)  # what the route calls first
    async with client_for(logging_app, ALICE_KEY) as http:
        response = await http.post(PATH, json={"cid": "nope"},
                                   headers={"X-Request-Id": "trace-7"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "trace-7"
    assert response.json()["request_id"] == "trace-7"
    assert "boom" not in response.text
    [line] = lines_for(access_lines, PATH)
    assert line["status"] == 500 and line["request_id"] == "trace-7"


async def test_other_methods_on_the_execute_path_still_go_through_the_router(
        logging_app: Any) -> None:
    async with client_for(logging_app, ALICE_KEY) as http:
        response = await http.get(PATH)
    assert_problem(response, 405, "method-not-allowed")
