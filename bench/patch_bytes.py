"""`python -m bench.patch_bytes`: bytes per player per second and CPU per frame, full frames vs
`match.patch` frames, in-process on the engine (no sockets: what goes on the wire is counted at
the outbox, plus the WebSocket frame header).

Workloads:
- `bench` / `bench shared`: `bench/game.py`, 20 fields of which ~13 change every tick;
- `arena`: `game/arena.lua` (two players, 7x7 grid, gems), each player moving every other tick on
  average (the target and the clock are raised so a round runs the whole measurement; the
  seconds left then have more digits than in a real round);
- `entities`: 50 entities keyed by id, 5 of them moving per tick, and a tick counter: the shape
  patches are for (a state keyed by id).

CPU is process time per delivered state frame, median of rounds, for the whole match tick
(Lua callbacks, conversion, diff, encoding, outbox); `patch cost` is the difference, which on a
busy machine is noisy.  `diff us` is the time of `merge_patch.diff` alone per patch computed (with
`shared_state`, one patch serves every player of a match), measured around the function.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from asobi import merge_patch
from asobi.engine import Engine
from asobi.match import Match
from asobi.scripts import ScriptRegistry
from bench import field_game, game

GAME_DIR = Path(__file__).resolve().parent.parent / "game"

ENTITIES = """\
match_size = 4
tick_rate = 10
shared_state = true
function init(state)
  state.tick = 0
  state.entities = {}
  for i = 1, 50 do
    state.entities["e" .. i] = { x = i, y = 2 * i, hp = 100, kind = "orc", name = "entity " .. i }
  end
  return state
end
function tick(state)
  state.tick = state.tick + 1
  for _ = 1, 5 do
    local e = state.entities["e" .. game.random(1, 50)]
    e.x = e.x + game.random(-1, 1)
    e.y = e.y + game.random(-1, 1)
  end
  return state
end
function get_state(state, player_id)
  return { tick = state.tick, entities = state.entities }
end
"""


class Counter:
    """An outbox that counts the bytes of state frames per player (frame + WebSocket header)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.frames = 0
        self.patches = 0

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        if frame.startswith((b'{"type":"match.state"', b'{"type":"match.patch"')):
            n = len(frame)
            self.bytes += n + (2 if n < 126 else 4 if n < 65536 else 10)
            self.frames += 1
            self.patches += frame.startswith(b'{"type":"match.patch"')
        return True


@dataclass
class Workload:
    name: str
    files: Callable[[Path], None]
    mode: str
    players: int
    # Queues the inputs of one tick for a match (`match.queue_input`).
    inputs: Callable[[Match, random.Random], None] | None = None


@dataclass
class Row:
    workload: str
    sync: str
    bytes_per_player_s: float
    frame_bytes: float
    patch_share: float
    cpu_us_per_frame: float
    diff_us: float = 0.0


