"""What clustering costs: CPU per frame with and without Redis, `--workers 2` against one
process, and Redis's own cost per operation the cluster sends.

`python -m bench --only cluster-cost` (or `python -m bench.cluster_cost`).  Needs `redis-server`
and PostgreSQL (ASOBI_BENCH_DATABASE_URL or ASOBI_TEST_DATABASE_URL): a cluster refuses SQLite,
and the node without Redis runs on the same database so that Redis is the only difference.

- **Frame cost**: the same fixed load (M matches x 4, `bench/game.py`) on one node without
  Redis and on one cluster node (a private `redis-server` on a Unix socket).  Per window: server
  CPU per delivered frame, tick lateness, and the Redis server's CPU and commands meanwhile.  The
  server is pinned to the first core; the load generator and Redis to the second.
- **Workers**: capacity (largest M at p99 tick lateness <= 10 ms, no frame dropped) of one
  process against `asobi serve --workers 2`.  One process: pinned to the first core, the load
  generator on the second (as the rest of the bench).  Two workers: nothing is pinned, the
  workers, the supervisor, Redis and the load generator share both cores as the kernel places
  them.  Each match's four clients connect to one worker (`?node=` through the one port) and
  queue together, so no player is redirected and matches form where their players are.
- **Redis operations**: the commands of heartbeats, the match listing and the bus, on a fresh
  `redis-server`, at 10 to 1,000 nodes' worth of keys: Redis CPU per command (from /proc) and
  the execution time it reports (`INFO commandstats`).  The matchmaker's script is measured in
  the frame-cost run, where 4 x M players queue through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench import capacity, cluster_model, game, procs
from bench.loadgen import Tally
from bench.targets import AsobiTarget


def database_url() -> str:
    return os.environ.get("ASOBI_BENCH_DATABASE_URL") or os.environ.get(
        "ASOBI_TEST_DATABASE_URL", ""
    )


@contextlib.asynccontextmanager
async def fresh_schema(db: str) -> Any:
    """The database URL with a schema of its own, dropped afterwards: a server restores the
    matches its journal holds, so a run must never start from another run's tables."""
    import asyncpg

    schema = "bench_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(db)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in db else "?"
        yield f"{db}{sep}search_path={schema}"
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


class PrivateRedis:
    """A `redis-server` of the bench's own on a Unix socket, read from outside: its process CPU
    from /proc and its counters from INFO."""

    def __init__(self, work: Path, core: set[int] | None) -> None:
        import redis  # the `cluster` extra

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "redis.sock"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.path),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, core)) if core else None,
        )
        deadline = time.monotonic() + 10
        while not self.path.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        self.url = f"unix://{self.path}"
        self.client = redis.Redis(unix_socket_path=str(self.path))

    def sample(self) -> dict[str, Any]:
        stats = self.client.info("stats")
        commands = {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in self.client.info("commandstats").items()
        }
        return {
            "t": time.monotonic(),
            "cpu": procs.cpu_seconds(self.proc.pid),
            "commands": commands,
            "in": int(stats["total_net_input_bytes"]),
            "out": int(stats["total_net_output_bytes"]),
        }

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


