"""`python -m bench.patch_bytes`: bytes per player per second and CPU per frame, full frames vs
`match.patch` frames in JSON vs the compact encoding (binary patch chains with interned keys,
`asobi.compact_state`), in-process on the engine (no sockets: what goes on the wire is counted at
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
`encode us` compares the two encodings of the same patches: every patch frame of the compact run
is encoded again, as JSON (`orjson` and the `match.patch` envelope) and compact, in a tight loop.
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

import orjson
import structlog

from asobi import compact_state, merge_patch
from asobi.engine import Engine, EngineConfig
from asobi.lua.runtime import Limits
from asobi.match import Match
from asobi.scripts import ScriptRegistry
from asobi.state_frames import SyncChoice
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
        self.full_bytes = 0  # of the frames that are not patches

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        if compact_state.is_binary(frame):
            patch = frame[0] & compact_state.PATCH == compact_state.PATCH
        elif frame.startswith((b'{"type":"match.state"', b'{"type":"match.patch"')):
            patch = frame.startswith(b'{"type":"match.patch"')
        else:
            return True
        n = len(frame)
        n += 2 if n < 126 else 4 if n < 65536 else 10
        self.bytes += n
        self.frames += 1
        self.patches += patch
        if not patch:
            self.full_bytes += n
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
    full_frame_bytes: float = 0.0  # mean of the full frames (join, every full_state_every)
    # Compact rows: us to encode one patch frame, JSON / compact, on the same patches.
    json_encode_us: float = 0.0
    compact_encode_us: float = 0.0


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


class PatchRecorder:
    """Keeps the arguments of the first `limit` `compact_state.encode_patch` calls made while
    installed, so both encodings can be timed afterwards on the very same patches.  (Keeping
    them all would keep every state alive, and the garbage collector's walks over them would
    show up as CPU per frame.)"""

    def __init__(self, limit: int = 5000) -> None:
        self.calls: list[tuple[int, int, Any, compact_state.KeyTable]] = []
        self.limit = limit
        self._encode = compact_state.encode_patch

    def __enter__(self) -> PatchRecorder:
        original, calls, limit = self._encode, self.calls, self.limit

        def recorded(
            seq: int, base: int, patch: Any, keys: compact_state.KeyTable
        ) -> tuple[bytes, compact_state.KeyTable]:
            if len(calls) < limit:
                calls.append((seq, base, patch, keys))
            return original(seq, base, patch, keys)

        compact_state.encode_patch = recorded  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        compact_state.encode_patch = self._encode  # type: ignore[assignment]

    def timings(self, repeat: int = 3) -> tuple[float, float]:
        """us per patch frame encoded: JSON (as `asobi.state_frames` writes it), compact."""
        calls = self.calls
        if not calls:
            return 0.0, 0.0
        encode, dumps = compact_state.encode_patch, orjson.dumps

        def json_frames() -> None:
            for seq, base, patch, _ in calls:
                b'{"type":"match.patch","seq":%d,"base":%d,"payload":%b}' % (
                    seq,
                    base,
                    dumps(patch),
                )

        def compact_frames() -> None:
            for seq, base, patch, keys in calls:
                encode(seq, base, patch, keys)

        best = []
        for run in (json_frames, compact_frames):
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                run()
                times.append(time.perf_counter() - started)
            best.append(min(times) / len(calls) * 1e6)
        return best[0], best[1]


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
    """One run of `workload` with `sync`: "full", "patch" (JSON) or "compact" (patch chains in
    the compact encoding, which every connection of the run chose)."""
    with (
        tempfile.TemporaryDirectory(prefix="asobi-patch-") as tmp,
        DiffTimer() as timer,
        PatchRecorder() as recorder,
    ):
        game_dir = Path(tmp)
        workload.files(game_dir)
        _with_sync(game_dir, "full" if sync == "full" else "patch")
        registry = ScriptRegistry(game_dir)
        errors = registry.load_all()
        assert not errors, errors
        script = registry.get("match.lua")
        assert script is not None
        counter = Counter()
        # Budgets far past any call's cost: a call cut on a loaded machine (the tests run this
        # beside another suite) would restart that player's chain with a full frame and change
        # the frames counted, which are what this measures.
        roomy = Limits(tick=2.0, get_state=2.0, handle_input=2.0)
        engine = Engine(registry, counter, EngineConfig(limits=roomy))
        rng = random.Random(1)
        running = [
            engine.start_match(
                workload.mode, script, [f"p{i}-{j}" for j in range(workload.players)]
            )
            for i in range(matches)
        ]
        for match in running:
            match.release_held()
            if sync == "compact":
                for pid in match.players:
                    engine.state_sync[pid] = SyncChoice(compact=True)
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
            counter.full_bytes / max(counter.frames - counter.patches, 1),
        )
        for match in running:
            engine.finish(match, None, notify=False)
    if sync == "compact":
        row.json_encode_us, row.compact_encode_us = recorder.timings()
    return row


Result = tuple[Row, Row, Row]  # full, JSON patch, compact


def run(matches: int = 50, ticks: int = 100, rounds: int = 5) -> list[Result]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = []
    for workload in WORKLOADS:
        full = measure(workload, "full", matches, ticks, rounds)
        patch = measure(workload, "patch", matches, ticks, rounds)
        compact = measure(workload, "compact", matches, ticks, rounds)
        results.append((full, patch, compact))
    return results


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


def colyseus_table(results: list[Result], colyseus: dict[str, Any]) -> str:
    """Bytes per player per second: asobi's full, JSON patch and compact frames beside Colyseus'
    deltas."""
    lines = [
        "| workload | asobi full B/player/s | asobi JSON patch B/player/s "
        "| asobi compact B/player/s | Colyseus B/player/s | JSON patch / Colyseus "
        "| compact / Colyseus | mean patch frame B (JSON / compact / Colyseus) "
        "| full state B (JSON / compact / Colyseus) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for full, patch, compact in results:
        theirs = colyseus.get(full.workload)
        if not theirs or "error" in theirs:
            continue
        per_s = theirs["patch_bytes_per_player_s"]
        lines.append(
            f"| {full.workload} | {full.bytes_per_player_s:,.0f} | "
            f"{patch.bytes_per_player_s:,.0f} | {compact.bytes_per_player_s:,.0f} | "
            f"{per_s:,.0f} | {patch.bytes_per_player_s / per_s:.2f} | "
            f"{compact.bytes_per_player_s / per_s:.2f} | "
            f"{patch.frame_bytes:.0f} / {compact.frame_bytes:.0f} / "
            f"{theirs['patch_frame_bytes']:.0f} | "
            f"{full.frame_bytes:.0f} / {compact.full_frame_bytes:.0f} / "
            f"{theirs['full_frame_bytes']:.0f} |"
        )
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    lines = [
        "| workload | full B/player/s | JSON patch B/player/s | compact B/player/s "
        "| JSON patch / full | compact / full | mean frame B (full / JSON patch / compact) "
        "| CPU us/frame full | CPU us/frame JSON patch | CPU us/frame compact "
        "| diff us/patch | encode us/patch (JSON / compact) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for full, patch, compact in results:
        lines.append(
            f"| {full.workload} | {full.bytes_per_player_s:,.0f} | "
            f"{patch.bytes_per_player_s:,.0f} | {compact.bytes_per_player_s:,.0f} | "
            f"{patch.bytes_per_player_s / full.bytes_per_player_s:.0%} | "
            f"{compact.bytes_per_player_s / full.bytes_per_player_s:.0%} | "
            f"{full.frame_bytes:.0f} / {patch.frame_bytes:.0f} / {compact.frame_bytes:.0f} | "
            f"{full.cpu_us_per_frame:.1f} | {patch.cpu_us_per_frame:.1f} | "
            f"{compact.cpu_us_per_frame:.1f} | {patch.diff_us:.1f} | "
            f"{compact.json_encode_us:.1f} / {compact.compact_encode_us:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--matches", type=int, default=50)
    parser.add_argument("--ticks", type=int, default=100, help="ticks per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = run(args.matches, args.ticks, args.rounds)
    print(table(results))
    colyseus = colyseus_bytes(args.ticks * args.rounds)
    if colyseus:
        print()
        print(colyseus_table(results, colyseus))


if __name__ == "__main__":
    main()
