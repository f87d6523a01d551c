"""GET /docs: the interactive API reference, served whole by the gateway without credentials."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx

from relay.gateway.routes import docs
from relay.openapi import document
from tests.conftest import Served

# XML namespace names (`xmlns="http://www.w3.org/2000/svg"` in inline SVG) are identifiers that
# no browser fetches.
NAMESPACE = re.compile(r"http://www\.w3\.org/(2000/svg|1999/xlink|1999/xhtml)")
URL = re.compile(r"https?://[^\s\"'<>)]+")


async def test_the_reference_page_and_its_assets_come_from_the_gateway_alone(
        served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        page = await anonymous.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<script>" not in page.text, "inline scripts are refused by the CSP"
        assert URL.findall(page.text) == []
        csp = dict(part.strip().split(" ", 1) for part in
                   page.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'"
        for directive in ("script-src", "connect-src", "img-src", "style-src"):
            assert not URL.search(csp[directive]) and "*" not in csp[directive], directive
        assert csp["script-src"] == "'self'"

        referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"docs/swagger-ui-bundle.js", "docs/swagger-ui.css",
                "docs/relay-docs.js"} <= set(referenced)
        for reference in referenced:
            url = urljoin(str(page.url), reference)
            assert urlsplit(url).netloc == urlsplit(served.url).netloc, url
            asset = await anonymous.get(url)
            assert asset.status_code == 200, url
            assert asset.headers["content-security-policy"] == page.headers[
                "content-security-policy"]
            if reference.endswith((".css", "relay-docs.js")):
                assert URL.findall(NAMESPACE.sub("", asset.text)) == [], reference

        start = (await anonymous.get("/docs/relay-docs.js")).text
        assert 'url: "openapi.json"' in start
        assert "validatorUrl: null" in start, "the document would be sent to an online validator"
        assert (await anonymous.get("/openapi.json")).status_code == 200


def test_the_document_lists_exactly_the_files_served_under_docs() -> None:
    parameter = document()["components"]["parameters"]["asset"]
    assert sorted(parameter["schema"]["enum"]) == sorted(docs.ASSETS)


async def test_only_the_reference_files_are_served_under_docs(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        for name in ("index.html", "..%2F..%2F__init__.py", "swagger-ui-standalone-preset.js"):
            response = await anonymous.get(f"/docs/{name}")
            assert response.status_code == 404, name
            assert response.headers["content-type"].startswith("application/problem+json")
