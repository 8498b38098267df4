"""When a match is snapshotted, and taking the snapshot: the engine's side of the journal.

The engine asks after every tick whether the match is due (`due`, one dict lookup) and calls
`take` when it is: every `ASOBI_SNAPSHOT_TICKS` ticks (default: once a second at the match's
tick rate), at the first tick of a match, and at the tick a reload switched it.  Taking one is
Lua work (the state written as data, `MatchLua.pack_state`) and so happens here, on the loop, at
a tick boundary; writing it is the journal's writer task (`asobi.journal`), off the tick path.

Each match keeps to a phase of its own within the interval (from its id): matches that tick
in step (made by one matchmaking round, restored by one restart) would otherwise all be
snapshotted at the same tick number, so within the same tick period, and the loop would carry
a second's worth of snapshots in that one period every second.  After a snapshot off its phase
(the first, a reload's, a new seat's) the next one comes sooner, at the phase: no two snapshots
of a match are further apart than the interval.

A state the copy refuses (it holds a function, a coroutine, a table with a metatable) makes the
match *not restorable*: `snapshot_refused` is logged once with the path, the older snapshot is
dropped (it would restore a state far behind), and the match plays on.  Once its state can be
copied again, `snapshot_restorable` says so and snapshots resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from asobi.journal import Journal, Snapshot
from asobi.match_host import first_line

if TYPE_CHECKING:
    from asobi.engine import Engine
    from asobi.match import Match
    from asobi.scripts import ScriptVersion

log = structlog.get_logger("asobi.snapshots")


class Snapshotter:
    """Takes matches' snapshots at tick boundaries and hands them to the journal."""

    def __init__(
        self,
        journal: Journal,
        resume_token: Callable[[str], str | None],
        *,
        every_ticks: int = 0,
    ) -> None:
        """`resume_token(player_id)`: the player's current resume token (kept with the seat, so
        a player reconnecting after a restart takes it back).  `every_ticks` 0: once a second."""
        self.journal = journal
        self.resume_token = resume_token
        self.every_ticks = every_ticks
        # match id -> the tick at or after which its next snapshot is taken (absent: now).
        self.due: dict[str, int] = {}
        self.refused: set[str] = set()
        self.taken = 0
        self.bytes = 0
        self.seconds = 0.0

    def interval(self, match: Match) -> int:
        if self.every_ticks > 0:
            return self.every_ticks
        return max(1, round(match.script.meta.tick_rate))

    def next_due(self, match: Match) -> int:
        """The first tick after this one in the match's phase (see the module's docstring)."""
        interval = self.interval(match)
        tick = match.tick_no
        phase = hash(match.id) % interval  # a str caches its hash: free after the first time
        return tick + interval - (tick + phase) % interval

    def clear_due(self, match_id: str) -> None:
        """Forget when the match is next due: its next tick here, if any, takes a snapshot (its
        seats changed, or it was handed to another node)."""
        self.due.pop(match_id, None)

    def take(self, match: Match) -> Snapshot | None:
        """Snapshot `match` now (a tick boundary) and queue it; None when its state cannot be
        copied.  Never raises into the engine."""
        started = time.perf_counter()
        self.due[match.id] = self.next_due(match)
        try:
            snapshot = self._snapshot(match)
        except Exception:
            log.exception("snapshot_failed", match_id=match.id, tick=match.tick_no)
            return None
        finally:
            self.seconds += time.perf_counter() - started
        if snapshot is not None:
            self.journal.save(snapshot)
            self.taken += 1
            self.bytes += len(snapshot.state)
        return snapshot

    def _snapshot(self, match: Match) -> Snapshot | None:
        lua = match.lua
        packed = lua.pack_state(match.state)
        if not packed.ok:
            if match.id not in self.refused:
                self.refused.add(match.id)
                self.journal.forget(match.id)
                log.warning(
                    "snapshot_refused",
                    match_id=match.id,
                    mode=match.mode,
                    tick=match.tick_no,
                    error=first_line(packed.error),
                    hint="the match runs on but cannot be restored after a restart; keep "
                    "functions in locals or modules, not in the state",
                )
            return None
        if match.id in self.refused:
            self.refused.discard(match.id)
            log.info("snapshot_restorable", match_id=match.id, tick=match.tick_no)
        script = match.script
        token = self.resume_token
        return Snapshot(
            match_id=match.id,
            mode=match.mode,
            script=script.name,
            script_hash=script.hash,
            script_version=script.version,
            tick=match.tick_no,
            seed=match.seed,
            random=packed.values[1],
            seats=tuple([(pid, token(pid)) for pid in match.players]),
            state=packed.values[0],
            saved_at_ms=int(time.time() * 1000),
        )

    def take_all(self, engine: Engine) -> int:
        """Snapshot every running match (a clean stop: a restart then loses no tick)."""
        count = 0
        for match in list(engine.matches.values()):
            if not match.finished and self.take(match) is not None:
                count += 1
        return count

    # -- the engine's listener ---------------------------------------------------------------------
    def match_finished(self, match: Match, result: Any) -> None:
        self.due.pop(match.id, None)
        self.refused.discard(match.id)
        self.journal.forget(match.id)

    def reload_resolved(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None:
        if outcome == "reloaded":
            # The engine asks right after this tick: the journal then holds the new version.
            self.due[match.id] = 0
