"""`asobi serve --workers N` as a bench target, and players per machine against one process.

Part of `python -m bench --only cluster-cost` (see `bench/cluster_cost.py`).  The supervisor and
its workers are measured together (CPU and RSS summed over the process tree); each worker writes
its own tick lateness, and the worst worker's percentiles stand for the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import capacity, game, procs
from bench.cluster_cost import NodeTarget, PrivateRedis, fresh_schema, load_average
from bench.loadgen import AsobiPlayer, Tally, asobi_token, connect, gather_limited
from bench.targets import CONNECT_CONCURRENCY, AsobiTarget


class TreeProcess(procs.ServerProcess):
    """The supervisor of `--workers N` and its workers, measured together."""

    worker_pids: list[int]

    def pids(self) -> list[int]:
        return [self.pid, *self.worker_pids]

    def cpu(self) -> float:
        return sum(procs.cpu_seconds(p) for p in self.pids())

    def rss(self) -> int:
        return sum(procs.rss_bytes(p) for p in self.pids())

    def worker_cpu(self) -> list[float]:
        return [procs.cpu_seconds(p) for p in self.worker_pids]


def _supervisor_started(text: str) -> dict[str, Any] | None:
    for line in text.splitlines():
        if '"supervisor_started"' in line:
            return orjson.loads(line)
    return None


class WorkersTarget(AsobiTarget):
    """`asobi serve --workers N`: clients through the one port, each match on one worker."""

    def __init__(self, work: Path, env: dict[str, str], workers: int) -> None:
        super().__init__(work, None, Tally())
        self.env = env
        self.workers = workers
        self.name = f"workers-{workers}"
        self.node_ids: list[str] = []
        self.home: dict[int, str] = {}  # id(player) -> worker id

    def start(self) -> None:
        self.game_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        game.write_script(self.game_dir, "v0", False, self.players_per_match)
        stats = self.data_dir / "bench-stats.json"
        argv = [sys.executable, "-m", "asobi", "serve", "--host", "127.0.0.1", "--port", "0"]
        argv += ["--game-dir", str(self.game_dir), "--data-dir", str(self.data_dir)]
        argv += ["--reload", "off", "--workers", str(self.workers)]
        log_path = self.work / "asobi.log"

        def port_of(text: str) -> int | None:
            found = _supervisor_started(text)
            return int(found["port"]) if found else None

        server = procs.spawn(
            argv,
            log_path=log_path,
            env={
                "ASOBI_SECRET": self.secret,
                "ASOBI_BENCH_STATS": str(stats),
                "ASOBI_LOG_LEVEL": "info",
                "ASOBI_CONNECT_RATE_PER_IP": "100000",
                "ASOBI_CONNECT_BURST_PER_IP": "100000",
                "ASOBI_MAX_CONNECTIONS": "100000",
                "ASOBI_NODE_ID": "cb",
                **self.env,
            },
            port_of=port_of,
            timeout=90,
        )
        started = _supervisor_started(log_path.read_text(errors="replace"))
        assert started is not None
        tree = TreeProcess(server.proc, server.log_path, server.port, stats, server._log)
        tree.worker_pids = [int(p) for p in started["pids"]]
        self.node_ids = [str(n) for n in started["workers"]]
        self.server = tree

    async def stats(self) -> dict[str, Any]:
        """Each worker's lateness since the last call (they share the stats file, so one at a
        time); the worst worker's percentiles stand for the machine."""
        assert isinstance(self.server, TreeProcess)
        path = self.server.stats_path
        assert path is not None
        each = []
        for pid in self.server.worker_pids:
            before = path.read_bytes() if path.exists() else b""
            os.kill(pid, signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while True:
                await asyncio.sleep(0.01)
                with contextlib.suppress(OSError, ValueError):
                    raw = path.read_bytes()
                    if raw != before:
                        each.append(orjson.loads(raw))
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {pid} did not write its stats")
        return {
            "samples": sum(s["samples"] for s in each),
            **{
                k: max(s[k] for s in each)
                for k in ("lateness_p50_ms", "lateness_p99_ms", "lateness_max_ms")
            },
            "workers": each,
        }

    async def connect_idle(self, matches: int) -> list[AsobiPlayer]:
        """Match i's four clients go to worker i mod N (`?node=` through the one port)."""
        assert self.server is not None
        base, first_match = len(self.players), len(self.players) // self.players_per_match
        new: list[AsobiPlayer] = []
        jobs = []
        for i in range(matches * self.players_per_match):
            player = AsobiPlayer(self.tally, asobi_token(self.secret, f"bench-{base + i}"))
            node = self.node_ids[(first_match + i // self.players_per_match) % self.workers]
            self.home[id(player)] = node
            url = f"ws://127.0.0.1:{self.server.port}/ws?node={node}"

            async def one(p: AsobiPlayer = player, u: str = url) -> None:
                await connect(u, p)
                await asyncio.wait_for(p.ready, 30)

            new.append(player)
            jobs.append(one)
        await gather_limited(jobs, CONNECT_CONCURRENCY)
        self.players.extend(new)
        return new

    async def start_matches(self, players: list[AsobiPlayer]) -> None:
        """Queue one worker's clients at a time: the cluster's one queue then only ever holds
        tickets of one worker, so every group forms and plays where its players are."""
        for node in self.node_ids:
            batch = [p for p in players if self.home[id(p)] == node]
            for player in batch:
                player.queue(game.MODE)
            await asyncio.wait_for(asyncio.gather(*(p.first_state for p in batch)), 60)
        self.matches += len(players) // self.players_per_match
        self.tally.clients = len(self.players)


async def workers_capacity(
    work: Path,
    cores: Any,
    db: str,
    steps: list[int],
    window: float,
    settle: float,
    budget_s: float,
) -> dict[str, Any]:
    """Largest M held by one process (pinned) and by `--workers 2` (unpinned)."""
    server_core, loadgen_core = cores
    out: dict[str, Any] = {}
    async with fresh_schema(db) as url:
        single = NodeTarget(work / "workers-1", server_core, {"ASOBI_DATABASE_URL": url}, "w1")
        try:
            single.start()
            load = load_average()
            result = await capacity.run(single, steps, window, settle, budget_s)
            out["workers-1"] = {**result.as_dict(), "load_avg_start": load, "placement": _PINNED}
        finally:
            single.stop()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))  # the load generator: any core
    redis = PrivateRedis(work / "redis-workers", None)
    try:
        async with fresh_schema(db) as url:
            two = WorkersTarget(
                work / "workers-2", {"ASOBI_DATABASE_URL": url, "ASOBI_REDIS_URL": redis.url}, 2
            )
            try:
                two.start()
                out["workers-2"] = await _measure_workers(two, steps, window, settle, budget_s)
            finally:
                two.stop()
    finally:
        redis.stop()
        if loadgen_core:
            os.sched_setaffinity(0, loadgen_core)
    return out


async def _measure_workers(
    two: WorkersTarget, steps: list[int], window: float, settle: float, budget_s: float
) -> dict[str, Any]:
    assert isinstance(two.server, TreeProcess)
    load = load_average()
    cpu0, t0 = two.server.worker_cpu(), time.monotonic()
    result = await capacity.run(two, steps, window, settle, budget_s)
    elapsed = time.monotonic() - t0
    busy = [b - a for a, b in zip(cpu0, two.server.worker_cpu(), strict=False)]
    return {
        **result.as_dict(),
        "load_avg_start": load,
        "placement": _UNPINNED,
        "worker_cpu_pct": [round(100 * b / elapsed, 1) for b in busy],
    }


_PINNED = "server pinned to core 0, load generator to core 1"
_UNPINNED = (
    "nothing pinned: 2 workers, the supervisor, redis-server and the load generator on both "
    "cores as the kernel places them"
)
