"""CORS: web UIs on the configured origins may call every endpoint and read what they need."""

from __future__ import annotations

import httpx

from relay.settings import Settings
from tests.conftest import ALICE_KEY, with_settings

ORIGIN = "https://ui.example"


async def test_a_configured_origin_may_call_and_read_the_answers_headers(
        settings: Settings) -> None:
    from relay.gateway.app import create_app

    app = create_app(with_settings(settings, cors_origins=(ORIGIN,), rate_limit=100))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://relay") as http:
        preflight = await http.options("/intent/execute-wasm", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type, idempotency-key"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        answer = await http.post("/intent/execute-wasm", json={"cid": "nope"},
                                 headers={"Origin": ORIGIN, "X-API-Key": ALICE_KEY})
        assert answer.status_code == 400
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        exposed = {h.strip().lower()
                   for h in answer.headers["access-control-expose-headers"].split(",")}
        # What a browser script needs to read: where to poll, the correlation id, replays, and
        # when it may retry (the RateLimit fields are on this very answer).
        assert {"location", "x-request-id", "idempotent-replayed", "retry-after", "ratelimit",
                "ratelimit-policy"} <= exposed
        assert "ratelimit" in answer.headers
        other = await http.post("/intent/execute-wasm", json={"cid": "nope"},
                                headers={"Origin": "https://evil.example", "X-API-Key": ALICE_KEY})
        assert "access-control-allow-origin" not in other.headers
