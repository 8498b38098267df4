"""One sandboxed Lua 5.4 state per match: creation, script loading and budgeted calls.

This is the only module that creates `LuaRuntime`s or calls into Lua.  Everything game code can
touch is defined in `sandbox.lua`; Python holds the host API that chunk returns and goes through it
for every call, so each call runs under a wall-clock budget and a memory cap, and errors come back
as values (`CallResult`) instead of exceptions that could unwind the engine.

The runtime is pinned to `lupa.lua54`: lupa's default module follows the newest Lua it bundles,
and objects, helpers and exception classes of different runtime modules do not mix.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, NewType, NoReturn, Protocol

from lupa import lua54

from asobi.lua import native
from asobi.lua.convert import MAX_NODES, ConversionError, input_args, to_lua, to_python
from asobi.lua.outcomes import (
    CallResult,
    EachResult,
    InputsResult,
    call_result,
    each_results,
    error_text,
)

LuaError = lua54.LuaError
LuaSyntaxError = lua54.LuaSyntaxError
LuaMemoryError = lua54.LuaMemoryError

_SANDBOX_SOURCE = resources.files("asobi.lua").joinpath("sandbox.lua").read_bytes()
_PATTERNS_SOURCE = resources.files("asobi.lua").joinpath("patterns.lua").read_bytes()
_CALLS_SOURCE = resources.files("asobi.lua").joinpath("calls.lua").read_bytes()
_CLIB_SOURCE = resources.files("asobi.lua").joinpath("clib.lua").read_bytes()
_RANDOM_SOURCE = resources.files("asobi.lua").joinpath("random.lua").read_bytes()
_PACK_SOURCE = resources.files("asobi.lua").joinpath("pack.lua").read_bytes()
_U64 = (1 << 64) - 1


@functools.cache
def _host_bytecode(source: bytes, name: bytes) -> bytes:
    """A host chunk (sandbox.lua, patterns.lua) compiled once per process.

    Every match gets a fresh Lua state; loading precompiled host chunks instead of compiling their
    source more than halves the cost of making one.  Game scripts are compiled from text only, by
    `compile_script`.
    """
    compiler = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    dump = compiler.execute(b"return function(src, n) return string.dump(load(src, n), true) end")
    return bytes(dump(source, name))


# Bytecode made by `compile_script` from a script's text.  Only this may be loaded as bytecode into
# a match: crafted bytecode can break Lua's memory safety, compiler output cannot.
Bytecode = NewType("Bytecode", bytes)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-callback wall-clock budgets (seconds) and the per-match memory cap."""

    init: float = 1.0
    join: float = 0.2
    leave: float = 0.2
    handle_input: float = 0.05
    tick: float = 0.05
    get_state: float = 0.01
    migrate: float = 1.0
    load: float = 1.0
    copy: float = 1.0
    max_memory: int = 32 * 1024 * 1024
    hook_count: int = 1000
    pattern_budget: float = 2.5e6

    def budget(self, callback: str) -> float:
        return float(getattr(self, callback, self.tick))


_MESSAGES: dict[tuple[str, float], tuple[bytes, bytes]] = {}
_now = time.perf_counter
# The Limits field (and so the ASOBI_LUA_<FIELD> variable) behind a call label that is not one.
_LIMIT_OF_LABEL = {"reload copy": "copy", "snapshot": "copy", "snapshot restore": "copy"}

# The budgeted call running now: (started, deadline, label, MatchLua), perf_counter seconds, or
# None.  One tuple swapped in and out per call, so that `asobi.watchdog`, reading it from its own
# thread, always sees a whole record.
_in_flight: tuple[float, float, str, MatchLua] | None = None


def in_flight() -> tuple[float, float, str, MatchLua] | None:
    """The budgeted Lua call running now, if any (for the watchdog)."""
    return _in_flight


