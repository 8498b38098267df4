"""Soak test: many clients, random drops and resumptions, against a server in a subprocess.

    python -m bench.soak --clients 1000 --seconds 120

Starts `asobi serve` on a free loopback port with a counter game (matches of 10 players), connects
N lean clients (a minimal asyncio WebSocket client: the load generator must not be the
bottleneck), and for S seconds drops random connections (no close frame, like a lost network) and
resumes them with their resume token within the grace period.  Every match.state carries the
match's tick counter, so a client that stays connected can tell if it missed a frame.  Reports a
markdown table: frames lost while connected (must be 0), counter resets after a resume (must be
0), RSS growth of the server, tick lateness p99 (from /metrics).  Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

GAME = """\
match_size = 10
max_players = 10
tick_rate = 10
function init(state)
  state.counter = 0
  return state
end
function tick(state)
  state.counter = state.counter + 1
  return state
end
function get_state(state, player_id)
  return { counter = state.counter }
end
"""

HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: c29ha3NvYWtzb2Frc29haw==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@dataclass
class Stats:
    states: int = 0
    lost: int = 0
    resets: int = 0
    drops: int = 0
    resumed: int = 0
    rejoined: int = 0
    not_resumed: int = 0
    connect_errors: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Wire(asyncio.Protocol):
    """Just enough WebSocket for a client: handshake, unmasked server frames, pong, send."""

    def __init__(self, client: Client, port: int) -> None:
        self.client = client
        self.port = port
        self.buf = bytearray()
        self.open = False
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(HANDSHAKE.format(port=self.port).encode())

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(bytes(buf[:40]).decode()))
                return
            del buf[: end + 4]
            self.open = True
            self.ready.set_result(None)
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, head = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, head = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < head + n:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[head : head + n])
            del buf[: head + n]
            if opcode == 1:
                self.client.on_frame(orjson.loads(payload))
            elif opcode == 9:
                self._write(0xA, payload)
            elif opcode == 8 and self.transport is not None:
                self.transport.close()

    def _write(self, opcode: int, data: bytes) -> None:
        # Client frames must be masked; an all-zero key makes masking a no-op (cheap).
        n = len(data)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + struct.pack("!H", n)
        else:
            head = bytes((0x80 | opcode, 0xFF)) + struct.pack("!Q", n)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head + b"\0\0\0\0" + data)

    def send(self, kind: str, payload: dict[str, Any]) -> None:
        self._write(1, orjson.dumps({"type": kind, "payload": payload}))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during handshake"))
        self.client.on_lost(self)


class Client:
    def __init__(self, port: int, stats: Stats, rng: random.Random) -> None:
        self.port = port
        self.stats = stats
        self.rng = rng
        self.wire: Wire | None = None
        self.token = ""
        self.resume_token: str | None = None
        self.in_match = False
        self.last: int | None = None
        self.last_before_drop: int | None = None
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "match.state":
            counter = frame["payload"]["counter"]
            stats = self.stats
            stats.states += 1
            if self.last is not None:
                if counter != self.last + 1:
                    stats.lost += max(counter - self.last - 1, 0)
                    stats.resets += counter <= self.last
            elif self.last_before_drop is not None:
                stats.resets += counter <= self.last_before_drop
                self.last_before_drop = None
            self.last = counter
            return
        if kind in ("matchmaker.matched", "match.rejoined"):
            self.in_match = True
            if kind == "match.rejoined":
                self.stats.rejoined += 1
        elif kind == "match.finished":
            self.in_match = False
            self.last = None
        elif kind == "error":
            code = frame["payload"]["code"]
            self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        waiter = self.waiting.pop(kind, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    def on_lost(self, wire: Wire) -> None:
        if wire is self.wire:
            self.wire = None
            for waiter in self.waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection lost"))
            self.waiting.clear()

    async def request(self, kind: str, payload: dict[str, Any], reply: str) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self.waiting[reply] = future
        assert self.wire is not None
        self.wire.send(kind, payload)
        return await asyncio.wait_for(future, 10)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        wire = Wire(self, self.port)
        self.wire = wire
        await loop.create_connection(lambda: wire, "127.0.0.1", self.port)
        await asyncio.wait_for(wire.ready, 10)
        if not self.token:
            self.token = (await self.request("auth.guest", {}, "auth.token"))["payload"]["token"]
        payload = {"token": self.token}
        if self.resume_token:
            payload["resume_token"] = self.resume_token
        connected = (await self.request("session.connect", payload, "session.connected"))["payload"]
        if self.resume_token:
            if connected["resumed"]:
                self.stats.resumed += 1
            else:
                self.stats.not_resumed += 1
        self.resume_token = connected["resume_token"]
        await asyncio.sleep(0.2)  # match.rejoined, if any, comes right after session.connected
        if not self.in_match:
            self.wire.send("matchmaker.add", {"mode": "soak"})

    def drop(self) -> None:
        wire, self.wire = self.wire, None
        self.last_before_drop = self.last
        self.last = None
        self.in_match = False
        self.stats.drops += 1
        if wire is not None and wire.transport is not None:
            wire.transport.abort()

    async def run(self, steady_at: float, stop_at: float, drop_every_s: float) -> None:
        try:
            await self.connect()
        except (OSError, ConnectionError, TimeoutError):
            self.stats.connect_errors += 1
            return
        loop = asyncio.get_running_loop()
        while True:
            start = max(loop.time(), steady_at)
            when = start + self.rng.expovariate(1 / drop_every_s)
            if when >= stop_at:
                await asyncio.sleep(max(stop_at - loop.time(), 0))
                return
            await asyncio.sleep(when - loop.time())
            self.drop()
            await asyncio.sleep(self.rng.uniform(0.05, 2.0))
            try:
                await self.connect()
            except (OSError, ConnectionError, TimeoutError):
                self.stats.connect_errors += 1
                return

    def close(self) -> None:
        if self.wire is not None and self.wire.transport is not None:
            self.wire.transport.close()


# -- server process and measurements -----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def lateness_buckets(text: str) -> dict[float, float]:
    out = {}
    for m in re.finditer(r'^asobi_tick_lateness_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
        out[float(m.group(1))] = float(m.group(2))
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bucket bound holding the q-quantile of the observations between two scrapes."""
    bounds = sorted(after)
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for bound in bounds:
        if after[bound] - before.get(bound, 0.0) >= q * total:
            return bound
    return float("inf")


