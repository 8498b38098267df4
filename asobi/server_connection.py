"""The server's WebSocket connection: each complete message goes to the session as it is parsed.

websockets' asyncio connection queues every parsed message and wakes the handler task to take
it (`async for message in ws`): a queue, a future and a task switch per message.  The session is
sans-I/O and synchronous (`asobi.session`), so nothing needs that task: this connection hands a
single-frame message straight from `data_received` to `on_message`, on the stack that parsed it.
On the field game (16 players sending inputs 20 times a second, two inputs per delivered frame)
that is 12-18% less server CPU per delivered frame, measured side by side under the same load.

It also reads the socket in 64 KiB pieces instead of asyncio's 256 KiB (`READ_SIZE`).  asyncio
allocates its read size for every `recv` and shrinks the bytes object to what arrived; above
glibc's 128 KiB mmap threshold that is an mmap, a page fault, an mremap and an munmap for each
message a client sends.  On the field game that was most of the server's system time (41 -> 12
us per delivered frame) and 13-22% of its CPU, measured side by side.

Everything else stays websockets' own: the handshake, control frames, keepalive, the size limit
(checked by its protocol while parsing), compression and the close handshake.  A message that
is fragmented, that is not valid UTF-8 text, or that arrives before `on_message` is set goes
through websockets' queue as before, and so does every message after it until the handler has
taken them all (`queued`), so messages always reach the session in the order they were sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Event
from websockets.typing import Data

log = structlog.get_logger("asobi.server")

# Bytes asked of each `recv` (see the module docstring): under glibc's mmap threshold, as large
# as Node's read buffer.  A message larger than this is read in several pieces, as any message
# split by TCP is.
READ_SIZE = 64 * 1024


class InlineConnection(ServerConnection):
    """`serve(create_connection=InlineConnection)`; the handler sets `on_message` and still
    iterates the connection (`async for`) for what went through the queue (see the module
    docstring)."""

    on_message: Callable[[str | bytes], None] | None = None
    # Messages handed to websockets' queue and not yet taken by the handler: while there are
    # any, later messages queue behind them.
    queued = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector transport reads `max_size` bytes per `recv` (a class attribute it
        # documents only in its source); other transports are left as they are.
        if isinstance(getattr(transport, "max_size", None), int):
            transport.max_size = READ_SIZE  # type: ignore[attr-defined]
        super().connection_made(transport)

    def process_event(self, event: Event) -> None:
        if self.request is None or not isinstance(event, Frame):
            super().process_event(event)  # the handshake request
            return
        opcode = event.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            handler = self.on_message
            if handler is not None and event.fin and not self.queued:
                message = _message(event)
                if message is not None:
                    self._deliver(handler, message)
                    return
            self.queued += 1  # counted at its first frame; continuations follow it
        super().process_event(event)

    async def __aiter__(self) -> AsyncIterator[Data]:
        async for message in super().__aiter__():
            self.queued -= 1  # the handler took it: whole messages go inline again once none wait
            yield message

    def _deliver(self, handler: Callable[[str | bytes], None], message: str | bytes) -> None:
        try:
            handler(message)
        except Exception:
            # The session never raises on input; if it did, this connection ends as a failed
            # handler's would (1011), and no other connection is touched.
            log.exception("session_receive_failed")
            self.on_message = None  # what else was parsed is websockets' to discard
            self.protocol.fail(CloseCode.INTERNAL_ERROR)
            self.send_data()


def _message(frame: Frame) -> str | bytes | None:
    """The frame's message, or None for text that is not UTF-8 (websockets' queue path then
    closes the connection with 1007, as for any client)."""
    if frame.opcode is Opcode.BINARY:
        return bytes(frame.data)
    try:
        return bytes(frame.data).decode()
    except UnicodeDecodeError:
        return None
