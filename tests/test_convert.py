"""Lua data to Python (`asobi.lua.convert.to_python`): object keys are decoded once and kept
(`_KEYS`), which must change nothing a walk returns, keep a bound however many keys a script
invents, and never keep a key that is not UTF-8."""

from __future__ import annotations

import pytest
from lupa import lua54

from asobi.lua import convert
from asobi.lua.convert import KEYS_CACHED, ConversionError, to_python


def _runtime() -> lua54.LuaRuntime:
    return lua54.LuaRuntime(register_eval=False, encoding=None)


def test_keys_seen_again_convert_as_the_first_time() -> None:
    lua = _runtime()
    make = lua.eval(b'function(n) return { x = n + 0.5, name = "p" .. n, nested = { hp = n } } end')
    first = to_python(make(1))
    again = to_python(make(2))
    assert first == {"x": 1.5, "name": "p1", "nested": {"hp": 1}}
    assert again == {"x": 2.5, "name": "p2", "nested": {"hp": 2}}
    # One str object per key across walks.
    assert next(iter(first)) is next(iter(again))


def test_the_key_cache_stays_bounded_and_results_stay_whole() -> None:
    lua = _runtime()
    many = lua.eval(
        b"function(from, n) local t = {} for i = from, from + n - 1 do t['k' .. i] = i end "
        b"return t end"
    )
    for start in (0, KEYS_CACHED):  # twice the bound of distinct keys
        result = to_python(many(start, KEYS_CACHED))
        assert result == {f"k{i}": i for i in range(start, start + KEYS_CACHED)}
    assert len(convert._KEYS) <= KEYS_CACHED


def test_a_key_that_is_not_utf8_is_refused_every_time_and_never_kept() -> None:
    lua = _runtime()
    bad = lua.eval(b'function() return { ["\\xff\\xfe"] = 1 } end')
    for _ in range(2):
        with pytest.raises(ConversionError, match="key that is not valid UTF-8"):
            to_python(bad(), what="get_state result")
    assert b"\xff\xfe" not in convert._KEYS
