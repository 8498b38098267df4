"""What the match journal costs: CPU on the tick path and bytes written, per match.

Measured in-process on the engine alone (no sockets, frames go nowhere), like
`bench.switch_cost`: the CPU of a normal tick pass against a pass where every match is also
snapshotted (`Snapshotter.take`: the state written as data, the random state, the seats), both per
match, paired in each round so that a change of the machine's load between rounds cancels out.
The difference counts what a snapshot leaves behind too (garbage the next ticks collect); a third
pass times the snapshot calls alone, a steadier figure on a busy machine.  At the default
interval a match is snapshotted once a second, so the cost per match-tick is the snapshot's CPU
divided by the tick rate, and its share is that over the tick's CPU.  Then the writer, off the
tick path: the wall time of one journal transaction writing every match's snapshot into SQLite
(fsync included).

Three states: the bench game's (20 fields), and one with 10 and 100 entities of 6 fields each
(a shooter's players or a board's pieces), since the snapshot's cost follows the state's size.
`python -m bench.snapshot_cost` prints the table alone.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from asobi.engine import Engine
from asobi.journal import Snapshot, StoreJournal
from asobi.scripts import ScriptRegistry
from asobi.snapshots import Snapshotter
from asobi.store.sqlite import SQLiteBackend
from asobi.store.store import Store
from bench import game

ENTITIES = """\
  state.entities = {}
  for i = 1, %(n)d do
    state.entities["e" .. i] = { x = i * 1.5, y = i * 0.5, vx = 1.0, vy = -1.0, hp = 100,
                                 name = "entity" .. i }
  end
"""


class _Discard:
    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        return True


class _Collect:
    """A journal that keeps what it is given (the CPU measure leaves I/O out)."""

    def __init__(self) -> None:
        self.latest: dict[str, Snapshot] = {}

    def save(self, snapshot: Snapshot) -> None:
        self.latest[snapshot.match_id] = snapshot

    def forget(self, match_id: str) -> None:
        self.latest.pop(match_id, None)


@dataclass
class SnapshotCost:
    state: str
    matches: int
    tick_rate: float
    tick_us: float
    # CPU a pass with snapshots took beyond a pass without (the garbage it leaves included),
    # paired per round; and the snapshot calls timed alone in a third pass (steadier).
    snapshot_us: float
    alone_us: float
    snapshot_bytes: int
    write_ms: float

    @property
    def per_tick_us(self) -> float:
        """At the default interval (once a second): the snapshot spread over the second's ticks."""
        return self.snapshot_us / self.tick_rate

    @property
    def share(self) -> float:
        return self.per_tick_us / self.tick_us

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_tick_us": self.per_tick_us, "share": self.share}


def _script(entities: int) -> str:
    """The bench game, with `entities` tables of 6 fields in its state moving every tick."""
    text = game.script("v0")
    if not entities:
        return text
    text = text.replace(
        "  state.counter = 0\n", "  state.counter = 0\n" + ENTITIES % {"n": entities}
    )
    return text.replace(
        "  state.counter = c\n",
        "  state.counter = c\n  for _, e in pairs(state.entities) do e.x = e.x + e.vx end\n",
    )


def measure(entities: int = 0, matches: int = 300, rounds: int = 11) -> SnapshotCost:
    """Medians over `rounds`, per match, in us of CPU (process time)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="asobi-snapshot-") as tmp:
        game_dir = Path(tmp) / "game"
        game_dir.mkdir()
        (game_dir / "match.lua").write_text(_script(entities))
        registry = ScriptRegistry(game_dir)
        registry.load_all()
        engine = Engine(registry, _Discard())
        script = registry.get("match.lua")
        assert script is not None, registry.load_all()
        running = [
            engine.start_match(game.MODE, script, [f"p{i}-{j}" for j in range(game.MATCH_SIZE)])
            for i in range(matches)
        ]
        for match in running:
            match.release_held()
        collected = _Collect()
        snapshots = Snapshotter(collected, lambda pid: "resume-" + pid)  # type: ignore[arg-type]

        def tick_all(snapshot: bool) -> float:
            started = time.process_time()
            for match in running:
                match.run_tick()
                if snapshot:
                    snapshots.take(match)
            return (time.process_time() - started) / matches * 1e6

        def take_timed() -> float:
            """A pass timing each snapshot alone (its clock reads kept out of the paired passes)."""
            spent = 0.0
            for match in running:
                match.run_tick()
                started = time.process_time()
                snapshots.take(match)
                spent += time.process_time() - started
            return spent / matches * 1e6

        normal, extra, alone = [], [], []
        for _ in range(rounds):
            tick_us = tick_all(False)
            normal.append(tick_us)
            extra.append(tick_all(True) - tick_us)
            alone.append(take_timed())
        sizes = [s.size for s in collected.latest.values()]
        write_ms = asyncio.run(_write(Path(tmp) / "data", list(collected.latest.values())))
        for match in running:
            engine.finish(match, None, notify=False)
    return SnapshotCost(
        state=f"{entities} entities" if entities else "bench game (20 fields)",
        matches=matches,
        tick_rate=script.meta.tick_rate,
        tick_us=statistics.median(normal),
        snapshot_us=statistics.median(extra),
        alone_us=statistics.median(alone),
        snapshot_bytes=int(statistics.median(sizes)),
        write_ms=write_ms,
    )


async def _write(data_dir: Path, taken: list[Snapshot]) -> float:
    """Wall ms of the journal writing one snapshot of every match (one transaction, SQLite)."""
    store = Store(SQLiteBackend(data_dir / "asobi.db"))
    await store.start()
    journal = StoreJournal(store.backend, coalesce_s=0.0)
    await journal.start()
    try:
        started = time.perf_counter()
        for snapshot in taken:
            journal.save(snapshot)
        await journal.flush()
        return (time.perf_counter() - started) * 1000
    finally:
        await journal.stop()
        await store.stop()


def run(matches: int = 300) -> list[SnapshotCost]:
    return [measure(n, matches) for n in (0, 10, 100)]


def table(costs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| state | matches | tick us | snapshot us | timed alone us | per match-tick us (1/s) "
        "| share of tick CPU | bytes per match per s | journal write ms (all matches, SQLite) |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in costs:
        alone = c.get("alone_us")
        lines.append(
            f"| {c['state']} | {c['matches']} | {c['tick_us']:.1f} | {c['snapshot_us']:.1f} "
            f"| {'-' if alone is None else f'{alone:.1f}'} | {c['per_tick_us']:.2f} "
            f"| {c['share'] * 100:.1f}% | {c['snapshot_bytes']} | {c['write_ms']:.1f} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(table([c.as_dict() for c in run()])))
