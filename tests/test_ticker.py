"""The ticker on a real event loop: matches due within EARLY_SHARE of their period share a
wake-up, so the wake-ups per second are bounded however many matches run, and every match keeps
its rate."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path

import pytest

from asobi.config import Settings
from asobi.engine import Engine
from asobi.scripts import ScriptRegistry, ScriptVersion
from asobi.ticker import COALESCE_S, EARLY_SHARE, OVERDUE_S, Ticker
from tests.test_engine_reload import SCRIPT, ListOutbox, make_engine


def _engine_on_loop_time(tmp_path: Path, source: bytes) -> tuple[Engine, ScriptVersion]:
    """An engine on the running loop's clock (as the server sets it) and its one script."""
    (tmp_path / "match.lua").write_bytes(source)
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    engine = Engine(registry, ListOutbox())
    engine.clock = asyncio.get_running_loop().time
    script = registry.get("match.lua")
    assert script is not None
    return engine, script


async def test_many_matches_share_wake_ups_and_keep_their_rate(tmp_path: Path) -> None:
    engine, script = _engine_on_loop_time(tmp_path, (SCRIPT % b"v1").replace(b"= 10", b"= 30"))
    created = engine.clock()  # every first deadline is after this
    matches = [engine.start_match("duel", script, [f"p{i}"]) for i in range(300)]
    wake_ups = 0
    run_due = engine.run_due

    def counted(*args: float) -> float | None:
        nonlocal wake_ups
        wake_ups += 1
        return run_due(*args)

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
    window = max(COALESCE_S, EARLY_SHARE / 30)
    assert wake_ups <= elapsed / window + 50, (wake_ups, ticks)
    assert wake_ups < ticks / 2, (wake_ups, ticks)
    # Each match keeps 30 Hz: none ran an extra tick by running early.  (Counted from before
    # the matches were made: the first ones were due while the rest were being made, and catch
    # up on the ticks due since.)
    since_created = engine.clock() - created
    assert max(m.tick_no for m in matches) <= 30 * since_created + 2


def test_a_pass_runs_a_match_at_most_its_share_of_a_period_early(tmp_path: Path) -> None:
    """`run_due(now, EARLY_SHARE, COALESCE_S)` at 10 Hz: 4 ms early runs the tick, 5 ms early
    does not; the schedule does not move (the next deadline is one period after this one) and an
    early tick is not late."""
    registry, engine, clock = make_engine(tmp_path, cap=0)
    script = registry.get("match.lua")
    assert script is not None
    match = engine.start_match("duel", script, ["p1"])
    period = match.period
    assert period == 0.1
    deadline = match.deadline
    clock.now = deadline - 0.005
    engine.run_due(clock.now, EARLY_SHARE, COALESCE_S)
    assert match.tick_no == 0
    clock.now = deadline - 0.0035
    engine.run_due(clock.now, EARLY_SHARE, COALESCE_S)
    assert match.tick_no == 1
    assert match.deadline == deadline + period
    assert engine.drain_lateness() == [0.0]
    # Without a share (as tests drive the engine), only what is due runs.
    clock.now = match.deadline - 0.0005
    engine.run_due(clock.now)
    assert match.tick_no == 1


def test_the_early_share_is_a_setting(tmp_path: Path) -> None:
    """ASOBI_TICK_EARLY_SHARE reaches the ticker's passes; out of range it is refused."""
    assert Settings.from_env({}).tick_early_share == EARLY_SHARE
    assert Settings.from_env({"ASOBI_TICK_EARLY_SHARE": "0.08"}).tick_early_share == 0.08
    for bad in ("-0.01", "0.3"):
        with pytest.raises(ValueError, match="ASOBI_TICK_EARLY_SHARE"):
            Settings.from_env({"ASOBI_TICK_EARLY_SHARE": bad})
    _, engine, clock = make_engine(tmp_path, cap=0)
    seen: list[tuple[float, ...]] = []
    engine.run_due = lambda *args: seen.append(args)  # type: ignore[method-assign,assignment]
    loop = asyncio.new_event_loop()
    try:
        ticker = Ticker(engine, loop, early_share=0.08)
        ticker._run()
    finally:
        loop.close()
    assert seen == [(clock.now, 0.08, COALESCE_S)]


def test_matches_started_at_any_times_tick_at_phases_spread_over_the_period(
    tmp_path: Path,
) -> None:
    """Matches start when their players come, at any times; their ticks still fall at phases
    spread over the period (the deadline modulo the period, on the clock's grid), so heavy
    match-ticks do not queue behind each other while the core has time between them.  Every
    first tick is at most a period away."""
    registry, engine, clock = make_engine(tmp_path, cap=10)
    script = registry.get("match.lua")
    assert script is not None
    starts = random.Random(7)
    count = 30
    phases = []
    for i in range(count):
        clock.now += starts.uniform(0.0, 0.2)
        match = engine.start_match("duel", script, [f"p{i}"])
        delay = match.deadline - clock.now
        assert 0.0 < delay <= match.period, delay
        phases.append(match.deadline % match.period / match.period)
    phases.sort()
    gaps = [b - a for a, b in itertools.pairwise(phases)]
    gaps.append(1.0 - phases[-1] + phases[0])
    # Evenly spaced would be 1/30 each; random starts give gaps near 0 and several times 1/30.
    assert min(gaps) >= 0.4 / count, sorted(gaps)[:3]
    assert max(gaps) <= 2.0 / count, sorted(gaps)[-3:]


async def test_a_pass_that_falls_due_during_a_burst_of_reads_runs_between_its_messages(
    tmp_path: Path,
) -> None:
    """The loop runs every ready reader before a timer that fell due meanwhile, so a burst of
    inputs from many connections would hold back every match due during it.  The server calls
    `run_overdue` after each message: the pass runs once it is OVERDUE_S late, inside the burst;
    before that it does not run early from there."""
    engine, script = _engine_on_loop_time(tmp_path, SCRIPT % b"v1")
    loop = asyncio.get_running_loop()
    match = engine.start_match("duel", script, ["p1"])
    ticker = Ticker(engine)
    ticker.start()
    due = match.deadline
    ran_at: float | None = None

    def burst() -> None:
        """One reader's callback, busy until 50 ms past the deadline, message after message."""
        nonlocal ran_at
        while loop.time() < due + 0.05:
            time.sleep(0.0005)  # one message's work
            now = loop.time()
            ticker.run_overdue(now)
            if now < due + OVERDUE_S:
                assert match.tick_no == 0  # not run before it is overdue
            elif match.tick_no and ran_at is None:
                ran_at = loop.time()

    loop.call_at(due - 0.01, burst)
    await asyncio.sleep(max(0.0, due - loop.time()) + 0.1)
    ticker.stop()
    assert ran_at is not None, "the pass waited for the burst to end"
    assert ran_at - due < OVERDUE_S + 0.005, ran_at - due
    assert match.tick_no >= 1
