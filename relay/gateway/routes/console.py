"""`GET /console`: the web console, and the JavaScript SDK it runs on, as package files.

The page asks for a key and keeps it in the tab's sessionStorage, so the page and its files
need no credentials. Everything it loads comes from this gateway, and the
Content-Security-Policy holds the browser to that: scripts only from here (no inline script,
no eval), requests only to here, no frames, no forms posted elsewhere.

Files are answered with a strong ETag and `Cache-Control: no-cache`: a browser keeps them and
asks again with If-None-Match (304, no body), so an upgraded gateway is never served stale
code. The SDK (`/console/relay-client.js`) may be imported by pages of other origins: it is
public code, and `Access-Control-Allow-Origin: *` lets a module script load it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from relay.errors import NotFound

CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
FILES = Path(__file__).resolve().parents[2] / "console"
# name: media type. Only these are served.
ASSETS = {"console.js": "text/javascript", "console.css": "text/css",
          "relay-client.js": "text/javascript", "relay-client.d.ts": "application/typescript"}
SHARED = {"relay-client.js", "relay-client.d.ts"}


async def page(request: Request) -> Response:
    return _answer(request, "index.html", "text/html")


async def asset(request: Request) -> Response:
    name = request.path_params["file"]
    if name not in ASSETS:
        raise NotFound(f"no file {name} in the console")
    return _answer(request, name, ASSETS[name])


def _answer(request: Request, name: str, media_type: str) -> Response:
    content, etag = _content(name)
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache", "ETag": etag,
               "Referrer-Policy": "no-referrer"}
    if name in SHARED:
        headers["Access-Control-Allow-Origin"] = "*"
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@functools.cache
def _content(name: str) -> tuple[bytes, str]:
    content = (FILES / name).read_bytes()
    return content, '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
