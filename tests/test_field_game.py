"""The field bench game (`bench/field_game.py`) and its Colyseus twin
(`bench/peers/colyseus/states.js`) simulate the same game: after the same ticks and inputs, every
player and NPC is in the same place with the same hit points and score.  Otherwise the bench
would compare two different workloads."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from asobi.engine import Engine, EngineConfig
from asobi.lua.convert import to_python
from asobi.lua.runtime import Limits
from asobi.scripts import ScriptRegistry
from bench import field_game
from bench.patch_bytes import COLYSEUS_DIR, Counter
from tests.conftest import each_data

TICKS = 80
# Inputs a tick cannot fit in its handle_input budget wait for the next tick: on a busy machine
# that would change the game, so the budgets here are far above what the calls need.
ROOMY = EngineConfig(limits=Limits(handle_input=10.0, tick=10.0, get_state=10.0))


def asobi_state(tmp_path: Path) -> dict[str, Any]:
    field_game.write_script(tmp_path)
    registry = ScriptRegistry(tmp_path)
    assert not registry.load_all()
    script = registry.get("match.lua")
    assert script is not None
    engine = Engine(registry, Counter(), ROOMY)
    players = [f"p{j}" for j in range(1, field_game.MATCH_SIZE + 1)]
    match = engine.start_match(field_game.MODE, script, players)
    match.release_held()
    for _ in range(TICKS):
        for j, pid in enumerate(players, 1):
            match.queue_input(pid, {"dir": field_game.input_dir(j, match.tick_no + 1)})
        match.run_tick()
    state: dict[str, Any] = to_python(match.state)
    return state


@pytest.mark.skipif(
    shutil.which("node") is None
    or not (COLYSEUS_DIR / "node_modules" / "@colyseus" / "core").is_dir(),
    reason="Colyseus is not installed (python -m bench installs it)",
)
def test_lua_and_colyseus_simulate_the_same_game(tmp_path: Path) -> None:
    ours = asobi_state(tmp_path)
    done = subprocess.run(
        ["node", "bytes.js", "field", str(TICKS), "state"],
        cwd=COLYSEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = json.loads(done.stdout)
    assert ours["tick"] == theirs["tick"] == TICKS
    assert ours["players"] == theirs["players"]
    assert ours["npcs"] == theirs["npcs"]
    # the simulation did move things: players steered, NPCs wandered, one was hit per tick
    assert any(p["score"] > 0 for p in ours["players"].values())
    assert any(n["hp"] < 100 for n in ours["npcs"].values())


def test_views_are_partial(tmp_path: Path) -> None:
    """Each player sees some of the field, not all of it (the per-player view is real)."""
    field_game.write_script(tmp_path)
    registry = ScriptRegistry(tmp_path)
    assert not registry.load_all()
    script = registry.get("match.lua")
    assert script is not None
    engine = Engine(registry, Counter(), ROOMY)
    players = [f"p{j}" for j in range(1, field_game.MATCH_SIZE + 1)]
    match = engine.start_match(field_game.MODE, script, players)
    match.release_held()
    match.run_tick()
    seen = [
        len(each_data(result)["npcs"])
        for result in match.lua.call_each("get_state", match.state, players, what="state")
    ]
    assert all(0 < n < field_game.NPCS for n in seen), seen
