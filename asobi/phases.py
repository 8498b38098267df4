"""Where in its period a new match ticks: beside other matches while that keeps a pass short,
at a phase of its own when it would not.

A wake-up of the loop and a pass over the due matches cost CPU whatever the pass holds (about
35 us each on a virtual machine, `asobi.ticker`), and matches ticked back to back send their
frames in one batch.  So matches tick in groups: every match of a group has the same phase, and
one pass runs the whole group.  A group is kept to `share` of its period in match-ticks
(measured: the engine reports each pass's tick work, and a match-tick's cost is the running mean
of those).  The ticker starts a pass a little before the deadline it wakes for (`early`, 4% of
the period by default), so with the default share of 8% a group's matches tick from 4 ms before
their deadline to 4 ms after it at 10 Hz, each at the same place in every pass: frames leave on a
steady rhythm, never more than that off their time on a core with time to spare.  A new match
joins the oldest group with room, and when none has room it opens a group at the next phase of a
golden-ratio sequence on the clock's grid, which keeps groups spread over the period whenever
the matches start.  On a light core everything ticks in a few passes per period; on a loaded one
the groups are many and spread, as single matches used to be.

A match-tick's cost grows with the load (more matches, more cache misses), so groups filled at
a light load can outgrow their budget.  A match in a group past its budget by more than a
quarter moves at its tick to a group with room (or a new one): its next tick comes up to half a
period earlier or later, once.  The quarter keeps the running mean's noise from moving matches
back and forth.

Matches handed over by another node keep the phase they had there and belong to no group.
`share` 0 turns grouping off: every match gets a phase of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

_PHASE_STEP = 0.6180339887498949  # golden ratio: spreads phases evenly over a period
# What a match-tick is taken to cost before a pass has been measured: on the low side, because a
# group that turns out too full sheds matches, and one too empty is not filled up later.
FIRST_COST_S = 0.00002
# Weight of each pass in the running mean of a match-tick's cost.
COST_WEIGHT = 0.05
# A group moves its matches out once it holds this much more than its budget.
MOVE_ABOVE = 1.25


@dataclass(slots=True, eq=False)
class Group:
    """Matches of one tick period that tick at one phase (a fraction of it) in one pass."""

    period: float
    phase: float
    members: int = 0


class Phases:
    """Groups of matches per tick period, and the running cost of a match-tick."""

    __slots__ = ("_group_of", "_groups", "_next", "cost", "share")

    def __init__(self, share: float) -> None:
        self.share = share
        self.cost = FIRST_COST_S
        self._next = 0.0
        self._groups: dict[float, list[Group]] = {}  # period -> groups, oldest first
        self._group_of: dict[str, Group] = {}  # match id -> its group

    def room(self, period: float) -> int:
        """How many matches a group of `period` holds at the measured cost of a match-tick."""
        return max(1, int(self.share * period / self.cost)) if self.cost > 0.0 else 1 << 30

    def _new_phase(self) -> float:
        self._next = (self._next + _PHASE_STEP) % 1.0
        return self._next

    def place(self, match_id: str, period: float) -> float:
        """The phase (a fraction of `period`) of a new match's ticks, and its group joined."""
        if self.share <= 0.0:
            return self._new_phase()
        groups = self._groups.setdefault(period, [])
        room = self.room(period)
        for group in groups:
            if group.members < room:
                break
        else:
            group = Group(period, self._new_phase())
            groups.append(group)
        group.members += 1
        self._group_of[match_id] = group
        return group.phase

    def release(self, match_id: str) -> None:
        """The match left this node (finished or handed over): its place is free."""
        group = self._group_of.pop(match_id, None)
        if group is None:
            return
        group.members -= 1
        if group.members == 0:
            groups = self._groups[group.period]
            groups.remove(group)
            if not groups:
                del self._groups[group.period]

    def moved_phase(self, match_id: str, period: float) -> float | None:
        """The phase a just-ticked match moves to, when its group has outgrown its budget (see
        the module's docstring); None when it stays."""
        group = self._group_of.get(match_id)
        if group is None or group.members <= self.room(period) * MOVE_ABOVE:
            return None
        self.release(match_id)
        return self.place(match_id, period)

    def record_pass(self, seconds: float, ticked: int) -> None:
        """A pass ran `ticked` match-ticks in `seconds`: the running cost of one follows."""
        if ticked > 0:
            self.cost += (seconds / ticked - self.cost) * COST_WEIGHT

    def groups(self, period: float) -> list[tuple[float, int]]:
        """(phase, members) of each group of `period`, oldest first (for tests and the console)."""
        return [(g.phase, g.members) for g in self._groups.get(period, [])]
