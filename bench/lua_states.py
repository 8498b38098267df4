"""What one Lua state per match costs the Lua side of a match-tick, against matches sharing one.

Every match runs in a Lua state of its own today: its own heap, and its own copy of the script's
and the host chunks' code (a Lua prototype belongs to one state).  Past a few dozen matches those
working sets stop fitting in the core's caches (docs/performance.md, "What would close the
gaps", item 10).  This measures how much of the Lua side of a match-tick that is, before anyone
builds matches that share a state: the bench game's `tick` and four `get_state` calls, each
result encoded by asobi's C encoder, one crossing per match-tick, in-process, in three layouts:

- one plain Lua state per match (the layout of today, without the sandbox's own heap);
- pods: `--pod K` matches per state (a memory cap or a fault would then be shared by K);
- one state for all: each match an environment of its own, the script's functions closures of
  one loaded chunk, so every match runs the same prototypes.

    python -m bench.lua_states [--pod 16] [matches ...]   # prints a table (~1 min)

Process time per match-tick, the better of two medians of 31 passes over every match.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from lupa import lua54

from asobi.lua import native
from bench import game

SOURCE = game.script("v1").encode()
PLAYERS = (b"p1", b"p2", b"p3", b"p4")
PASSES = 31

# tick, then get_state for each player, encoded: what the server's tick crossing runs.
DRIVER = b"""
local select, unpack = select, table.unpack
return function(tick, get_state, state, tojson, ...)
  state = tick(state) or state
  local n = select('#', ...)
  local out = {}
  for i = 1, n do out[i] = tojson(get_state(state, (select(i, ...))), 100000) end
  return state, unpack(out, 1, n)
end
"""
# Each match's environment: the script's globals, `game.players` and, behind them, the libraries.
NEW_ENV = b"""
return function()
  return setmetatable({ game = { players = function() return { 1, 2, 3, 4 } end } },
                      { __index = _G })
end
"""

Match = list[Any]  # [driver, tick, get_state, state, tojson]


def _state(library: bytes) -> tuple[Any, Any, Any, Any, Any]:
    """A Lua state with the C encoder: (runtime, driver, encoder, environment maker, chunk
    maker)."""
    runtime = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    runtime.execute(b"collectgarbage('generational')")
    tojson = native.load_into(runtime, library).tojson
    driver = runtime.execute(DRIVER)
    new_env = runtime.execute(NEW_ENV)
    # One chunk whose functions close over the environment they are given: every call defines
    # the script's functions anew, as closures of the same prototypes.
    make = runtime.execute(b"return function(_ENV) " + SOURCE + b"\nend")
    return runtime, driver, tojson, new_env, make


def build(matches: int, per_state: int, library: bytes) -> tuple[list[Match], list[Any]]:
    """`matches` matches, `per_state` of them in each Lua state."""
    out: list[Match] = []
    runtimes: list[Any] = []
    while len(out) < matches:
        runtime, driver, tojson, new_env, make = _state(library)
        runtimes.append(runtime)
        for _ in range(min(per_state, matches - len(out))):
            env = new_env()
            make(env)
            state = env[b"init"](runtime.table())
            out.append([driver, env[b"tick"], env[b"get_state"], state, tojson])
    return out, runtimes


def match_tick_us(matches: int, per_state: int, library: bytes) -> float:
    group, runtimes = build(matches, per_state, library)
    for _ in range(10):
        _pass(group)
    times = []
    for _ in range(PASSES):
        started = time.process_time()
        _pass(group)
        times.append((time.process_time() - started) / matches * 1e6)
    del group, runtimes
    gc.collect()
    return statistics.median(times)


def _pass(group: list[Match]) -> None:
    for m in group:
        m[3] = m[0](m[1], m[2], m[3], m[4], *PLAYERS)[0]


def tick_frames(m: Match) -> list[bytes]:
    """One match-tick of `m` as `_pass` runs it; the four players' encoded states."""
    driver, tick, get_state, state, tojson = m
    out = driver(tick, get_state, state, tojson, *PLAYERS)
    m[3] = out[0]
    return list(out[1:])


def best_of_two(measure: Callable[[], float]) -> float:
    return min(measure(), measure())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lua_states")
    parser.add_argument("--pod", type=int, default=16, help="matches per state in the pod layout")
    parser.add_argument("matches", type=int, nargs="*", default=[1, 30, 100, 300, 1000])
    args = parser.parse_args(argv)
    library = native.library()
    if library is None:
        sys.exit("asobi's C encoder is not built (pip install -e .)")
    pod = args.pod
    print(f"Lua side of a match-tick (tick, 4 get_state, encoding), process time, us; pod {pod}")
    print()
    print("| matches | a state per match | pods | one state | pods / per match | one / per match |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.matches:
        alone = best_of_two(lambda n=n: match_tick_us(n, 1, library))
        pods = best_of_two(lambda n=n: match_tick_us(n, pod, library))
        shared = best_of_two(lambda n=n: match_tick_us(n, n, library))
        print(
            f"| {n:,} | {alone:.1f} | {pods:.1f} | {shared:.1f} | {pods / alone:.2f} |"
            f" {shared / alone:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
