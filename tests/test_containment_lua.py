"""Containment of Lua-side escapes, one test per class, each next to a victim match.

Classes: Lua that runs after a budget is lifted (`__close` while a failed callback unwinds, the
top level of a reloaded file), host calls that were not charged (time spent in Python for
game.*), and C library functions whose single call costs grow with their arguments.  Each attack
runs in its own match; a victim match (the tutorial script, another mode) on the same server must
keep ticking: no two of its frames further apart than its period plus the hostile callback's
budget plus 50 ms.  The hostile match must end after FAILURES failed ticks, or (for attacks
that are simply refused) report the refusal.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from asobi.lua.runtime import Limits
from tests.conftest import TUTORIAL, Client, Logs
from tests.test_sandbox_hostile import VictimWatch

# Every test runs on the C budgeted calls and on calls.lua's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("budget_machinery")

TICK_BUDGET = 0.02
LIMITS = Limits(
    tick=TICK_BUDGET, init=1.0, join=0.05, get_state=0.01, load=0.05, max_memory=24 * 2**20
)
FAILURES = 3
VICTIM_PERIOD = 1 / 20
SLACK = 0.05

VICTIM = "tick_rate = 20\n" + TUTORIAL

HOSTILE = """
tick_rate = 20
{setup}
function init(state) state.n = 0 if SETUP then SETUP() end return state end
function tick(state)
  state.n = state.n + 1
  if state.n > 2 then
    {attack}
  end
  return state
