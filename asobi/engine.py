"""Matches and the tick schedule.  No sockets, no asyncio: time is passed in.

A `Match` owns one sandboxed Lua state and the match state table inside it.  The `Engine` keeps
every match on an absolute schedule (`deadline = first + n * period`, so there is no drift) and
runs whatever is due when `run_due(now)` is called; `asobi.ticker` calls it from the event loop,
tests call it directly.  Everything a match sends goes through an `Outbox`, which the server
implements with WebSocket connections and tests implement with a list.

Hot reload happens here, at a tick boundary, as a transaction: the new code is loaded into a fresh
Lua state, the state is copied across as plain data, `migrate` and the tick run on the copy with
their side effects buffered, and only if all of that succeeds does the match switch.  Otherwise the
copy is dropped and the old code runs the same tick, so no tick is skipped or repeated.
"""

from __future__ import annotations

import heapq
import itertools
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import structlog

from asobi.lua.convert import ConversionError, to_python
from asobi.lua.runtime import CallResult, Limits, MatchLua, ScriptLoadError
from asobi.protocol import encode, encode_raw_payload
from asobi.scripts import ScriptRegistry, ScriptVersion

log = structlog.get_logger("asobi.engine")

EVENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_EVENTS = frozenset(
    {
        "state",
        "finished",
        "message",
        "reloaded",
        "input",
        "leave",
        "left",
        "join",
        "joined",
        "list",
        "rejoined",
        "error",
    }
)
MAX_TRACEBACK_LINES = 8
_PHASE_STEP = 0.6180339887498949  # golden ratio: spreads match phases evenly over a period


class Outbox(Protocol):
    """Where frames for players go.  `droppable` frames may be skipped for a slow reader."""

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> None: ...


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


class MatchStartError(Exception):
    """`init` (or the script's top level) failed; the match never started."""


def short_error(message: str) -> str:
    """First lines of a Lua error with its traceback, for logs."""
    lines = message.splitlines()
    kept = [ln for ln in lines if "[C]: in function 'xpcall'" not in ln and "=asobi" not in ln]
    if len(kept) > MAX_TRACEBACK_LINES:
        kept = [*kept[:MAX_TRACEBACK_LINES], f"... ({len(kept) - MAX_TRACEBACK_LINES} more lines)"]
    return "\n".join(kept)


def first_line(message: str) -> str:
    return message.split("\n", 1)[0]


