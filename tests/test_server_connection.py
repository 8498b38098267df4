"""Messages reach the session as they are parsed (`asobi.server_connection`), and in the order
the client sent them, whichever path each took: whole frames go straight to the session, a
fragmented message through websockets' queue, and the whole ones after it wait their turn."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedError

from asobi.server_connection import READ_SIZE, InlineConnection
from tests.conftest import Client


def _heartbeat(cid: str) -> str:
    return orjson.dumps({"type": "session.heartbeat", "cid": cid}).decode()


async def _replies(client: Client, count: int) -> list[str]:
    out = []
    while len(out) < count:
        frame = await client.recv()
        assert frame["type"] == "session.heartbeat", frame
        out.append(frame["cid"])
    return out


async def test_whole_and_fragmented_messages_reach_the_session_in_the_order_sent(
    start_server,
) -> None:
    server = await start_server()
    client = await server.player()
    sent = []
    for round_ in range(10):  # 40 messages: under the rate limit's burst
        whole = [f"{round_}-a", f"{round_}-c", f"{round_}-d"]
        await client.ws.send(_heartbeat(whole[0]))
        text = _heartbeat(f"{round_}-b")
        await client.ws.send([text[:5], text[5:12], text[12:]])  # three frames, one message
        await client.ws.send(_heartbeat(whole[1]))
        await client.ws.send(_heartbeat(whole[2]))
        sent += [whole[0], f"{round_}-b", whole[1], whole[2]]
    assert await _replies(client, len(sent)) == sent
    # Back to whole frames only: they go straight to the session again, still in order.
    for n in range(10):
        await client.ws.send(_heartbeat(f"after-{n}"))
    assert await _replies(client, 10) == [f"after-{n}" for n in range(10)]
    # The handler took every message websockets queued: whole frames are not held back for good.
    (peer,) = server.server.peers
    assert peer.ws.queued == 0


async def test_a_receiver_that_raises_ends_its_own_connection_only() -> None:
    """Should the session ever raise on a message, that connection closes with 1011 and the
    server goes on serving the others."""
    got: list[str | bytes] = []

    def receive(message: str | bytes) -> None:
        if message == "boom":
            raise RuntimeError("a bug")
        got.append(message)

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, InlineConnection)
        ws.on_message = receive
        async for message in ws:
            receive(message)

    async with serve(handler, "127.0.0.1", 0, create_connection=InlineConnection) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        url = f"ws://127.0.0.1:{port}"
        async with connect(url) as failing, connect(url) as other:
            await failing.send("before")
            await failing.send("boom")
            with pytest.raises(ConnectionClosedError) as closed:
                await asyncio.wait_for(failing.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
            await other.send("still served")
            await (await other.ping())  # answered after the message before it was handled
    assert got == ["before", "still served"]


async def test_the_socket_is_read_in_small_pieces_and_large_messages_still_arrive_whole() -> None:
    """Reads are READ_SIZE bytes (not asyncio's 256 KiB, which glibc serves with an mmap per
    read); a message four times that size arrives whole, in order with the small ones."""
    got: list[str | bytes] = []
    read_sizes: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        assert isinstance(ws, InlineConnection)
        read_sizes.append(ws.transport.max_size)  # type: ignore[attr-defined]
        ws.on_message = got.append
        async for message in ws:
            got.append(message)

    large = "x" * (4 * READ_SIZE + 123)
    async with serve(handler, "127.0.0.1", 0, create_connection=InlineConnection) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", max_size=None) as client:
            await client.send("small")
            await client.send(large)
            await client.send(b"binary")
            await (await client.ping())  # answered once everything before it was parsed
    assert read_sizes == [READ_SIZE]
    assert got == ["small", large, b"binary"]