def sample(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_server(port: int, workdir: Path, clients: int) -> subprocess.Popen[bytes]:
    game = workdir / "game"
    game.mkdir()
    (game / "soak.lua").write_text(GAME)
    env = {
        **os.environ,
        "ASOBI_HOST": "127.0.0.1",
        "ASOBI_PORT": str(port),
        "ASOBI_GAME_DIR": str(game),
        "ASOBI_DATA_DIR": str(workdir / "data"),
        "ASOBI_SECRET": "soak-secret-with-enough-length-for-hs256",
        "ASOBI_RELOAD": "off",
        "ASOBI_LOG_LEVEL": "warning",
        "ASOBI_MAX_CONNECTIONS": str(clients * 2 + 100),
        "ASOBI_CONNECT_RATE_PER_IP": "100000",
        "ASOBI_CONNECT_BURST_PER_IP": "100000",
    }
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asobi", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                log_text = (workdir / "server.log").read_text()[-2000:]
                raise SystemExit(f"server exited: {log_text}") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become ready")


async def soak(clients: int, seconds: float, drop_every_s: float, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="asobi-soak-") as tmp:
        port = free_port()
        proc = start_server(port, Path(tmp), clients)
        try:
            return await _drive(proc, port, clients, seconds, drop_every_s, seed)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _drive(
    proc: subprocess.Popen[bytes],
    port: int,
    n: int,
    seconds: float,
    drop_every_s: float,
    seed: int,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    rng = random.Random(seed)
    rss_idle = rss_kib(proc.pid)
    ramp_s = max(n / 250, 1.0)
    steady_at = loop.time() + ramp_s + 2.0
    stop_at = steady_at + seconds
    clients = [Client(port, stats, random.Random(rng.random())) for _ in range(n)]
    tasks = []
    for i, client in enumerate(clients):
        tasks.append(asyncio.create_task(client.run(steady_at, stop_at, drop_every_s)))
        if i % 25 == 24:
            await asyncio.sleep(0.1)
    await asyncio.sleep(max(steady_at - loop.time(), 0))
    rss_start = rss_kib(proc.pid)
    before = await asyncio.to_thread(scrape, port)
    states_start = stats.states
    peak = rss_start
    # RSS at each quarter of the run: growth that keeps its pace is a leak, growth that slows
    # down is the allocator and the server's bounded buffers filling up.
    quarters: list[int] = []
    started = loop.time()
    while loop.time() < stop_at:
        await asyncio.sleep(min(2.0, max(stop_at - loop.time(), 0)))
        rss = rss_kib(proc.pid)
        peak = max(peak, rss)
        if loop.time() - started >= seconds * (len(quarters) + 1) / 4 - 1.0:
            quarters.append(rss)
    after = await asyncio.to_thread(scrape, port)
    rss_end = rss_kib(proc.pid)
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        client.close()
    b, a = lateness_buckets(before), lateness_buckets(after)
    return {
        "clients": n,
        "seconds": seconds,
        "states": stats.states - states_start,
        "stats": stats,
        "rss_idle": rss_idle,
        "rss_start": rss_start,
        "rss_end": rss_end,
        "rss_peak": peak,
        "rss_quarters": quarters,
        "p50": quantile(b, a, 0.50),
        "p99": quantile(b, a, 0.99),
        "ticks": sample(after, "asobi_ticks_total") - sample(before, "asobi_ticks_total"),
        "dropped": sample(after, "asobi_frames_dropped_total"),
        "matches": sample(after, "asobi_matches"),
    }


def report(r: dict[str, Any]) -> str:
    s: Stats = r["stats"]

    def ms(x: float) -> str:
        return f"<= {x * 1000:g} ms" if x != float("inf") else "> 1 s"

    rows = [
        ("clients / steady seconds", f"{r['clients']} / {r['seconds']:g}"),
        ("matches running at the end", f"{r['matches']:g}"),
        ("match.state frames received", f"{r['states']} ({r['states'] / r['seconds']:.0f}/s)"),
        ("frames lost while connected", f"**{s.lost}**"),
        ("counter resets after resume", f"**{s.resets}**"),
        ("drops / resumed / rejoined", f"{s.drops} / {s.resumed} / {s.rejoined}"),
        ("reconnects not resumed", str(s.not_resumed)),
        ("connect errors", str(s.connect_errors)),
        ("error frames", ", ".join(f"{k}: {v}" for k, v in s.errors.items()) or "none"),
        ("frames dropped by server (slow readers)", f"{r['dropped']:g}"),
        (
            "server RSS idle / start / end / peak (MiB)",
            " / ".join(
                f"{r[k] / 1024:.1f}" for k in ("rss_idle", "rss_start", "rss_end", "rss_peak")
            ),
        ),
        ("server RSS growth over the run", f"{(r['rss_end'] - r['rss_start']) / 1024:+.1f} MiB"),
        (
            "server RSS at each quarter of the run (MiB)",
            " / ".join(f"{k / 1024:.1f}" for k in r["rss_quarters"]),
        ),
        ("match ticks (server)", f"{r['ticks']:g}"),
        ("tick lateness p50 / p99 (bucket bound)", f"{ms(r['p50'])} / {ms(r['p99'])}"),
    ]
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument(
        "--drop-every",
        type=float,
        default=20.0,
        help="mean seconds between drops of one client (exponential)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args.clients, args.seconds, args.drop_every, args.seed))
    print(report(result))
    s: Stats = result["stats"]
    return 0 if s.lost == 0 and s.resets == 0 and s.connect_errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
