"""GET /console and its files: served by the gateway without credentials, under a strict CSP,
revalidated by ETag, the SDK the same bytes as clients/typescript's. The page itself is driven in
Chromium by tests/clients/test_console.py."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx

from relay.gateway.routes import console
from relay.openapi import document
from tests.conftest import ROOT, Served

URL = re.compile(r"https?://[^\s\"'<>)`]+")


async def test_the_console_and_its_files_come_from_the_gateway_alone(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        page = await anonymous.get("/console")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = dict(part.strip().split(" ", 1) for part in
                   page.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'"
        assert csp["script-src"] == "'self'", "no inline script, no eval, no other host"
        assert csp["connect-src"] == "'self'"
        assert csp["style-src"] == "'self'", "no inline style either"
        assert csp["frame-ancestors"] == "'none'"
        assert re.search(r"<script(?![^>]*\bsrc=)", page.text) is None, "an inline script"
        assert re.search(r"\son[a-z]+=", page.text) is None, "an inline event handler"
        assert re.search(r"\sstyle=", page.text) is None, "an inline style"

        referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"console/console.js", "console/console.css"} <= set(referenced)
        for reference in [*referenced, "console/relay-client.js", "console/relay-client.d.ts"]:
            if reference.startswith("data:"):
                continue
            url = urljoin(str(page.url), reference)
            assert urlsplit(url).netloc == urlsplit(served.url).netloc, url
            asset = await anonymous.get(url)
            assert asset.status_code == 200, url
            assert asset.headers["content-security-policy"] == page.headers[
                "content-security-policy"]
            assert asset.headers["x-content-type-options"] == "nosniff"
            # The SDK's default gateway (Node, no RELAY_URL) is the only URL, and is loopback.
            hosts = {urlsplit(found).hostname for found in URL.findall(asset.text)}
            assert hosts <= {"127.0.0.1", "www.w3.org"}, reference
        script = (await anonymous.get("/console/console.js")).text
        assert 'from "./relay-client.js"' in script, "the console runs on the JavaScript SDK"
        assert ".innerHTML" not in script, "values from the API are set as text, never markup"


async def test_the_files_are_revalidated_by_etag(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        for path in ("/console", "/console/console.js", "/console/relay-client.js"):
            first = await anonymous.get(path)
            assert first.headers["cache-control"] == "no-cache"
            etag = first.headers["etag"]
            again = await anonymous.get(path, headers={"If-None-Match": etag})
            assert again.status_code == 304, path
            assert again.content == b""
            changed = await anonymous.get(path, headers={"If-None-Match": '"stale"'})
            assert changed.status_code == 200 and changed.content == first.content


async def test_the_sdk_is_served_as_it_is_in_the_repository(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        sdk = await anonymous.get("/console/relay-client.js")
        types = await anonymous.get("/console/relay-client.d.ts")
    source = ROOT / "clients" / "typescript" / "src"
    assert sdk.content == (source / "index.js").read_bytes()
    assert types.content == (source / "index.d.ts").read_bytes()
    assert sdk.headers["content-type"].startswith("text/javascript")
    # Pages of other origins may import it as a module script.
    assert sdk.headers["access-control-allow-origin"] == "*"


async def test_only_the_console_files_are_served(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        for name in ("index.html", "..%2F__init__.py", "%2E%2E%2Fapp.py", "console.py"):
            response = await anonymous.get(f"/console/{name}")
            assert response.status_code == 404, name
            assert response.headers["content-type"].startswith("application/problem+json")


def test_the_document_lists_exactly_the_files_served_under_console() -> None:
    parameter = document()["components"]["parameters"]["file"]
    assert sorted(parameter["schema"]["enum"]) == sorted(console.ASSETS)
