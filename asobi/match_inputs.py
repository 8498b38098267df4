"""A match's queued inputs, fed to `handle_input` at the start of its tick.

They go into Lua in runs, one crossing for many (`MatchLua.call_inputs`), and each input still
behaves as if it had its own call: it sees the state the input before it left, a failing or
refused input changes nothing and is logged, effects belong to the input that made them, and all
the inputs of one tick share one `handle_input` budget.  `Match.queue_input` fills the queue.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from asobi.lua.convert import ConversionError

if TYPE_CHECKING:
    from asobi.match import Match

# Inputs handed to Lua in one crossing at most (they are arguments of one call).
INPUTS_PER_RUN = 64


def run_inputs(match: Match) -> None:
    """Feed queued inputs to `handle_input`, oldest first, until one budget is spent.

    All the inputs of one tick share one `handle_input` budget: each call gets what is left
    of it, and what does not fit waits for the next tick.  So a burst of inputs costs every
    other match at most one budget per tick, however many inputs it holds.  They go into Lua
    in runs (`MatchLua.call_inputs`), one crossing for many; a run ends after a call that
    failed or made host calls, so effects and failures stay that input's own.
    """
    inputs = match.inputs
    fn = match.lua.function("handle_input")
    if fn is None:
        inputs.clear()
        match.queued.clear()
        return
    until = time.perf_counter() + match.services.config.limits.handle_input
    first = True
    while inputs:
        taken, pairs = _take_inputs(match)
        if not taken:
            continue  # the front ones were for players who left, or refused
        match.effects.discard()
        done = match.lua.call_inputs(fn, match.state, pairs, until, match.input_cost, first)
        match.input_cost = done.peak
        for pid, payload in reversed(taken[done.made :]):
            inputs.appendleft((pid, payload))
            match.queued[pid] = match.queued.get(pid, 0) + 1
        if not done.made:
            return  # the budget is spent; the rest waits for the next tick
        first = False
        recorder = match.recorder
        if recorder is not None:
            for pid, payload in taken[: done.made]:
                recorder.input(pid, payload)
        # Calls before the last made no host calls (the run would have ended there), so
        # what effects there are belong to the last one, and it alone can have failed.
        match.state = done.state
        match.apply_outcome("handle_input", done.last)


def _take_inputs(match: Match) -> tuple[list[tuple[str, Any]], list[Any]]:
    """Inputs from the front of the queue for one run, with their Lua form: (player id,
    payload) in order, and each input's player id as bytes and `input_args`, flattened.  An
    input of a player no longer seated is dropped; one that cannot become Lua data is refused
    and logged.  Either ends the run at the first input after it, so inputs keep their order."""
    inputs, queued, recorder = match.inputs, match.queued, match.recorder
    taken: list[tuple[str, Any]] = []
    pairs: list[Any] = []
    while inputs and len(taken) < INPUTS_PER_RUN:
        pid, payload = inputs[0]
        usable = pid in match.players
        lua_args: list[Any] = []
        if usable:
            try:
                lua_args = match.lua.input_args(payload)
            except ConversionError as exc:
                if taken:
                    break
                usable = False
                if recorder is not None:
                    recorder.input(pid, payload)
                match.log_failure("handle_input", f"input refused: {exc}")
        elif taken:
            break
        inputs.popleft()
        count = queued.pop(pid, 1) - 1
        if count > 0:
            queued[pid] = count
        if not usable:
            break
        taken.append((pid, payload))
        pairs.append(pid.encode())
        pairs += lua_args
    return taken, pairs
