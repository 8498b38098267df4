"""The socket layer: WebSocket connections at /ws and plain GET routes on the same port.

This is the only module that touches sockets.  Each connection gets a `Session` (the protocol, with
its per-connection frame limits) run by a `SessionDriver`, and a `WebSocketPeer` (how frames reach
the wire).  Frames are written synchronously with
`websockets.broadcast`, which never waits for a slow reader: the peer watches the transport's
write buffer itself and drops stale `match.state` frames for a client that cannot keep up rather
than buffering without bound or delaying anyone else.  Admission (connection cap, per-IP connect
rate) and the HTTP routes (/health, /ready, /metrics) live here too, because they are decisions
about sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from asobi import benchstats, handoff, huge_pages, web
from asobi.app import App
from asobi.cluster.link import Unavailable
from asobi.compact_state import is_binary
from asobi.limits import KeyedBuckets
from asobi.metrics import Metrics
from asobi.reload import poll_changes, watch_changes
from asobi.server_connection import InlineConnection
from asobi.server_writes import PassWrites, direct_fd, frame_header
from asobi.session import expire_seats
from asobi.session_driver import SessionDriver
from asobi.ticker import Ticker
from asobi.watchdog import Watchdog, WatchdogSettings

log = structlog.get_logger("asobi.server")

WS_PATH = "/ws"
CLOSE_POLICY = 1008
ADMIN_RELOAD_WAIT_S = 5.0
HOUSEKEEPING_S = 0.25
PRUNE_EVERY_S = 10.0


_last_frame: bytes = b""
_last_wire: bytes = b""


def _wire(frame: bytes) -> bytes:
    """`frame` as an unmasked WebSocket frame: a text frame, or a binary one for a compact
    state frame (`asobi.compact_state.is_binary`).

    A shared `match.state` frame goes to every player of a match one after the other: the
    one-entry cache (by identity) frames it once for all of them.  Writing the framed bytes to
    the transport is what `websockets.broadcast` does after framing; it is only used on
    connections without extensions (no per-connection compression state).
    """
    global _last_frame, _last_wire
    if frame is not _last_frame:
        _last_wire = frame_header(len(frame), is_binary(frame)) + frame
        _last_frame = frame
    return _last_wire


class WebSocketPeer:
    """Writes frames to one connection without ever awaiting.

    A client that cannot keep up loses its `droppable` frames (stale `match.state` and
    `match.patch` frames, which the next tick's frame supersedes, and `rate_limited` errors) once
    the transport holds more than `soft` bytes; `send_frame` returns False for them, so the
    match sends that player a full state next.  It is closed when the buffer passes `hard` bytes
    or stays over `soft` for `stuck_s` seconds.  Writes to other connections never wait for it.
    """

    __slots__ = (
        "_closing",
        "compressed",
        "dropped",
        "fd",
        "hard",
        "metrics",
        "player_id",
        "protocol",
        "soft",
        "stuck_s",
        "stuck_since",
        "transport",
        "writes",
        "ws",
    )

    def __init__(
        self,
        ws: ServerConnection,
        metrics: Metrics,
        soft: int,
        hard: int,
        stuck_s: float,
        writes: PassWrites,
    ) -> None:
        self.ws = ws
        self.writes = writes
        self.metrics = metrics
        self.soft = soft
        self.hard = hard
        self.stuck_s = stuck_s
        self.stuck_since = 0.0
        self.dropped = 0
        self.player_id: str | None = None
        self._closing: asyncio.Task[None] | None = None
        # What every frame reads, looked up once: a connection's transport, its protocol and the
        # extensions negotiated in its handshake are fixed for its life.
        self.protocol = ws.protocol
        self.transport = ws.transport
        self.compressed = bool(ws.protocol.extensions)
        # The socket held frames may be sent on directly at the end of a pass, or -1.
        self.fd = direct_fd(self.transport)

    def send_frame(self, frame: bytes, *, droppable: bool = False) -> bool:
        if self._closing is not None or self.protocol.state is not State.OPEN:
            return False
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        if buffered > self.soft:
            if not self._sends_over_soft(buffered, droppable):
                return False
        elif self.stuck_since:
            self.stuck_since = 0.0
        self.metrics.frames_sent += 1
        if self.compressed:
            # Per-connection compression: let websockets frame it.
            broadcast((self.ws,), frame, text=not is_binary(frame))
        else:
            # Sent directly only while nothing waits in the transport's buffer (see PassWrites).
            direct = buffered == 0 and not transport.is_closing()
            self.writes.write(transport, _wire(frame), self.fd if direct else -1)
        return True

    def _sends_over_soft(self, buffered: int, droppable: bool) -> bool:
        """A frame for a client whose buffer holds more than `soft` bytes: False when it is
        dropped (`droppable`) or the client is closed as a slow reader."""
        now = time.monotonic()
        if not self.stuck_since:
            self.stuck_since = now
        if buffered > self.hard or now - self.stuck_since > self.stuck_s:
            self._slow_reader(buffered, now)
            return False
        if droppable:
            self.dropped += 1
            self.metrics.frames_dropped += 1
            return False
        return True

    def _slow_reader(self, buffered: int, now: float) -> None:
        log.warning(
            "slow_reader_closed",
            player_id=self.player_id,
            buffered=buffered,
            dropped=self.dropped,
            stuck_s=round(now - self.stuck_since, 3),
        )
        self.metrics.closed.labels("slow_reader").inc()
        self.close(CLOSE_POLICY, "client is not reading its frames")
        # Closing waits for the peer's close frame; a stuck reader never sends it.
        asyncio.get_running_loop().call_later(1.0, self.transport.abort)

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
        self.metrics = app.metrics
        self._server: Server | None = None
        self._ticker: Ticker | None = None
        self._stop_watch = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopping = False
        self.watchdog: Watchdog | None = None
        self._handoff: handoff.HandoffReceiver | None = None
        self.peers: set[WebSocketPeer] = set()
        # Frames written during a ticker pass leave together when it ends (`asobi.server_writes`).
        self.writes = PassWrites()
        self._ip_buckets = KeyedBuckets(
            self.settings.connect_rate_per_ip, self.settings.connect_burst_per_ip
        )
        self.started_at = time.time()
        self.port = 0
        self.metrics.bind(
            connections=lambda: len(self.peers),
            players=lambda: len(self.app.hub),
            matches=lambda: len(self.app.engine.matches),
            ticks=lambda: self.app.engine.ticks,
            ticks_skipped=lambda: self.app.engine.ticks_skipped,
            inputs_dropped=lambda: self.app.engine.inputs_dropped,
            seats_held=lambda: len(self.app.presence),
            tickets=lambda: len(self.app.matchmaker),
        )

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        # Bind first, serve later: a taken port is found before anything else has started
        # (no store opened and closed again around the one line the user needs to read).
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            compression="deflate" if s.compression == "deflate" else None,
            max_size=s.max_message_bytes,
            ping_interval=s.ping_interval_s or None,
            ping_timeout=s.ping_timeout_s or None,
            close_timeout=s.close_timeout_s,
            start_serving=False,
            create_connection=InlineConnection,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        await self.app.open(self.port)
        self._ticker = Ticker(
            self.app.engine,
            on_pass_start=self.writes.begin,
            on_pass_end=self.writes.end,
            early_share=s.tick_early_share,
        )
        self.app.engine.clock = self._ticker.loop.time
        self._ticker.start()
        await self._server.start_serving()
        self._housekeeping = asyncio.create_task(self._housekeep())
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
            compression=s.compression,
            max_connections=s.max_connections,
            huge_pages=huge_pages.in_use(),
        )
        # A worker of `asobi serve --workers N` also serves the sockets its supervisor accepts.
        self._handoff = handoff.HandoffReceiver.from_env(
            handoff.connection_factory(self._server, s)
        )
        if self._handoff is not None:
            self._handoff.start()

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._handoff is not None:
            self._handoff.stop()
        if self.app.drainer is not None:
            # A node of a cluster hands its matches to the others before it goes (the ticker
            # and the connections still run: players are told where their match went).
            try:
                await self.app.drainer.drain()
            except Exception:
                log.exception("drain_failed")
        self._stop_watch.set()
        if self._watch_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._watch_task, 2)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self._ticker is not None:
            self._ticker.stop()
        if self._server is not None:
            await self._close_connections()
        await self.app.close()
        log.info("server_stopped")

    async def _close_connections(self) -> None:
        """Close every connection (1001, going away), but never wait on clients for longer than
        the shutdown timeout: pending writes are only saved after the connections are gone (a
        closing session still runs its match's `leave`), and a stuck client must not push that
        past the moment the process gets killed."""
        assert self._server is not None
        connections = list(self._server.connections)
        self._server.close()
        closed = asyncio.ensure_future(self._server.wait_closed())
        done, _ = await asyncio.wait({closed}, timeout=self.settings.shutdown_timeout_s)
        if not done:
            stuck = [c for c in connections if c.protocol.state is not State.CLOSED]
            log.warning("shutdown_connections_cut", connections=len(stuck))
            for connection in stuck:
                connection.transport.abort()
        await closed

    async def serve_forever(self, on_started: Callable[[AsobiServer], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, under the watchdog (`asobi.watchdog`).

        The watchdog starts first: it blocks the stop signals for every thread started after it
        and waits for them on its own thread, so a stuck loop cannot make the server deaf to
        them.  A signal then runs the same graceful `stop` on the loop as before.
        """
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        s = self.settings
        self.watchdog = Watchdog(
            loop,
            WatchdogSettings(s.wedge_after_s, s.wedge_exit_s, s.wedge_ready_hold_s, s.stop_stuck_s),
            on_wedged=self.app.engine.wedged.add,
            on_stop=done.set,
        )
        self.watchdog.start()
        try:
            await self.start()
            if on_started is not None:
                on_started(self)
            if not self.watchdog.takes_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError):
                        loop.add_signal_handler(sig, done.set)
            benchstats.install(loop, self.app, os.environ.get(benchstats.ENV))
            await done.wait()
            await self.stop()
        finally:
            self.watchdog.stop()

    async def _housekeep(self) -> None:
        """Timers that need no precision: ticket expiry, seat grace, metrics, bucket pruning."""
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            now = time.monotonic()
            try:
                self.app.matchmaker.expire(now)
                expire_seats(self.app, now)
                self._collect_metrics()
                if now - last_prune > PRUNE_EVERY_S:
                    self._ip_buckets.prune(now)
                    last_prune = now
            except Exception:
                log.exception("housekeeping_failed")

    def _collect_metrics(self) -> None:
        self.metrics.take_lateness(self.app.engine)
        self.metrics.count_reloads(self.app.history)

    # -- HTTP -------------------------------------------------------------------------------------
    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        response = await self._route(connection, request)
        if response is not None and self.settings.node_id:
            response.headers["X-Asobi-Node"] = self.settings.node_id  # which node answered
        return response

    async def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return self._admit(connection)
        if path == "/health":
            return _json_response(connection, 200, {"status": "ok"})
        if path == "/ready":
            ready = self._ready()
            body: dict[str, Any] = {"ready": ready}
            unplayable = self.app.unplayable()
            if unplayable is not None:
                body["reason"] = unplayable
            return _json_response(connection, 200 if ready else 503, body)
        if path == "/metrics":
            self._collect_metrics()
            response = connection.respond(200, self.metrics.exposition().decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return response
        if path == "/api/v1/cluster":
            return _json_response(connection, 200, self._cluster())
        if path == "/api/v1/reloads":
            return _json_response(connection, 200, await self._reloads())
        if path == "/api/v1/admin/reload":
            return await self._admin_reload(connection, request)
        page = web.respond(
            connection, path, bool(self.settings.admin_token), self.app.registry.known_modes()
        )
        if page is not None:
            return page
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
        scripts = query.get("script")
        script = scripts[0] if scripts else None
        if (
            script is not None
            and self.app.registry.relative_name(self.app.registry.game_dir / script) != script
        ):
            return _json_response(connection, 400, {"error": f"not a script: {script[:200]}"})
        records = await self.app.reloader.reload_now(script, "manual")
        # Answer once every affected match has switched or refused (a tick or two).
        deadline = asyncio.get_running_loop().time() + ADMIN_RELOAD_WAIT_S
        while any(r.outcome == "pending" for r in records):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        return _json_response(connection, 200, {"reloads": [r.as_dict() for r in records]})

    async def _reloads(self) -> dict[str, Any]:
        """This node's reload history; on a node of a cluster also the latest cluster reload
        records (`asobi push`), or why they cannot be read now."""
        body: dict[str, Any] = {"reloads": self.app.history.as_list()}
        if self.app.cluster_reloader is not None:
            try:
                body["cluster_reloads"] = await self.app.cluster_reloader.records.recent()
            except Unavailable as exc:
                body["cluster_reloads_error"] = str(exc)
        return body

    def _cluster(self) -> dict[str, Any]:
        """The live nodes (`asobi nodes`); a single node lists itself."""
        from asobi.cluster.node import default_public_url

        if self.app.cluster is not None:
            return self.app.cluster.describe()
        return {
            "cluster": False,
            "node_id": "local",
            "nodes": [
                {
                    "node_id": "local",
                    "public_url": default_public_url(self.settings.host, self.port),
                    "matches": len(self.app.engine.matches),
                    "players": len(self.app.hub),
                }
            ],
        }

    def _ready(self) -> bool:
        return (
            self._server is not None
            and self._ticker is not None
            and not self._stopping
            and len(self.peers) < self.settings.max_connections
            and self.app.unplayable() is None
            and (self.watchdog is None or self.watchdog.ready())
        )

    def _admit(self, connection: ServerConnection) -> Response | None:
        """Refuse a WebSocket handshake over the connection cap (503) or the IP's rate (429)."""
        if len(self.peers) >= self.settings.max_connections:
            self.metrics.refused.labels("capacity").inc()
            log.warning("connection_refused", reason="capacity", connections=len(self.peers))
            response = _json_response(connection, 503, {"error": "server is at capacity"})
            response.headers["Retry-After"] = "5"
            return response
        ip = connection.remote_address[0] if connection.remote_address else ""
        if not self._ip_buckets.take(ip, time.monotonic()):
            self.metrics.refused.labels("ip_rate").inc()
            log.warning("connection_refused", reason="ip_rate", remote=ip)
            response = _json_response(connection, 429, {"error": "too many connection attempts"})
            response.headers["Retry-After"] = "1"
            return response
        return None

    # -- WebSocket --------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, InlineConnection)  # `serve(create_connection=...)`
        s = self.settings
        peer = WebSocketPeer(
            ws,
            self.metrics,
            s.outbound_soft_bytes,
            s.outbound_hard_bytes,
            s.slow_reader_timeout_s,
            self.writes,
        )
        if s.socket_sndbuf_bytes > 0:
            # Bytes the kernel queues for a client are invisible to the slow-reader check; a
            # fixed send buffer bounds them (Linux autotunes up to tcp_wmem's max, often 4 MiB).
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s.socket_sndbuf_bytes)
        remote = ws.remote_address[0] if ws.remote_address else ""
        # The session (asobi.session) decides everything: rate and size limits, the time limit
        # to authenticate, the protocol; the driver gives it the loop's time and does its I/O.
        driver = SessionDriver(self.app, peer, remote)
        self.peers.add(peer)
        ticker = self._ticker
        assert ticker is not None  # started before the server accepts connections
        clock = ticker.loop.time

        def receive(message: str | bytes) -> None:
            driver.receive(message)
            if driver.session.authenticated:
                peer.player_id = driver.session.player_id
            # Between two messages of a burst, a pass that fell due runs instead of waiting for
            # the loop to read every other ready connection first.
            ticker.run_overdue(clock())

        # Messages reach `receive` as they are parsed (`InlineConnection`); the loop takes the
        # few that websockets queued instead (fragmented, early, or not UTF-8: it closes then).
        ws.on_message = receive
        try:
            async for message in ws:
                receive(message)
        except ConnectionClosed:
            pass
        finally:
            self.peers.discard(peer)
            driver.closed()
