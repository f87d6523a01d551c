"""Headless Chromium for the browser tests of the gateway's pages (/console, /docs).

Chromium is Debian's (`/usr/bin/chromium`, or RELAY_TEST_CHROMIUM), driven by Playwright for
Python through `executable_path`: Playwright's own browser downloads are not needed. A test
module importing this is skipped when playwright is not installed; mark it `needs_chromium`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Page

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM") or shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: apt-get install chromium (scripts/test does, as root)")
expect = playwright_api.expect
# What a person waits for at most; a condition met sooner ends the wait at once.
PATIENCE_MS = 30_000
expect.set_options(timeout=PATIENCE_MS)


@contextlib.asynccontextmanager
async def browser_page(url: str, *, width: int = 1100,
                       every_console_error: bool = False,
                       requested: list[str] | None = None) -> AsyncIterator[Page]:
    """A fresh Chromium page (new profile: empty storage) opened on `url`, failing the test on
    any script error or CSP violation the page reports; with `every_console_error`, on any
    console message of type error (a refused request logs one, so a page that shows refusals
    cannot use it). `requested` collects the URL of every request the page makes."""
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and (every_console_error
                                        or "Content Security Policy" in message.text):
            errors.append(message.text)

    async with playwright_api.async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = await browser.new_page(viewport={"width": width, "height": 800})
            page.set_default_timeout(PATIENCE_MS)
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.on("console", on_console)
            if requested is not None:
                page.on("request", lambda request: requested.append(request.url))
            await page.goto(url)
            yield page
        finally:
            await browser.close()
    assert errors == []
