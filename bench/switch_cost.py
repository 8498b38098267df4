"""What one match pays to switch code: the CPU of a switching tick against a normal one.

Measured in-process on the engine alone (no sockets, frames go nowhere), so it isolates the
reload transaction: the state copy, loading the compiled script into a fresh environment,
`tick` and `get_state` on the copy.  The difference times the number of matches is the extra
CPU a save costs the server, spread over one tick period.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from asobi.engine import Engine
from asobi.scripts import ScriptRegistry, vet_script
from bench import game


class _Discard:
    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        return True


@dataclass
class SwitchCost:
    shared: bool
    matches: int
    normal_us: float
    switching_us: float

    @property
    def extra_us(self) -> float:
        return self.switching_us - self.normal_us

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extra_us": self.extra_us}


def measure(shared: bool, matches: int = 300, rounds: int = 7) -> SwitchCost:
    """Median over `rounds` of a normal tick and of a switching tick, per match, in us of CPU
    time (process time: on a shared machine, time stolen by other guests is not counted)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="asobi-switch-") as tmp:
        game_dir = Path(tmp)
        game.write_script(game_dir, "v0", shared)
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

        def tick_all() -> float:
            started = time.process_time()
            for match in running:
                match.run_tick()
            return (time.process_time() - started) / matches * 1e6

        normal, switching = [], []
        for i in range(1, rounds + 1):
            normal.append(tick_all())
            source = game.script(f"v{i}", shared).encode()
            vetted = vet_script("match.lua", source, registry.limits, registry.modules())
            version = registry.install("match.lua", vetted)
            assert version is not None and not hasattr(version, "errors")
            engine.schedule_reload(version)  # type: ignore[arg-type]
            switching.append(tick_all())
            assert all(match.script is version for match in running)
        for match in running:
            engine.finish(match, None, notify=False)
    return SwitchCost(shared, matches, statistics.median(normal), statistics.median(switching))
