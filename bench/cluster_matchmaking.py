"""Matchmaking latency across a cluster: `matchmaker.add` -> `matchmaker.matched`, 1 and 3 nodes.

`python -m bench --only cluster` (or `python -m bench.cluster_matchmaking`).  A private
`redis-server` on a Unix socket, node processes (`python -m asobi serve`, a `match_size = 2`
game) on the PostgreSQL of ASOBI_DATABASE_URL or ASOBI_TEST_DATABASE_URL (a cluster refuses
SQLite), and this process as the clients.  Each pair is two fresh guests: the first queues and
is acknowledged, then the second queues; the latency is from the second's `matchmaker.add` to
each player's `matchmaker.matched` (the completing player, and the one who waited, who with 3
nodes sits on another node and hears it through the bus with a seat token).  Pairs run
one at a time and eight at a time.  Needs the `redis-server` binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import websockets

GAME = """
match_size = 2
function init(state) return state end
function tick(state) return state end
function get_state(state, player_id) return {} end
"""
SECRET = "bench-cluster-secret-long-enough-for-hs256"
LISTENING = re.compile(rb"listening on ws://[^:]+:(\d+)/ws")


@dataclass
class Row:
    nodes: int
    pairs: int
    concurrency: int  # pairs in flight at once
    completing_p50_ms: float
    completing_p99_ms: float
    waiting_p50_ms: float
    waiting_p99_ms: float


def database_url() -> str:
    return os.environ.get("ASOBI_DATABASE_URL") or os.environ.get("ASOBI_TEST_DATABASE_URL", "")


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    sock = work / "redis.sock"
    args = [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    return proc, f"unix://{sock}"


async def start_node(
    work: Path, redis_url: str, db: str, name: str, *, game: str = GAME
) -> tuple[Any, str]:
    home = work / name
    (home / "game").mkdir(parents=True, exist_ok=True)
    (home / "game" / "match.lua").write_text(game)
    env = {
        **os.environ,
        "ASOBI_REDIS_URL": redis_url,
        "ASOBI_DATABASE_URL": db,
        "ASOBI_SECRET": SECRET,
        "ASOBI_NODE_ID": name,
        "ASOBI_HOST": "127.0.0.1",
        "ASOBI_PORT": "0",
        "ASOBI_GAME_DIR": str(home / "game"),
        "ASOBI_DATA_DIR": str(home / "data"),
        "ASOBI_LOG_LEVEL": "warning",
        "ASOBI_RECONNECT_GRACE_S": "2",
        "ASOBI_CONNECT_RATE_PER_IP": "100000",
        "ASOBI_CONNECT_BURST_PER_IP": "100000",
    }
    err = home / "stderr.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "asobi", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(err, "wb"),  # noqa: SIM115
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = LISTENING.search(err.read_bytes())
        if found:
            return proc, f"ws://127.0.0.1:{int(found.group(1))}/ws"
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"node {name} did not start: {err.read_text()[-1000:]}")


async def guest(url: str) -> Any:
    ws = await websockets.connect(url)
    await ws.send(orjson.dumps({"type": "auth.guest", "payload": {}}).decode())
    while orjson.loads(await ws.recv())["type"] != "session.connected":
        pass
    # Frames wait while the player's data loads from the database: a heartbeat's answer says
    # the load is over, so it stays out of the matchmaking latency.
    await ws.send(orjson.dumps({"type": "session.heartbeat", "payload": {}}).decode())
    while orjson.loads(await ws.recv())["type"] != "session.heartbeat":
        pass
    return ws


async def until(ws: Any, kind: str, timeout: float = 10.0) -> float:
    """Wait for a frame of this type; the time it arrived."""
    async with asyncio.timeout(timeout):
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == kind:
                return time.perf_counter()
            if frame["type"] == "error":
                raise RuntimeError(f"{kind}: {frame['payload']}")


async def pair(first_url: str, second_url: str) -> tuple[float, float]:
    first, second = await guest(first_url), await guest(second_url)
    try:
        add = orjson.dumps({"type": "matchmaker.add", "payload": {"mode": "duel"}}).decode()
        await first.send(add)
        await until(first, "matchmaker.queued")
        started = time.perf_counter()
        await second.send(add)
        waited, completed = await asyncio.gather(
            until(first, "matchmaker.matched"), until(second, "matchmaker.matched")
        )
        return (completed - started) * 1000, (waited - started) * 1000
    finally:
        await asyncio.gather(first.close(), second.close())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(int(len(ordered) * q), len(ordered) - 1)], 2)


async def measure(nodes: int, pairs: int, concurrency: int, db: str) -> Row:
    with tempfile.TemporaryDirectory(prefix="asobi-mm-bench-") as tmp:
        work = Path(tmp)
        redis, redis_url = start_redis(work)
        procs: list[Any] = []
        try:
            urls = []
            for i in range(nodes):
                proc, url = await start_node(work, redis_url, db, f"b{i}-{uuid.uuid4().hex[:4]}")
                procs.append(proc)
                urls.append(url)
            await asyncio.sleep(1.5)  # every node has seen every other's heartbeat
            for _ in range(3):  # warm up each path once
                await pair(urls[0], urls[-1])
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int) -> tuple[float, float]:
                async with gate:
                    return await pair(urls[i % nodes], urls[(i + 1) % nodes])

            results = await asyncio.gather(*(one(i) for i in range(pairs)))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            redis.terminate()
            redis.wait()
    completing = [c for c, _ in results]
    waiting = [w for _, w in results]
    return Row(
        nodes=nodes,
        pairs=pairs,
        concurrency=concurrency,
        completing_p50_ms=round(statistics.median(completing), 2),
        completing_p99_ms=pct(completing, 0.99),
        waiting_p50_ms=round(statistics.median(waiting), 2),
        waiting_p99_ms=pct(waiting, 0.99),
    )


async def run(pairs: int = 300, concurrency: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """One row per node count (1, 3) and concurrency; with 3 nodes every pair is cross-node."""
    db = database_url()
    if not db.startswith(("postgresql://", "postgres://")):
        raise RuntimeError("set ASOBI_DATABASE_URL (or ASOBI_TEST_DATABASE_URL) to PostgreSQL")
    return [asdict(await measure(n, pairs, c, db)) for n in (1, 3) for c in concurrency]


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| nodes | pairs | in flight | completing player p50 / p99 (ms) "
        "| waiting player p50 / p99 (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['pairs']} | {r['concurrency']} | {r['completing_p50_ms']} / "
            f"{r['completing_p99_ms']} | {r['waiting_p50_ms']} / {r['waiting_p99_ms']} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(table(asyncio.run(run()))))
