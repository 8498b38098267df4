"""The socket layer: WebSocket connections at /ws and plain GET routes on the same port.

This is the only module that touches sockets.  Each connection gets a `Session` (the protocol) and
a `WebSocketPeer` (how frames reach the wire).  Frames are written synchronously with
`websockets.broadcast`, which never waits for a slow reader: the peer watches the transport's
write buffer itself and drops stale `match.state` frames for a client that cannot keep up rather
than buffering without bound or delaying anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import structlog
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from asobi import benchstats
from asobi.app import App
from asobi.protocol import ErrorCode
from asobi.reload import poll_changes, watch_changes
from asobi.session import Session
from asobi.ticker import Ticker

log = structlog.get_logger("asobi.server")

WS_PATH = "/ws"
CLOSE_POLICY = 1008
SOFT_BUFFER_BYTES = 256 * 1024
HARD_BUFFER_BYTES = 4 * 1024 * 1024
ADMIN_RELOAD_WAIT_S = 5.0


class WebSocketPeer:
    """Writes frames to one connection without ever awaiting."""

    __slots__ = ("_closing", "dropped", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.dropped = 0
        self._closing: asyncio.Task[None] | None = None

    def send_frame(self, frame: bytes, *, droppable: bool = False) -> None:
        ws = self.ws
        if ws.protocol.state is not State.OPEN:
            return
        transport = ws.transport
        if droppable and transport is not None:
            buffered = transport.get_write_buffer_size()
            if buffered > SOFT_BUFFER_BYTES:
                self.dropped += 1
                if buffered > HARD_BUFFER_BYTES:
                    self.close(CLOSE_POLICY, "client is not reading its frames")
                return
        broadcast((ws,), frame, text=True)

    def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.ws.close(code, reason))


def _json_response(connection: ServerConnection, status: int, body: Any) -> Response:
    response = connection.respond(status, orjson.dumps(body).decode() + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


class AsobiServer:
    """Owns the listening socket, the ticker and the reload detector for one `App`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.settings = app.settings
        self._server: Server | None = None
        self._ticker: Ticker | None = None
        self._stop_watch = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self.started_at = time.time()
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        await self.app.open()
        self._ticker = Ticker(self.app.engine)
        self.app.engine.clock = self._ticker.loop.time
        self._ticker.start()
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            compression=None,
            max_size=s.max_message_bytes,
            ping_interval=20,
            ping_timeout=20,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        watching = asyncio.Event()
        if s.reload == "watch":
            self._watch_task = asyncio.create_task(
                watch_changes(self.app.reloader, s.reload_debounce_ms, self._stop_watch, watching)
            )
        elif s.reload == "poll":
            self._watch_task = asyncio.create_task(
                poll_changes(self.app.reloader, s.reload_poll_ms / 1000, self._stop_watch, watching)
            )
        if self._watch_task is not None:
            await asyncio.wait_for(watching.wait(), 10)
        log.info(
            "server_started",
            host=s.host,
            port=self.port,
            game_dir=str(self.app.registry.game_dir),
            reload=s.reload,
            scripts=self.app.registry.names(),
        )

    async def stop(self) -> None:
        self._stop_watch.set()
        if self._watch_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._watch_task, 2)
        if self._ticker is not None:
            self._ticker.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.app.close()
        log.info("server_stopped")

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, done.set)
        benchstats.install(loop, self.app, os.environ.get(benchstats.ENV))
        await done.wait()
        await self.stop()

    # -- HTTP -------------------------------------------------------------------------------------
    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return None
        if path == "/health":
            return _json_response(connection, 200, {"status": "ok"})
        if path == "/ready":
            ready = self._server is not None and self._ticker is not None
            return _json_response(connection, 200 if ready else 503, {"ready": ready})
        if path == "/api/v1/reloads":
            return _json_response(connection, 200, {"reloads": self.app.history.as_list()})
        if path == "/api/v1/admin/reload":
            return await self._admin_reload(connection, request)
        return _json_response(connection, 404, {"error": "not found", "path": path[:200]})

    async def _admin_reload(self, connection: ServerConnection, request: Request) -> Response:
        """Reload now (`asobi reload`), for setups where watching is off.  Guarded by the
        ASOBI_ADMIN_TOKEN bearer token and disabled when none is configured.  It is a GET
        because this port's HTTP side only serves the WebSocket handshake's method."""
        expected = self.settings.admin_token
        if not expected:
            return _json_response(connection, 403, {"error": "ASOBI_ADMIN_TOKEN is not set"})
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return _json_response(connection, 401, {"error": "bad admin token"})
        query = parse_qs(urlsplit(request.path).query)
        script = (query.get("script") or [None])[0]
        if (
            script is not None
            and self.app.registry.relative_name(self.app.registry.game_dir / script) != script
        ):
            return _json_response(connection, 400, {"error": f"not a script: {script[:200]}"})
        records = self.app.reloader.reload_now(script, "manual")
        # Answer once every affected match has switched or refused (a tick or two).
        deadline = asyncio.get_running_loop().time() + ADMIN_RELOAD_WAIT_S
        while any(r.outcome == "pending" for r in records):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        return _json_response(connection, 200, {"reloads": [r.as_dict() for r in records]})

    # -- WebSocket --------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        peer = WebSocketPeer(ws)
        remote = ws.remote_address[0] if ws.remote_address else ""
        session = Session(self.app, peer, remote)
        max_frame = self.settings.max_frame_bytes
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.settings.connect_timeout_s, self._auth_deadline, session)
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    session.send_error(
                        ErrorCode.BINARY_NOT_SUPPORTED, "send JSON text frames, not binary"
                    )
                    continue
                if len(message) > max_frame or (
                    len(message) * 4 > max_frame and len(message.encode()) > max_frame
                ):
                    session.send_error(
                        ErrorCode.PAYLOAD_TOO_LARGE, f"frames are limited to {max_frame} bytes"
                    )
                    continue
                session.handle(message)
                if session.authenticated:
                    deadline.cancel()
        except ConnectionClosed:
            pass
        finally:
            deadline.cancel()
            session.closed()

    @staticmethod
    def _auth_deadline(session: Session) -> None:
        if not session.authenticated:
            session.peer.close(CLOSE_POLICY, "authenticate with session.connect within the limit")
