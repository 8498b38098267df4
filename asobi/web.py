"""The pages the server serves itself: the playground at `/`, the console at `/console`, the
JavaScript client they are built on, and the list of modes the playground offers.

Static files ship inside the package (`asobi/static/`, no build step, nothing from a CDN).
Every page is sent with a Content-Security-Policy that allows scripts from this origin only (no
inline script, no inline event handlers, no eval), so text a game puts in its state or logs can
never run in the browser even if a page forgot to treat it as text.  The console page is served
only when ASOBI_ADMIN_TOKEN is set; the token itself is typed into the page and travels in an
`admin.auth` frame, never in a URL.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGES = {"/": "playground.html", "/console": "console.html"}
ASSETS = {
    "/static/asobi.js": "asobi.js",
    "/static/msgpack.js": "msgpack.js",
    "/static/playground.js": "playground.js",
    "/static/console.js": "console.js",
    "/static/ui.js": "ui.js",
    "/static/style.css": "style.css",
}
TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
}


def static_bytes(name: str) -> bytes:
    return resources.files("asobi").joinpath("static", name).read_bytes()


def respond(
    connection: ServerConnection, path: str, admin_enabled: bool, modes: list[str]
) -> Response | None:
    """The response for a page route, or None when `path` is not one of them."""
    if path == "/console" and not admin_enabled:
        return _send(
            connection,
            403,
            b"The console is disabled: start the server with ASOBI_ADMIN_TOKEN set.\n",
            "text/plain; charset=utf-8",
        )
    name = PAGES.get(path) or ASSETS.get(path)
    if name is not None:
        return _send(connection, 200, static_bytes(name), TYPES[name.rsplit(".", 1)[1]])
    if path == "/api/v1/modes":
        body: Any = {"modes": modes}
        return _send(connection, 200, orjson.dumps(body) + b"\n", "application/json")
    return None


def _send(connection: ServerConnection, status: int, body: bytes, content_type: str) -> Response:
    response = connection.respond(status, "")
    response.body = body
    headers = response.headers
    for key in ("Content-Type", "Content-Length"):
        del headers[key]
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["Cache-Control"] = "no-cache"
    return response