def budget_message(label: str, budget: float) -> tuple[bytes, bytes]:
    """The two halves of a budget error, around the script position sandbox adds:
    "tick exceeded its 50 ms budget" .. " at match.lua:12" .. " (raise with ASOBI_LUA_TICK)"."""
    key = (label, budget)
    parts = _MESSAGES.get(key)
    if parts is None:
        field = _LIMIT_OF_LABEL.get(label, label)
        env = f"ASOBI_LUA_{field.upper()}"
        parts = _MESSAGES[key] = (
            f"{label} exceeded its {budget * 1000:g} ms budget".encode(),
            f" (raise with {env})".encode(),
        )
    return parts


class ScriptHost(Protocol):
    """What a match's Lua code may ask of the server (the game.* API and require)."""

    def log(self, level: bytes, message: bytes, meta: Any) -> None: ...

    def send(self, player_id: Any, payload: Any) -> Any: ...

    def broadcast(self, event: Any, payload: Any) -> Any: ...

    def module(self, name: bytes) -> tuple[bytes | None, bytes]: ...


class ScriptLoadError(Exception):
    """A script failed to compile or its top-level code failed to run."""


def _deny_attributes(obj: Any, name: Any, is_setting: bool) -> NoReturn:
    raise AttributeError("Python attributes are not accessible from match scripts")


def _id_args(ids: Sequence[str | None]) -> list[bytes | None]:
    """Player ids as `B.call_each` takes them: bytes, or nil for a shared state frame."""
    return [i.encode() if i else None for i in ids]


def compile_script(source: bytes, chunkname: str) -> Bytecode:
    """Compile a script's text once; every match then loads the returned bytecode.

    Raises ScriptLoadError with the compiler's message.  A throwaway runtime is used, so that
    compiling never touches a running match; nothing of the script runs here.  The bytecode keeps
    its debug information (error messages name the file and line).  Loading precompiled code is
    safe only because it comes from this compiler: bytecode from anywhere else is never loaded.
    """
    runtime = lua54.LuaRuntime(
        register_eval=False,
        register_builtins=False,
        encoding=None,
        attribute_filter=_deny_attributes,
        max_memory=64 * 1024 * 1024,
    )
    compiler = runtime.execute(
        b"return function(s, n) "
        b"local fn, err = load(s, n, 't', {}) "
        b"if not fn then return nil, err end "
        b"return string.dump(fn) end"
    )
    try:
        result = compiler(source, ("@" + chunkname).encode())
    except LuaError as exc:
        raise ScriptLoadError(error_text(exc)) from None
    code, err = ((*result, None))[:2] if isinstance(result, tuple) else (result, None)
    if not isinstance(code, bytes):
        raise ScriptLoadError(error_text(err or b"could not compile"))
    return Bytecode(code)


class _TickPlan(NamedTuple):
    """What `MatchLua.tick_states` passes into Lua that stays fixed for a loaded version."""

    tick: Any
    budget: float
    get_state_budget: float
    # get_state's budget message halves, budget and function, in `api.tick`'s order.
    get_state_args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class LoadedScript:
    """Which loaded version of a script a MatchLua runs (`MatchLua.current` / `restore`)."""

    env: Any
    functions: dict[str, Any]
    name: str = ""


