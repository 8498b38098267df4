"""The engine's schedule (`asobi.schedule`) against the plain definition: every match due by
`now` (plus its allowance), in deadline order, and nothing else; finished matches never."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from asobi.schedule import Schedule


@dataclass(eq=False)
class Item:
    deadline: float
    period: float
    finished: bool = False


PERIODS = (0.1, 0.05, 1 / 30)


def _reference(items: list[Item], now: float, share: float) -> list[Item]:
    return sorted(
        (i for i in items if not i.finished and i.deadline <= now + share * i.period),
        key=lambda i: i.deadline,
    )


@settings(max_examples=200, deadline=None)
@given(
    starts=st.lists(
        st.tuples(st.floats(0.0, 1.0), st.sampled_from(PERIODS)), min_size=1, max_size=40
    ),
    steps=st.lists(
        st.tuples(
            st.floats(0.0, 0.3),  # how far the clock moves
            st.booleans(),  # whether a tick stalls long enough to skip periods
            st.integers(0, 39),  # a match to finish (if it exists)
        ),
        max_size=30,
    ),
    share=st.sampled_from((0.0, 0.04, 0.25)),
)
def test_ticking_matches_come_due_in_deadline_order(
    starts: list[tuple[float, float]], steps: list[tuple[float, bool, int]], share: float
) -> None:
    """Run a ticking engine's schedule: what is due comes out exactly as a sorted list would
    give it, after re-scheduling one period on, skips of whole periods, new matches and
    finished ones."""
    schedule: Schedule[Item] = Schedule()
    live: list[Item] = []
    for deadline, period in starts:
        item = Item(deadline, period)
        live.append(item)
        schedule.add(item)
    now = 0.0
    for advance, stall, finish in steps:
        now += advance
        if finish < len(live):
            live[finish].finished = True
        expected = _reference(live, now, share)
        due = schedule.take_due(now, lambda period: share * period)
        # Matches due at the same moment may come in either order.
        assert [i.deadline for i in due] == [i.deadline for i in expected]
        assert {id(i) for i in due} == {id(i) for i in expected}
        for item in due:
            item.deadline += item.period
            if stall and item.deadline < now - item.period:
                item.deadline += int((now - item.deadline) / item.period) * item.period
            schedule.add(item)
        # A new match at a phase of its own, anywhere within a period.
        newcomer = Item(now + advance / 2, PERIODS[int(advance * 100) % len(PERIODS)])
        live.append(newcomer)
        schedule.add(newcomer)
        unfinished = [i.deadline for i in live if not i.finished]
        assert schedule.first_deadline() == (min(unfinished) if unfinished else None)


def test_a_match_out_of_order_is_placed_where_it_belongs() -> None:
    schedule: Schedule[Item] = Schedule()
    late, early, middle = Item(3.0, 0.1), Item(1.0, 0.1), Item(2.0, 0.1)
    for item in (late, early, middle):
        schedule.add(item)
    assert schedule.first_deadline() == 1.0
    assert schedule.take_due(10.0, lambda period: 0.0) == [early, middle, late]
    assert schedule.first_deadline() is None
    assert len(schedule) == 0
