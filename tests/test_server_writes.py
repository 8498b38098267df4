"""Frames written during a ticker pass leave together when it ends (`asobi.server_writes`): on
real loopback sockets, nothing written in a pass reaches the client before the pass ends (unless
the pass holds MAX_HELD frames), writes outside a pass go at once, order is kept, and the ticker
ends a pass even when the engine raised in it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.frames import Frame, Opcode

from asobi.engine import Engine
from asobi.scripts import ScriptRegistry
from asobi.server_writes import MAX_HELD, PassWrites, frame_header
from asobi.ticker import Ticker
from tests.test_engine_reload import SCRIPT, ListOutbox

Pair = tuple[asyncio.WriteTransport, asyncio.StreamReader]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A server-side transport and a client reading what it writes, over loopback TCP."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def on_client(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, client = await asyncio.open_connection("127.0.0.1", port)
    writer = await asyncio.wait_for(accepted, 5)
    transport = writer.transport
    assert isinstance(transport, asyncio.WriteTransport)
    yield transport, reader
    client.close()
    writer.close()
    server.close()
    await server.wait_closed()


async def _nothing_arrives(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), 0.2)
    except TimeoutError:
        return True
    return False


async def test_frames_of_a_pass_leave_when_it_ends_in_order(pair: Pair) -> None:
    transport, reader = pair
    writes = PassWrites()
    writes.write(transport, b"before;")  # outside a pass: at once
    assert await reader.readexactly(7) == b"before;"
    writes.begin()
    for n in range(5):
        writes.write(transport, b"held-%d;" % n)
    assert await _nothing_arrives(reader)
    writes.end()
    assert await reader.readexactly(35) == b"held-0;held-1;held-2;held-3;held-4;"
    writes.write(transport, b"after;")
    assert await reader.readexactly(6) == b"after;"


async def test_a_pass_holding_max_held_frames_writes_them_at_once(pair: Pair) -> None:
    transport, reader = pair
    writes = PassWrites()
    writes.begin()
    for n in range(MAX_HELD + 3):
        writes.write(transport, b"%05d" % n)
    # The first MAX_HELD left when the last of them was held; the three after wait for the end.
    first = await reader.readexactly(5 * MAX_HELD)
    assert first == b"".join(b"%05d" % n for n in range(MAX_HELD))
    assert await _nothing_arrives(reader)
    writes.end()
    assert await reader.readexactly(15) == b"".join(
        b"%05d" % n for n in range(MAX_HELD, MAX_HELD + 3)
    )


async def test_a_lost_connection_does_not_keep_the_others_frames(pair: Pair) -> None:
    transport, reader = pair
    writes = PassWrites()
    writes.begin()
    transport.write_eof()  # this one cannot be written to any more
    writes.write(transport, b"lost")
    writes.end()  # no exception escapes the pass
    assert await reader.read() == b""


async def test_the_ticker_ends_a_pass_even_when_the_engine_raised(tmp_path: Path) -> None:
    (tmp_path / "match.lua").write_bytes(SCRIPT % b"v1")
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    engine = Engine(registry, ListOutbox())
    script = registry.get("match.lua")
    assert script is not None
    engine.start_match("duel", script, ["p1"])
    passes: list[str] = []

    def failing(now: float | None = None) -> float | None:
        raise RuntimeError("a bug in the engine")

    engine.run_due = failing  # type: ignore[method-assign]
    ticker = Ticker(
        engine,
        on_pass_start=lambda: passes.append("start"),
        on_pass_end=lambda: passes.append("end"),
    )
    ticker.start()
    await asyncio.sleep(0.3)
    ticker.stop()
    assert passes and passes[0] == "start"
    assert passes == ["start", "end"] * (len(passes) // 2)


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_frame_header_is_what_websockets_serializes(length: int, opcode: Opcode) -> None:
    """The server frames state frames itself; the bytes must be websockets' own, at each edge of
    the three length encodings."""
    payload = bytes(length)
    expected = Frame(opcode, payload).serialize(mask=False, extensions=())
    assert frame_header(length, opcode is Opcode.BINARY) + payload == expected
