"""A lean load generator: one picows listener per player, no client library objects.

picows parses WebSocket frames in C; each listener only pulls `counter` and `message` out of a
`match.state` frame with two byte regexes (no JSON parse on the hot path), so one core can
receive far more frames than the server under test sends.  Everything measured client side goes
into a shared `Tally`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_COUNTER = re.compile(rb'"counter":(\d+)')
# State frames of a match in patch mode (`bench/field_game.py`) carry the match's frame `seq`.
_SEQ = re.compile(rb'"seq":(\d+)')
_MESSAGE = re.compile(rb'"message":"([^"]*)"')
_STATE_PREFIXES = (b'{"type":"match.state"', b'{"type":"match.patch"')
COLYSEUS_JOIN_ROOM, COLYSEUS_ERROR, COLYSEUS_STATE, COLYSEUS_PATCH = 10, 11, 14, 15
COLYSEUS_ROOM_DATA = 13


@dataclass
class Version:
    """When clients first saw frames made by one version of the code."""

    first: float
    seen: int = 0
    all_at: float | None = None


@dataclass
class Tally:
    """Counters shared by every client of one run."""

    period: float = 0.1
    frames: int = 0
    gaps: int = 0
    repeats: int = 0
    errors: int = 0
    measuring: bool = False
    intervals: list[float] = field(default_factory=list)
    track_messages: bool = False
    clients: int = 0
    versions: dict[bytes, Version] = field(default_factory=dict)
    last_error: str = ""

    def counters(self) -> tuple[int, int, int]:
        return self.frames, self.gaps, self.repeats

    def saw_version(self, message: bytes, now: float) -> None:
        version = self.versions.get(message)
        if version is None:
            version = self.versions[message] = Version(now)
        version.seen += 1
        if version.seen >= self.clients and version.all_at is None:
            version.all_at = now


class _Player(WSListener):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_state: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_t: float | None = None

    def _arrived(self, now: float) -> None:
        tally = self.tally
        tally.frames += 1
        if tally.measuring and self.last_t is not None:
            tally.intervals.append(now - self.last_t)
        self.last_t = now
        if not self.first_state.done():
            self.first_state.set_result(None)

    def _fail(self, why: str) -> None:
        self.tally.errors += 1
        self.tally.last_error = why
        for fut in (self.ready, self.first_state):
            if not fut.done():
                fut.set_exception(RuntimeError(why))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._fail("disconnected")

    def send(self, data: bytes, text: bool = True) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT if text else WSMsgType.BINARY, data)


class AsobiPlayer(_Player):
    """Authenticates with a token, queues for a match, and checks every match.state frame."""

    def __init__(self, tally: Tally, token: str) -> None:
        super().__init__(tally)
        self.token = token
        self.last_counter: int | None = None
        self.message: bytes | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.send(orjson.dumps({"type": "session.connect", "payload": {"token": self.token}}))

    def queue(self, mode: str) -> None:
        self.send(orjson.dumps({"type": "matchmaker.add", "payload": {"mode": mode}}))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        data = frame.get_payload_as_bytes()
        if data.startswith(_STATE_PREFIXES):
            self._state(data)
            return
        doc = orjson.loads(data)
        kind = doc.get("type")
        if kind == "session.connected" and not self.ready.done():
            self.ready.set_result(None)
        elif kind == "error":
            self._fail(f"error frame: {doc.get('payload')}")

    def _state(self, data: bytes) -> None:
        now = time.monotonic()
        tally = self.tally
        found = _COUNTER.search(data) or _SEQ.search(data)
        if found is not None:
            counter = int(found.group(1))
            last = self.last_counter
            if last is not None:
                step = counter - last
                if step > 1:
                    tally.gaps += step - 1
                elif step < 1:
                    tally.repeats += 1
            self.last_counter = counter
        if tally.track_messages:
            message = _MESSAGE.search(data)
            if message is not None and message.group(1) != self.message:
                self.message = message.group(1)
                tally.saw_version(self.message, now)
        self._arrived(now)


class ColyseusPlayer(_Player):
    """Raw Colyseus room protocol: acknowledge JOIN_ROOM, then count state patches.

    Patches are not decoded (no schema decoder per client): the load shape is the same as for
    asobi's clients, and a Colyseus patch carries no sequence number to check for gaps.
    """

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        data = frame.get_payload_as_bytes()
        if not data:
            return
        code = data[0]
        if code in (COLYSEUS_PATCH, COLYSEUS_STATE):
            self._arrived(time.monotonic())
        elif code == COLYSEUS_JOIN_ROOM:
            self.send(bytes([COLYSEUS_JOIN_ROOM]), text=False)
            if not self.ready.done():
                self.ready.set_result(None)
        elif code == COLYSEUS_ERROR:
            self._fail(f"colyseus error frame {data[:80]!r}")


def asobi_input(direction: int) -> bytes:
    """A `match.input` frame steering a field game player (`bench/field_game.py`)."""
    return orjson.dumps({"type": "match.input", "payload": {"dir": direction}})


def colyseus_input(direction: int) -> bytes:
    """The same input as a Colyseus ROOM_DATA message: type "input", body {dir} (msgpack)."""
    return (
        bytes([COLYSEUS_ROOM_DATA, 0xA5])
        + b"input"
        + bytes([0x81, 0xA3])
        + b"dir"
        + bytes([direction])
    )


async def pump_inputs(
    players: list[Any], frames: list[bytes], *, text: bool, rate: float, per_match: int
) -> None:
    """Every player sends `rate` inputs per second until cancelled, steering on the schedule of
    `bench.field_game.input_dir` (as player j of its match, by ticks of this process' clock);
    `frames[d]` is the encoded input for direction d."""
    from bench.field_game import TICK_RATE, input_dir

    interval = 1.0 / rate
    started = time.monotonic()
    while True:
        tick = int((time.monotonic() - started) * TICK_RATE)
        for index, player in enumerate(players):
            # only players already in their match (a new step's clients connect idle first)
            if player.transport is not None and player.first_state.done():
                player.send(frames[input_dir(index % per_match + 1, tick)], text=text)
        await asyncio.sleep(interval)


def asobi_token(secret: str, player_id: str) -> str:
    """The same HS256 token `asobi token` prints (the bench knows the server's secret)."""
    now = int(time.time())
    claims = {"sub": player_id, "iat": now, "exp": now + 3600, "iss": "asobi"}
    return jwt.encode(claims, secret, algorithm="HS256")


async def gather_limited(jobs: Iterable[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """Run coroutine factories with at most `limit` in flight (the server's accept backlog is
    finite, and a burst of thousands of handshakes only measures the backlog)."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


async def connect(url: str, listener: _Player, timeout: float = 30.0) -> _Player:
    await ws_connect(lambda: listener, url, websocket_handshake_timeout=timeout)
    return listener


async def http_post_json(host: str, port: int, path: str, body: Any) -> Any:
    """A minimal HTTP/1.1 POST for Colyseus' matchmaking route (one connection per request)."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        rest = _unchunk(rest)
    if status != 200:
        raise RuntimeError(f"POST {path} -> {status}: {rest[:200]!r}")
    return orjson.loads(rest)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