class DiffTimer:
    """Times every `merge_patch.diff` call made from `asobi.state_frames` while installed."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._diff = merge_patch.diff

    def __enter__(self) -> DiffTimer:
        original, clock = self._diff, time.process_time

        def timed(old: Any, new: Any) -> Any:
            started = clock()
            try:
                return original(old, new)
            finally:
                self.seconds += clock() - started
                self.calls += 1

        merge_patch.diff = timed
        return self

    def __exit__(self, *exc: object) -> None:
        merge_patch.diff = self._diff


def _bench_files(shared: bool) -> Callable[[Path], None]:
    return lambda d: game.write_script(d, "v0", shared)


def _arena_files(d: Path) -> None:
    shutil.copytree(GAME_DIR / "lib", d / "lib")
    source = (GAME_DIR / "arena.lua").read_text()
    for short, long in (
        ("TARGET = 3", "TARGET = 1e9"),
        ("ROUND_SECONDS = 60", "ROUND_SECONDS = 1e6"),
    ):
        assert short in source, short
        source = source.replace(short, long)
    (d / "match.lua").write_text(source)


def _entities_files(d: Path) -> None:
    (d / "match.lua").write_text(ENTITIES)


def _field_files(d: Path) -> None:
    field_game.write_script(d)


def _field_inputs(match: Match, rng: random.Random) -> None:
    """Two inputs per player per tick (20 per second), on the schedule `states.js` uses."""
    tick = match.tick_no + 1
    for j, pid in enumerate(match.players, 1):
        payload = {"dir": field_game.input_dir(j, tick)}
        match.queue_input(pid, payload)
        match.queue_input(pid, payload)


def _arena_moves(match: Match, rng: random.Random) -> None:
    for pid in match.players:
        if rng.random() < 0.5:
            match.queue_input(pid, {"move": rng.choice(["up", "down", "left", "right"])})


WORKLOADS = [
    Workload("bench", _bench_files(False), game.MODE, game.MATCH_SIZE),
    Workload("bench shared", _bench_files(True), game.MODE, game.MATCH_SIZE),
    Workload("arena", _arena_files, "arena", 2, _arena_moves),
    Workload("entities", _entities_files, "entities", 4),
    Workload("field", _field_files, field_game.MODE, field_game.MATCH_SIZE, _field_inputs),
]


def _with_sync(game_dir: Path, sync: str) -> None:
    path = game_dir / "match.lua"
    path.write_text(f'state_sync = "{sync}"\n' + path.read_text())


def measure(workload: Workload, sync: str, matches: int, ticks: int, rounds: int) -> Row:
    with tempfile.TemporaryDirectory(prefix="asobi-patch-") as tmp, DiffTimer() as timer:
        game_dir = Path(tmp)
        workload.files(game_dir)
        _with_sync(game_dir, sync)
        registry = ScriptRegistry(game_dir)
        errors = registry.load_all()
        assert not errors, errors
        script = registry.get("match.lua")
        assert script is not None
        counter = Counter()
        engine = Engine(registry, counter)
        rng = random.Random(1)
        running = [
            engine.start_match(
                workload.mode, script, [f"p{i}-{j}" for j in range(workload.players)]
            )
            for i in range(matches)
        ]
        for match in running:
            match.release_held()
        per_frame: list[float] = []
        for _ in range(rounds):
            frames_before = counter.frames
            cpu = 0.0
            for _ in range(ticks):
                if workload.inputs is not None:
                    for match in running:
                        workload.inputs(match, rng)
                started = time.process_time()
                for match in running:
                    match.run_tick()
                cpu += time.process_time() - started
            per_frame.append(cpu / max(counter.frames - frames_before, 1) * 1e6)
        assert all(not m.finished for m in running), "a match ended during the measurement"
        seconds = rounds * ticks / script.meta.tick_rate
        players = matches * workload.players
        row = Row(
            workload.name,
            sync,
            counter.bytes / players / seconds,
            counter.bytes / counter.frames,
            counter.patches / counter.frames,
            statistics.median(per_frame),
            timer.seconds / timer.calls * 1e6 if timer.calls else 0.0,
        )
        for match in running:
            engine.finish(match, None, notify=False)
    return row


def run(matches: int = 50, ticks: int = 100, rounds: int = 5) -> list[tuple[Row, Row]]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    pairs = []
    for workload in WORKLOADS:
        full = measure(workload, "full", matches, ticks, rounds)
        patch = measure(workload, "patch", matches, ticks, rounds)
        pairs.append((full, patch))
    return pairs


COLYSEUS_DIR = Path(__file__).resolve().parent / "peers" / "colyseus"
# bench/patch_bytes workload -> the same state in bench/peers/colyseus/states.js
COLYSEUS_GAMES = {"bench": "bench", "field": "field"}


def colyseus_bytes(ticks: int) -> dict[str, Any]:
    """Colyseus' bytes for the same states and simulation (`bytes.js`: its own serializer, a
    StateView per client for the field game), per workload name; {} when it is not installed."""
    node = shutil.which("node")
    if node is None or not (COLYSEUS_DIR / "node_modules" / "@colyseus" / "core").is_dir():
        return {}
    out: dict[str, Any] = {}
    for workload, name in COLYSEUS_GAMES.items():
        done = subprocess.run(
            [node, "bytes.js", name, str(ticks)],
            cwd=COLYSEUS_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode == 0:
            out[workload] = json.loads(done.stdout)
        else:
            out[workload] = {"error": done.stderr.strip()[-300:]}
    return out


def colyseus_table(pairs: list[tuple[Row, Row]], colyseus: dict[str, Any]) -> str:
    """Bytes per player per second: asobi's full and patch frames beside Colyseus' deltas."""
    lines = [
        "| workload | asobi full B/player/s | asobi patch B/player/s | Colyseus B/player/s "
        "| asobi patch / Colyseus | mean patch frame B (asobi / Colyseus) "
        "| full state B (asobi / Colyseus) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for full, patch in pairs:
        theirs = colyseus.get(full.workload)
        if not theirs or "error" in theirs:
            continue
        lines.append(
            f"| {full.workload} | {full.bytes_per_player_s:,.0f} | "
            f"{patch.bytes_per_player_s:,.0f} | {theirs['patch_bytes_per_player_s']:,.0f} | "
            f"{patch.bytes_per_player_s / theirs['patch_bytes_per_player_s']:.2f} | "
            f"{patch.frame_bytes:.0f} / {theirs['patch_frame_bytes']:.0f} | "
            f"{full.frame_bytes:.0f} / {theirs['full_frame_bytes']:.0f} |"
        )
    return "\n".join(lines)


def table(pairs: list[tuple[Row, Row]]) -> str:
    lines = [
        "| workload | full B/player/s | patch B/player/s | patch / full | mean frame B "
        "(full / patch) | CPU us/frame full | CPU us/frame patch | patch cost us/frame "
        "| diff us/patch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for full, patch in pairs:
        lines.append(
            f"| {full.workload} | {full.bytes_per_player_s:,.0f} | "
            f"{patch.bytes_per_player_s:,.0f} | "
            f"{patch.bytes_per_player_s / full.bytes_per_player_s:.0%} | "
            f"{full.frame_bytes:.0f} / {patch.frame_bytes:.0f} | "
            f"{full.cpu_us_per_frame:.1f} | {patch.cpu_us_per_frame:.1f} | "
            f"{patch.cpu_us_per_frame - full.cpu_us_per_frame:+.1f} | {patch.diff_us:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--matches", type=int, default=50)
    parser.add_argument("--ticks", type=int, default=100, help="ticks per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pairs = run(args.matches, args.ticks, args.rounds)
    print(table(pairs))
    colyseus = colyseus_bytes(args.ticks * args.rounds)
    if colyseus:
        print()
        print(colyseus_table(pairs, colyseus))


if __name__ == "__main__":
    main()
