"""Skipped ticks when the engine falls behind: counted per match, logged in aggregate.

The engine is driven directly with a clock passed in, so "the loop fell behind" is a jump of the
clock, not a loaded machine.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Logs
from tests.test_engine_reload import make_engine


async def test_a_late_pass_skips_ticks_and_logs_one_line_not_one_per_match(
    tmp_path: Path, logs: Logs
) -> None:
    registry, engine, clock = make_engine(tmp_path, cap=0)
    script = registry.get("match.lua")
    assert script is not None
    matches = [engine.start_match("duel", script, [f"p{i}"]) for i in range(40)]
    period = matches[0].period
    clock.now += period
    engine.run_due(clock.now)
    assert engine.ticks_skipped == 0 and logs.events("tick_overrun") == []

    clock.now += 5 * period  # the loop stalled for five periods
    engine.run_due(clock.now)
    # Every match ran one tick late and skipped the ones it cannot catch up on.
    assert {m.tick_no for m in matches} == {2}
    per_match = [m.ticks_skipped for m in matches]
    assert min(per_match) >= 3 and engine.ticks_skipped == sum(per_match)
    # The first overrun is logged at once, with its match; the other 39 wait for the interval.
    (first,) = logs.events("tick_overrun")
    assert first["matches"] == 1 and first["match_id"] in {m.id for m in matches}

    # The loop keeps up again; once the interval has passed, one line tells the rest.
    for _ in range(round(1.0 / period) + 1):
        clock.now += period
        engine.run_due(clock.now)
    assert engine.ticks_skipped == sum(per_match)  # no more skips since the stall
    lines = logs.events("tick_overrun")
    assert len(lines) == 2
    assert lines[1]["matches"] == len(matches) - 1
    assert first["skipped_total"] + lines[1]["skipped_total"] == engine.ticks_skipped
    assert min(per_match) <= lines[1]["longest_skip"] <= max(per_match)
