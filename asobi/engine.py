"""All running matches and the tick schedule.  No sockets, no asyncio: time is passed in.

The `Engine` keeps every match (`asobi.match`) on an absolute schedule (`deadline = first + n *
period`, so there is no drift), spreads their phases over the period, and runs whatever is due
when `run_due(now)` is called; `asobi.ticker` calls it from the event loop, tests call it directly.
Everything a match sends goes through an `Outbox`, which the server implements with WebSocket
connections and tests implement with a list.  It also seats and removes players and marks the
matches a reload concerns.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from asobi.directory import JoinRefused, Outbox
from asobi.lua.runtime import Limits, ScriptLoadError
from asobi.match import Match, MatchStartError
from asobi.match_host import first_line
from asobi.protocol import encode
from asobi.recording import Recorder
from asobi.schedule import Schedule
from asobi.scripts import ScriptRegistry, ScriptVersion
from asobi.snapshots import Snapshotter
from asobi.state_frames import SyncChoice
from asobi.store import Store

log = structlog.get_logger("asobi.engine")

_PHASE_STEP = 0.6180339887498949  # golden ratio: spreads match phases evenly over a period
# Skipped ticks are logged as one `tick_overrun` line per this many seconds, not one per late
# match: an overloaded loop would otherwise spend its scarce time writing warnings.
OVERRUN_LOG_INTERVAL_S = 1.0


class EngineListener(Protocol):
    def match_finished(self, match: Match, result: Any) -> None: ...

    def reload_resolved(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None: ...


@dataclass(slots=True)
class EngineConfig:
    limits: Limits = field(default_factory=Limits)
    max_consecutive_failures: int = 10
    log_lines_per_second: float = 20.0
    # Seed every match's random generator with this value instead of a fresh one (replays).
    match_seed: int | None = None
    # Inputs one player may have waiting in their match; more are dropped (and counted).
    max_queued_inputs: int = 64
    # Reload transactions one `run_due` pass runs at most (0: no cap); see `run_due`.
    reload_switches_per_tick: int = 16


class Engine:
    """All running matches and their schedule."""

    def __init__(
        self,
        registry: ScriptRegistry,
        outbox: Outbox,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.outbox = outbox
        self.config = config or EngineConfig()
        self.clock = clock
        # Put in front of every new match id: a cluster node's id, so any node can tell from a
        # match id alone which node started it.
        self.match_id_prefix = ""
        self.matches: dict[str, Match] = {}
        self.player_match: dict[str, str] = {}
        self.listeners: list[EngineListener] = []
        self._schedule: Schedule[Match] = Schedule()
        self._phase = 0.0
        self.ticks = 0
        self.inputs_dropped = 0
        # Ticks not run because their match fell more than a period behind (counted, not queued).
        self.ticks_skipped = 0
        self._overruns = _OverrunLog()
        # Match ticks that ran on the old code because the pass had run its reload switches.
        self.reload_switches_deferred = 0
        # Matches whose Lua call ran far past its budget (added by the watchdog's thread); each
        # is ended at its next tick.
        self.wedged: set[str] = set()
        self.lateness: deque[float] = deque(maxlen=65536)
        self.on_schedule_change: Callable[[float], None] | None = None
        # Players who asked for `match.reloaded` frames (session.connect {notify_reload: true}).
        self.reload_subscribers: set[str] = set()
        # Players whose connection chose their state frames (`match.patch` or full `match.state`
        # only, JSON or compact); the others get what their match's script says, in JSON.
        self.state_sync: dict[str, SyncChoice | bool] = {}
        # match id -> inputs received so far (the console's inputs/s).
        self.inputs_received: dict[str, int] = {}
        # Persistence for game.economy / leaderboard / storage (set by the app; None: refused).
        self.store: Store | None = None
        # Takes matches' snapshots for the journal (`asobi.snapshots`; None: no journal).
        self.snapshots: Snapshotter | None = None
        # Restored matches' players -> the `match.restored` frame their next resync sends.
        self.restored_notices: dict[str, bytes] = {}
        # Records started matches for `asobi replay` (`asobi.recording`; None: ASOBI_RECORD off).
        self.recorder: Recorder | None = None

    # -- matches ----------------------------------------------------------------------------------
    def start_match(self, mode: str, script: ScriptVersion, players: list[str]) -> Match:
        """Start a match on this node, on the event loop.

        A start runs Lua under budgets: the script's top level (`load`, and the save's measured
        `load_ms` says how long it takes), `init`, and one `join` per player.  A match cannot
        start on a worker thread, because its callbacks reach the store and the outbox, which
        belong to the loop.  What bounds one turn of the loop is that a start happens only when
        a matchmaking ticket completes a group (one start per ticket at most) or a backfill
        join, each within those budgets.
        """
        match_id = self.match_id_prefix + uuid.uuid4().hex
        try:
            match = Match(self, match_id, mode, script, players)
            refused = match.start()
        except (ScriptLoadError, MatchStartError) as exc:
            log.error(
                "match_start_failed",
                match_id=match_id,
                mode=mode,
                script=script.name,
                error=first_line(str(exc)),
            )
            raise MatchStartError(first_line(str(exc))) from exc
        self.adopt(match)
        if self.recorder is not None:
            self.recorder.attach(match)
        log.info(
            "match_started",
            match_id=match_id,
            mode=mode,
            script=script.name,
            version=script.version,
            players=match.players,
            seed=match.seed,
            tick_rate=script.meta.tick_rate,
            refused=refused,
        )
        return match

    def adopt(self, match: Match, first_tick_in: float | None = None) -> None:
        """Put a started (or restored) match on the schedule, at its own phase; or, for a match
        handed over by another node, `first_tick_in` seconds from now, when its next tick was
        due there (its players then see no longer a pause than the hand-over took)."""
        self.matches[match.id] = match
        for pid in match.players:
            self.player_match[pid] = match.id
        now = self.clock()
        if first_tick_in is None:
            match.deadline = now + self._first_delay(now, match.period)
        else:
            match.deadline = now + max(0.0, min(first_tick_in, match.period))
        self._push(match)

    def _first_delay(self, now: float, period: float) -> float:
        """How long until a new match's first tick (more than 0, at most a period): at the next
        phase of a golden-ratio sequence on the clock's own grid (the deadline modulo the
        period).

        Phases taken on the clock's grid stay spread however the matches' starts fall; taken
        from each start they are as random as the starts (players come when they come), and
        matches whose ticks meet wait for each other: a 2 ms match-tick queued behind two others
        is 4 ms late at any load."""
        self._phase = (self._phase + _PHASE_STEP) % 1.0
        delay = (self._phase * period - now) % period
        return delay if delay > 0.0 else period

    def due_in(self, match: Match) -> float:
        """Seconds until the match's next tick is due (0 when late)."""
        return max(0.0, match.deadline - self.clock())

    def match_of(self, player_id: str) -> Match | None:
        match_id = self.player_match.get(player_id)
        return self.matches.get(match_id) if match_id else None

    def submit_input(self, player_id: str, payload: Any) -> bool:
        match = self.match_of(player_id)
        if match is None:
            return False
        match.queue_input(player_id, payload)
        self.inputs_received[match.id] = self.inputs_received.get(match.id, 0) + 1
        return True

    def resync(self, player_id: str) -> bool:
        """The player's next state frame is a full one; False when not in a match."""
        match = self.match_of(player_id)
        if match is None:
            return False
        match.resync(player_id)
        if self.restored_notices:
            notice = self.restored_notices.pop(player_id, None)
            if notice is not None:
                self.outbox.send(player_id, notice)
        return True

    def list_matches(self, mode: str | None = None, limit: int = 100) -> list[Match]:
        """Running matches, oldest first, optionally of one mode."""
        out = []
        for match in self.matches.values():
            if not match.finished and (mode is None or match.mode == mode):
                out.append(match)
                if len(out) >= limit:
                    break
        return out

    def join_match(self, player_id: str, match_id: str) -> Match:
        """Backfill: seat the player in a running match with room (`join` may refuse)."""
        if self.match_of(player_id) is not None:
            raise JoinRefused("in_match", "leave your current match first")
        match = self.matches.get(match_id)
        if match is None or match.finished:
            raise JoinRefused("not_found", "no running match with this id")
        if len(match.players) >= match.script.meta.max_players:
            raise JoinRefused("full", "match is full")
        reason = match.join(player_id)
        if reason is not None:
            raise JoinRefused("refused", reason)
        self.player_match[player_id] = match.id
        if self.snapshots is not None:
            self.snapshots.clear_due(match.id)  # the journal gets the new seat
        log.info("player_joined", match_id=match.id, player_id=player_id)
        return match

    def remove_player(self, player_id: str) -> Match | None:
        """The player leaves their match (`leave` runs); an empty match ends."""
        match = self.match_of(player_id)
        if match is None:
            return None
        self.player_match.pop(player_id, None)
        if self.restored_notices:
            self.restored_notices.pop(player_id, None)
        match.leave(player_id)
        log.info("player_left", match_id=match.id, player_id=player_id)
        if not match.players and not match.finished:
            self.finish(match, {"reason": "empty"}, notify=False)
        return match

    def finish(self, match: Match, result: Any, *, notify: bool = True) -> None:
        if match.finished:
            return
        frame = encode("match.finished", {"match_id": match.id, "result": result})
        if notify:
            for pid in match.players:
                self.outbox.send(pid, frame)
        self._unlink(match)
        match.close()
        log.info(
            "match_finished",
            match_id=match.id,
            mode=match.mode,
            ticks=match.tick_no,
            result=result,
            logs_dropped=match.logs_dropped,
        )
        for listener in self.listeners:
            listener.match_finished(match, result)

    def release(self, match: Match) -> None:
        """Take a match off this engine without ending it: it was handed to another node (no
        `match_finished`, so its snapshot stays in the journal for the taker)."""
        self._unlink(match)
        if self.snapshots is not None:
            self.snapshots.clear_due(match.id)
        match.finished = True  # the schedule skips it from now on

    def _unlink(self, match: Match) -> None:
        for pid in match.players:
            if self.player_match.get(pid) == match.id:
                del self.player_match[pid]
            self.restored_notices.pop(pid, None)
        self.matches.pop(match.id, None)
        self.inputs_received.pop(match.id, None)

    # -- reload -----------------------------------------------------------------------------------
    def schedule_reload(self, version: ScriptVersion) -> list[Match]:
        """Mark every match running `version.name` (or depending on it) to switch next tick."""
        affected = []
        for match in self.matches.values():
            if match.script.name == version.name:
                match.pending = version
                affected.append(match)
            elif match.script.meta.reload_dependents and version.name in match.required:
                current = self.registry.get(match.script.name)
                if current is not None:
                    match.pending = current
                    affected.append(match)
        return affected

    # -- what a match asks of the engine (`asobi.match_services.MatchServices`) --------------
    def reload_resolved(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None:
        for listener in self.listeners:
            listener.reload_resolved(match, version, outcome, error, elapsed_ms)

    def module_source(self, name: bytes) -> tuple[bytes | None, bytes]:
        return self.registry.module_source(name)

    def input_dropped(self, match: Match) -> None:
        self.inputs_dropped += 1

    # -- schedule ---------------------------------------------------------------------------------
    def _push(self, match: Match) -> None:
        first = self._schedule.first_deadline()
        self._schedule.add(match)
        if self.on_schedule_change is not None and (first is None or match.deadline < first):
            self.on_schedule_change(match.deadline)

    def next_deadline(self) -> float | None:
        return self._schedule.first_deadline()

    def run_due(
        self, now: float | None = None, early_share: float = 0.0, early_floor: float = 0.0
    ) -> float | None:
        """Tick every match whose deadline has passed, or is at most `early_share` of its
        period (and at least `early_floor` seconds) away; return the next deadline.  The ticker
        runs matches a little early so that those due within a few milliseconds share one
        wake-up of the loop (`asobi.ticker`); tests leave both at 0 and tick what is due.

        A reload marks every match it concerns at once, and each switch is a transaction
        (load, copy, migrate, tick, get_state) far dearer than a tick.  At most
        `reload_switches_per_tick` of them run in one pass; a marked match past the cap runs
        this tick on its code in force and stays marked, so it switches at a later tick.  The
        matches due in one pass are those whose deadline passed since the last: few when the
        loop keeps up, many when it is busy; the cap bounds what one turn of the loop can cost,
        and spreads a reload over more ticks exactly when the loop is behind.
        """
        now = self.clock() if now is None else now
        due = self._schedule.take_due(now, lambda period: max(early_floor, early_share * period))
        cap = self.config.reload_switches_per_tick
        switches = 0
        for match in due:
            may_switch = cap <= 0 or switches < cap
            if match.pending is not None:
                if may_switch:
                    switches += 1
                else:
                    self.reload_switches_deferred += 1
            self._tick_one(match, may_switch)
        self._overruns.flush_due(now)
        return self.next_deadline()

    def _tick_one(self, match: Match, may_switch: bool = True) -> None:
        late = self.clock() - match.deadline
        # A match run early to share a wake-up (`asobi.ticker`) is not late.
        self.lateness.append(late if late > 0.0 else 0.0)
        host = match.host
        host.ticking = True  # its units of work are keyed by tick (exactly-once after a restore)
        try:
            match.run_tick(may_switch=may_switch)
        except Exception:
            log.exception("match_crashed", match_id=match.id, mode=match.mode, tick=match.tick_no)
            self.finish(match, {"error": "internal error"})
        if match.recorder is not None:
            match.recorder.ticked(match.tick_no)
        host.ticking = False
        self.ticks += 1
        if self.wedged and match.id in self.wedged:
            self.wedged.discard(match.id)
            self.finish(match, {"error": "a script call ran far past its time budget"})
        if match.finished:
            return
        snapshots = self.snapshots
        if snapshots is not None and match.tick_no >= snapshots.due.get(match.id, 0):
            snapshots.take(match)
        match.deadline += match.period
        now = self.clock()
        if match.deadline < now - match.period:
            skipped = int((now - match.deadline) / match.period)
            match.deadline += skipped * match.period
            match.ticks_skipped += skipped
            self.ticks_skipped += skipped
            self._overruns.add(match.id, skipped, now)
        self._schedule.add(match)

    def drain_lateness(self) -> list[float]:
        values = list(self.lateness)
        self.lateness.clear()
        return values


class _OverrunLog:
    """Skipped ticks, gathered into at most one `tick_overrun` line per OVERRUN_LOG_INTERVAL_S.

    The first overrun after a quiet interval is logged at once (a lone runaway match shows with
    its id straight away); the ones after it wait for the interval and go out as one line: the
    match that skipped most and how many, how many matches skipped and how many ticks in all,
    and the longest single skip (one long stall, or many short ones).
    """

    __slots__ = ("_logged_at", "_longest", "_skipped")

    def __init__(self) -> None:
        self._logged_at = -OVERRUN_LOG_INTERVAL_S
        self._skipped: dict[str, int] = {}
        self._longest = 0

    def add(self, match_id: str, skipped: int, now: float) -> None:
        self._skipped[match_id] = self._skipped.get(match_id, 0) + skipped
        self._longest = max(self._longest, skipped)
        self.flush_due(now)

    def flush_due(self, now: float) -> None:
        if not self._skipped or now - self._logged_at < OVERRUN_LOG_INTERVAL_S:
            return
        self._logged_at = now
        skipped = self._skipped
        worst = max(skipped, key=skipped.__getitem__)
        log.warning(
            "tick_overrun",
            match_id=worst,
            skipped=skipped[worst],
            matches=len(skipped),
            skipped_total=sum(skipped.values()),
            longest_skip=self._longest,
        )
        skipped.clear()
        self._longest = 0