class MatchLua:
    """A match's private Lua state with the sandbox installed and a script loaded."""

    def __init__(
        self, host: ScriptHost, limits: Limits, *, seed: int, watched: bool = True
    ) -> None:
        """`watched`: publish each call for the watchdog (`in_flight`).  The record is one per
        process, for the event loop's thread; a state used on another thread (a reload's probe)
        must not publish into it."""
        self.limits = limits
        self.watched = watched
        self.runtime = lua54.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            encoding=None,
            attribute_filter=_deny_attributes,
            max_memory=limits.max_memory,
        )
        # Persistence results are Lua tables, built in the runtime that made the call.
        persist = getattr(host, "persist", None)
        library = native.library()
        functions = native.load_into(self.runtime, library) if library else None
        host_table = self.runtime.table_from(
            {
                b"now": functions.now if functions else time.perf_counter,
                b"log": host.log,
                b"send": host.send,
                b"broadcast": host.broadcast,
                b"module": host.module,
                # A weak proxy: a strong reference from inside the Lua state back to this object
                # would be a cycle only the cyclic GC can break, and dead match states would then
                # pile up and be freed in one long pause.
                b"persist": functools.partial(persist, weakref.proxy(self)) if persist else None,
                b"hook_count": limits.hook_count,
                b"pattern_budget": limits.pattern_budget,
                b"seed": seed,
                b"patterns_chunk": _host_bytecode(_PATTERNS_SOURCE, b"=patterns.lua"),
                b"calls_chunk": _host_bytecode(_CALLS_SOURCE, b"=asobi"),
                b"clib_chunk": _host_bytecode(_CLIB_SOURCE, b"=asobi"),
                b"random_chunk": _host_bytecode(_RANDOM_SOURCE, b"=asobi"),
                b"pack_chunk": _host_bytecode(_PACK_SOURCE, b"=asobi"),
                b"tojson": functions.tojson if functions else None,
                b"pack": functions.pack if functions else None,
                b"budget": functions.budget if functions else None,
                b"max_nodes": MAX_NODES,
            }
        )
        real_load = self.runtime.globals()[b"load"]
        self.api = real_load(_host_bytecode(_SANDBOX_SOURCE, b"=asobi"), b"=asobi", b"b")(
            host_table
        )
        self._call = self.api[b"call"]
        self._call_each = self.api[b"call_each"]
        self._tick = self.api[b"tick"]
        self._call_inputs = self.api[b"call_inputs"]
        self._ctx = self.api[b"ctx"]
        self._global = self.api[b"global"]
        self._field = self.api[b"field"]
        self._install = self.api[b"install"]
        self._activate = self.api[b"activate"]
        self._copy = self.api[b"copy"]
        self._snapshot = self.api[b"snapshot"]
        self._snapshot_budget_error = b"".join(budget_message("snapshot", limits.copy))
        self._unpack = self.api[b"unpack"]
        self._loaded = LoadedScript(None, {})
        self._budgets: dict[str, float] = {}
        # What every tick's crossing passes that changes only with the script version or the
        # players (`tick_states`): worked out again only when they change.
        self._tick_plan: _TickPlan | None = None
        self._tick_plan_of: LoadedScript | None = None
        self._asked_ids: list[str | None] = []
        self._asked_args: list[bytes | None] = []
        # Building the sandbox leaves a quarter of the new heap as garbage: freed now, its memory
        # goes to the next match's state.  Then generational collection: a match makes young
        # garbage every tick (get_state's tables), which the incremental collector lets pile up
        # to twice the live heap before a cycle; with hundreds of small Lua heaps interleaved in
        # one malloc arena those peaks add up.  Measured on the bench game after 60 ticks, 400
        # matches: 306 -> 215 KiB of RSS per match, the same CPU per tick.
        collect = self.runtime.globals()[b"collectgarbage"]
        collect(b"collect")
        collect(b"generational")
        # Plain labels the watchdog reads from its thread (it must not touch the Lua state).
        self.match_id = ""
        self.script_name = ""

    # -- loading --------------------------------------------------------------------------------
    def load(self, code: Bytecode, chunkname: str) -> Any:
        """Load a compiled script into a new environment and run its top level (budgeted).

        Returns what the chunk returned (a module's table, `config.lua`'s mode map).  Each load
        gets a fresh environment, so versions of a script never share a table.  The new version
        becomes the running one; if its top level fails, the previous one is put back and
        ScriptLoadError raised.  `restore` puts it back later (a reload rolled back).
        """
        previous = self._loaded
        self.script_name = chunkname
        result = self.call_function(
            "load", self._install, code, ("@" + chunkname).encode(), budget=self.limits.load
        )
        if not result.ok:
            self.restore(previous)
            raise ScriptLoadError(result.error)
        env = result.value
        if env is None:
            message = result.values[1] if len(result.values) > 1 else None
            raise ScriptLoadError(error_text(message or b"could not compile"))
        self._loaded = LoadedScript(env, {}, chunkname)
        return result.values[1] if len(result.values) > 1 else None

    def current(self) -> LoadedScript:
        return self._loaded

    def restore(self, loaded: LoadedScript) -> None:
        """Run `loaded` again (what `current` returned before a newer version was loaded)."""
        self._loaded = loaded
        self.script_name = loaded.name
        self._activate(loaded.env)

    def global_value(self, name: str) -> Any:
        """A script global as plain data (None when unset or not convertible)."""
        try:
            return to_python(self._global(self._loaded.env, name.encode()), what=name)
        except ConversionError:
            return None

    def field(self, table: Any, name: str) -> Any:
        """`table[name]` without metamethods (no script code runs outside a budget)."""
        return self._field(table, name.encode())

    def function(self, name: str) -> Any:
        """The script's global function `name`, or None.  Looked up once per loaded script."""
        functions = self._loaded.functions
        if name not in functions:
            value = self._global(self._loaded.env, name.encode())
            functions[name] = value if lua54.lua_type(value) == "function" else None
        return functions[name]

    def copy_state(self, state: Any) -> CallResult:
        """A data-only copy of `state` for a new version to run on (see `api.copy`)."""
        return self.call_function("reload copy", self._copy, state, budget=self.limits.copy)

    def pack_state(self, state: Any) -> CallResult:
        """The same data-only copy written to bytes, for a snapshot (`api.snapshot`).  On
        success `values` is (the bytes, the random generator's state at the same moment, as
        `random_state` gives it); on failure the error names the path of what cannot be copied.

        Budgeted like the reload's copy (ASOBI_LUA_COPY), but the walk runs no script code and
        checks the clock itself: one crossing, no budget hook (see pack.lua)."""
        global _in_flight
        budget = self.limits.copy
        started = _now()
        watched = self.watched
        if watched:
            outer, _in_flight = _in_flight, (started, started + budget, "snapshot", self)
        try:
            out = self._snapshot(self._snapshot_budget_error, started + budget, state)
        except LuaMemoryError:
            return CallResult(
                False, error=f"snapshot ran out of memory (cap {self.limits.max_memory} bytes)"
            )
        except LuaError as exc:
            return CallResult(False, error=error_text(exc))
        finally:
            if watched:
                _in_flight = outer
        if out[0] is not True:
            return CallResult(False, error=error_text(out[1]))
        a, b, c, d = out[1:5]
        packed = b"".join(out[5:])
        return CallResult(True, (packed, (a & _U64, b & _U64, c & _U64, d & _U64)))

    def unpack_state(self, data: bytes) -> CallResult:
        """A state `pack_state` wrote, rebuilt as tables of this Lua state."""
        return self.call_function("snapshot restore", self._unpack, data, budget=self.limits.copy)

    # -- calling --------------------------------------------------------------------------------
    def call(self, callback: str, *args: Any) -> CallResult:
        """Call the script's global `callback` with its configured budget."""
        fn = self.function(callback)
        if fn is None:
            return CallResult(False, error=f"{callback} is not defined")
        budget = self._budget(callback)
        return self.call_function(callback, fn, *args, budget=budget)

    def _budget(self, callback: str) -> float:
        """The configured budget of `callback`, looked up once per state."""
        budget = self._budgets.get(callback)
        if budget is None:
            budget = self._budgets[callback] = self.limits.budget(callback)
        return budget

    def call_tick(self, state: Any, tick_no: int) -> tuple[CallResult, bool | None]:
        """The script's `tick(state)` as tick `tick_no` (what game.tick() says from now on), and
        whether the state it leaves has `_finished` set (None: unknown, the call did not return):
        one crossing into Lua (`api.tick`) where a tick took three."""
        fn = self.function("tick")
        if fn is None:
            self._ctx[b"tick"] = tick_no
            return CallResult(False, error="tick is not defined"), None
        budget = self._budget("tick")
        out = self._enter("tick", budget, None, self._tick, (tick_no,), fn, (state,))
        if type(out) is CallResult:
            return out, None
        return call_result(out[1:]), out[0] is True

    def tick_states(
        self, state: Any, tick_no: int, ids: Sequence[str | None]
    ) -> tuple[CallResult, bool | None, list[EachResult] | None]:
        """`call_tick` and, when the tick succeeded, left a table (or nothing) and made no host
        calls, `call_each("get_state", state it left, ids)` in the same crossing
        (`api.tick`).  The third value is call_each's results, or None when get_state did
        not run (the caller then calls `call_each` itself)."""
        loaded = self._loaded
        if self._tick_plan_of is not loaded:
            self._tick_plan = self._plan_ticks()
            self._tick_plan_of = loaded
        plan = self._tick_plan
        if plan is None:
            return (*self.call_tick(state, tick_no), None)
        if ids != self._asked_ids:
            self._asked_ids = list(ids)
            self._asked_args = _id_args(ids)
        out = self._enter(
            "tick",
            plan.budget,
            None,
            self._tick,
            (tick_no,),
            plan.tick,
            (state, *plan.get_state_args, *self._asked_args),
            watch_s=plan.budget + plan.get_state_budget * len(ids),
        )
        if type(out) is CallResult:
            return out, None, None
        states = each_results(out, 3, "get_state result") if len(out) > 3 else None
        return call_result(out[1:3]), out[0] is True, states

    def _plan_ticks(self) -> _TickPlan | None:
        """The loaded version's `tick` and `get_state` with their budgets and budget messages,
        as `api.tick` takes them; None when either is not defined."""
        fn = self.function("tick")
        state_fn = self.function("get_state")
        if fn is None or state_fn is None:
            return None
        state_budget = self._budget("get_state")
        state_prefix, state_suffix = budget_message("get_state", state_budget)
        return _TickPlan(
            fn,
            self._budget("tick"),
            state_budget,
            (state_prefix, state_suffix, state_budget, state_fn),
        )

    def call_function(
        self, label: str, fn: Any, *args: Any, budget: float, named: float | None = None
    ) -> CallResult:
        """Call fn(*args) with `budget` seconds to run.  `named` is the budget an error names when
        the call gets only what is left of a shared one (inputs of one tick): the configured
        budget is what a developer can raise, and the messages stay few enough to cache."""
        out = self._enter(label, budget, named, self._call, (), fn, args)
        if type(out) is CallResult:
            return out
        return call_result(out if type(out) is tuple else (out,))

    def _enter(
        self,
        label: str,
        budget: float,
        named: float | None,
        entry: Any,
        lead: tuple[Any, ...],
        fn: Any,
        args: tuple[Any, ...],
        watch_s: float | None = None,
    ) -> Any:
        """entry(prefix, suffix, deadline, *lead, fn, *args), watched: what it returned, or a
        failed CallResult when Lua raised (out of memory, an error past the call machinery).
        `watch_s`: how long the whole crossing may take, for the watchdog, when it makes more
        than this one call (`tick_states`)."""
        global _in_flight
        started = _now()
        watched = self.watched
        if watched:
            limit = started + (budget if watch_s is None else watch_s)
            outer, _in_flight = _in_flight, (started, limit, label, self)
        try:
            prefix, suffix = budget_message(label, budget if named is None else named)
            return entry(prefix, suffix, started + budget, *lead, fn, *args)
        except LuaMemoryError:
            return CallResult(
                False, error=f"{label} ran out of memory (cap {self.limits.max_memory} bytes)"
            )
        except LuaError as exc:
            return CallResult(False, error=error_text(exc))
        finally:
            if watched:
                _in_flight = outer

    def call_inputs(
        self, fn: Any, state: Any, pairs: list[Any], until_time: float, peak: float, first: bool
    ) -> InputsResult:
        """`handle_input` for a run of inputs, each a player id as bytes followed by its
        `input_args`, flattened in `pairs`, in one crossing (`B.call_inputs`): all under one
        deadline, each call on the state the one before left.  A call after the tick's `first`
        starts only if twice `peak` still fits; the batch ends after a call that failed,
        returned a non-table, or made host calls.  Raised Lua errors (out of memory outside any
        call) count as the first call's."""
        out = self._enter(
            "handle_input",
            until_time - _now(),
            self.limits.handle_input,
            self._call_inputs,
            (peak, first),
            fn,
            (state, *pairs),
        )
        if type(out) is CallResult:
            return InputsResult(1, peak, state, out)
        made, peak, state, ok, value = out
        if ok is True:
            return InputsResult(made, peak, state, CallResult(True, (value,)))
        return InputsResult(made, peak, state, CallResult(False, error=error_text(value)))

    def call_each(
        self, callback: str, state: Any, ids: Sequence[str | None], *, what: str
    ) -> list[EachResult]:
        """Call the script's `callback(state, id)` for the first ids in one crossing, each call
        under the callback's own budget; per id called, (its result as plain data, None, None),
        (None, its result as JSON text, None) when the Lua-side encoder wrote it
        (`asobi.lua.native`), or (None, None, why it failed: the call or the conversion).

        It answers for `ids[:k]`, k >= 1: it stops after a call that used host functions, so
        that effects held meanwhile are the last id's alone, and the caller calls again for the
        rest.  This is the state-frame path: one crossing per match tick instead of one budgeted
        call per player.
        """
        global _in_flight
        fn = self.function(callback)
        if fn is None:
            return [(None, None, f"{callback} is not defined")]
        budget = self._budget(callback)
        started = _now()
        watched = self.watched
        if watched:
            outer, _in_flight = _in_flight, (started, started + budget * len(ids), callback, self)
        try:
            prefix, suffix = budget_message(callback, budget)
            out = self._call_each(prefix, suffix, budget, fn, state, *_id_args(ids))
        except LuaMemoryError:
            return [
                (None, None, f"{callback} ran out of memory (cap {self.limits.max_memory} bytes)")
            ]
        except LuaError as exc:
            return [(None, None, error_text(exc))]
        finally:
            if watched:
                _in_flight = outer
        return each_results(out, 0, what)

    # -- random generator ------------------------------------------------------------------------
    def random_state(self) -> tuple[int, int, int, int]:
        """The state of the match's random generator (`math.random`, `game.random`): four
        unsigned 64-bit integers.  `set_random_state` with them, in this state or a fresh one,
        continues the same sequence (a snapshot, a replay)."""
        a, b, c, d = self.api[b"random_state"]()
        return a & _U64, b & _U64, c & _U64, d & _U64

    def set_random_state(self, state: tuple[int, int, int, int]) -> None:
        """Put back a state `random_state` returned.  Raises ValueError for anything else."""
        words = tuple(state)
        if len(words) != 4 or not all(
            isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= _U64 for w in words
        ):
            raise ValueError("a random state is four integers from 0 to 2**64 - 1")
        if not any(words):
            raise ValueError("an all-zero random state would draw only zeros")
        # Lua integers are signed 64-bit: the same bits, read as two's complement.
        signed = [w - (1 << 64) if w >> 63 else w for w in words]
        self.api[b"set_random_state"](*signed)

    # -- context and data ------------------------------------------------------------------------
    def set_context(self, match_id: str, tick: int, players: list[str]) -> None:
        self.match_id = match_id
        ctx = self._ctx
        ctx[b"match_id"] = match_id.encode()
        ctx[b"tick"] = tick
        ctx[b"players"] = self.to_lua(players)

    def set_tick(self, tick: int) -> None:
        self._ctx[b"tick"] = tick

    def set_players(self, players: list[str]) -> None:
        self._ctx[b"players"] = self.to_lua(players)

    def new_table(self) -> Any:
        return self.runtime.table()

    def to_lua(self, value: Any) -> Any:
        return to_lua(self.runtime, value)

    def input_args(self, value: Any) -> list[Any]:
        """An input's arguments for `call_inputs` (`convert.input_args`)."""
        return input_args(self.runtime, value)

    @staticmethod
    def is_table(value: Any) -> bool:
        return bool(lua54.lua_type(value) == "table")

    @staticmethod
    def type_name(value: Any) -> str:
        return lua54.lua_type(value) or type(value).__name__
