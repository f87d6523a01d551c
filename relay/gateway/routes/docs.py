"""`GET /docs`: the interactive API reference (Swagger UI) rendered from `/openapi.json`.

Everything the page loads comes from this gateway: Swagger UI's files from the
openapi-ui-bundles package, the page and its start-up script from here. The
Content-Security-Policy holds the browser to that (no other host, no inline script), so the
page works offline and a compromised CDN has nothing to serve into it. None needs credentials:
the page asks for a key ("Authorize") before it tries a request.
"""

from __future__ import annotations

import functools
from pathlib import Path

import openapi_ui_bundles
from starlette.requests import Request
from starlette.responses import Response

from relay.errors import NotFound

CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
       # Swagger UI (React) sets style attributes on its elements.
       "style-src 'self' 'unsafe-inline'; font-src 'self'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}

# Relative links: /docs resolves them under /docs/ and the document at /openapi.json, wherever
# a proxy mounts the gateway.
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Relay API reference</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/relay-docs.js"></script>
</body>
</html>
"""

START = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // Swagger UI would otherwise send the document to an online validator for its badge.
    validatorUrl: null,
  });
});
"""

VENDOR = Path(openapi_ui_bundles.swagger_ui.static_path)
# name: media type. Only these are served: nothing else under the package's directory.
ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript",
          "favicon-32x32.png": "image/png", "relay-docs.js": "text/javascript"}


async def page(request: Request) -> Response:
    return Response(PAGE, media_type="text/html", headers=HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["asset"]
    if name not in ASSETS:
        raise NotFound(f"no file {name} in the API reference")
    return Response(_content(name), media_type=ASSETS[name],
                    headers={**HEADERS, "Cache-Control": "public, max-age=86400"})


@functools.cache
def _content(name: str) -> bytes:
    if name == "relay-docs.js":
        return START.encode()
    return (VENDOR / name).read_bytes()
