"""Webhooks against a real receiver (pytest-httpserver on 127.0.0.1), signatures checked with
the reference `standardwebhooks` verifier: retries with growing gaps, redirects not followed,
410, Retry-After, rotation, the SSRF refusals (loopback targets only) and isolation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer
from standardwebhooks import Webhook, WebhookVerificationError
from werkzeug import Request, Response

from relay.connection import connect
from relay.gateway.app import create_app
from relay.keys import Keys
from relay.settings import Settings
from tests.conftest import (
    ADD_WAT,
    ALICE_KEY,
    BOB_KEY,
    assert_problem,
    client_for,
    upload,
    wait_for,
    with_settings,
)

LOCAL = {"webhook_allow_http": True, "webhook_allow_private": True}


@asynccontextmanager
async def gateway(settings: Settings, **changes: Any
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """alice's and bob's clients to an in-process gateway (and its deliverer) with `changes`."""
    app = create_app(with_settings(settings, **changes))
    async with app.router.lifespan_context(app), client_for(app, ALICE_KEY) as alice, \
            client_for(app, BOB_KEY) as bob:
        yield alice, bob


class Receiver:
    """Answers each POST with the next of `statuses` (the last one from then on), noting
    when each came and what it carried."""

    def __init__(self, server: HTTPServer, path: str, *statuses: int,
                 headers: dict[str, str] | None = None) -> None:
        self.statuses = list(statuses)
        self.headers = headers or {}
        self.got: list[tuple[float, dict[str, str], bytes]] = []
        self.url = f"http://127.0.0.1:{server.port}{path}"
        server.expect_request(path, method="POST").respond_with_handler(self.answer)

    def answer(self, request: Request) -> Response:
        self.got.append((time.monotonic(), dict(request.headers), request.get_data()))
        status = self.statuses[min(len(self.got), len(self.statuses)) - 1]
        return Response("", status=status, headers=self.headers)


async def _execute(http: httpx.AsyncClient, cid: str, inputs: list[int], **fields: Any) -> str:
    response = await http.post("/intent/execute-wasm", json={"cid": cid, "inputs": inputs,
                                                              **fields})
    assert response.status_code == 200, response.text
    request_id: str = response.json()["request_id"]
    return request_id


async def _log(http: httpx.AsyncClient, request_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/executions/{request_id}/deliveries")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def _verify(secret: str, headers: dict[str, str], body: bytes) -> Any:
    return Webhook(secret).verify(body, headers)


async def test_a_failing_receiver_gets_retries_with_growing_gaps_each_signed(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 500, 500, 200)
    async with gateway(settings, **LOCAL, webhook_schedule_ms=(300, 1200)) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        request_id = await _execute(http, cid, [1, 2], callback_url=receiver.url)
        secret = (await http.get("/webhooks/secret")).json()["secret"]
        assert secret.startswith("whsec_")
        await wait_for(lambda: len(receiver.got) >= 3, timeout_s=15)
        log = await wait_for(lambda: _three(http, request_id), timeout_s=5)
    times = [at for at, _, _ in receiver.got]
    first_gap, second_gap = times[1] - times[0], times[2] - times[1]
    assert 0.24 <= first_gap < second_gap and second_gap >= 0.96, (first_gap, second_gap)
    ids = set()
    for attempt, (_, headers, body) in enumerate(receiver.got, start=1):
        event = _verify(secret, headers, body)
        assert event["type"] == "execution_complete" and event["request_id"] == request_id
        assert event["output"] == 3
        assert headers["Relay-Attempt"] == str(attempt)
        ids.add(headers["Webhook-Id"])
    assert len(ids) == 1 and len(receiver.got) == 3
    assert [(e["attempt"], e["status_code"]) for e in log] == [(1, 500), (2, 500), (3, 200)]
    assert {e["webhook_id"] for e in log} == ids and {e["url"] for e in log} == {receiver.url}
    assert log[0]["next_attempt_at"] is not None and log[2]["next_attempt_at"] is None
    assert all(e["error"] is None for e in log)


async def _three(http: httpx.AsyncClient, request_id: str) -> list[dict[str, Any]] | None:
    log = await _log(http, request_id)
    return log if len(log) == 3 else None


async def test_a_redirect_is_not_followed(settings: Settings, executor: Any,
                                          httpserver: HTTPServer) -> None:
    second = HTTPServer(host="127.0.0.1", port=0)
    second.start()
    try:
        target = Receiver(second, "/elsewhere", 200)
        redirect = Receiver(httpserver, "/hook", 302, 200,
                            headers={"Location": target.url})
        async with gateway(settings, **LOCAL, webhook_schedule_ms=(100,)) as (http, _):
            cid = (await upload(http, ADD_WAT))["cid"]
            request_id = await _execute(http, cid, [2, 2], callback_url=redirect.url)
            await wait_for(lambda: len(redirect.got) == 2, timeout_s=10)
            log = await wait_for(lambda: _logged(http, request_id, 2), timeout_s=5)
        assert [e["status_code"] for e in log] == [302, 200]
        assert target.got == []
    finally:
        second.clear()
        if second.is_running():
            second.stop()


async def _logged(http: httpx.AsyncClient, request_id: str,
                  count: int) -> list[dict[str, Any]] | None:
    log = await _log(http, request_id)
    return log if len(log) >= count else None


async def test_410_stops_and_a_longer_retry_after_is_honoured(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    gone = Receiver(httpserver, "/gone", 410)
    later = Receiver(httpserver, "/later", 503, 200, headers={"Retry-After": "2"})
    async with gateway(settings, **LOCAL, webhook_schedule_ms=(100, 100)) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        first = await _execute(http, cid, [1, 1], callback_url=gone.url)
        second = await _execute(http, cid, [1, 3], callback_url=later.url)
        gone_log = await wait_for(lambda: _logged(http, first, 1), timeout_s=10)
        await wait_for(lambda: len(later.got) == 2, timeout_s=10)
        later_log = await wait_for(lambda: _logged(http, second, 2), timeout_s=5)
        keys = Keys(settings.prefix)
        pending = await http._transport.app.state.gateway.client.zrange(  # type: ignore
            keys.webhook_due, 0, -1)
    assert [(e["status_code"], e["next_attempt_at"]) for e in gone_log] == [(410, None)]
    assert gone_log[0]["webhook_id"].encode() not in pending and len(gone.got) == 1
    # Its schedule said 0.1 s; the receiver asked for 2 s, and got them.
    assert later.got[1][0] - later.got[0][0] >= 1.9
    scheduled = (datetime.fromisoformat(later_log[0]["next_attempt_at"])
                 - datetime.fromisoformat(later_log[0]["at"])).total_seconds()
    assert scheduled >= 1.99 and [e["status_code"] for e in later_log] == [503, 200]


async def test_rotation_signs_with_both_secrets_during_the_grace_only(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 200)
    async with gateway(settings, **LOCAL, webhook_rotation_grace_ms=1500) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        old = (await http.get("/webhooks/secret")).json()["secret"]
        response = await http.post("/webhooks/secret")
        assert response.status_code == 200
        new = response.json()["secret"]
        assert new != old and (await http.get("/webhooks/secret")).json()["secret"] == new
        rotated = time.monotonic()
        await _execute(http, cid, [5, 5], callback_url=receiver.url)
        await wait_for(lambda: len(receiver.got) == 1, timeout_s=10)
        assert time.monotonic() - rotated < 1.5, "too slow to see the grace period"
        await wait_for(lambda: time.monotonic() - rotated > 1.6, timeout_s=5)
        await _execute(http, cid, [6, 6], callback_url=receiver.url)
        await wait_for(lambda: len(receiver.got) == 2, timeout_s=10)
    (_, during, body), (_, after, later_body) = receiver.got
    assert len(during["Webhook-Signature"].split(" ")) == 2
    assert _verify(old, during, body)["output"] == 10
    assert _verify(new, during, body)["output"] == 10
    assert len(after["Webhook-Signature"].split(" ")) == 1
    assert _verify(new, after, later_body)["output"] == 12
    with pytest.raises(WebhookVerificationError):
        _verify(old, after, later_body)


SSRF_TARGETS = ["https://127.0.0.1/hook", "https://[::1]/hook",
                "https://[::ffff:127.0.0.1]/hook", "https://0.0.0.0/hook",
                "https://localhost/hook", "https://2130706433/hook", "https://0177.0.0.1/hook"]


async def test_local_targets_are_refused_unless_allowed(settings: Settings) -> None:
    async with gateway(settings) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        for url in SSRF_TARGETS:
            response = await http.post("/intent/execute-wasm", json={
                "cid": cid, "inputs": [1, 2], "callback_url": url})
            body = assert_problem(response, 400, "invalid-request")
            assert body["errors"][0]["pointer"] == "/callback_url", url
        response = await http.post("/pipelines", json={
            "nodes": [{"id": "a", "cid": cid, "inputs": [1, 2]}],
            "callback_url": "https://127.0.0.1/hook"})
        body = assert_problem(response, 400, "invalid-request")
        assert body["errors"][0]["pointer"] == "/callback_url"
        response = await http.post("/intent/execute-wasm", json={
            "cid": cid, "inputs": [1, 2], "callback_url": "http://8.8.8.8/hook"})
        assert assert_problem(response, 400, "invalid-request")["errors"][0]["pointer"] == (
            "/callback_url")
    async with gateway(settings, webhook_allow_private=True) as (http, _):
        for url in SSRF_TARGETS:
            response = await http.post(
                "/intent/execute-wasm", headers={"Prefer": "respond-async"},
                json={"cid": cid, "inputs": [1, 2], "callback_url": url,
                      "idempotency_key": url})
            assert response.status_code == 202, (url, response.text)


async def test_callback_events_must_be_known(settings: Settings) -> None:
    async with gateway(settings, **LOCAL) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        response = await http.post("/intent/execute-wasm", json={
            "cid": cid, "inputs": [1, 2], "callback_url": "http://127.0.0.1:9/hook",
            "callback_events": ["execution_complete", "pipeline_complete"]})
        body = assert_problem(response, 400, "invalid-request")
        assert body["errors"][0]["pointer"] == "/callback_events/1"


async def test_chosen_events_are_delivered_and_replays_deliver_nothing_new(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 200)
    async with gateway(settings, **LOCAL) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        body = {"cid": cid, "inputs": [7, 8], "callback_url": receiver.url,
                "callback_events": ["execution_queued", "execution_complete"],
                "idempotency_key": "once"}
        request_id = await _execute(http, cid, [7, 8], **{k: v for k, v in body.items()
                                                          if k not in ("cid", "inputs")})
        await wait_for(lambda: len(receiver.got) == 2, timeout_s=10)
        replay = await http.post("/intent/execute-wasm", json=body)
        assert replay.headers.get("Idempotent-Replayed") == "true"
        # Another execution's delivery, queued after the replay: nothing came in between.
        await _execute(http, cid, [1, 1], callback_url=receiver.url)
        await wait_for(lambda: len(receiver.got) == 3, timeout_s=10)
        types = [_verify((await http.get("/webhooks/secret")).json()["secret"], h, b)["type"]
                 for _, h, b in receiver.got]
        assert sorted(types[:2]) == ["execution_complete", "execution_queued"]
        assert types[2] == "execution_complete"
        assert len(await _log(http, request_id)) == 2


async def test_deliveries_and_secrets_are_each_principals_own(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 200)
    async with gateway(settings, **LOCAL) as (http, bob):
        cid = (await upload(http, ADD_WAT))["cid"]
        request_id = await _execute(http, cid, [3, 4], callback_url=receiver.url)
        await wait_for(lambda: _logged(http, request_id, 1), timeout_s=10)
        assert_problem(await bob.get(f"/executions/{request_id}/deliveries"), 404, "not-found")
        assert_problem(await bob.get("/pipelines/nope/deliveries"), 404, "not-found")
        mine = (await http.get("/webhooks/secret")).json()["secret"]
        theirs = (await bob.get("/webhooks/secret")).json()["secret"]
        assert mine != theirs
        # An execution without a callback has an empty log, to its owner only.
        plain = await _execute(http, cid, [9, 9])
        assert (await http.get(f"/executions/{plain}/deliveries")).json() == {
            "items": [], "next_cursor": None}
        assert_problem(await bob.get(f"/executions/{plain}/deliveries"), 404, "not-found")


async def test_a_pipeline_and_a_session_call_are_called_back(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 200)
    async with gateway(settings, **LOCAL) as (http, _):
        secret = (await http.get("/webhooks/secret")).json()["secret"]
        cid = (await upload(http, ADD_WAT))["cid"]
        response = await http.post("/pipelines", json={
            "nodes": [{"id": "a", "cid": cid, "inputs": [1, 2]},
                      {"id": "b", "cid": cid, "inputs": [{"$ref": "a"}, 4]}],
            "callback_url": receiver.url})
        assert response.status_code == 202, response.text
        pipeline_id = response.json()["pipeline_id"]
        await wait_for(lambda: len(receiver.got) == 1, timeout_s=15)
        event = _verify(secret, receiver.got[0][1], receiver.got[0][2])
        # Its default: the one terminal event, not its nodes' or its progress.
        assert event == {**event, "type": "pipeline_complete", "pipeline_id": pipeline_id,
                         "status": "completed"}
        async def pipeline_log() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = (
                await http.get(f"/pipelines/{pipeline_id}/deliveries")).json()["items"]
            return items or None
        log = await wait_for(pipeline_log, timeout_s=5)
        assert [(e["status_code"], e["url"]) for e in log] == [(200, receiver.url)]

        session = (await http.post("/sessions", json={"cid": cid})).json()["session_id"]
        response = await http.post(f"/sessions/{session}/calls", json={
            "entrypoint": "main", "inputs": [40, 2], "callback_url": receiver.url,
            "callback_events": ["execution_complete"]})
        assert response.status_code == 200, response.text
        await wait_for(lambda: len(receiver.got) == 2, timeout_s=15)
        event = _verify(secret, receiver.got[1][1], receiver.got[1][2])
        assert (event["type"], event["output"], event["session_id"]) == (
            "execution_complete", 42, session)


async def test_the_callback_is_part_of_the_request_and_attempts_are_counted(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 200)
    async with gateway(settings, **LOCAL) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        body = {"cid": cid, "inputs": [2, 3], "idempotency_key": "k",
                "callback_url": receiver.url}
        first = await http.post("/intent/execute-wasm", json=body)
        assert first.status_code == 200
        reused = await http.post("/intent/execute-wasm",
                                 json={**body, "callback_url": receiver.url + "/other"})
        assert_problem(reused, 422, "idempotency-key-reuse")
        alone = await http.post("/intent/execute-wasm", json={
            "cid": cid, "inputs": [2, 3], "callback_events": ["execution_error"]})
        assert assert_problem(alone, 400, "invalid-request")["errors"][0]["pointer"] == (
            "/callback_events")
        await wait_for(lambda: _logged(http, first.json()["request_id"], 1), timeout_s=10)

        async def counted() -> bool:
            text = (await http.get("/metrics")).text
            return ('relay_webhook_attempts_total{outcome="success"} 1' in text
                    and 'relay_webhook_deliveries_total{result="delivered"} 1' in text)
        await wait_for(counted, timeout_s=5, interval_s=0.2)
    assert len(receiver.got) == 1


async def test_a_delivery_is_given_up_after_its_schedule(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    receiver = Receiver(httpserver, "/hook", 500)
    async with gateway(settings, **LOCAL, webhook_schedule_ms=(100, 100)) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        request_id = await _execute(http, cid, [4, 4], callback_url=receiver.url)
        log = await wait_for(lambda: _logged(http, request_id, 3), timeout_s=10)

        async def exhausted() -> bool:
            text = (await http.get("/metrics")).text
            return 'relay_webhook_deliveries_total{result="exhausted"} 1' in text
        await wait_for(exhausted, timeout_s=5, interval_s=0.2)
    assert [(e["attempt"], e["status_code"]) for e in log] == [(1, 500), (2, 500), (3, 500)]
    assert log[2]["next_attempt_at"] is None and len(receiver.got) == 3


async def test_only_followed_executions_reach_the_deliverers_stream_under_their_event_ids(
        settings: Settings, executor: Any, httpserver: HTTPServer) -> None:
    """The deliverer and the pipeline scheduler read relay:events:followed: the events of an
    execution with a callback are copied there under their ids in relay:events (the delivery
    is named after the event), those of one without are not."""
    receiver = Receiver(httpserver, "/hook", 200)
    async with gateway(settings, **LOCAL) as (http, _):
        cid = (await upload(http, ADD_WAT))["cid"]
        plain = await _execute(http, cid, [1, 1])
        called = await _execute(http, cid, [2, 2], callback_url=receiver.url)
        await wait_for(lambda: len(receiver.got) >= 1, timeout_s=10)
    keys = Keys(settings.prefix)
    assert settings.redis_url is not None
    redis_client = connect(settings.redis_url)
    events = await redis_client.xrange(keys.events)
    followed = await redis_client.xrange(keys.followed)
    await redis_client.aclose()

    def of(request_id: str) -> list[tuple[bytes, bytes]]:
        return [(entry_id, fields[b"data"]) for entry_id, fields in events
                if f'"request_id":"{request_id}"'.encode() in fields[b"data"]]

    copied = [(entry_id, fields[b"data"]) for entry_id, fields in followed]
    assert copied == of(called) and len(copied) >= 4  # queued, started, complete, completed
    assert not set(copied) & set(of(plain)) and of(plain)
    complete = next(entry_id for entry_id, data in copied
                    if data.startswith(b'{"type":"execution_complete"'))
    assert receiver.got[0][1]["Webhook-Id"] == complete.decode()
