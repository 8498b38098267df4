"""`python -m bench [--smoke] [--only PART,...]`: the suite on loopback.

Parts: asobi, shared, reload, patch, snapshot, colyseus, field (the default run), cluster,
cluster-cost and drain (only when `--only` names them: matchmaking latency on 1 and 3 nodes over
Redis; CPU per frame with and without Redis, `--workers 2` against one process, Redis's cost per
operation; 100 and 1,000 matches moved off a node; all need `redis-server` and PostgreSQL).  The
server under test runs pinned to one core and this process (the load generator) to the other.
Prints a markdown report and writes the figures as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import (
    capacity,
    match_memory,
    patch_bytes,
    procs,
    profile,
    reload_bench,
    report,
    snapshot_cost,
    switch_cost,
)
from bench.loadgen import Tally
from bench.targets import AsobiTarget, ColyseusTarget

RESULTS = Path(__file__).parent / "results"
CHECKOUT = Path(__file__).parent.parent
PARTS = ("asobi", "shared", "reload", "patch", "snapshot", "colyseus", "field")
ON_REQUEST = ("cluster", "cluster-cost", "drain")  # run only when `--only` names them


@dataclass(frozen=True)
class Server:
    """How asobi's servers are started: `python`, another interpreter than this one (it imports
    this checkout's `asobi`, which it does not have installed)."""

    python: str | None = None

    def target(self, work: Path, core: set[int] | None, **options: Any) -> AsobiTarget:
        source = CHECKOUT if self.python else None
        return AsobiTarget(work, core, Tally(), python=self.python, source=source, **options)


@dataclass(frozen=True)
class Plan:
    steps: tuple[int, ...]
    window_s: float
    settle_s: float
    capacity_budget_s: float
    # (matches, shared_state, players per match) per row; rows with the same script shape share
    # a server, in order
    reload_runs: tuple[tuple[int, bool, int], ...]
    reload_saves: int
    switch_matches: int
    profile_s: float
    # matches, ticks per round, rounds for `bench.patch_bytes`
    patch_run: tuple[int, int, int]
    # matches per state shape for `bench.snapshot_cost`
    snapshot_matches: int
    # capacity steps of the field game (16 players per match), asobi and Colyseus
    field_steps: tuple[int, ...]
    # matches, ticks of the in-process steady-state memory measure (`bench/match_memory.py`)
    memory_run: tuple[int, int]


FULL = Plan(
    steps=(50, 100, 200, 250, 300, 350, 400, 500, 750, 1000, 1250, 1500, 2000, 2500, 3000),
    window_s=6.0,
    settle_s=2.0,
    capacity_budget_s=200.0,
    # 400 per-player matches of 4 is what one core carries (see capacity); 1,000 one-player
    # matches (the tutorial's shape) leave headroom; 1,000 shared_state matches of 4 is at the
    # limit of one core, where ticks are late before any reload.
    reload_runs=((200, False, 4), (400, False, 4), (1000, False, 1), (1000, True, 4)),
    reload_saves=20,
    switch_matches=300,
    profile_s=8.0,
    patch_run=(50, 100, 7),
    snapshot_matches=300,
    field_steps=(5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100),
    memory_run=(400, 60),
)
SMOKE = Plan(
    steps=(10,),
    window_s=1.0,
    settle_s=0.3,
    capacity_budget_s=5.0,
    reload_runs=((5, False, 4),),
    reload_saves=3,
    switch_matches=20,
    profile_s=0.0,
    patch_run=(2, 10, 1),
    snapshot_matches=20,
    field_steps=(1,),
    memory_run=(20, 5),
)


async def run_asobi(
    plan: Plan, work: Path, cores: Any, out: dict[str, Any], server: Server, shared: bool = False
) -> None:
    server_core, _ = cores
    key = "asobi-shared" if shared else "asobi"
    target = server.target(work / key, server_core, shared=shared)
    target.start()
    try:
        result = await capacity.run(
            target, list(plan.steps), plan.window_s, plan.settle_s, plan.capacity_budget_s
        )
        out[key] = result.as_dict()
        if plan.profile_s and target.server is not None and not shared:
            print(f"  profiling the server at {target.matches} matches ...", flush=True)
            out["profile"] = {
                "matches": target.matches,
                **profile.record(target.server.pid, plan.profile_s, work / "profile"),
            }
    finally:
        target.stop()


async def run_reload(
    plan: Plan, work: Path, cores: Any, out: dict[str, Any], server: Server
) -> None:
    server_core, _ = cores
    out["switch_cost"] = [
        switch_cost.measure(shared, matches=plan.switch_matches).as_dict()
        for shared in (False, True)
    ]
    runs: list[dict[str, Any]] = []
    out["reload"] = runs
    shapes = dict.fromkeys((shared, players) for _, shared, players in plan.reload_runs)
    for shared, players in shapes:
        rows = [m for m, s, p in plan.reload_runs if (s, p) == (shared, players)]
        name = f"reload-{'shared' if shared else 'per-player'}-{players}"
        target = server.target(
            work / name, server_core, reload="watch", shared=shared, players=players
        )
        target.start()
        try:
            for matches in rows:
                result = await reload_bench.run(target, matches, plan.reload_saves, plan.settle_s)
                runs.append(result.as_dict())
        finally:
            target.stop()


