"""What a match's script may ask of the server (the `game.*` host side), and its held effects.

`MatchHost` is the `ScriptHost` of one match: logging, `game.send` / `game.broadcast`, `require`
and persistence.  What a callback does through it is held in `Effects` and committed only if the
callback succeeds, which is what lets a failed tick or a rolled-back reload leave no trace.
Errors go back to Lua as values, never as Python exceptions (which would reach a script as opaque
userdata).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from asobi import names
from asobi.limits import TokenBucket
from asobi.lua import persist
from asobi.lua.convert import ConversionError, to_python
from asobi.lua.runtime import MatchLua
from asobi.protocol import encode
from asobi.store import StoreError, UnitOfWork
from asobi.store.errors import NOT_CONFIGURED

if TYPE_CHECKING:
    from asobi.match import Match

log = structlog.get_logger("asobi.match")

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
        "patch",
        "resync",
        "redirect",
        "moved",
        "moving",
        "restored",
    }
)
MAX_TRACEBACK_LINES = 8
_LOG_LEVELS = {
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
}
# Traceback frames of the server's own Lua (the sandbox and the pattern matcher), not the game's.
_TRACEBACK_NOISE = ("[C]: in function 'xpcall'", "asobi:", "patterns.lua:", '[string "<python>"]')


def short_error(message: str) -> str:
    """First lines of a Lua error with its traceback, for logs."""
    first, *rest = message.splitlines() or [""]
    kept = [first] + [ln for ln in rest if not ln.lstrip().startswith(_TRACEBACK_NOISE)]
    if len(kept) > MAX_TRACEBACK_LINES:
        kept = [*kept[:MAX_TRACEBACK_LINES], f"... ({len(kept) - MAX_TRACEBACK_LINES} more lines)"]
    return "\n".join(kept)


def lua_kind(value: Any) -> str:
    """The Lua type name of a value lupa handed over (strings arrive as bytes)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, bytes):
        return "string"
    return MatchLua.type_name(value)


def first_line(message: str) -> str:
    return message.split("\n", 1)[0]


class Effects:
    """Side effects of one callback, committed on success: frames produced by game.send /
    game.broadcast, and the persistence writes of game.economy / leaderboard / storage (`work`,
    a unit of work created on the first such call)."""

    __slots__ = ("frames", "work")

    def __init__(self) -> None:
        self.frames: list[tuple[str | None, bytes]] = []
        self.work: UnitOfWork | None = None

    def discard(self) -> None:
        """The callback failed (or is starting): nothing it did may take effect."""
        self.frames.clear()
        self.work = None

    def commit_work(self) -> None:
        work, self.work = self.work, None
        if work is not None:
            work.commit()


class MatchHost:
    """The ScriptHost of one match: what its Lua code can ask of the server.

    `send` and `broadcast` return an error message instead of raising: a Python exception would
    reach Lua as an opaque userdata, while sandbox.lua turns a returned message into a Lua error
    pointing at the script line that made the call.
    """

    def __init__(self, match: Match) -> None:
        self.match = match
        # One second's worth of burst; the bucket starts full, so a match's first lines (from
        # init, say) are never dropped.
        rate = match.services.config.log_lines_per_second
        self._log_bucket = TokenBucket(rate, rate, time.monotonic())
        self._dropped_since = 0
        # The key of the last unit of work, (tick, seq): units are numbered within each tick,
        # so a tick run again after a restore can tell which of its units already committed.
        # Only units of a tick (`ticking`, set by the engine) are keyed: a join or a leave is
        # a new event, never a re-run.
        self._unit_key = (-1, -1)
        self.ticking = False

    def log(self, level: bytes, message: bytes, meta: Any) -> None:
        match = self.match
        if not self._log_bucket.take(time.monotonic()):
            match.logs_dropped += 1
            self._dropped_since += 1
            return
        lvl = level.decode(errors="replace") if isinstance(level, bytes) else "info"
        lvl = _LOG_LEVELS.get(lvl, "info")
        fields: dict[str, Any] = {}
        if self._dropped_since:
            # Lines lost to the rate limit since the previous line that got through.
            fields["dropped"] = self._dropped_since
            self._dropped_since = 0
        if meta is not None:
            # A log line is never worth failing the game over: meta that cannot be logged is
            # replaced by what is wrong with it.
            try:
                converted = to_python(meta, what="game.log meta", max_nodes=200)
            except ConversionError as exc:
                fields["meta_error"] = str(exc)
            else:
                if isinstance(converted, dict):
                    fields["meta"] = converted
                else:
                    fields["meta_error"] = "game.log meta must be a table of named fields"
        text = message.decode(errors="replace")[:2000] if isinstance(message, bytes) else ""
        getattr(log, lvl)("script_log", match_id=match.id, mode=match.mode, message=text, **fields)

    def send(self, player_id: Any, payload: Any) -> bytes | None:
        match = self.match
        if not isinstance(player_id, bytes):
            return b"game.send: player_id must be a string"
        pid = player_id.decode(errors="replace")
        if pid not in match.players:
            return f"game.send: player {pid[:64]!r} is not in this match".encode()
        try:
            body = to_python(payload, what="game.send payload")
        except ConversionError as exc:
            return str(exc).encode()
        match.effects.frames.append(
            (pid, encode("match.message", {"match_id": match.id, "payload": body}))
        )
        return None

    def broadcast(self, event: Any, payload: Any) -> bytes | None:
        match = self.match
        name = event.decode(errors="replace") if isinstance(event, bytes) else ""
        if not names.EVENT.accepts(name):
            return f"game.broadcast: event name must match {names.EVENT}".encode()
        if name in RESERVED_EVENTS:
            return f"game.broadcast: event name '{name}' is reserved".encode()
        try:
            body = to_python(payload, what="game.broadcast payload")
        except ConversionError as exc:
            return str(exc).encode()
        match.effects.frames.append((None, encode(f"match.{name}", body)))
        return None

    def module(self, name: bytes) -> tuple[bytes | None, bytes]:
        source, chunkname = self.match.services.module_source(name)
        if source is not None:
            self.match.required.add(chunkname.decode()[1:])
        return source, chunkname

    def persist(self, lua: MatchLua, name: Any, *args: Any) -> Any:
        """game.economy / game.leaderboard / game.storage.  Writes join the callback's unit of
        work; the result is always a table, `{ok = ...}` or `{error = ...}`, never an error."""
        return persist.answer(lua.to_lua, self._work, name, args, self.match.id)

    def _work(self) -> UnitOfWork:
        match = self.match
        store = match.services.store
        if store is None:
            raise StoreError(NOT_CONFIGURED, "this server has no store")
        effects = match.effects
        if effects.work is None:
            key = None
            if self.ticking:
                tick, seq = self._unit_key
                key = self._unit_key = (match.tick_no, seq + 1 if tick == match.tick_no else 0)
            effects.work = store.unit(match.id, key)
        return effects.work
