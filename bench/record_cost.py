"""What recording for replay (`ASOBI_RECORD=1`) costs per match-tick: CPU on the loop, bytes.

Measured in-process on the engine alone (no sockets, frames go nowhere), like
`bench.snapshot_cost`: the bench game (20 fields, four players, `get_state` per player) with a
`handle_input` added, every player sending one input every tick.  Per match-tick, CPU (process
time), medians of nine rounds:

- a tick with recording off;
- a tick with recording on (the hooks: input kept, each frame's digest, the row encoded and
  handed over), as the paired difference of the two passes in each round (noisy on a busy
  machine);
- the same hooks timed alone, on the very `get_state` data the match renders (steadier);

then the wall time of one transaction writing one tick's rows of every match into SQLite (on the
store's database thread).  `python -m bench.record_cost` prints the table.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from asobi.engine import Engine
from asobi.recording import MatchRecording, Recorder
from asobi.scripts import ScriptRegistry
from asobi.store.sqlite import SQLiteBackend
from asobi.store.store import Store
from bench import game

INPUT = """
function handle_input(state, player_id, input)
  state.a = state.a + (input.dx or 0)
  return state
end
"""


class _Discard:
    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        return True


class _Rows:
    """Keeps the rows handed over (the CPU measure leaves the database out)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, bytes]] = []

    def row(self, match_id: str, tick: int, body: bytes) -> bool:
        self.rows.append((match_id, tick, body))
        return True


class _Keep(MatchRecording):
    """Keeps one tick's get_state data, to time the hooks on exactly what the match renders."""

    def __init__(self, match_id: str, sink: Any) -> None:
        super().__init__(match_id, sink)
        self.data: dict[str | None, Any] = {}

    def state(self, player_id: str | None, data: Any) -> None:
        self.data[player_id] = data


def hooks_alone(match: Any, payload: dict[str, Any], repeat: int = 20_000) -> float:
    """CPU us of one match-tick's recording calls, timed alone (no tick around them): a frame
    digest per player, an input per player, the row handed over."""
    keep = _Keep(match.id, _Rows())
    match.recorder = keep
    match.run_tick()
    match.recorder = None
    frames = list(keep.data.items())
    sink = _Rows()
    recording = MatchRecording(match.id, sink)
    started = time.process_time()
    for n in range(repeat):
        for pid, _ in frames:
            recording.input(pid or "", payload)
        for pid, data in frames:
            recording.state(pid, data)
        recording.ticked(n)
        if len(sink.rows) > 1000:
            sink.rows.clear()
    return (time.process_time() - started) / repeat * 1e6


def measure(matches: int = 300, rounds: int = 9) -> dict[str, Any]:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="asobi-record-") as tmp:
        game_dir = Path(tmp) / "game"
        game_dir.mkdir()
        (game_dir / "match.lua").write_text(game.script("v0") + INPUT)
        registry = ScriptRegistry(game_dir)
        registry.load_all()
        engine = Engine(registry, _Discard())
        script = registry.get("match.lua")
        assert script is not None
        running = [
            engine.start_match(game.MODE, script, [f"p{i}-{j}" for j in range(game.MATCH_SIZE)])
            for i in range(matches)
        ]
        for match in running:
            match.release_held()
        sink = _Rows()
        recordings = {m.id: MatchRecording(m.id, sink) for m in running}
        payload = {"dx": 1, "aim": [0.5, -0.25], "fire": False}

        def tick_all(record: bool) -> float:
            for match in running:
                match.recorder = recordings[match.id] if record else None
                for pid in match.players:
                    match.queue_input(pid, dict(payload))
            started = time.process_time()
            for match in running:
                match.run_tick()
                if match.recorder is not None:
                    match.recorder.ticked(match.tick_no)
            return (time.process_time() - started) / matches * 1e6

        off, on, diff = [], [], []
        for _ in range(rounds):
            off.append(tick_all(False))
            sink.rows.clear()
            on.append(tick_all(True))
            diff.append(on[-1] - off[-1])
        row_bytes = statistics.median(len(body) for _, _, body in sink.rows)
        write_ms = asyncio.run(_write(Path(tmp) / "data", registry, sink.rows))
        alone = statistics.median(hooks_alone(running[0], payload) for _ in range(5))
        for match in running:
            engine.finish(match, None, notify=False)
    tick_us = statistics.median(off)
    return {
        "matches": matches,
        "tick_us": tick_us,
        "paired_us": statistics.median(diff),
        "hooks_us": alone,
        "share": alone / tick_us,
        "row_bytes": row_bytes,
        "bytes_per_s": row_bytes * script.meta.tick_rate,
        "write_ms": write_ms,
    }


async def _write(data_dir: Path, registry: ScriptRegistry, rows: list[Any]) -> float:
    """Wall ms of the recorder writing one tick's rows of every match (one transaction)."""
    store = Store(SQLiteBackend(data_dir / "asobi.db"))
    await store.start()
    recorder = Recorder(store.backend, registry, coalesce_s=0.0)
    await recorder.start()
    try:
        started = time.perf_counter()
        for match_id, tick, body in rows:
            recorder.row(match_id, tick, body)
        await recorder.flush()
        return (time.perf_counter() - started) * 1000
    finally:
        await recorder.stop()
        await store.stop()


def table(c: dict[str, Any]) -> list[str]:
    return [
        "| matches | tick us (off) | on - off us (paired) | hooks alone us "
        "| share of tick CPU | row bytes | bytes per match per s | write ms (one tick, all) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {c['matches']} | {c['tick_us']:.1f} | {c['paired_us']:.1f} | {c['hooks_us']:.1f} "
        f"| {c['share'] * 100:.1f}% | {c['row_bytes']:.0f} | {c['bytes_per_s']:.0f} "
        f"| {c['write_ms']:.1f} |",
    ]


if __name__ == "__main__":
    print("\n".join(table(measure())))
