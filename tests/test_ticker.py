"""The ticker on a real event loop: matches due within COALESCE_S share a wake-up, so the
wake-ups per second are bounded however many matches run, and every match keeps its rate."""

from __future__ import annotations

import asyncio
from pathlib import Path

from asobi.engine import Engine
from asobi.scripts import ScriptRegistry
from asobi.ticker import COALESCE_S, Ticker
from tests.test_engine_reload import SCRIPT, ListOutbox


async def test_many_matches_share_wake_ups_and_keep_their_rate(tmp_path: Path) -> None:
    (tmp_path / "match.lua").write_bytes((SCRIPT % b"v1").replace(b"= 10", b"= 30"))
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    engine = Engine(registry, ListOutbox())
    script = registry.get("match.lua")
    assert script is not None
    created = engine.clock()  # every first deadline is after this
    matches = [engine.start_match("duel", script, [f"p{i}"]) for i in range(300)]
    wake_ups = 0
    run_due = engine.run_due

    def counted(now: float | None = None) -> float | None:
        nonlocal wake_ups
        wake_ups += 1
        return run_due(now)

    engine.run_due = counted  # type: ignore[method-assign]
    ticker = Ticker(engine)
    started = engine.clock()
    ticker.start()
    await asyncio.sleep(1.0)
    ticker.stop()
    elapsed = engine.clock() - started
    ticks = sum(m.tick_no for m in matches)
    # 300 matches at 30 Hz with their phases spread over the period: ~9,000 match-ticks a second,
    # 0.11 ms apart, which without coalescing take thousands of wake-ups.
    assert ticks >= 300 * 30 * elapsed * 0.9 - 300, ticks
    assert wake_ups <= elapsed / COALESCE_S + 50, (wake_ups, ticks)
    assert wake_ups < ticks / 2, (wake_ups, ticks)
    # Each match keeps 30 Hz: none ran an extra tick by running early.  (Counted from before
    # the matches were made: the first ones were due while the rest were being made, and catch
    # up on the ticks due since.)
    since_created = engine.clock() - created
    assert max(m.tick_no for m in matches) <= 30 * since_created + 2
