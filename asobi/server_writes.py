"""Frames written during a pass of the ticker leave together when the pass ends.

A pass (`asobi.ticker`) runs every match due within a millisecond: their `tick`, `get_state`,
the table walk, the encoding, and a `send` to each player.  Written one by one, each match's
sends sit between two matches' Lua and Python work; held until the pass ends, the sends run back
to back and so does the matches' work.  Measured side by side under the same load, two servers
on one core: 5-7% less server CPU per delivered frame with `shared_state`, 5-8% with per-player
`get_state`.  (The likely reason is the caches: the kernel's network path, which on loopback also
runs the receiver's TCP and wakes it, evicts what the next match's work needs, and back.)

What this costs is latency: a frame leaves when its pass ends, not when its match was done, which
is at most the pass's length (a millisecond or two when the server keeps up).  A pass that holds
`MAX_HELD` frames writes them at once, so an overloaded pass does not hold frames back for long.

Only writes made during a pass are held; everything else (replies to a client's messages, pings)
is written at once, and since held frames are written when their pass ends, before the loop runs
anything else, a connection's frames always leave in the order they were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from asyncio import selector_events
from collections.abc import Callable

from asobi import c_parts

SendEach = Callable[[list[int], list[bytes]], list[tuple[int, int]]]


def _send_in_c() -> SendEach | None:
    """`asobi/_send.c`, built at install when a C compiler is there; without it (or with
    `ASOBI_NATIVE=0`) every held frame goes through its transport."""
    if not c_parts.wanted():
        return None
    try:
        from asobi import _send
    except ImportError:
        return None
    return _send.send_each


_send_each = _send_in_c()

# Frames held before they are written anyway, mid-pass (~200 KiB of typical state frames).
MAX_HELD = 512

# FIN set, no reserved bits: a whole message in one frame (RFC 6455, section 5.2).
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_MEDIUM = struct.Struct("!BBH").pack
_LONG = struct.Struct("!BBQ").pack

_SOCKET_TRANSPORT: type = getattr(selector_events, "_SelectorSocketTransport", type(None))


def frame_header(length: int, binary: bool = False) -> bytes:
    """The header of an unmasked, unfragmented WebSocket frame with a `length`-byte payload: the
    same bytes as websockets' `Frame(...).serialize(mask=False)`, which is general (any opcode,
    extensions, masking) and costs 0.8 us a frame where this costs 0.1: every per-player state
    frame is framed once, so that is 2% of the server's CPU per delivered frame."""
    first = _FIN_BINARY if binary else _FIN_TEXT
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _MEDIUM(first, 126, length)
    return _LONG(first, 127, length)


def direct_fd(transport: asyncio.BaseTransport) -> int:
    """The socket a held frame may be sent on without its transport, or -1.

    Only asyncio's plain socket transport, whose `write` with an empty buffer is a bare `send`:
    a TLS transport's socket carries ciphertext, and any other transport keeps its own rules.
    """
    if type(transport) is not _SOCKET_TRANSPORT or _send_each is None:
        return -1
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


class PassWrites:
    """Where `WebSocketPeer` writes its frames; `begin`/`end` bracket a ticker pass.

    A frame held with a socket (`fd`, from `direct_fd`, given only while the transport's write
    buffer is empty and it is not closing) is sent by `asobi._send` at the end of the pass, with
    the others, in one C call; the transport gets only what the kernel did not take.  Nothing
    else writes to a transport during a pass (replies and websockets' own frames are written
    between passes), so its buffer is still empty when the pass ends.
    """

    __slots__ = ("_fds", "_frames", "_holding", "_transports")

    def __init__(self) -> None:
        self._holding = False
        self._transports: list[asyncio.WriteTransport] = []
        self._fds: list[int] = []
        self._frames: list[bytes] = []

    def write(self, transport: asyncio.WriteTransport, data: bytes, fd: int = -1) -> None:
        if not self._holding:
            transport.write(data)
            return
        self._transports.append(transport)
        self._fds.append(fd)
        frames = self._frames
        frames.append(data)
        if len(frames) >= MAX_HELD:
            self._write_held()

    def begin(self) -> None:
        self._holding = True

    def end(self) -> None:
        self._holding = False
        self._write_held()

    def _write_held(self) -> None:
        frames = self._frames
        if not frames:
            return
        transports, fds = self._transports, self._fds
        self._transports, self._fds, self._frames = [], [], []
        if _send_each is None:
            for transport, data in zip(transports, frames, strict=True):
                _write(transport, data)
            return
        for index, sent in _send_each(fds, frames):
            data = frames[index]
            _write(transports[index], memoryview(data)[sent:] if sent else data)


def _write(transport: asyncio.WriteTransport, data: bytes | memoryview) -> None:
    # A connection lost during the pass: asyncio's transport counts the write and drops it, as
    # it would have done had the frame been written at once.  One that cannot be written to any
    # more must not keep the frames after it from the others.
    with contextlib.suppress(RuntimeError):
        transport.write(data)
