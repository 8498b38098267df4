"""Memory per running match in steady state: RSS per match after its heaps have settled.

The capacity run measures RSS right after a step's matches start, over a fraction of a second:
before a match's Lua heap has made and collected its first garbage, and swung by whatever the
allocator had free (one run saw 39 to 212 KiB per match across its steps).  This runs the engine
alone, in a fresh process (nothing else's freed memory to reuse), starts M bench matches of 4,
ticks them T times, and divides the growth of RSS by M.  Lua's own count of each heap is reported
beside it: the rest is the Python side and the allocator's spread over many interleaved heaps.

    python -m bench.match_memory            # prints one JSON line
"""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

MATCHES = 400
TICKS = 60


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(matches: int = MATCHES, ticks: int = TICKS) -> dict[str, Any]:
    """In this process: RSS growth per match for `matches` matches after `ticks` ticks each."""
    from asobi.engine import Engine
    from asobi.scripts import ScriptRegistry
    from bench import game

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    class _Discard:
        def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
            return True

    with tempfile.TemporaryDirectory(prefix="asobi-memory-") as tmp:
        game.write_script(Path(tmp), "v0")
        registry = ScriptRegistry(Path(tmp))
        registry.load_all()
        script = registry.get("match.lua")
        assert script is not None
        engine = Engine(registry, _Discard())
        # Warm up: the first matches pay for code and caches every later one shares.
        warm = [
            engine.start_match(game.MODE, script, [f"w{j}" for j in range(4)]) for _ in range(20)
        ]
        for match in warm:
            engine._tick_one(match)
        gc.collect()
        before = _rss_kib()
        running = [
            engine.start_match(game.MODE, script, [f"p{i}-{j}" for j in range(4)])
            for i in range(matches)
        ]
        for _ in range(ticks):
            for match in running:
                engine._tick_one(match)
            engine.drain_lateness()  # the engine's own sample buffer is not the matches' memory
        gc.collect()
        after = _rss_kib()
        heaps = [m.lua.runtime.globals()[b"collectgarbage"](b"count") for m in running]
    return {
        "matches": matches,
        "ticks": ticks,
        "rss_per_match_kib": round((after - before) / matches, 1),
        "lua_heap_kib": round(sum(heaps) / len(heaps), 1),
    }


def run(matches: int = MATCHES, ticks: int = TICKS) -> dict[str, Any]:
    """`measure` in a fresh interpreter, so no memory this process freed is reused."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.match_memory", str(matches), str(ticks)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-400:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(measure(*args)))