def redis_delta(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> dict:
    """What Redis did between two samples: CPU, bytes, and per command calls and usec.  INFO's
    own calls (the sampling) are left out."""
    elapsed = b["t"] - a["t"]
    per: dict[str, dict[str, float]] = {}
    for name, (calls, usec) in b["commands"].items():
        if name in ("info", *skip):
            continue
        c0, u0 = a["commands"].get(name, (0, 0))
        if calls > c0:
            per[name] = {
                "calls": calls - c0,
                "per_s": round((calls - c0) / elapsed, 1),
                "usec_per_call": round((usec - u0) / (calls - c0), 2),
            }
    calls = sum(v["calls"] for v in per.values())
    cpu = b["cpu"] - a["cpu"]
    return {
        "elapsed_s": round(elapsed, 2),
        "cpu_s": round(cpu, 4),
        "cpu_pct": round(100 * cpu / elapsed, 2),
        "commands": int(calls),
        "commands_per_s": round(calls / elapsed, 1),
        "cpu_us_per_command": round(cpu / calls * 1e6, 2) if calls else None,
        "bytes_in_per_s": round((b["in"] - a["in"]) / elapsed),
        "bytes_out_per_s": round((b["out"] - a["out"]) / elapsed),
        "per_command": per,
    }


class NodeTarget(AsobiTarget):
    """`asobi serve` with extra settings: a cluster node's, or PostgreSQL alone."""

    def __init__(self, work: Path, core: set[int] | None, env: dict[str, str], name: str) -> None:
        super().__init__(work, core, Tally())
        self.env = env
        self.name = name

    def start(self) -> None:
        self.game_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        game.write_script(self.game_dir, "v0", False, self.players_per_match)
        self.server = procs.spawn_asobi(
            self.game_dir,
            self.data_dir,
            self.secret,
            reload="off",
            core=self.core,
            log_path=self.work / "asobi.log",
            env=self.env,
        )


async def frame_cost(
    work: Path,
    cores: Any,
    db: str,
    steps: tuple[int, ...],
    window: float,
    settle: float,
    windows: int,
    variants: tuple[str, ...] = ("single", "cluster"),
) -> dict[str, Any]:
    """The same load on a node without Redis and on a cluster node; rows per window."""
    server_core, other_core = cores
    redis = PrivateRedis(work / "redis-cost", other_core)
    rows: list[dict[str, Any]] = []
    matchmaking: dict[str, Any] = {}
    listing_bytes = listing_matches = 0
    failures: list[str] = []
    try:
        for variant in variants:
            async with fresh_schema(db) as url:
                env = {"ASOBI_DATABASE_URL": url}
                if variant == "cluster":
                    env |= {
                        "ASOBI_REDIS_URL": redis.url,
                        "ASOBI_NODE_ID": f"cost-{uuid.uuid4().hex[:6]}",
                    }
                target = NodeTarget(work / f"cost-{variant}", server_core, env, variant)
                target.start()
                try:
                    for m in steps:
                        before = redis.sample()
                        try:
                            idle = await target.connect_idle(m - target.matches)
                            connected = redis.sample()
                            await target.start_matches(idle)
                        except (TimeoutError, RuntimeError, OSError) as exc:
                            failures.append(f"{variant}: could not start {m} matches: {exc!r}")
                            print(f"  cost {variant} M={m} FAILED {exc!r}", flush=True)
                            break
                        if variant == "cluster":
                            matchmaking[str(m)] = {
                                "players": len(idle),
                                "matches": len(idle) // game.MATCH_SIZE,
                                "connect": redis_delta(before, connected),
                                "queue_to_playing": redis_delta(connected, redis.sample()),
                            }
                        await asyncio.sleep(settle)
                        for i in range(windows):
                            load = load_average()
                            r0 = redis.sample()
                            figures = await capacity.measure(target, window)
                            r1 = redis.sample()
                            row = {
                                "variant": variant,
                                "matches": m,
                                "window": i + 1,
                                "load_avg": load,
                                **{k: figures[k] for k in _FIGURES},
                                "redis": redis_delta(r0, r1),
                            }
                            rows.append(row)
                            print(
                                f"  cost {variant:7} M={m:4} "
                                f"us/frame={row['cpu_us_per_frame']:5.1f} "
                                f"p99={row['lateness_p99_ms']:5.1f}ms redis cmd/s="
                                f"{row['redis']['commands_per_s']:6.1f} load={load} "
                                f"foreign={row['foreign_cpu_pct']:.0f}%",
                                flush=True,
                            )
                    if variant == "cluster":
                        node_id = env["ASOBI_NODE_ID"]
                        raw = redis.client.get(f"asobi:matches:{node_id}") or b""
                        listing_bytes, listing_matches = len(raw), target.matches
                finally:
                    target.stop()
    finally:
        redis.stop()
    return {
        "rows": rows,
        "matchmaking": matchmaking,
        "listing_bytes": listing_bytes,
        "listing_matches": listing_matches,
        "failures": failures,
    }


_FIGURES = (
    "frames_per_s",
    "expected_per_s",
    "server_cpu_pct",
    "cpu_us_per_frame",
    "lateness_p50_ms",
    "lateness_p99_ms",
    "lateness_max_ms",
    "dropped",
    "loadgen_cpu_pct",
    "foreign_cpu_pct",
)


def _node_record(i: int) -> bytes:
    """A heartbeat record shaped as `NodeInfo` writes it."""
    return orjson.dumps(
        {
            "node_id": f"node-{i:04d}-1234",
            "public_url": f"wss://n{i:04d}.play.example.com/ws",
            "started_at": time.time(),
            "seen_at": time.time(),
            "matches": 400,
            "players": 1600,
            "lateness_p99_ms": 2.125,
            "cpu": 0.612,
            "version": "",
        }
    )


def _timed(redis: PrivateRedis, work: Any, rounds: int) -> dict[str, Any]:
    before = redis.sample()
    for _ in range(rounds):
        work()
    delta = redis_delta(before, redis.sample())
    return {"rounds": rounds, "cpu_us_per_round": round(delta["cpu_s"] / rounds * 1e6, 1), **delta}


def redis_ops(work: Path, core: set[int] | None, listing_bytes: int, rounds: int) -> dict:
    """Redis's cost of each operation the cluster sends, at several cluster sizes."""
    redis = PrivateRedis(work / "redis-ops", core)
    r = redis.client
    out: dict[str, Any] = {"listing_bytes": listing_bytes, "heartbeat": [], "listing": []}
    try:
        for nodes in (10, 100, 1000):
            r.flushall()
            ids = [f"node-{i:04d}-1234" for i in range(nodes)]
            for i, node in enumerate(ids):
                r.set(f"asobi:node:{node}", _node_record(i), px=60_000)
                r.zadd("asobi:nodes", {node: time.time()})
            keys = [f"asobi:node:{n}" for n in ids]

            def beat(record: bytes = _node_record(0), keys: list[str] = keys) -> None:
                pipe = r.pipeline(transaction=False)
                pipe.set("asobi:node:node-0000-1234", record, px=60_000, get=True)
                pipe.zadd("asobi:nodes", {"node-0000-1234": time.time()})
                pipe.zrange("asobi:nodes", 0, -1)
                pipe.execute()
                r.mget(keys)

            out["heartbeat"].append({"nodes": nodes, **_timed(redis, beat, rounds)})
        value = b"x" * max(listing_bytes, 1)
        for nodes in (10, 100):
            r.flushall()
            keys = [f"asobi:matches:node-{i:04d}" for i in range(nodes)]
            for k in keys:
                r.set(k, value, px=60_000)

            def exchange(keys: list[str] = keys) -> None:
                pipe = r.pipeline(transaction=False)
                pipe.set(keys[0], value, px=60_000)
                pipe.mget(keys[1:])
                pipe.execute()

            out["listing"].append(
                {"nodes": nodes, **_timed(redis, exchange, max(rounds // nodes, 20))}
            )
        r.flushall()
        subscriber = r.pubsub()
        subscriber.subscribe("asobi:bus:node:x")
        message = orjson.dumps({"kind": "mm.matched", "sender": "node-0001", "payload": "y" * 300})
        pipe_rounds = max(rounds // 10, 1)

        def publish() -> None:
            pipe = r.pipeline(transaction=False)
            for _ in range(10):
                pipe.publish("asobi:bus:node:x", message)
            pipe.execute()
            while subscriber.get_message(timeout=0) is not None:
                pass

        out["publish"] = {"bytes": len(message), **_timed(redis, publish, pipe_rounds)}
        subscriber.close()
    finally:
        redis.stop()
    return out


async def run(smoke: bool = False, work: Path | None = None) -> dict[str, Any]:
    db = database_url()
    if not db.startswith(("postgresql://", "postgres://")):
        return {
            "error": "skipped: set ASOBI_BENCH_DATABASE_URL (or ASOBI_TEST_DATABASE_URL) to a "
            "PostgreSQL database (a cluster refuses SQLite)"
        }
    if shutil.which("redis-server") is None:
        return {"error": "skipped: redis-server is not installed (apt install redis-server)"}
    cores = procs.cores()
    if cores[1]:
        os.sched_setaffinity(0, cores[1])  # the load generator: the second core (as `bench`)
    out: dict[str, Any] = {"load_avg_start": load_average()}
    with tempfile.TemporaryDirectory(prefix="asobi-cluster-cost-") as tmp:
        work = work / "cluster-cost" if work is not None else Path(tmp)
        steps = (10,) if smoke else (100, 200)
        out["frame_cost"] = await frame_cost(
            work, cores, db, steps, 1.0 if smoke else 6.0, 0.5 if smoke else 2.0, 1 if smoke else 2
        )
        listing = out["frame_cost"]["listing_bytes"]
        out["redis_ops"] = await asyncio.to_thread(
            redis_ops, work, cores[1], listing, 50 if smoke else 2000
        )
        capacity_steps = [10] if smoke else [50, 100, 150, 200, 250, 300, 400, 500, 600, 800]
        from bench.cluster_workers import workers_capacity  # it builds on this module

        out["workers"] = await workers_capacity(
            work,
            cores,
            db,
            capacity_steps,
            1.0 if smoke else 5.0,
            0.5 if smoke else 2.0,
            10.0 if smoke else 240.0,
        )
    out["load_avg_end"] = load_average()
    return out


if __name__ == "__main__":
    result = asyncio.run(run(smoke="--smoke" in sys.argv))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


def _usec(row: dict[str, Any], command: str) -> str:
    found = row["per_command"].get(command)
    return f"{found['usec_per_call']:.1f}" if found else "-"


def tables(cost: dict[str, Any]) -> list[str]:
    """The readable part of a run (the JSON keeps every window and command)."""
    if "error" in cost:
        return [cost["error"]]
    lines = [
        f"Load average (1 min) {cost['load_avg_start']} at the start, {cost['load_avg_end']} at "
        "the end.  Server pinned to core 0; load generator and Redis to core 1.",
        "",
        "| node | M x 4 | window | load avg | frames/s | server CPU | CPU us/frame "
        "| lateness p50 / p99 / max ms | Redis cmd/s | Redis CPU | Redis B/s in / out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in cost["frame_cost"]["rows"]:
        red = r["redis"]
        lines.append(
            f"| {r['variant']} | {r['matches']} | {r['window']} | {r['load_avg']} "
            f"| {r['frames_per_s']:,.0f} | {r['server_cpu_pct']:.0f}% "
            f"| {r['cpu_us_per_frame']:.1f} "
            f"| {r['lateness_p50_ms']:.1f} / {r['lateness_p99_ms']:.1f} / "
            f"{r['lateness_max_ms']:.1f} | {red['commands_per_s']:.1f} | {red['cpu_pct']:.1f}% "
            f"| {red['bytes_in_per_s']:,} / {red['bytes_out_per_s']:,} |"
        )
    lines += [f"\n{f}" for f in cost["frame_cost"].get("failures", [])]
    mm = cost["frame_cost"]["matchmaking"]
    if mm:
        lines += [
            "",
            "Redis work to connect players and form their matches (cluster node, all on one node):",
            "",
            "| players | matches | Redis CPU us / player connect | scripts / match "
            "| script usec / call | Redis CPU us / match formed | Redis commands / match "
            "| Redis B in+out / match |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for step in mm.values():
            con, q, n = step["connect"], step["queue_to_playing"], step["matches"]
            script = q["per_command"].get("evalsha", {"calls": 0, "usec_per_call": 0})
            moved = q["bytes_in_per_s"] + q["bytes_out_per_s"]
            lines.append(
                f"| {step['players']} | {n} | {con['cpu_s'] / step['players'] * 1e6:.0f} "
                f"| {script['calls'] / n:.1f} | {script['usec_per_call']:.0f} "
                f"| {q['cpu_s'] / n * 1e6:.0f} | {q['commands'] / n:.0f} "
                f"| {moved * q['elapsed_s'] / n:,.0f} |"
            )
    ops = cost["redis_ops"]
    lines += [
        "",
        f"Redis per operation (fresh server; a listing value of {ops['listing_bytes']:,} bytes, "
        f"one node's {cost['frame_cost']['listing_matches']} matches as measured above):",
        "",
        "| operation | nodes | Redis CPU us / op | SET | ZADD | ZRANGE | MGET (usec / call) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ops["heartbeat"]:
        lines.append(
            f"| heartbeat (SET, ZADD, ZRANGE, MGET of all) | {row['nodes']} "
            f"| {row['cpu_us_per_round']:.1f} | {_usec(row, 'set')} | {_usec(row, 'zadd')} "
            f"| {_usec(row, 'zrange')} | {_usec(row, 'mget')} |"
        )
    for row in ops["listing"]:
        lines.append(
            f"| listing (SET own, MGET the others) | {row['nodes']} "
            f"| {row['cpu_us_per_round']:.1f} | {_usec(row, 'set')} | - | - "
            f"| {_usec(row, 'mget')} |"
        )
    pub = ops["publish"]
    lines.append(
        f"| PUBLISH of {pub['bytes']} bytes to 1 subscriber | - "
        f"| {pub['cpu_us_per_round'] / 10:.1f} | - | - | - | {_usec(pub, 'publish')} (PUBLISH) |"
    )
    lines += [
        "",
        "Players per machine (largest M x 4 at p99 tick lateness <= 10 ms, no frame dropped):",
        "",
        "| server | placement | largest M | players | load avg at start | at that step: "
        "server CPU, p99 ms, load generator CPU |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, res in cost["workers"].items():
        held = [s for s in res["steps"] if s["ok"]]
        last = held[-1] if held else None
        at = (
            f"{last['server_cpu_pct']:.0f}%, {last['lateness_p99_ms']:.1f}, "
            f"{last['loadgen_cpu_pct']:.0f}%"
            if last
            else "-"
        )
        lines.append(
            f"| {name} | {res['placement']} | {res['largest_ok']} | {res['largest_ok'] * 4:,} "
            f"| {res['load_avg_start']} | {at} |"
        )
    lines += ["", "Capacity model (`bench/cluster_model.py`):", ""]
    lines += cluster_model.table(cluster_model.model(cost))
    return lines
