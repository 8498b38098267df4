"""Shared pieces of the protocol, session and limit tests: a game script exercising every
callback, and a tiny HTTP GET for the routes on the WebSocket port."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import struct
import urllib.error
import urllib.request

GAME = """\
match_size = 1
max_players = 3
tick_rate = 20
function init(state, ctx)
  state.counter = 0
  state.inputs = 0
  state.left = 0
  state.last_left = ""
  state.closed = false
  return state
end
function join(state, player_id)
  if state.closed then return nil, "match is closed" end
  return state
end
function leave(state, player_id)
  state.left = state.left + 1
  state.last_left = player_id
  game.broadcast("gone", { player_id = player_id })
  return state
end
function handle_input(state, player_id, input)
  if math.type(input.add) == "integer" then state.inputs = state.inputs + input.add end
  if type(input.whisper) == "string" then game.send(player_id, { echo = input.whisper }) end
  if type(input.shout) == "string" then
    game.broadcast("shout", { from = player_id, text = input.shout })
  end
  if input.close == true then state.closed = true end
  if input.finish == true then
    state._finished = true
    state._result = { winner = player_id }
  end
  return state
end
function tick(state)
  state.counter = state.counter + 1
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, inputs = state.inputs, left = state.left,
           last_left = state.last_left }
end
"""

PAIR = "match_size = 2\nmax_players = 2\n" + GAME.split("\n", 3)[3]


async def http_get(url: str) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of a GET (4xx/5xx included, not raised)."""

    def fetch() -> tuple[int, dict[str, str], str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    return await asyncio.to_thread(fetch)


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus exposition text (0 when absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    for line in text.splitlines():
        found = re.match(pattern, line)
        if found:
            return float(found.group(1))
    return 0.0


class RawClient:
    """A bare-bones WebSocket client on a plain socket: it does only what a test tells it to,
    e.g. stop reading entirely, or never answer pings."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send_text(self, text: str | bytes, opcode: int = 1) -> None:
        data = text.encode() if isinstance(text, str) else text
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 65536:
            head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.writer.write(head + mask + masked)

    async def read_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame; raises IncompleteReadError at EOF."""
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    def stop_reading(self) -> None:
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.transport.abort()  # type: ignore[attr-defined]