class _Effects:
    """Frames produced by game.send / game.broadcast during one callback, committed on success."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames: list[tuple[str | None, bytes]] = []


class MatchHost:
    """The ScriptHost of one match: what its Lua code can ask of the server."""

    def __init__(self, match: Match) -> None:
        self.match = match
        self._log_tokens = 0.0
        self._log_stamp = time.monotonic()

    def log(self, level: bytes, message: bytes, meta: Any) -> None:
        match = self.match
        rate = match.engine.config.log_lines_per_second
        now = time.monotonic()
        self._log_tokens = min(rate, self._log_tokens + (now - self._log_stamp) * rate)
        self._log_stamp = now
        if self._log_tokens < 1.0:
            match.logs_dropped += 1
            return
        self._log_tokens -= 1.0
        lvl = level.decode(errors="replace") if isinstance(level, bytes) else "info"
        if lvl not in ("debug", "info", "warning", "error"):
            lvl = "info"
        fields: dict[str, Any] = {}
        if meta is not None:
            try:
                converted = to_python(meta, what="meta", max_nodes=200)
                if isinstance(converted, dict):
                    fields["meta"] = converted
            except ConversionError:
                pass
        text = message.decode(errors="replace")[:2000] if isinstance(message, bytes) else ""
        getattr(log, lvl)("script_log", match_id=match.id, mode=match.mode, message=text, **fields)

    def send(self, player_id: Any, payload: Any) -> bool:
        match = self.match
        pid = player_id.decode(errors="replace") if isinstance(player_id, bytes) else None
        if pid is None or pid not in match.players:
            raise ValueError("game.send: unknown player id")
        body = to_python(payload, what="game.send payload")
        match.effects.frames.append(
            (pid, encode("match.message", {"match_id": match.id, "payload": body}))
        )
        return True

    def broadcast(self, event: Any, payload: Any) -> bool:
        match = self.match
        name = event.decode(errors="replace") if isinstance(event, bytes) else ""
        if not EVENT_RE.match(name):
            raise ValueError("game.broadcast: event name must match [A-Za-z0-9_-]{1,64}")
        if name in RESERVED_EVENTS:
            raise ValueError(f"game.broadcast: event name '{name}' is reserved")
        body = to_python(payload, what="game.broadcast payload")
        match.effects.frames.append((None, encode(f"match.{name}", body)))
        return True

    def module(self, name: bytes) -> tuple[bytes | None, bytes]:
        source, chunkname = self.match.engine.registry.module_source(name)
        if source is not None:
            self.match.required.add(chunkname.decode()[1:])
        return source, chunkname


class Match:
    """One running match: its Lua state, players, schedule and pending reload."""

    def __init__(
        self, engine: Engine, match_id: str, mode: str, script: ScriptVersion, players: list[str]
    ) -> None:
        self.engine = engine
        self.id = match_id
        self.mode = mode
        self.script = script
        self.players: list[str] = []
        self.seed = random.getrandbits(48)
        self.period = 1.0 / script.meta.tick_rate
        self.tick_no = 0
        self.deadline = 0.0
        self.failures = 0
        self.finished = False
        self.pending: ScriptVersion | None = None
        self.inputs: list[tuple[str, Any]] = []
        self.required: set[str] = set()
        self.effects = _Effects()
        self.logs_dropped = 0
        self.host = MatchHost(self)
        self.last_error: str | None = None
        self.lua = self._new_lua(script, self.seed)
        self.state: Any = None
        self._initial_players = players

    def _new_lua(self, script: ScriptVersion, seed: int) -> MatchLua:
        lua = MatchLua(self.host, self.engine.config.limits, seed=seed)
        lua.load(script.source, script.name)
        lua.set_context(self.id, self.tick_no, self.players)
        return lua

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Run init then join for each initial player.  Returns the players refused by join."""
        ctx = self.lua.to_lua(
            {"match_id": self.id, "mode": self.mode, "players": self._initial_players}
        )
        result = self._callback("init", self.lua.new_table(), ctx, fallback=None)
        if result is None:
            raise MatchStartError(self.last_error or "init failed")
        self.state = result
        refused = []
        for pid in self._initial_players:
            reason = self.join(pid)
            if reason is not None:
                refused.append(pid)
        return refused

    def join(self, player_id: str) -> str | None:
        """Add a player; returns a refusal reason, or None when they are in."""
        if player_id in self.players:
            return None
        if len(self.players) >= self.script.meta.max_players:
            return "match is full"
        self.players.append(player_id)
        self.lua.set_players(self.players)
        if self.lua.function("join") is None:
            return None
        result = self._call("join", self.state, player_id.encode())
        if result.ok and result.value is None and len(result.values) > 1:
            self.players.remove(player_id)
            self.lua.set_players(self.players)
            reason = result.values[1]
            return reason.decode(errors="replace") if isinstance(reason, bytes) else "refused"
        self._apply("join", result)
        return None

    def leave(self, player_id: str) -> None:
        if player_id not in self.players:
            return
        if self.lua.function("leave") is not None:
            self._apply("leave", self._call("leave", self.state, player_id.encode()))
        self.players.remove(player_id)
        self.lua.set_players(self.players)

    # -- one tick ---------------------------------------------------------------------------------
    def run_tick(self) -> None:
        self.tick_no += 1
        self.lua.set_tick(self.tick_no)
        for pid, payload in self.inputs:
            if pid in self.players and self.lua.function("handle_input") is not None:
                lua_input = self.lua.to_lua(payload)
                self._apply(
                    "handle_input", self._call("handle_input", self.state, pid.encode(), lua_input)
                )
        self.inputs.clear()
        if self.pending is not None:
            version, self.pending = self.pending, None
            if self._reload_transaction(version):
                self._after_tick()
                return
        result = self._call("tick", self.state)
        if self._apply("tick", result):
            self.failures = 0
        else:
            self.failures += 1
            if self.failures >= self.engine.config.max_consecutive_failures:
                self.engine.finish(
                    self,
                    {
                        "error": f"tick failed {self.failures} times in a row: "
                        f"{first_line(self.last_error or '')}"
                    },
                )
                return
        self._after_tick()

    def _after_tick(self) -> None:
        if self._finished_flag():
            try:
                result = to_python(self.lua.field(self.state, "_result"), what="state._result")
            except (ConversionError, TypeError):
                result = None
            self.engine.finish(self, result)
            return
        self.send_state()

    def _finished_flag(self) -> bool:
        try:
            flag = self.lua.field(self.state, "_finished")
        except (TypeError, KeyError):
            return False
        return flag is not None and flag is not False

    def send_state(self) -> None:
        outbox = self.engine.outbox
        if self.script.meta.shared_state:
            frame = self._state_frame(None)
            if frame is not None:
                for pid in self.players:
                    outbox.send(pid, frame, droppable=True)
            return
        for pid in self.players:
            frame = self._state_frame(pid)
            if frame is not None:
                outbox.send(pid, frame, droppable=True)

    def _state_frame(self, player_id: str | None) -> bytes | None:
        result = self._call("get_state", self.state, player_id.encode() if player_id else None)
        if not result.ok:
            self._log_failure("get_state", result.error)
            self.effects.frames.clear()
            return None
        try:
            payload = to_python(result.value, what="get_state result")
            body = orjson.dumps(payload)
        except (ConversionError, TypeError) as exc:
            self._log_failure("get_state", str(exc))
            self.effects.frames.clear()
            return None
        self._commit_effects()
        return encode_raw_payload("match.state", body)

    # -- reload transaction ----------------------------------------------------------------------
    def _reload_transaction(self, version: ScriptVersion) -> bool:
        """Try this tick on the new code.  True when the match switched (and the tick ran)."""
        started = time.perf_counter()
        old = self.lua
        try:
            new = self._new_lua(version, (self.seed * 1_000_003 + self.tick_no) & (2**48 - 1))
        except ScriptLoadError as exc:
            self._reload_resolved(version, "reload_rolled_back", f"top-level code failed: {exc}")
            return False
        new.set_context(self.id, self.tick_no, self.players)
        copied = old.api_call("reload copy", "serialize", self.state, budget=old.limits.copy)
        if not copied.ok:
            self._reload_resolved(version, "reload_failed", f"state cannot cross: {copied.error}")
            return False
        restored = new.api_call("reload copy", "deserialize", copied.value, budget=new.limits.copy)
        if not restored.ok:
            self._reload_resolved(version, "reload_failed", f"state copy failed: {restored.error}")
            return False
        state = restored.value
        self.effects.frames.clear()
        self.lua = new
        try:
            if new.function("migrate") is not None:
                info = new.to_lua(
                    {"from_version": self.script.version, "to_version": version.version}
                )
                migrated = new.call("migrate", state, info)
                state = self._result_state("migrate", migrated, state)
            ticked = new.call("tick", state)
            state = self._result_state("tick", ticked, state)
        except _CallFailed as exc:
            self.lua = old
            self.effects.frames.clear()
            self._reload_resolved(version, "reload_rolled_back", exc.message)
            return False
        self.state = state
        self.script = version
        self.period = 1.0 / version.meta.tick_rate
        self.failures = 0
        self._commit_effects()
        elapsed = (time.perf_counter() - started) * 1000
        self._reload_resolved(version, "reloaded", None, elapsed_ms=elapsed)
        if version.meta.notify_reload:
            frame = encode("match.reloaded", {"match_id": self.id, "version": version.version})
            for pid in self.players:
                self.engine.outbox.send(pid, frame)
        return True

    def _result_state(self, callback: str, result: CallResult, given: Any) -> Any:
        if not result.ok:
            raise _CallFailed(f"{callback} failed on the new code: {short_error(result.error)}")
        value = result.value
        if value is None:
            return given
        if not MatchLua.is_table(value):
            raise _CallFailed(
                f"{callback} on the new code returned a {type(value).__name__}, not a table"
            )
        return value

    def _reload_resolved(
        self, version: ScriptVersion, outcome: str, error: str | None, elapsed_ms: float = 0.0
    ) -> None:
        self.engine.listener_reload(self, version, outcome, error, elapsed_ms)

    # -- calling Lua ------------------------------------------------------------------------------
    def _call(self, callback: str, *args: Any) -> CallResult:
        self.effects.frames.clear()
        return self.lua.call(callback, *args)

    def _callback(self, callback: str, *args: Any, fallback: Any) -> Any:
        result = self._call(callback, *args)
        if not result.ok:
            self._log_failure(callback, result.error)
            self.effects.frames.clear()
            return fallback
        value = result.value
        self._commit_effects()
        if value is None:
            return args[0]
        if not MatchLua.is_table(value):
            self._log_failure(
                callback, f"{callback} returned a {type(value).__name__}, not a table"
            )
            return fallback
        return value

    def _apply(self, callback: str, result: CallResult) -> bool:
        """Adopt a callback's returned state (or keep the given one) and commit its effects."""
        if not result.ok:
            self._log_failure(callback, result.error)
            self.effects.frames.clear()
            return False
        value = result.value
        if value is not None and not MatchLua.is_table(value):
            self._log_failure(
                callback, f"{callback} returned a {type(value).__name__}, not a table"
            )
            self.effects.frames.clear()
            return False
        if value is not None:
            self.state = value
        self._commit_effects()
        return True

    def _commit_effects(self) -> None:
        frames = self.effects.frames
        if not frames:
            return
        outbox = self.engine.outbox
        for pid, frame in frames:
            if pid is None:
                for member in self.players:
                    outbox.send(member, frame)
            else:
                outbox.send(pid, frame)
        frames.clear()

    def _log_failure(self, callback: str, error: str) -> None:
        self.last_error = error
        log.error(
            "callback_failed",
            match_id=self.id,
            mode=self.mode,
            callback=callback,
            tick=self.tick_no,
            error=first_line(error),
            traceback=short_error(error),
        )

    def close(self) -> None:
        self.finished = True
        self.state = None
        self.inputs.clear()


