"""The engine and the reloader driven directly: no sockets, time passed in.

A reload's switches are spread over engine passes by `reload_switches_per_tick`, and vetting a
save runs off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from asobi.engine import Engine, EngineConfig
from asobi.reload import Reloader, ReloadHistory
from asobi.scripts import ScriptRegistry

SCRIPT = b"""
version = "%s"
tick_rate = 10
function init(state) state.n = 0 return state end
function tick(state) state.n = state.n + 1 return state end
function get_state(state, player_id) return { n = state.n } end
"""


class ListOutbox:
    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> None:
        self.frames.append((player_id, frame))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_engine(tmp_path: Path, cap: int) -> tuple[ScriptRegistry, Engine, Clock]:
    (tmp_path / "match.lua").write_bytes(SCRIPT % b"v1")
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    clock = Clock()
    engine = Engine(registry, ListOutbox(), EngineConfig(reload_switches_per_tick=cap), clock=clock)
    return registry, engine, clock


async def test_reload_switches_are_spread_over_passes(tmp_path: Path) -> None:
    registry, engine, clock = make_engine(tmp_path, cap=10)
    script = registry.get("match.lua")
    assert script is not None
    matches = [engine.start_match("duel", script, [f"p{i}"]) for i in range(50)]
    period = matches[0].period
    clock.now += period
    engine.run_due(clock.now)  # every match has ticked once, on v1
    assert {m.tick_no for m in matches} == {1}

    reloader = Reloader(registry, engine, ReloadHistory())
    record = await reloader.apply_source("match.lua", SCRIPT % b"v2", "test")
    assert record is not None and record.outcome == "pending"
    assert sorted(record.matches) == sorted(m.id for m in matches)

    switched_per_pass = []
    for n in range(2, 7):
        clock.now += period
        before = len(record.switched)
        engine.run_due(clock.now)
        switched_per_pass.append(len(record.switched) - before)
        # No tick skipped or repeated: every match ran exactly one tick this pass.
        assert {m.tick_no for m in matches} == {n}
    assert switched_per_pass == [10, 10, 10, 10, 10]
    assert sorted(record.switched) == sorted(m.id for m in matches)
    assert record.outcome == "reloaded"
    assert {m.script.version for m in matches} == {"v2"}
    assert engine.reload_switches_deferred == 40 + 30 + 20 + 10
    # A switched match's state went on counting: the tick it switched on ran on the new code.
    assert {m.lua.field(m.state, "n") for m in matches} == {6}


async def test_no_cap_switches_every_match_at_its_next_tick(tmp_path: Path) -> None:
    registry, engine, clock = make_engine(tmp_path, cap=0)
    script = registry.get("match.lua")
    assert script is not None
    matches = [engine.start_match("duel", script, [f"p{i}"]) for i in range(30)]
    reloader = Reloader(registry, engine, ReloadHistory())
    record = await reloader.apply_source("match.lua", SCRIPT % b"v2", "test")
    assert record is not None
    clock.now += matches[0].period
    engine.run_due(clock.now)
    assert len(record.switched) == 30 and record.outcome == "reloaded"


async def test_vetting_a_save_does_not_block_the_loop(tmp_path: Path) -> None:
    """A top level that runs 400 ms is vetted on a worker thread: the loop keeps turning."""
    registry, engine, _ = make_engine(tmp_path, cap=0)
    reloader = Reloader(registry, engine, ReloadHistory())
    slow = (SCRIPT % b"slow") + b"\nlocal t0 = os.clock() while os.clock() - t0 < 0.4 do end\n"
    task = asyncio.create_task(reloader.apply_source("match.lua", slow, "test"))
    gaps: list[float] = []
    last = time.perf_counter()
    while not task.done():
        await asyncio.sleep(0.005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    record = task.result()
    assert record is not None and record.outcome == "reloaded", record
    assert record.load_ms >= 350
    assert len(gaps) > 10
    # On the loop, one gap would be the whole 400 ms.
    assert max(gaps) < 0.2, max(gaps)
