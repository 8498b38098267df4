"""The floor under every delivered frame: what one loopback `send` of a state frame costs the
sender, written three ways.

`python -m bench.send_floor [connections]`: this process (pinned to the server core) writes a
300-byte WebSocket frame to each of N loopback TCP connections (default 300), in bursts of N as a
ticker pass does (10,000 frames a second at 300), while a reader process pinned to the other core
drains them all.  It
prints the sender's CPU per frame for asyncio's `transport.write`, a bare `socket.send`, and
`asobi._send.send_each` (the C call that ends a pass; absent when it was not built).  On
loopback the `send` also runs the receiver's TCP and wakes it, so this is what any server pays
per frame on this machine, asobi and Colyseus alike.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import procs

FRAME = b"\x81\x7e\x01\x28" + b"x" * 296  # a 300-byte text frame
SECONDS = 4.0


def _drain(port: int, connections: int, core: set[int] | None, ready: Any) -> None:
    if core:
        os.sched_setaffinity(0, core)
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    poller = select.epoll()
    by_fd = {}
    for sock in socks:
        sock.setblocking(False)
        by_fd[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
    ready.set()
    while True:
        for fd, _ in poller.poll():
            try:
                if not by_fd[fd].recv(65536):
                    return
            except BlockingIOError:
                pass


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(connections: int) -> list[tuple[str, float]]:
    server_core, load_core = procs.cores()
    if server_core:
        os.sched_setaffinity(0, server_core)
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[asyncio.WriteTransport] = asyncio.Queue()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.WriteTransport)
            accepted.put_nowait(transport)

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ready = multiprocessing.Event()
    reader = multiprocessing.Process(
        target=_drain, args=(port, connections, load_core, ready), daemon=True
    )
    reader.start()
    transports = [await accepted.get() for _ in range(connections)]
    fds = [t.get_extra_info("socket").fileno() for t in transports]
    # Plain socket objects on the same sockets (asyncio hands out a wrapper without `send`).
    socks = [socket.socket(fileno=os.dup(fd)) for fd in fds]
    frames = [FRAME] * connections

    def with_transports() -> None:
        for transport in transports:
            transport.write(FRAME)

    def with_sockets() -> None:
        for sock in socks:
            sock.send(FRAME)

    ways: list[tuple[str, Callable[[], object]]] = [
        ("asyncio transport.write", with_transports),
        ("socket.send", with_sockets),
    ]
    try:
        from asobi._send import send_each

        ways.append(("asobi._send.send_each (C)", lambda: send_each(fds, frames)))
    except ImportError:
        pass
    results = []
    for name, burst in ways + ways:  # twice, interleaved: the machine drifts
        sent = 0
        started_cpu, started = _cpu(), time.monotonic()
        while time.monotonic() - started < SECONDS:
            burst()
            sent += connections
            await asyncio.sleep(0.1 * min(1.0, connections / 1000))
        results.append((name, (_cpu() - started_cpu) / sent * 1e6))
    reader.kill()
    for sock in socks:
        sock.close()
    server.close()
    for transport in transports:
        transport.abort()
    return results


def main() -> None:
    connections = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    results = asyncio.run(measure(connections))
    print(f"# one 300-byte frame to each of {connections} loopback connections, in bursts\n")
    print("| written with | sender CPU us per frame (two runs) |")
    print("|---|---:|")
    names = list(dict.fromkeys(name for name, _ in results))
    for name in names:
        runs = [f"{us:.2f}" for n, us in results if n == name]
        print(f"| {name} | {' / '.join(runs)} |")


if __name__ == "__main__":
    main()
