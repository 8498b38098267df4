"""The end of a pass sent in C (`asobi/_send.c` through `PassWrites`), on real loopback sockets:
frames arrive whole and in order whether the kernel takes them at once, takes part of them, or
refuses the connection; what it does not take goes through the transport as before."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from asobi import server_writes
from asobi.server_writes import PassWrites, direct_fd

pytestmark = pytest.mark.skipif(
    server_writes._send_each is None, reason="asobi/_send.c not built (CI checks it is)"
)

Pair = tuple[asyncio.WriteTransport, asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[], asyncio.Future[Pair]]]:
    """Make server-side transports, each with the client reading what it writes, over TCP."""
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    opened: list[asyncio.StreamWriter] = []

    async def on_client(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def make() -> Pair:
        reader, client = await asyncio.open_connection("127.0.0.1", port)
        writer = await asyncio.wait_for(accepted.get(), 5)
        opened.extend((client, writer))
        transport = writer.transport
        assert isinstance(transport, asyncio.WriteTransport)
        return transport, reader, client

    yield make  # type: ignore[misc]
    for writer in opened:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_held_frames_leave_at_the_end_in_order_beside_transport_writes(
    connect: Callable[[], asyncio.Future[Pair]],
) -> None:
    (a, read_a, _), (b, read_b, _) = await connect(), await connect()
    fd_a = direct_fd(a)
    assert fd_a >= 0
    writes = PassWrites()
    writes.begin()
    for n in range(50):
        writes.write(a, b"a%02d;" % n, fd_a)
        writes.write(b, b"b%02d;" % n)  # -1: through its transport
    writes.end()
    assert await read_a.readexactly(200) == b"".join(b"a%02d;" % n for n in range(50))
    assert await read_b.readexactly(200) == b"".join(b"b%02d;" % n for n in range(50))
    assert a.get_write_buffer_size() == 0


async def test_what_the_kernel_does_not_take_waits_in_the_transport_in_order(
    connect: Callable[[], asyncio.Future[Pair]],
) -> None:
    """A client that does not read: the first frames fill the socket's buffers, the rest of the
    one sent in part and every later one go to the transport's buffer, and all of it arrives in
    order once the client reads."""
    slow, read_slow, client = await connect()
    fast, read_fast, _ = await connect()
    sock = slow.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = 10_000
    frames = [bytes([65 + n % 26]) * chunk for n in range(40)]
    writes = PassWrites()
    writes.begin()
    for frame in frames:
        writes.write(slow, frame, direct_fd(slow))
        writes.write(fast, b"f", direct_fd(fast))
    writes.end()
    assert slow.get_write_buffer_size() > 0  # the kernel took only part of it
    assert await read_fast.readexactly(40) == b"f" * 40  # the other connection was not held up
    assert await asyncio.wait_for(read_slow.readexactly(chunk * 40), 10) == b"".join(frames)


async def test_a_reset_connection_is_reported_by_its_transport_and_spares_the_others(
    connect: Callable[[], asyncio.Future[Pair]],
) -> None:
    lost, _, client = await connect()
    kept, read_kept, _ = await connect()
    # Close with a reset: the server's sends on that socket now fail (ECONNRESET / EPIPE).
    raw = client.get_extra_info("socket")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.transport.abort()
    await asyncio.sleep(0.1)
    writes = PassWrites()
    writes.begin()
    for n in range(3):
        writes.write(lost, b"x" * 100, direct_fd(lost))
        writes.write(kept, b"k%d" % n, direct_fd(kept))
    writes.end()  # nothing escapes the pass
    assert await read_kept.readexactly(6) == b"k0k1k2"
    await asyncio.sleep(0.05)
    assert lost.is_closing()  # the transport saw the error and closed, as on its own write


def test_send_each_returns_what_it_did_not_send() -> None:
    send_each = server_writes._send_each
    assert send_each is not None
    left, right = socket.socketpair()
    try:
        assert send_each([-1, left.fileno()], [b"skipped", b"sent"]) == [(0, 0)]
        assert right.recv(16) == b"sent"
        with pytest.raises(TypeError):
            send_each([left.fileno()], [b"a", b"b"])
        with pytest.raises(TypeError):
            send_each([left.fileno()], ["text"])  # type: ignore[list-item]
    finally:
        left.close()
        right.close()


def test_only_asyncios_plain_socket_transport_is_sent_on_directly() -> None:
    class Other(asyncio.WriteTransport):
        def get_extra_info(self, name: str, default: object = None) -> object:
            return socket.socket() if name == "socket" else default

    assert direct_fd(Other()) == -1
