"""GET /docs rendered in headless Chromium: Swagger UI, served by the gateway under the CSP of
relay/gateway/routes/docs.py, draws the API's operations from /openapi.json, and the page
reports no script error, no CSP violation and no other console error."""

from __future__ import annotations

from tests.clients.browser import browser_page, expect, needs_chromium
from tests.conftest import Served

pytestmark = needs_chromium


async def test_the_api_reference_renders_under_its_csp(served: Served) -> None:
    requested: list[str] = []
    async with browser_page(f"{served.url}/docs", every_console_error=True,
                            requested=requested) as page:
        await expect(page.get_by_text("/intent/execute-wasm", exact=True).first).to_be_visible()
        authorize = page.get_by_role("button", name="Authorize")
        await expect(authorize).to_be_visible()
        # Operations open (Swagger UI renders their details on demand), and so does the
        # dialog asking for credentials: more of the page's code runs under the CSP.
        await page.get_by_text("/intent/execute-wasm", exact=True).first.click()
        await expect(page.get_by_role("button", name="Try it out").first).to_be_visible()
        await authorize.click()
        await expect(page.get_by_text("Available authorizations")).to_be_visible()
    assert f"{served.url}/openapi.json" in requested
    assert all(url.startswith(f"{served.url}/") for url in requested), requested
