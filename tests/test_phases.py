"""Phases of new matches (`asobi.phases`): cheap matches share a phase up to their group's budget
of a period's work, expensive ones get phases spread over the period, and a group that outgrew
its budget sheds matches to others."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from asobi.config import TICK_GROUP_SHARE, Settings
from asobi.phases import FIRST_COST_S, MOVE_ABOVE, Phases
from tests.test_engine_reload import make_engine

PERIOD = 0.1  # 10 Hz: a share of 0.08 is 8 ms of match-ticks per group


def _distinct(phases: list[float]) -> list[float]:
    return sorted(set(phases))


def test_cheap_matches_share_one_phase_until_the_group_is_full() -> None:
    phases = Phases(0.08)
    phases.cost = 0.0001  # 100 us a match-tick: 80 fit in 8 ms
    assert phases.room(PERIOD) == 80
    placed = [phases.place(f"m{i}", PERIOD) for i in range(80)]
    assert len(_distinct(placed)) == 1
    other = phases.place("m80", PERIOD)
    assert other != placed[0]
    assert phases.groups(PERIOD) == [(placed[0], 80), (other, 1)]


def test_expensive_matches_get_phases_spread_over_the_period() -> None:
    """3 ms a match-tick at 10 Hz: two per 8 ms group, so 30 matches take 15 phases, spread as
    evenly as a golden-ratio sequence spreads them."""
    phases = Phases(0.08)
    phases.cost = 0.003
    placed = [phases.place(f"m{i}", PERIOD) for i in range(30)]
    distinct = _distinct(placed)
    assert len(distinct) == 15
    assert all(members == 2 for _, members in phases.groups(PERIOD))
    gaps = [b - a for a, b in itertools.pairwise(distinct)]
    gaps.append(1.0 - distinct[-1] + distinct[0])
    assert min(gaps) >= 0.4 / 15, sorted(gaps)[:3]
    assert max(gaps) <= 2.0 / 15, sorted(gaps)[-3:]


def test_a_freed_place_is_taken_by_the_next_match_and_an_empty_group_goes() -> None:
    phases = Phases(0.08)
    phases.cost = 0.004  # two per group
    a, b, c = (phases.place(m, PERIOD) for m in ("a", "b", "c"))
    assert a == b != c
    phases.release("a")
    assert phases.place("d", PERIOD) == a  # the oldest group with room
    phases.release("c")
    assert [phase for phase, _ in phases.groups(PERIOD)] == [a]
    phases.release("never placed")  # a handed-over match: no group, nothing to free


def test_periods_have_groups_of_their_own() -> None:
    phases = Phases(0.08)
    phases.cost = 0.0001
    at_10_hz = phases.place("slow", PERIOD)
    at_30_hz = phases.place("fast", 1 / 30)
    assert at_10_hz != at_30_hz
    assert phases.groups(PERIOD) == [(at_10_hz, 1)]
    assert phases.groups(1 / 30) == [(at_30_hz, 1)]


def test_a_group_that_outgrew_its_budget_sheds_matches_and_a_full_one_keeps_them() -> None:
    phases = Phases(0.08)
    phases.cost = 0.0001  # filled at a light load: 80 in one group
    first = phases.place("m0", PERIOD)
    for i in range(1, 80):
        phases.place(f"m{i}", PERIOD)
    assert phases.moved_phase("m0", PERIOD) is None  # within its budget
    phases.cost = 0.008 / 70.5  # room 70: 80 is within the quarter above it
    assert phases.room(PERIOD) == 70
    assert phases.moved_phase("m0", PERIOD) is None
    phases.cost = 0.0004  # the load grew: 20 fit, the group holds 80
    moved = [phases.moved_phase(f"m{i}", PERIOD) for i in range(80)]
    assert moved[0] is not None and moved[0] != first
    # Matches leave until the group is back within its budget (and its quarter).
    left = sum(m is not None for m in moved)
    assert 80 - left <= 20 * MOVE_ABOVE
    assert all(members <= 20 * MOVE_ABOVE for _, members in phases.groups(PERIOD))


def test_no_share_gives_every_match_a_phase_of_its_own() -> None:
    phases = Phases(0.0)
    placed = [phases.place(f"m{i}", PERIOD) for i in range(30)]
    assert len(_distinct(placed)) == 30
    assert phases.groups(PERIOD) == []
    assert phases.moved_phase("m0", PERIOD) is None


def test_the_cost_of_a_match_tick_follows_the_passes() -> None:
    phases = Phases(0.08)
    assert phases.cost == FIRST_COST_S
    for _ in range(200):
        phases.record_pass(0.002, 20)  # 100 us each
    assert abs(phases.cost - 0.0001) < 0.000001
    phases.record_pass(0.5, 0)  # a pass with nothing to run says nothing
    assert abs(phases.cost - 0.0001) < 0.000001


# -- in the engine ---------------------------------------------------------------------------------


def test_matches_started_at_any_times_tick_together_in_their_group(tmp_path: Path) -> None:
    """Matches start when their players come; while their group has room they all tick at its
    phase (on the clock's grid), each first tick at most a period away, in one pass."""
    registry, engine, clock = make_engine(tmp_path, cap=0)
    script = registry.get("match.lua")
    assert script is not None
    starts = random.Random(7)
    matches = []
    for i in range(20):
        clock.now += starts.uniform(0.0, 0.2)
        match = engine.start_match("duel", script, [f"p{i}"])
        assert 0.0 < match.deadline - clock.now <= match.period
        matches.append(match)
    period = matches[0].period
    phases = {round(m.deadline % period, 9) for m in matches}
    assert len(phases) == 1, phases
    clock.now = max(m.deadline for m in matches)
    engine.run_due(clock.now)
    assert {m.tick_no for m in matches} == {1}


def test_a_match_of_a_group_that_outgrew_its_budget_moves_once_by_under_half_a_period(
    tmp_path: Path,
) -> None:
    registry, engine, clock = make_engine(tmp_path, cap=0)
    script = registry.get("match.lua")
    assert script is not None
    engine.phases.cost = 0.00001  # placed at a light load: all 40 in one group
    matches = [engine.start_match("duel", script, [f"p{i}"]) for i in range(40)]
    period = matches[0].period
    clock.now = matches[0].deadline
    engine.run_due(clock.now)
    assert {m.tick_no for m in matches} == {1}
    group_deadline = matches[0].deadline
    assert {m.deadline for m in matches} == {group_deadline}
    engine.phases.cost = 0.001  # the load grew: 8 fit in 8 ms
    clock.now = group_deadline
    engine.run_due(clock.now)
    assert {m.tick_no for m in matches} == {2}
    stayed = [m for m in matches if m.deadline == group_deadline + period]
    moved = [m for m in matches if m.deadline != group_deadline + period]
    assert moved and len(stayed) <= 8 * MOVE_ABOVE
    for match in moved:
        shift = match.deadline - (group_deadline + period)
        assert -period / 2 <= shift <= period / 2 and match.deadline > clock.now
    # Moved once: their new groups have room, and the next pass keeps them where they are.
    for match in sorted(matches, key=lambda m: m.deadline):
        clock.now = max(clock.now, match.deadline)
        before = match.deadline
        engine.run_due(clock.now)
        assert match.deadline == before + period


def test_the_group_share_is_a_setting() -> None:
    """ASOBI_TICK_GROUP_SHARE; out of range it is refused."""
    assert Settings.from_env({}).tick_group_share == TICK_GROUP_SHARE
    assert Settings.from_env({"ASOBI_TICK_GROUP_SHARE": "0"}).tick_group_share == 0.0
    assert Settings.from_env({"ASOBI_TICK_GROUP_SHARE": "0.2"}).tick_group_share == 0.2
    for bad in ("-0.01", "0.6"):
        with pytest.raises(ValueError, match="ASOBI_TICK_GROUP_SHARE"):
            Settings.from_env({"ASOBI_TICK_GROUP_SHARE": bad})
