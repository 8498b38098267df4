"""The engine's schedule: matches in the order of their next tick.

A match that has ticked goes back on the schedule one period later.  Every other match of the
same period that is already on it was put there no later than one period after a deadline that
came before this one, so the match belongs behind all of them: a queue per period stays in order
by itself, and a tick costs an append and a pop.  A heap (what this replaced) orders anything,
but pays for it with a walk of log n entries per push and per pop, each a tuple comparison on a
different cache line; at hundreds of matches that was 2% of a shared-state server's CPU
(measured side by side, see docs/performance-history.md).

What breaks that order is rare, and is inserted where it belongs: a new or restored match (its
first tick is placed at a phase of its own), and a match that skipped ticks (its deadline jumped
by whole periods).  Matches of another tick rate get a queue of their own.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Scheduled(Protocol):
    deadline: float
    period: float
    finished: bool


T = TypeVar("T", bound=Scheduled)


def _deadline(entry: tuple[float, Scheduled]) -> float:
    return entry[0]


class Schedule(Generic[T]):
    """Matches by deadline, one queue per tick period.  A finished match is dropped when it
    reaches the front of its queue (finishing one does not have to find it)."""

    __slots__ = ("_queues",)

    def __init__(self) -> None:
        self._queues: dict[float, deque[tuple[float, T]]] = {}

    def add(self, item: T) -> None:
        """Put `item` on the schedule at its `deadline`."""
        deadline = item.deadline
        queue = self._queues.get(item.period)
        if queue is None:
            queue = self._queues[item.period] = deque()
        if not queue or queue[-1][0] <= deadline:
            queue.append((deadline, item))
        else:
            insort(queue, (deadline, item), key=_deadline)

    def first_deadline(self) -> float | None:
        """The earliest deadline of a match not finished, or None when there is none."""
        earliest: float | None = None
        for queue in self._queues.values():
            while queue and queue[0][1].finished:
                queue.popleft()
            if queue and (earliest is None or queue[0][0] < earliest):
                earliest = queue[0][0]
        return earliest

    def take_due(self, now: float, allowance: Callable[[float], float]) -> list[T]:
        """Remove and return, in deadline order, every match not finished whose deadline is at
        most `allowance(period)` seconds after `now` (a match may run that early)."""
        due: list[T] = []
        queues = 0
        for period, queue in self._queues.items():
            limit = now + allowance(period)
            taken = len(due)
            while queue and queue[0][0] <= limit:
                item = queue.popleft()[1]
                if not item.finished:
                    due.append(item)
            queues += len(due) > taken
        if queues > 1:
            due.sort(key=_deadline_of)
        return due

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())


def _deadline_of(item: Scheduled) -> float:
    return item.deadline
