"""Draining a node: how long moving its matches takes, and the longest gap a player sees.

`python -m bench --only drain` (or `python -m bench.drain_bench`).  A private `redis-server`,
two node processes on the PostgreSQL of ASOBI_DATABASE_URL or ASOBI_TEST_DATABASE_URL, and four
client processes as the players: N two-player matches on node A (100 at 20 Hz, 1,000 at 5 Hz),
every player reading its frames.  Then `admin.drain` on A: as the JavaScript client does, each
player opens a second connection to node B when `match.moving` names it, keeps reading A until
B's first state frame, then closes A's (and follows a `match.moved` the old way).  Reported: the
drain as A measured it (players ahead, cut, write out, hand over) and as the operator saw it
(request to answer); per player, the longest time between two state frames it saw from the
drain's start to the end, and the ticks skipped or repeated in what they saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets

from bench.cluster_matchmaking import database_url, pct, start_node, start_redis

GAME = """
match_size = 2
max_players = 2
tick_rate = {hz}
function init(state) state.n = 0 return state end
function join(state, player_id) return state end
function tick(state) state.n = state.n + 1 return state end
function get_state(state, player_id) return { n = state.n } end
"""
ADMIN = "bench-drain-admin-token"


@dataclass
class Player:
    ws: Any
    token: str
    frames: list[tuple[float, int]] = field(default_factory=list)
    moved_at: float | None = None
    readers: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class Row:
    matches: int
    moved: int
    drain_server_ms: float
    drain_client_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    tick_period_ms: float
    players_over_3_periods: int
    skipped: int
    repeated: int


def send(kind: str, payload: dict[str, Any]) -> str:
    return orjson.dumps({"type": kind, "payload": payload}).decode()


async def guest(url: str) -> Player:
    ws = await websockets.connect(url, max_queue=None)
    await ws.send(send("auth.guest", {}))
    token = ""
    while True:
        frame = orjson.loads(await ws.recv())
        if frame["type"] == "auth.token":
            token = frame["payload"]["token"]
        if frame["type"] == "session.connected":
            return Player(ws, token)


async def matched(player: Player) -> None:
    await player.ws.send(send("matchmaker.add", {"mode": "duel"}))
    while orjson.loads(await player.ws.recv())["type"] != "matchmaker.matched":
        pass


async def read(player: Player, ws: Any, stop: asyncio.Event) -> None:
    """Record the state frames of one of the player's connections; follow `match.moving` (a
    second connection) and `match.moved` (a new connection instead of this one).  A connection
    another one replaced is read until it falls quiet, then closed."""
    led = False
    while not stop.is_set():
        led = led or ws is player.ws
        retired = led and ws is not player.ws
        try:
            raw = await asyncio.wait_for(ws.recv(), 0.2 if retired else 0.5)
        except TimeoutError:
            if not retired:
                continue
            await ws.close()
            return
        except websockets.ConnectionClosed:
            return
        frame = orjson.loads(raw)
        kind = frame["type"]
        if kind == "match.state":
            player.frames.append((time.perf_counter(), frame["payload"]["n"]))
            if ws is not player.ws:
                player.ws = ws  # the first frame of the connection opened ahead: it leads now
        elif kind in ("match.moving", "match.moved"):
            player.moved_at = player.moved_at or time.perf_counter()
            follow = asyncio.create_task(ahead(player, frame["payload"], stop))
            player.readers.append(follow)


async def ahead(player: Player, moving: dict[str, Any], stop: asyncio.Event) -> None:
    ws = await websockets.connect(moving["node_url"], max_queue=None)
    payload = {"token": player.token, "seat_token": moving["seat_token"]}
    await ws.send(send("session.connect", payload))
    await read(player, ws, stop)


async def drain(url: str) -> tuple[float, dict[str, Any]]:
    async with websockets.connect(url) as ws:
        await ws.send(send("admin.auth", {"token": ADMIN}))
        while orjson.loads(await ws.recv())["type"] != "admin.authed":
            pass
        started = time.perf_counter()
        await ws.send(send("admin.drain", {}))
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "admin.drained":
                return (time.perf_counter() - started) * 1000, frame["payload"]
            if frame["type"] == "error":
                raise RuntimeError(f"drain: {frame['payload']}")


# The players live in several processes, as players live on their own devices: one process
# reconnecting hundreds of players at once would stall its own reading and count that as a gap.
CLIENT_PROCESSES = 4

Seen = list[tuple[list[tuple[float, int]], float | None]]  # per player: frames, moved at


def clients(a_url: str, pairs: int, ready: Any, stop: Any, out: Any) -> None:
    """One client process: `pairs` matched pairs of players reading their frames until `stop`."""
    out.put(asyncio.run(play(a_url, pairs, ready, stop)))


async def play(a_url: str, pairs: int, ready: Any, stop: Any) -> Seen:
    players: list[Player] = []
    gate = asyncio.Semaphore(8)

    async def pair() -> list[Player]:
        async with gate:
            two = [await guest(a_url), await guest(a_url)]
            await asyncio.gather(*(matched(p) for p in two))
            return two

    for two in await asyncio.gather(*(pair() for _ in range(pairs))):
        players.extend(two)
    halt = asyncio.Event()
    for p in players:
        p.readers.append(asyncio.create_task(read(p, p.ws, halt)))
    ready.set()
    await asyncio.to_thread(stop.wait)
    halt.set()
    for p in players:
        while p.readers:
            with contextlib.suppress(Exception):
                await p.readers.pop()
        with contextlib.suppress(Exception):
            await p.ws.close()
    return [(p.frames, p.moved_at) for p in players]


async def measure(matches: int, hz: int, db: str) -> Row:
    os.environ["ASOBI_ADMIN_TOKEN"] = ADMIN
    spawn = multiprocessing.get_context("spawn")
    seen: Seen = []
    with tempfile.TemporaryDirectory(prefix="asobi-drain-bench-") as tmp:
        work = Path(tmp)
        redis, redis_url = start_redis(work)
        procs: list[Any] = []
        players: list[Any] = []
        try:
            game = GAME.replace("{hz}", str(hz))
            a, a_url = await start_node(work, redis_url, db, "drain-a", game=game)
            procs.append(a)
            b, _ = await start_node(work, redis_url, db, "drain-b", game=game)
            procs.append(b)
            await asyncio.sleep(1.5)  # each node has seen the other's heartbeat
            stop, out = spawn.Event(), spawn.Queue()
            shares = [matches // CLIENT_PROCESSES] * CLIENT_PROCESSES
            shares[0] += matches % CLIENT_PROCESSES
            for share in shares:
                ready = spawn.Event()
                player = spawn.Process(target=clients, args=(a_url, share, ready, stop, out))
                player.start()
                players.append((player, ready))
            for _, ready in players:
                if not await asyncio.to_thread(ready.wait, 300):
                    raise RuntimeError("the players did not get into their matches")
            await asyncio.sleep(1.5)
            drain_started = time.perf_counter()
            drain_client_ms, answer = await drain(a_url)
            await asyncio.sleep(2.0)
            stop.set()
            for _ in players:
                seen.extend(await asyncio.to_thread(out.get, True, 120))
        finally:
            for player, _ in players:
                player.join(10)
                if player.is_alive():
                    player.kill()
            for proc in procs:
                proc.terminate()
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            redis.terminate()
            redis.wait()
    period_ms = 1000.0 / hz
    gaps, skipped, repeated = [], 0, 0
    for frames, moved_at in seen:
        if moved_at is None or not frames:
            continue
        # The longest pause between two frames the player saw while the node drained.
        times = sorted(t for t, _ in frames if t >= drain_started)
        if len(times) > 1:
            gaps.append(max(y - x for x, y in itertools.pairwise(times)) * 1000)
        # Every tick once: the counters seen, whatever connection brought them.
        counters = sorted(n for _, n in frames)
        for x, y in itertools.pairwise(counters):
            skipped += max(0, y - x - 1)
            repeated += 1 if y == x else 0
    return Row(
        matches=matches,
        moved=int(answer.get("moved", 0)),
        drain_server_ms=float(answer.get("elapsed_ms", 0.0)),
        drain_client_ms=round(drain_client_ms, 1),
        gap_p50_ms=round(statistics.median(gaps), 1) if gaps else 0.0,
        gap_p99_ms=pct(gaps, 0.99) if gaps else 0.0,
        gap_max_ms=round(max(gaps), 1) if gaps else 0.0,
        tick_period_ms=period_ms,
        players_over_3_periods=sum(1 for g in gaps if g > 3 * period_ms),
        skipped=skipped,
        repeated=repeated,
    )


# (matches, tick rate): one node cannot tick 1,000 matches of two players at 20 Hz (40,000 frames a
# second) on its one core, so the large drain runs at 5 Hz; the target is in tick periods.
SIZES = ((100, 20), (1000, 5))


async def run(sizes: tuple[tuple[int, int], ...] = SIZES) -> list[dict[str, Any]]:
    db = database_url()
    if not db.startswith(("postgresql://", "postgres://")):
        raise RuntimeError("set ASOBI_DATABASE_URL (or ASOBI_TEST_DATABASE_URL) to PostgreSQL")
    return [asdict(await measure(n, hz, db)) for n, hz in sizes]


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| matches | tick (ms) | moved | drain, node / operator (ms) "
        "| frame gap p50 / p99 / max (ms) | players over 3 periods | ticks skipped / repeated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['matches']} | {r['tick_period_ms']:g} | {r['moved']} "
            f"| {r['drain_server_ms']} / {r['drain_client_ms']} "
            f"| {r['gap_p50_ms']} / {r['gap_p99_ms']} / {r['gap_max_ms']} "
            f"| {r['players_over_3_periods']} | {r['skipped']} / {r['repeated']} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(table(asyncio.run(run()))))
