"""Handing accepted client sockets from the supervisor to a worker (`asobi serve --workers N`).

The supervisor owns the one published port.  It accepts a connection, peeks at the HTTP
request line without consuming it (`MSG_PEEK`), picks a worker (the one named by `?node=<id>`,
else the next ready one) and passes the socket's descriptor over a Unix socket pair
(`SCM_RIGHTS`).  The worker adopts it with `loop.connect_accepted_socket` into the same
websockets server as its own listener, so the request, the handshake and every frame after it
are the worker's alone: no byte is copied through the supervisor.

The channel carries two things: descriptors from the supervisor (one byte of payload each), and
one byte `READY` from the worker once it serves.  End of file on the worker's side means the
supervisor is gone: the worker then stops as on SIGTERM rather than live on unreachable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.server import ServerProtocol

from asobi.config import Settings
from asobi.server_connection import InlineConnection

log = structlog.get_logger("asobi.handoff")

ENV = "ASOBI_HANDOFF_FD"
READY = b"R"
SOCKET_MSG = b"S"
# Bytes of the request the supervisor looks at: the request line and then some.
PEEK_BYTES = 4096
NODE_PARAM = "node"


# -- supervisor side -------------------------------------------------------------------------------
class Incomplete(Exception):
    """The request line has not fully arrived yet."""


def requested_node(peeked: bytes) -> str | None:
    """The `node` query parameter of the request line in `peeked`, if any.

    Raises `Incomplete` while the first line has not arrived and there is still room for it.
    Anything that is not a request line routes like a request without a node: the worker
    answers it (or refuses it) as it would on its own port.
    """
    end = peeked.find(b"\r\n")
    if end < 0:
        if len(peeked) < PEEK_BYTES:
            raise Incomplete
        return None
    parts = peeked[:end].split(b" ")
    if len(parts) != 3:
        return None
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None
    values = parse_qs(urlsplit(target).query).get(NODE_PARAM)
    return values[0] if values else None


def send_socket(channel: socket.socket, conn: socket.socket) -> None:
    """Pass `conn` to the worker at the other end of `channel` (raises OSError if it cannot)."""
    socket.send_fds(channel, [SOCKET_MSG], [conn.fileno()])


# -- worker side -----------------------------------------------------------------------------------
def connection_factory(server: Server, settings: Settings) -> Callable[[], ServerConnection]:
    """Connections for `server` configured as `AsobiServer.start` configures its listener.

    websockets builds the same pair (a Sans-I/O `ServerProtocol` inside an asyncio
    `ServerConnection`, here our `InlineConnection`) for each connection its listener accepts; a
    `ServerConnection` starts the server's handler (handshake, `process_request`, the session)
    when its socket is attached.
    """
    extensions = (
        enable_server_permessage_deflate(None) if settings.compression == "deflate" else None
    )

    def factory() -> ServerConnection:
        protocol = ServerProtocol(extensions=extensions, max_size=settings.max_message_bytes)
        return InlineConnection(
            protocol,
            server,
            ping_interval=settings.ping_interval_s or None,
            ping_timeout=settings.ping_timeout_s or None,
            close_timeout=settings.close_timeout_s,
        )

    return factory


class HandoffReceiver:
    """Adopts the sockets the supervisor passes to this worker."""

    def __init__(self, channel_fd: int, factory: Callable[[], ServerConnection]) -> None:
        self._channel = socket.socket(fileno=channel_fd)
        self._channel.setblocking(False)
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[object]] = set()
        self.adopted = 0

    @classmethod
    def from_env(cls, factory: Callable[[], ServerConnection]) -> HandoffReceiver | None:
        raw = os.environ.get(ENV)
        return cls(int(raw), factory) if raw else None

    def start(self) -> None:
        """Take sockets from now on, and tell the supervisor this worker is ready for them."""
        self._loop.add_reader(self._channel.fileno(), self._receive)
        self._channel.send(READY)

    def stop(self) -> None:
        """Take no more sockets (those in flight are closed with the channel)."""
        if self._channel.fileno() >= 0:
            self._loop.remove_reader(self._channel.fileno())
            self._channel.close()

    def _receive(self) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self._channel, 64, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds = b"", []
        for fd in fds:
            self._adopt(fd)
        if not msg:
            # Stop reading first: the channel stays readable at its end, and this must run once
            # even if the log line below cannot be written (the supervisor held its pipe).
            self.stop()
            os.kill(os.getpid(), signal.SIGTERM)
            log.warning("supervisor_gone")

    def _adopt(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self.adopted += 1
        task = self._loop.create_task(self._attach(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attach(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock)
        except OSError:
            sock.close()
