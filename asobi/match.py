"""One match: its sandboxed Lua state, its players, one tick, and the reload transaction.

A `Match` owns one Lua state and the match state table inside it.  `run_tick` feeds the inputs
that arrived since the last tick to `handle_input`, runs `tick`, renders `get_state` for every
player and hands the frames to the engine's `Outbox`.  Side effects of a callback (frames from
`game.send` / `game.broadcast`, persistence writes) are held until the callback succeeds.

Hot reload happens here, at a tick boundary, as a transaction: the new code is loaded into a fresh
Lua state, the state is copied across as plain data, `migrate`, the tick and `get_state` run on the
copy with their side effects held, and only if all of that succeeds does the match switch.
Otherwise the copy is dropped and the old code runs the same tick, so no tick is skipped or
repeated.  Nothing here does I/O: time and scheduling belong to whoever runs
the match (`MatchServices`, which `asobi.engine` implements).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Set
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from asobi.lua.convert import ConversionError, to_python
from asobi.lua.outcomes import CallResult, EachResult
from asobi.lua.runtime import MatchLua, ScriptLoadError
from asobi.match_host import Effects, MatchHost, first_line, lua_kind, short_error
from asobi.match_inputs import run_inputs
from asobi.match_services import MatchServices
from asobi.protocol import encode, encode_raw_payload
from asobi.scripts import ScriptMeta, ScriptVersion
from asobi.state_frames import NOBODY, UNPARSED, StateFrames

if TYPE_CHECKING:
    from asobi.recording import MatchRecording

log = structlog.get_logger("asobi.match")

FAILURE_LINES_PER_TICK = 3
DROP_LOG_INTERVAL_S = 1.0


class MatchStartError(Exception):
    """`init` (or the script's top level) failed; the match never started."""


class Match:
    """One running match: its Lua state, players, schedule and pending reload."""

    def __init__(
        self,
        services: MatchServices,
        match_id: str,
        mode: str,
        script: ScriptVersion,
        players: list[str],
    ) -> None:
        self.services = services
        self.id = match_id
        self.mode = mode
        self.script = script
        self.players: list[str] = []
        seed = services.config.match_seed
        self.seed = random.getrandbits(48) if seed is None else seed
        self.period = 1.0 / script.meta.tick_rate
        self.tick_no = 0
        # Ticks the engine skipped because this match fell more than a period behind.
        self.ticks_skipped = 0
        self.deadline = 0.0
        self.failures = 0
        self.finished = False
        self.pending: ScriptVersion | None = None
        # Inputs not handled yet, oldest first, and how many of them each player has queued.
        self.inputs: deque[tuple[str, Any]] = deque()
        self.queued: dict[str, int] = {}
        self.inputs_dropped = 0
        # The longest a handle_input call has taken (seconds), by the running code.
        self.input_cost = 0.0
        self._drops_unlogged: dict[str, int] = {}
        self._drop_logged_at = -DROP_LOG_INTERVAL_S
        self.required: set[str] = set()
        self.effects = Effects()
        # Committed frames of init/join at match start, held back until the players have been
        # told they are matched (`release_held`), so `matchmaker.matched` always comes first.
        self._withheld_frames: list[tuple[str | None, bytes]] | None = None
        self.refused: dict[str, str] = {}
        self.logs_dropped = 0
        self.host = MatchHost(self)
        # What each player in patch mode was last sent (`asobi.state_frames`).
        self.state_frames = StateFrames()
        self.last_error: str | None = None
        self._failure_tick = -1
        self._failure_lines = 0
        self._failures_suppressed = 0
        # Its record for `asobi replay` (`asobi.recording`); None when not recorded.
        self.recorder: MatchRecording | None = None
        self.lua = self._new_lua(script, self.seed)
        self.state: Any = None
        self._initial_players = players

    def _new_lua(self, script: ScriptVersion, seed: int) -> MatchLua:
        lua = MatchLua(self.host, self.services.config.limits, seed=seed)
        lua.set_context(self.id, self.tick_no, self.players)
        lua.load(script.code, script.name)
        return lua

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Run init then join for each initial player.  Returns the players refused by join.

        Frames the callbacks send are held until `release_held` (or the first tick), and a
        broadcast from init reaches every player who then joined.
        """
        self._withheld_frames = []
        ctx = self.lua.to_lua(
            {"match_id": self.id, "mode": self.mode, "players": self._initial_players}
        )
        blank = self.lua.new_table()
        result = self._outcome("init", self._call("init", blank, ctx), blank)
        if result is None:
            raise MatchStartError(self.last_error or "init failed")
        self.state = result
        for pid in self._initial_players:
            reason = self.join(pid)
            if reason is not None:
                self.refused[pid] = reason
        if self._initial_players and not self.players:
            reasons = sorted(set(self.refused.values()))
            raise MatchStartError(f"join refused every player ({'; '.join(reasons)})")
        return list(self.refused)

    def release_held(self) -> None:
        """Deliver what init/join sent at match start (after `matchmaker.matched`)."""
        withheld, self._withheld_frames = self._withheld_frames, None
        if withheld:
            self.effects.frames[:0] = withheld
            self._commit_effects()

    def join(self, player_id: str) -> str | None:
        """Add a player; returns a refusal reason, or None when they are in.

        `join` returning `nil, reason` refuses the player, and so does a `join` that fails: the
        script's state never saw them, so letting them in would break the game's invariants.
        Effects of a refused join are dropped.
        """
        if player_id in self.players:
            return None
        if self.recorder is not None:
            self.recorder.joined(player_id)
        if len(self.players) >= self.script.meta.max_players:
            return "match is full"
        self.players.append(player_id)
        self.lua.set_players(self.players)
        if self.lua.function("join") is None:
            return None
        result = self._call("join", self.state, player_id.encode())
        reason: str | None = None
        if result.ok and not result.value and len(result.values) > 1:
            raw = result.values[1]
            reason = raw.decode(errors="replace")[:200] if isinstance(raw, bytes) else "refused"
        elif not self.apply_outcome("join", result):
            reason = "join failed"
        if reason is not None:
            self.effects.discard()
            self.players.remove(player_id)
            self.lua.set_players(self.players)
            log.info("join_refused", match_id=self.id, player_id=player_id, reason=reason)
        return reason

    def leave(self, player_id: str) -> None:
        if player_id not in self.players:
            return
        if self.recorder is not None:
            self.recorder.left(player_id)
        if self.lua.function("leave") is not None:
            self.apply_outcome("leave", self._call("leave", self.state, player_id.encode()))
        self.players.remove(player_id)
        self.state_frames.resync(player_id)
        self.lua.set_players(self.players)

    # -- one tick ---------------------------------------------------------------------------------
    def run_tick(self, *, may_switch: bool = True) -> None:
        """One tick.  A pending reload switches now unless `may_switch` is False (the engine
        has run enough reload transactions this pass); it then waits for a later tick."""
        if self._withheld_frames is not None:
            self.release_held()
        self.tick_no += 1
        switching = self.pending is not None and may_switch
        if self.inputs or switching:
            # game.tick() in handle_input and in the new code's first tick; otherwise the tick
            # call sets it.
            self.lua.set_tick(self.tick_no)
        if self.inputs:
            run_inputs(self)
        if switching:
            version, self.pending = self.pending, None
            assert version is not None
            frames = self._reload_transaction(version)
            if frames is not None:
                self._after_tick(frames)
                return
        self.effects.discard()
        ids = self._state_ids(self.script.meta)
        result, finished, states = self.lua.tick_states(self.state, self.tick_no, ids)
        if states is not None:
            # get_state ran in the same crossing, which it does only after a tick that succeeded
            # with a table (or nothing) and made no host calls: the tick has no effects to
            # commit, and those held now are the last get_state call's (`_render_states`).
            if result.value is not None:
                self.state = result.value
            self.failures = 0
            self._after_tick(None, finished, (ids, states))
            return
        if self.apply_outcome("tick", result):
            self.failures = 0
        else:
            self.failures += 1
            if self.failures >= self.services.config.max_consecutive_failures:
                reason = first_line(self.last_error or "")
                self.services.finish(
                    self, {"error": f"tick failed {self.failures} times in a row: {reason}"}
                )
                return
        self._after_tick(None, finished)

    def queue_input(self, player_id: str, payload: Any) -> bool:
        """Queue an input for the next tick; False when the player's queue is full (dropped).

        A player can queue at most `max_queued_inputs`: a client sending faster than its
        inputs are handled loses the newest ones instead of growing the queue without bound.
        """
        queued = self.queued.get(player_id, 0)
        if queued >= self.services.config.max_queued_inputs:
            self._drop_input(player_id)
            return False
        self.queued[player_id] = queued + 1
        self.inputs.append((player_id, payload))
        return True

    def _drop_input(self, player_id: str) -> None:
        """Count a dropped input; log the counts at most once per DROP_LOG_INTERVAL_S."""
        self.inputs_dropped += 1
        self.services.input_dropped(self)
        unlogged = self._drops_unlogged
        unlogged[player_id] = unlogged.get(player_id, 0) + 1
        now = time.monotonic()
        if now - self._drop_logged_at < DROP_LOG_INTERVAL_S:
            return
        self._drop_logged_at = now
        for pid, count in unlogged.items():
            log.warning(
                "inputs_dropped",
                match_id=self.id,
                player_id=pid,
                count=count,
                queue_limit=self.services.config.max_queued_inputs,
            )
        unlogged.clear()

    def _after_tick(
        self,
        frames: list[tuple[str, bytes]] | None,
        finished: bool | None = None,
        asked: tuple[list[str | None], list[EachResult]] | None = None,
    ) -> None:
        """Send the tick's state frames (rendered here unless given, from `asked` when get_state
        already ran), then end the match if its state says so: `finished` when the tick call
        told (None: read it from the state)."""
        if frames is None:
            frames = self._render_states(self.lua, self.state, self.script.meta, asked=asked)
        send = self.services.outbox.send
        state_frames = self.state_frames
        if state_frames.staged:
            # A patch chain holds only if the player got the frame: the outbox says whether it
            # was written (not dropped for a slow reader, player connected).
            for pid, frame in frames:
                state_frames.settle(pid, send(pid, frame, droppable=True))
        else:
            for pid, frame in frames:
                send(pid, frame, droppable=True)
        if finished is None:
            finished = self._finished_flag()
        if finished:
            # Players have seen the final state; now the result.
            try:
                result = to_python(self.lua.field(self.state, "_result"), what="state._result")
            except (ConversionError, TypeError) as exc:
                self.log_failure("tick", f"state._result cannot be sent: {exc}")
                result = None
            self.services.finish(self, result)

    def _finished_flag(self) -> bool:
        try:
            flag = self.lua.field(self.state, "_finished")
        except (TypeError, KeyError):
            return False
        return flag is not None and flag is not False

    def resync(self, player_id: str) -> None:
        """The player's next state frame is a full `match.state` (`match.resync`, a resume)."""
        self.state_frames.resync(player_id)

    def _state_choices(self, meta: ScriptMeta) -> tuple[Set[str], Set[str]]:
        """The players who get `match.patch` frames (the script's choice unless their connection
        made its own, `Engine.state_sync`) and those whose connection chose compact frames."""
        default = meta.state_sync == "patch"
        prefs = self.services.state_sync
        if not prefs:
            return (set(self.players) if default else NOBODY), NOBODY
        patching: set[str] = set()
        compact: set[str] = set()
        for pid in self.players:
            choice = prefs.get(pid)
            if choice is None or type(choice) is bool:
                patch = default if choice is None else choice
            else:
                patch = default if choice.patch is None else choice.patch
                if choice.compact:
                    compact.add(pid)
            if patch:
                patching.add(pid)
        return patching, compact

    def _state_ids(self, meta: ScriptMeta) -> list[str | None]:
        """Whom a round of `get_state` calls is for: every player, or one call (None) for all
        with `shared_state`."""
        return [None] if meta.shared_state else list(self.players)

    def _render_states(
        self,
        lua: MatchLua,
        state: Any,
        meta: ScriptMeta,
        *,
        strict: bool = False,
        asked: tuple[list[str | None], list[EachResult]] | None = None,
    ) -> list[tuple[str, bytes]]:
        """One `match.state` frame per player (one for all with `shared_state`), or for players
        in patch mode a `match.patch`, in the compact encoding if their connection chose it (see
        `asobi.state_frames`).

        Outside a reload a failing get_state costs that player this tick's frame; inside the
        reload transaction (`strict`) it fails the whole transaction.  `asked`: the ids and the
        outcomes of a first `call_each` already made for them (`MatchLua.tick_states`).
        """
        frames: list[tuple[str, bytes]] = []
        recorder = self.recorder
        patching, compact = self._state_choices(meta)
        chained = patching or compact
        if chained:
            self.state_frames.begin()
        if asked is not None and not chained and recorder is None:
            # The usual tick: every player answered as JSON text; plain frames, effects first.
            texts = [text for _, text, _ in asked[1] if text is not None]
            if len(texts) == len(asked[0]):
                self._commit_effects()
                for pid, json_text in zip(asked[0], texts, strict=True):
                    self._add_state_frame(frames, pid, json_text)
                return frames
        ids, outcomes = asked if asked is not None else (self._state_ids(meta), [])
        done = 0
        for index, pid in enumerate(ids):
            if index == done:
                # One crossing into Lua answers for as many players as it can; effects held
                # meanwhile belong to the last of them (see `MatchLua.call_each`).
                if asked is None or done:
                    if not strict:
                        self.effects.discard()
                    outcomes = lua.call_each(
                        "get_state", state, ids[done:], what="get_state result"
                    )
                done += len(outcomes)
            data, text, error = outcomes[index - done + len(outcomes)]
            last = index == done - 1
            if text is not None:
                # Written as JSON inside Lua; data only where something needs it as objects
                # (state frames parse it themselves if they must, see `StateFrames.frames`).
                body = text
                if recorder is not None:
                    data = orjson.loads(text)
                elif chained:
                    data = UNPARSED
            elif error is None:
                try:
                    body = b"" if chained else orjson.dumps(data)
                except TypeError as exc:
                    error = str(exc)
            if error is not None:
                if strict:
                    raise _CallFailed(f"get_state failed on the new code: {short_error(error)}")
                if recorder is not None:
                    recorder.state_failed(pid)
                self.log_failure("get_state", error)
                if last:
                    self.effects.discard()
                continue
            if not strict and last:
                self._commit_effects()
            if recorder is not None:
                recorder.state(pid, data)
            if chained:
                targets = self.players if pid is None else (pid,)
                frames.extend(
                    self.state_frames.frames(
                        targets,
                        data,
                        patching,
                        self.tick_no,
                        meta.full_state_every,
                        compact,
                        text,
                    )
                )
                continue
            self._add_state_frame(frames, pid, body)
        return frames

    def _add_state_frame(
        self, frames: list[tuple[str, bytes]], pid: str | None, body: bytes
    ) -> None:
        """A plain `match.state` frame of `body` for `pid`, or one for every player (None)."""
        frame = encode_raw_payload("match.state", body)
        if pid is None:
            frames.extend((member, frame) for member in self.players)
        else:
            frames.append((pid, frame))

    # -- reload transaction ----------------------------------------------------------------------
    def _reload_transaction(self, version: ScriptVersion) -> list[tuple[str, bytes]] | None:
        """Run this tick on the new code.  Returns the tick's state frames when the match
        switched, None when it stays on the old code (which then runs the tick as usual).

        The new version is loaded into a fresh environment of the match's own Lua state and runs
        on a data-only copy of the state; nothing it can write to is shared with the running
        version, so rolling back is putting the old environment back.
        """
        started = time.perf_counter()
        lua = self.lua
        copied = lua.copy_state(self.state)
        if not copied.ok:
            self._reload_resolved(
                version, "reload_failed", f"state cannot cross: {copied.error}", started
            )
            return None
        running = lua.current()
        try:
            lua.load(version.code, version.name)
        except ScriptLoadError as exc:
            self.effects.discard()
            self._reload_resolved(
                version, "reload_rolled_back", f"top-level code failed: {exc}", started
            )
            return None
        state = copied.value
        self.effects.discard()
        try:
            if lua.function("migrate") is not None:
                info = lua.to_lua(
                    {"from_version": self.script.version, "to_version": version.version}
                )
                migrated = lua.call("migrate", state, info)
                state = self._result_state("migrate", migrated, state)
            ticked = lua.call("tick", state)
            state = self._result_state("tick", ticked, state)
            frames = self._render_states(lua, state, version.meta, strict=True)
        except _CallFailed as exc:
            lua.restore(running)
            self.effects.discard()
            self._reload_resolved(version, "reload_rolled_back", exc.message, started)
            return None
        self.state = state
        self.script = version
        self.period = 1.0 / version.meta.tick_rate
        self.failures = 0
        self.input_cost = 0.0
        self._commit_effects()
        self._reload_resolved(version, "reloaded", None, started)
        subscribers = self.services.reload_subscribers
        if subscribers:
            frame = encode("match.reloaded", {"match_id": self.id, "version": version.version})
            for pid in self.players:
                if pid in subscribers:
                    self.services.outbox.send(pid, frame)
        return frames

    def _result_state(self, callback: str, result: CallResult, given: Any) -> Any:
        if not result.ok:
            raise _CallFailed(f"{callback} failed on the new code: {short_error(result.error)}")
        error = _not_a_state(f"{callback} on the new code", result.value)
        if error is not None:
            raise _CallFailed(error)
        return given if result.value is None else result.value

    def _reload_resolved(
        self, version: ScriptVersion, outcome: str, error: str | None, started: float
    ) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.services.reload_resolved(self, version, outcome, error, elapsed_ms)

    # -- calling Lua ------------------------------------------------------------------------------
    def _call(self, callback: str, *args: Any) -> CallResult:
        self.effects.discard()
        return self.lua.call(callback, *args)

    def _outcome(self, callback: str, result: CallResult, given: Any) -> Any:
        """The state a callback leaves: the table it returned, or `given` when it returned
        nothing; its effects are committed.  None when it failed: logged, effects discarded."""
        value = result.value
        error = result.error if not result.ok else _not_a_state(callback, value)
        if error is None:
            self._commit_effects()
            return given if value is None else value
        self.log_failure(callback, error)
        self.effects.discard()
        return None

    def apply_outcome(self, callback: str, result: CallResult) -> bool:
        """Adopt a callback's outcome as the match state; False when it failed."""
        state = self._outcome(callback, result, self.state)
        if state is None:
            return False
        self.state = state
        return True

    def _commit_effects(self) -> None:
        self.effects.commit_work()
        frames = self.effects.frames
        if not frames:
            return
        if self._withheld_frames is not None:
            self._withheld_frames.extend(frames)
            frames.clear()
            return
        outbox = self.services.outbox
        for pid, frame in frames:
            if pid is None:
                for member in self.players:
                    outbox.send(member, frame)
            else:
                outbox.send(pid, frame)
        frames.clear()

    def log_failure(self, callback: str, error: str) -> None:
        """Log a failed callback, at most FAILURE_LINES_PER_TICK lines per tick: a get_state
        that fails for every player of a big match would otherwise write a line per player per
        tick.  The next line logged says how many were left out."""
        self.last_error = error
        if self._failure_tick != self.tick_no:
            self._failure_tick, self._failure_lines = self.tick_no, 0
        self._failure_lines += 1
        if self._failure_lines > FAILURE_LINES_PER_TICK:
            self._failures_suppressed += 1
            return
        suppressed, self._failures_suppressed = self._failures_suppressed, 0
        log.error(
            "callback_failed",
            match_id=self.id,
            mode=self.mode,
            callback=callback,
            tick=self.tick_no,
            error=first_line(error),
            traceback=short_error(error),
            **({"suppressed": suppressed} if suppressed else {}),
        )

    def close(self) -> None:
        """Free the match's Lua state now.  The state's Lua registry refers back to this match
        through its host functions: dropping our reference to it breaks that cycle, so the
        memory is returned at once instead of at the next full garbage collection (a long pause
        when many finished matches pile up)."""
        self.finished = True
        self.state = None
        self.inputs.clear()
        self.queued.clear()
        self.lua = _CLOSED


class _ClosedLua:
    """Stands in for the Lua state of a finished match: any late call fails loudly."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("this match has finished; its Lua state is closed")


_CLOSED: Any = _ClosedLua()


def _not_a_state(callback: str, value: Any) -> str | None:
    """Why a callback's return value cannot be the match state (None: it can)."""
    if value is None or MatchLua.is_table(value):
        return None
    return f"{callback} returned a {lua_kind(value)}, not a table (or nothing)"


class _CallFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
