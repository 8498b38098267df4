"""The budgets' clock read in C (`now` in `asobi/lua/_native.c`): what `time.perf_counter`
reads, and what a match's budget machinery uses, so a runaway call is still cut on time."""

from __future__ import annotations

import time

import pytest
from lupa import lua54

from asobi.lua import native
from asobi.lua.runtime import Limits, MatchLua, compile_script
from tests.test_patterns import _QuietHost

pytestmark = pytest.mark.skipif(
    native.library() is None,
    reason="asobi's Lua C functions are not built here (no C compiler at install)",
)


def _functions() -> native.Functions:
    library = native.library()
    assert library is not None
    runtime = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    return native.load_into(runtime, library)


def test_it_reads_what_perf_counter_reads() -> None:
    now = _functions().now
    assert now is not time.perf_counter  # the C clock, not the fallback
    for _ in range(1000):
        before = time.perf_counter()
        reading = now()
        after = time.perf_counter()
        # CPython rounds nanoseconds the same way: a reading between two of its own.
        assert before <= reading <= after


def test_a_clock_that_disagrees_is_not_used() -> None:
    assert not native._same_clock(lambda: time.perf_counter() + 5.0)
    assert not native._same_clock(lambda: 0)
    assert native._same_clock(time.perf_counter)


def test_a_runaway_tick_is_cut_at_its_budget_on_it() -> None:
    lua = MatchLua(_QuietHost(), Limits(tick=0.02), seed=1)
    lua.load(compile_script(b"function tick(state) while true do end end", "spin.lua"), "spin.lua")
    started = time.perf_counter()
    result, _ = lua.call_tick(lua.new_table(), 1)
    elapsed = time.perf_counter() - started
    assert not result.ok
    assert "tick exceeded its 20 ms budget" in (result.error or "")
    assert 0.02 <= elapsed < 0.5