end
function get_state(state) return {{ n = state.n }} end
"""


LOOPING_CLOSE = "setmetatable({}, { __close = function() while true do end end })"


async def start(start_server: Any, hostile: str, **files: str) -> tuple[Any, Client]:
    server = await start_server(
        {"victim.lua": VICTIM, "hostile.lua": hostile, **files},
        limits=LIMITS,
        max_consecutive_failures=FAILURES,
    )
    victim = await server.player("victim")
    await victim.expect("matchmaker.matched")
    await victim.states(2)
    return server, victim


async def run_attack(
    start_server: Any, logs: Logs, setup: str, attack: str, expected: tuple[str, ...], **files: str
) -> float:
    """Run `attack` in a hostile match's tick; returns the victim's worst frame gap."""
    source = HOSTILE.format(setup=setup, attack=attack)
    server, victim = await start(start_server, source, **files)
    player = await server.player("hostile")
    matched = await player.expect("matchmaker.matched")
    match_id = matched["payload"]["match_id"]
    # The attack starts at the hostile match's third tick, once the victim is being watched.
    watch = VictimWatch(victim, server.app)
    started = time.monotonic()
    finished = await player.expect("match.finished", timeout=15)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.15)
    await watch.stop()
    gap = watch.worst_gap()
    print(f"victim worst gap {gap * 1000:.1f} ms")

    error = finished["payload"]["result"]["error"]
    assert error.startswith(f"tick failed {FAILURES} times in a row: "), error
    assert any(e in error for e in expected), error
    assert elapsed < FAILURES * (1 / 20 + TICK_BUDGET) + 1.0, elapsed
    failed = [e for e in logs.events("callback_failed") if e["match_id"] == match_id]
    assert len(failed) == FAILURES
    watch.assert_on_time(TICK_BUDGET)
    return gap


# --------------------------------------------------------------------------------------------------
# Class 1: Lua that runs after the budget is lifted.
# --------------------------------------------------------------------------------------------------
AFTER_BUDGET = {
    "close_after_error": (f"local x <close> = {LOOPING_CLOSE} error('boom')", ("budget",)),
    "close_after_cut": (f"local x <close> = {LOOPING_CLOSE} while true do end", ("budget",)),
    "close_in_for_loop": (
        f"for k in next, {{1}}, nil, {LOOPING_CLOSE} do error('boom') end",
        ("budget",),
    ),
    "close_inside_pcall": (
        f"pcall(function() local x <close> = {LOOPING_CLOSE} error('boom') end)",
        ("budget",),
    ),
    "close_on_coroutine_close": (
        "local co = coroutine.create(function() "
        f"local x <close> = {LOOPING_CLOSE} coroutine.yield() end) "
        "coroutine.resume(co) coroutine.close(co)",
        ("budget",),
    ),
    "many_closes_after_cut": (
        " ".join(f"local x{i} <close> = {LOOPING_CLOSE}" for i in range(20)) + " while true do end",
        ("budget",),
    ),
    "close_after_error_object": (
        f"local x <close> = {LOOPING_CLOSE} "
        "error(setmetatable({}, { __tostring = function() while true do end end }))",
        ("budget",),
    ),
}


@pytest.mark.parametrize("attack", sorted(AFTER_BUDGET))
async def test_lua_after_the_budget_is_contained(
    start_server: Any, logs: Logs, attack: str
) -> None:
    source, expected = AFTER_BUDGET[attack]
    await run_attack(start_server, logs, "", source, expected)


async def test_close_at_the_top_level_of_a_reloaded_file_is_contained(
    start_server: Any, logs: Logs
) -> None:
    """A saved file's top level runs (in a probe state, then in each match) under the load
    budget, and so do the `__close` handlers it leaves behind when it fails."""
    benign = HOSTILE.format(setup="", attack="")
    server, victim = await start(start_server, benign)
    player = await server.player("hostile")
    await player.expect("matchmaker.matched")
    await player.states(2)
    watch = VictimWatch(victim, server.app)
    server.write("hostile.lua", f"local x <close> = {LOOPING_CLOSE}\nerror('top')\n" + benign)
    line = await logs.wait_for("reload_failed", timeout=10)
    assert "load exceeded its 50 ms budget at hostile.lua:1" in str(line["errors"]), line
    states = await player.states(3)
    assert states[-1]["n"] > states[0]["n"]
    await watch.stop()
    gap = watch.worst_gap()
    print(f"victim worst gap {gap * 1000:.1f} ms")
    watch.assert_on_time(LIMITS.load)


# --------------------------------------------------------------------------------------------------
# Class 2: host calls that are not charged.
# --------------------------------------------------------------------------------------------------
# A table conversion refuses past 100,000 values, after walking them: each refused call costs
# tens of milliseconds of Python.
# Built by init (1 s budget): as top-level code it would be the load's, whose 50 ms a loaded
# machine can exceed before any attack runs.
BIG = "function SETUP() BIG = {} for i = 1, 120000 do BIG[i] = i end end"
HOST_CALLS = {
    "storage_set_refused": ("while true do game.storage.set('c', 'k', BIG) end", ("budget",)),
    "broadcast_in_pcall": ("while true do pcall(game.broadcast, 'ev', BIG) end", ("budget",)),
    "send_in_pcall": (
        "local p = game.players()[1] while true do pcall(game.send, p, BIG) end",
        ("budget",),
    ),
    "player_set_refused": (
        "local p = game.players()[1] while true do game.storage.player_set(p, 'c', 'k', BIG) end",
        ("budget",),
    ),
    "failing_module_in_pcall": ("while true do pcall(require, 'heavy') end", ("budget",)),
}
HEAVY_MODULE = (
    "local t = {" + ", ".join(f"{{{i}, 'v{i}'}}" for i in range(20000)) + "}\nerror('no')\n"
)


@pytest.mark.parametrize("attack", sorted(HOST_CALLS))
async def test_host_calls_count_against_the_budget(
    start_server: Any, logs: Logs, attack: str
) -> None:
    source, expected = HOST_CALLS[attack]
    await run_attack(start_server, logs, BIG, source, expected, **{"heavy.lua": HEAVY_MODULE})


# --------------------------------------------------------------------------------------------------
# Class 3: C functions whose cost grows with their arguments.
# --------------------------------------------------------------------------------------------------
# Data the attacks use, made by init (1 s budget), once.
SETUP = (
    'function SETUP() DIGITS = ("1"):rep(2^23) '
    "NUMBERS = {} for i = 1, 400000 do NUMBERS[i] = i + 0.5 end end"
)
C_FUNCTIONS = {
    "table_move_range": ("table.move({}, 1, 1e8, 2)", ("budget",)),
    "table_insert_len": (
        "table.insert(setmetatable({}, { __len = function() return 1e8 end }), 1, 'x')",
        ("budget",),
    ),
    "table_remove_len": (
        "table.remove(setmetatable({}, { __len = function() return 1e8 end }), 1)",
        ("budget",),
    ),
    "table_concat_numbers": (
        "local s = table.concat(NUMBERS, ',')",
        ("budget",),
    ),
    "os_date_format": ('local s = os.date(("%c"):rep(2^19))', ("format longer than",)),
    "format_quoted": (
        'local s = string.format("%q", ("\\0"):rep(2^21))',
        ("%q of a string longer than", "budget"),
    ),
    "format_many_floats": (
        "local a = {} for i = 1, 16384 do a[i] = 1e308 end "
        'local s = string.format(("%.99f"):rep(16384), table.unpack(a))',
        ("conversions in one format",),
    ),
    "numeral_arithmetic": (
        "while true do local x = DIGITS + 0 end",
        ("longer than 200 bytes",),
    ),
    "numeral_math": (
        "while true do local x = math.floor(DIGITS) end",
        ("is not a number",),
    ),
    "numeral_tonumber": ("while true do local x = tonumber(DIGITS) end", ("budget",)),
    "numeral_format": (
        'while true do local x = string.format("%d", DIGITS) end',
        ("is not a number",),
    ),
    "pack_padding": ('while true do local s = string.pack("c8000000", "") end', ("add up to",)),
    "rep_short_unit": (
        "local s = ('x'):rep(2^23) while true do s = ('x'):rep(2^23) end",
        ("budget", "memory"),
    ),
    "unpack_many": (
        "local t = {} while true do local n = select('#', table.unpack(t, 1, 999000)) end",
        ("too many results",),
    ),
    "gsub_long_replacement": (
        "local s = ('x'):rep(2^16) while true do local r = s:gsub('x', ('%0'):rep(60)) end",
        ("budget", "memory"),
    ),
}


@pytest.mark.parametrize("attack", sorted(C_FUNCTIONS))
async def test_c_functions_are_bounded(start_server: Any, logs: Logs, attack: str) -> None:
    source, expected = C_FUNCTIONS[attack]
    await run_attack(start_server, logs, SETUP, source, expected)