async def run_colyseus(
    plan: Plan, work: Path, cores: Any, out: dict[str, Any], smoke: bool
) -> None:
    if not ColyseusTarget.installed():
        if smoke:
            out["colyseus"] = {"error": "not installed (the full run installs it with npm)"}
            return
        print("  installing Colyseus from npm ...", flush=True)
        why = ColyseusTarget.install()
        if why is not None:
            out["colyseus"] = {"error": why}
            return
    server_core, _ = cores
    target = ColyseusTarget(work / "colyseus", server_core, Tally())
    target.work.mkdir(parents=True, exist_ok=True)
    try:
        target.start()
        result = await capacity.run(
            target, list(plan.steps), plan.window_s, plan.settle_s, plan.capacity_budget_s
        )
        out["colyseus"] = result.as_dict()
    except (RuntimeError, OSError) as exc:
        out["colyseus"] = {"error": f"{exc}"}
    finally:
        target.stop()


async def run_field(
    plan: Plan, work: Path, cores: Any, out: dict[str, Any], server: Server, smoke: bool
) -> None:
    """The field game (`bench/field_game.py`) on asobi, then as the same Colyseus room."""
    server_core, _ = cores
    targets: list[AsobiTarget | ColyseusTarget] = [
        server.target(work / "asobi-field", server_core, field=True)
    ]
    if ColyseusTarget.installed():
        targets.append(ColyseusTarget(work / "colyseus-field", server_core, Tally(), field=True))
    elif not smoke:
        out["colyseus-field"] = {"error": "Colyseus is not installed (run the colyseus part)"}
    for target in targets:
        target.work.mkdir(parents=True, exist_ok=True)
        try:
            target.start()
            result = await capacity.run(
                target,
                list(plan.field_steps),
                plan.window_s,
                plan.settle_s,
                plan.capacity_budget_s,
            )
            out[target.name] = result.as_dict()
        except (RuntimeError, OSError) as exc:
            out[target.name] = {"error": f"{exc}"}
        finally:
            target.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    plan = SMOKE if args.smoke else FULL
    server = Server(args.server_python)
    if server.python:
        procs.build_extensions(CHECKOUT, server.python)
    cores = procs.cores()
    if cores[1]:
        os.sched_setaffinity(0, cores[1])
    out: dict[str, Any] = {
        "smoke": args.smoke,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "pinned": cores[0] is not None,
            "python": platform.python_version(),
            "server_python": procs.interpreter(server.python),
            "platform": platform.platform(),
        },
        "plan": plan.__dict__,
    }
    parts = args.only.split(",") if args.only else list(PARTS)
    with tempfile.TemporaryDirectory(prefix="asobi-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "asobi" in parts:
            await run_asobi(plan, work, cores, out, server)
            out["match_memory"] = await asyncio.to_thread(match_memory.run, *plan.memory_run)
        if "shared" in parts and not (args.smoke and not args.only):
            await run_asobi(plan, work, cores, out, server, shared=True)
        if "reload" in parts:
            await run_reload(plan, work, cores, out, server)
        if "patch" in parts:
            out["patch_bytes"] = [
                {"full": asdict(full), "patch": asdict(patch), "compact": asdict(compact)}
                for full, patch, compact in patch_bytes.run(*plan.patch_run)
            ]
            out["colyseus_bytes"] = patch_bytes.colyseus_bytes(
                plan.patch_run[1] * plan.patch_run[2]
            )
        if "snapshot" in parts:
            # In a thread: it runs an event loop of its own for the journal's writer.
            costs = await asyncio.to_thread(snapshot_cost.run, plan.snapshot_matches)
            out["snapshot_cost"] = [c.as_dict() for c in costs]
        if "colyseus" in parts:
            await run_colyseus(plan, work, cores, out, args.smoke)
        if "field" in parts:
            await run_field(plan, work, cores, out, server, args.smoke)
        if "cluster" in parts:
            from bench import cluster_matchmaking  # needs redis-server and PostgreSQL

            pairs = 30 if args.smoke else 300
            out["cluster_matchmaking"] = await cluster_matchmaking.run(pairs=pairs)
        if "cluster-cost" in parts:
            from bench import cluster_cost  # needs redis-server and PostgreSQL

            out["cluster_cost"] = await cluster_cost.run(smoke=args.smoke, work=work)
        if "drain" in parts:
            from bench import drain_bench  # needs redis-server and PostgreSQL

            out["drain"] = await drain_bench.run(((10, 20),) if args.smoke else drain_bench.SIZES)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny run (< 10 s) for CI")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(PARTS + ON_REQUEST)}")
    parser.add_argument("--work", help="keep game dirs and server logs here (default: a temp dir)")
    parser.add_argument(
        "--server-python",
        metavar="EXE",
        help="run asobi's servers on this interpreter (a venv's python with asobi's dependencies;"
        " its C parts are built for it); the in-process parts stay on this one",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = asyncio.run(main_async(args))
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{stamp}{'-smoke' if args.smoke else ''}.json"
    path.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(report.markdown(out))
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0 if report.healthy(out) else 1


if __name__ == "__main__":
    sys.exit(main())
