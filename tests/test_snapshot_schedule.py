"""When matches are snapshotted: the engine driven directly, no sockets, time passed in.

Matches started together tick in step; their snapshots are still spread over the interval, and
no match ever goes longer than the interval without one.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from pathlib import Path

from asobi.engine import Engine
from asobi.journal import Snapshot
from asobi.scripts import ScriptRegistry
from asobi.snapshots import Snapshotter
from tests.test_engine_reload import SCRIPT, Clock, ListOutbox

MATCHES = 200
TICKS = 45


class Taken:
    """A journal that keeps every snapshot it is handed (the writer is not under test)."""

    def __init__(self) -> None:
        self.saved: list[Snapshot] = []

    def save(self, snapshot: Snapshot) -> None:
        self.saved.append(snapshot)

    def forget(self, match_id: str) -> None:
        pass


def _run(tmp_path: Path, every_ticks: int, off_phase_at: int = 0) -> tuple[list[Snapshot], int]:
    """Run MATCHES matches in step for TICKS ticks; at tick `off_phase_at`, every match's next
    tick takes a snapshot (as when a player joins it)."""
    (tmp_path / "match.lua").write_bytes(SCRIPT % b"v1")
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    clock = Clock()
    engine = Engine(registry, ListOutbox(), clock=clock)
    taken = Taken()
    snapshots = Snapshotter(taken, lambda pid: None, every_ticks=every_ticks)  # type: ignore[arg-type]
    engine.snapshots = snapshots
    engine.listeners.append(snapshots)
    script = registry.get("match.lua")
    assert script is not None
    matches = [engine.start_match("duel", script, [f"p{i}"]) for i in range(MATCHES)]
    for tick in range(1, TICKS + 1):
        clock.now += matches[0].period
        engine.run_due(clock.now)
        assert {m.tick_no for m in matches} == {tick}  # in step: the case to spread
        if tick == off_phase_at:
            for match in matches:
                snapshots.clear_due(match.id)
    return taken.saved, snapshots.interval(matches[0])


def _check(saved: list[Snapshot], interval: int) -> None:
    ticks: dict[str, list[int]] = {}
    for snapshot in saved:
        ticks.setdefault(snapshot.match_id, []).append(snapshot.tick)
    assert len(ticks) == MATCHES
    for taken in ticks.values():
        # Every match at its first tick, then never more than the interval apart.
        assert taken[0] == 1
        gaps = [b - a for a, b in pairwise(taken)]
        assert gaps and max(gaps) <= interval
        assert gaps[1:] == [interval] * (len(gaps) - 1)  # after the first: its own phase
        assert taken[-1] > TICKS - interval
    # Past the first tick, each tick carries about its share of the matches, not all of them.
    per_tick = Counter(s.tick for s in saved if s.tick > 1)
    assert set(per_tick) == set(range(2, TICKS + 1))
    assert max(per_tick.values()) <= 3 * MATCHES // interval


def test_matches_started_together_are_snapshotted_at_spread_ticks(tmp_path: Path) -> None:
    saved, interval = _run(tmp_path, every_ticks=0)
    assert interval == 10  # once a second at 10 Hz
    _check(saved, interval)


def test_a_configured_interval_is_spread_alike(tmp_path: Path) -> None:
    saved, interval = _run(tmp_path, every_ticks=7)
    assert interval == 7
    _check(saved, interval)


def test_a_snapshot_off_its_phase_brings_the_next_one_forward(tmp_path: Path) -> None:
    saved, interval = _run(tmp_path, every_ticks=0, off_phase_at=17)
    ticks: dict[str, list[int]] = {}
    for snapshot in saved:
        ticks.setdefault(snapshot.match_id, []).append(snapshot.tick)
    for taken in ticks.values():
        assert 18 in taken  # the tick after the seat changed
        assert max(b - a for a, b in pairwise(taken)) <= interval
        before = {t % interval for t in taken if 1 < t < 18}
        after = {t % interval for t in taken if t > 18}
        assert len(before) == 1 and after == before  # back on its own phase
