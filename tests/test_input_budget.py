"""Inputs must not multiply a budget: the inputs one match handles in one tick share one
`handle_input` budget, what does not fit waits for the next tick, and a player's queue is bounded
(what overflows is dropped, counted and logged).

The attack: a client sends bursts of inputs to a match whose `handle_input` burns its whole budget
on every call.  Without a shared budget a burst of 60 inputs holds the event loop for 60 budgets,
and every other match stalls that long.  Next to it a victim match must keep its frames within
its period plus one budget plus scheduling slack.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import pytest

from asobi.lua.runtime import Limits
from tests.conftest import Logs
from tests.test_sandbox_hostile import HOSTILE, VICTIM, VictimWatch, join_hostile

# Every test runs on the C budgeted calls and on calls.lua's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("budget_machinery")

# Below the 50 ms tick period: a handler that burns its budget on every tick keeps the loop busy
# 40% of the time, not all of it (which would starve the test's own in-process clients).
LIMITS = Limits(tick=0.02, handle_input=0.02, init=0.2, join=0.05, get_state=0.01)

BURN = HOSTILE.format(attack="") + (
    "function handle_input(state, player, input) while true do end end\n"
)

# handle_input costs about 2 ms of CPU, a tenth of its budget (LIMITS.handle_input, 20 ms of wall
# time): ten fit in one tick, and each call still fits its budget when a busy machine gives the
# server a fraction of a CPU.
COUNTING = """
tick_rate = 20
function init(state) state.n = 0 state.seen = {} state.per_tick = {} return state end
function handle_input(state, player, input)
  local stop = os.clock() + 0.002
  while os.clock() < stop do end
  state.seen[#state.seen + 1] = input.i
  state.per_tick[game.tick()] = (state.per_tick[game.tick()] or 0) + 1
  return state
end
function tick(state) state.n = state.n + 1 return state end
function get_state(state)
  local most = 0
  for _, count in pairs(state.per_tick) do if count > most then most = count end end
  return { n = state.n, seen = state.seen, most_per_tick = most }
end
"""


async def start(start_server: Any, hostile: str) -> tuple[Any, VictimWatch]:
    server = await start_server({"victim.lua": VICTIM, "hostile.lua": hostile}, limits=LIMITS)
    victim = await server.player("victim")
    await victim.expect("matchmaker.matched")
    await victim.states(2)
    return server, VictimWatch(victim, server.app)


async def test_input_burst_costs_other_matches_one_budget_per_tick(
    start_server: Any, logs: Logs
) -> None:
    """Bursts of 60 inputs into a handle_input that loops until its budget is cut: the victim's
    frame gap stays within period + one handle_input budget + slack."""
    server, watch = await start(start_server, BURN)
    player, match_id = await join_hostile(server)
    for _ in range(3):
        for i in range(60):
            await player.send("match.input", {"i": i})
        await asyncio.sleep(0.5)
    # Watch on after the last burst: a stalled loop only delivers the late frame afterwards.
    await asyncio.sleep(1.0)
    await watch.stop()
    print(f"worst victim frame gap under input bursts: {watch.worst_gap() * 1000:.0f} ms")
    watch.assert_on_time(LIMITS.handle_input)
    failed = logs.events("callback_failed")
    assert any(e["match_id"] == match_id and e["callback"] == "handle_input" for e in failed)


async def test_inputs_over_the_budget_wait_for_the_next_tick(start_server: Any) -> None:
    """Thirty inputs that cost 2 ms each do not fit in one 20 ms budget: they are all handled,
    in the order sent, spread over later ticks, and none is cut for lack of budget."""
    server = await start_server({"count.lua": COUNTING}, limits=LIMITS)
    player = await server.player("count")
    await player.expect("matchmaker.matched")
    await player.states(1)
    for i in range(30):
        await player.send("match.input", {"i": i})
    deadline = time.monotonic() + 5
    state: dict[str, Any] = {}
    while time.monotonic() < deadline and len(state.get("seen", [])) < 30:
        (state,) = await player.states(1)
    assert state["seen"] == list(range(30))
    assert 1 <= state["most_per_tick"] <= 10


async def test_a_full_input_queue_drops_and_counts(start_server: Any, logs: Logs) -> None:
    """A player's queue holds at most `max_queued_inputs`; the rest is dropped, counted in
    /metrics and logged once per match per second with the count."""
    server, watch = await start(start_server, BURN)
    server.app.engine.config.max_queued_inputs = 8
    player, match_id = await join_hostile(server)
    for i in range(40):
        await player.send("match.input", {"i": i})
    line = await logs.wait_for("inputs_dropped", lambda e: e["match_id"] == match_id)
    assert line["player_id"] == player.player_id
    assert line["count"] >= 1
    await watch.stop()

    def scrape() -> str:
        with urllib.request.urlopen(server.http + "/metrics", timeout=5) as response:
            return response.read().decode()

    deadline = time.monotonic() + 5
    dropped = 0.0
    while time.monotonic() < deadline and dropped < 40 - 8 - 2:
        metrics = await asyncio.to_thread(scrape)
        (row,) = [r for r in metrics.splitlines() if r.startswith("asobi_inputs_dropped_total ")]
        dropped = float(row.split()[1])
        await asyncio.sleep(0.05)
    # 40 sent, at most 8 queued plus the one or two taken by the ticks that ran meanwhile.
    assert dropped >= 40 - 8 - 2
    assert len(logs.events("inputs_dropped")) <= 3


# The first input costs 8 ms (a machine that was busy once), every later one about 0.5 ms.
SLOW_ONCE = COUNTING.replace(
    "  local stop = os.clock() + 0.002",
    "  local stop = os.clock() + (input.i == 0 and 0.008 or 0.0005)",
)


async def test_one_slow_input_does_not_slow_the_inputs_after_it(start_server: Any) -> None:
    """The cost a match expects of its next input follows its recent calls: after one 8 ms call,
    cheap inputs go back to many per tick (with the slowest call ever seen as the estimate,
    2 x 8 ms would leave room for one input per 20 ms budget from then on)."""
    server = await start_server({"count.lua": SLOW_ONCE}, limits=LIMITS)
    player = await server.player("count")
    await player.expect("matchmaker.matched")
    await player.states(1)
    await player.send("match.input", {"i": 0})
    state: dict[str, Any] = {"seen": []}
    while not state["seen"]:
        (state,) = await player.states(1)
    for i in range(1, 41):
        await player.send("match.input", {"i": i})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(state["seen"]) < 41:
        (state,) = await player.states(1)
    assert state["seen"] == list(range(41))
    assert state["most_per_tick"] >= 4, state["most_per_tick"]
