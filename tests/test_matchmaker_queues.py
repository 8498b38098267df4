"""Matchmaker queues are freed when they empty, and capped: mode names made up by clients (with a
`match.lua`, every valid name is a mode) cannot pile up and slow every later tick and add."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Client, Logs

DUEL = """
match_size = 2
function init(state) return state end
function tick(state) return state end
function get_state(state, player_id) return state end
"""


async def _add(client: Client, mode: str) -> dict[str, Any]:
    await client.send("matchmaker.add", {"mode": mode}, cid=mode)
    while True:
        frame = await client.recv()
        if frame.get("cid") == mode:
            return frame


async def test_queues_are_freed_and_capped_over_the_socket(start_server, logs: Logs) -> None:
    server = await start_server({"match.lua": DUEL}, max_queues=3, max_tickets_per_player=2)
    mm = server.app.matchmaker
    a, b, c, d = [await server.player() for _ in range(4)]
    ticket_a = (await _add(a, "one"))["payload"]["ticket_id"]
    assert (await _add(a, "two"))["type"] == "matchmaker.queued"
    over = await _add(a, "three")
    assert over["payload"]["code"] == "too_many_tickets", over
    assert (await _add(b, "three"))["type"] == "matchmaker.queued"
    assert mm.live_queues() == 3
    full = await _add(c, "four")
    assert full["payload"]["code"] == "matchmaker_full", full
    assert "try a mode others are queued for" in full["payload"]["message"]
    await logs.wait_for("matchmaker_queues_full", lambda e: e["mode"] == "four")
    # Joining a mode that has a queue is always possible: it makes no new queue.
    matched = await _add(c, "three")
    assert matched["type"] == "matchmaker.queued"
    await c.expect("matchmaker.matched")
    assert mm.live_queues() == 2  # "three" matched and emptied: freed
    # A removed ticket frees its queue, and the slot is usable again.
    await a.send("matchmaker.remove", {"ticket_id": ticket_a})
    await a.expect("matchmaker.removed")
    assert mm.live_queues() == 1
    assert (await _add(d, "four"))["type"] == "matchmaker.queued"
    assert (await _add(d, "five"))["type"] == "matchmaker.queued"
    assert mm.live_queues() == 3
    # Closing a connection frees its queues too.
    await d.close()
    await logs.wait_for("session_closed", lambda e: e["player_id"] == d.player_id)
    assert mm.live_queues() == 1 and len(mm) == 1


async def test_ten_thousand_made_up_modes_leave_nothing_behind(start_server) -> None:
    """Drive the server's own matchmaker with 10,000 distinct names (over the socket this takes
    minutes at the per-connection rate limit): queued and removed, expired, or matched, every
    queue is gone afterwards, and a tick's matchmaking pass costs what it cost before."""
    server = await start_server({"match.lua": DUEL}, max_queues=20_000)
    mm = server.app.matchmaker

    def pass_time() -> float:
        """The cheapest of ten rounds of 100 passes: a round that another process interrupted
        measures the machine, not the matchmaker."""
        rounds = []
        for _ in range(10):
            t0 = time.perf_counter()
            for _ in range(100):
                mm.process()
                mm.expire()
            rounds.append((time.perf_counter() - t0) / 100)
        return min(rounds)

    baseline = pass_time()
    for i in range(10_000):
        mm.add("drifter", f"mode-{i}")
        mm.remove("drifter")
    for i in range(10_000):
        mm.add(f"p{i % 8}", f"gone-{i}")
        if i % 8 == 7:
            mm.expire(now=time.monotonic() + 3600)
    assert mm.live_queues() == 0 and len(mm) == 0
    after = pass_time()
    assert after < baseline * 5 + 50e-6, (baseline, after)