class _CallFailed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
        self.matches: dict[str, Match] = {}
        self.player_match: dict[str, str] = {}
        self.listeners: list[EngineListener] = []
        self._heap: list[tuple[float, int, Match]] = []
        self._seq = itertools.count()
        self._phase = 0.0
        self.ticks = 0
        self.lateness: deque[float] = deque(maxlen=65536)
        self.on_schedule_change: Callable[[float], None] | None = None

    # -- matches ----------------------------------------------------------------------------------
    def start_match(self, mode: str, script: ScriptVersion, players: list[str]) -> Match:
        match_id = uuid.uuid4().hex
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
        self.matches[match_id] = match
        for pid in match.players:
            self.player_match[pid] = match_id
        self._phase = (self._phase + _PHASE_STEP) % 1.0
        match.deadline = self.clock() + match.period * (0.05 + 0.95 * self._phase)
        self._push(match)
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

    def match_of(self, player_id: str) -> Match | None:
        match_id = self.player_match.get(player_id)
        return self.matches.get(match_id) if match_id else None

    def submit_input(self, player_id: str, payload: Any) -> bool:
        match = self.match_of(player_id)
        if match is None:
            return False
        match.inputs.append((player_id, payload))
        return True

    def remove_player(self, player_id: str) -> Match | None:
        """The player leaves their match (`leave` runs); an empty match ends."""
        match = self.match_of(player_id)
        if match is None:
            return None
        self.player_match.pop(player_id, None)
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
        for pid in match.players:
            if self.player_match.get(pid) == match.id:
                del self.player_match[pid]
        match.close()
        self.matches.pop(match.id, None)
        log.info(
            "match_finished", match_id=match.id, mode=match.mode, ticks=match.tick_no, result=result
        )
        for listener in self.listeners:
            listener.match_finished(match, result)

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

    def listener_reload(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None:
        for listener in self.listeners:
            listener.reload_resolved(match, version, outcome, error, elapsed_ms)

    # -- schedule ---------------------------------------------------------------------------------
    def _push(self, match: Match) -> None:
        heapq.heappush(self._heap, (match.deadline, next(self._seq), match))
        if self.on_schedule_change is not None and self._heap[0][2] is match:
            self.on_schedule_change(match.deadline)

    def next_deadline(self) -> float | None:
        while self._heap and self._heap[0][2].finished:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float | None = None) -> float | None:
        """Tick every match whose deadline has passed; return the next deadline."""
        now = self.clock() if now is None else now
        heap = self._heap
        due: list[Match] = []
        while heap and heap[0][0] <= now:
            _, _, match = heapq.heappop(heap)
            if not match.finished:
                due.append(match)
        for match in due:
            self._tick_one(match)
        return self.next_deadline()

    def _tick_one(self, match: Match) -> None:
        late = self.clock() - match.deadline
        self.lateness.append(late)
        try:
            match.run_tick()
        except Exception:
            log.exception("match_crashed", match_id=match.id, mode=match.mode, tick=match.tick_no)
            self.finish(match, {"error": "internal error"})
        self.ticks += 1
        if match.finished:
            return
        match.deadline += match.period
        now = self.clock()
        if match.deadline < now - match.period:
            skipped = int((now - match.deadline) / match.period)
            match.deadline += skipped * match.period
            log.warning("tick_overrun", match_id=match.id, skipped=skipped)
        heapq.heappush(self._heap, (match.deadline, next(self._seq), match))

    def drain_lateness(self) -> list[float]:
        values = list(self.lateness)
        self.lateness.clear()
        return values

    def all_players(self) -> Iterable[str]:
        return self.player_match.keys()
