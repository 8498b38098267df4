"""Lua data to Python (`asobi.lua.convert.to_python`): object keys and short string values are
decoded once and kept (`_KEYS`, `_TEXTS`), which must change nothing a walk returns, keep a bound
however many a script invents, and never keep one that is not UTF-8."""

from __future__ import annotations

import pytest
from lupa import lua54

from asobi.lua import convert
from asobi.lua.convert import CACHED, CACHED_TEXT_BYTES, ConversionError, to_python


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
    for start in (0, CACHED):  # twice the bound of distinct keys
        result = to_python(many(start, CACHED))
        assert result == {f"k{i}": i for i in range(start, start + CACHED)}
    assert len(convert._KEYS) <= CACHED


def test_a_key_that_is_not_utf8_is_refused_every_time_and_never_kept() -> None:
    lua = _runtime()
    bad = lua.eval(b'function() return { ["\\xff\\xfe"] = 1 } end')
    for _ in range(2):
        with pytest.raises(ConversionError, match="key that is not valid UTF-8"):
            to_python(bad(), what="get_state result")
    assert b"\xff\xfe" not in convert._KEYS


def test_values_are_kept_when_short_and_bounded_however_many() -> None:
    lua = _runtime()
    make = lua.eval(
        b"function(from, n, long) local t = {} for i = from, from + n - 1 do "
        b"t[#t + 1] = 'v' .. i; t[#t + 1] = long .. i end return { list = t, kind = 'orc' } end"
    )
    long = "x" * CACHED_TEXT_BYTES
    for start in (0, CACHED):
        result = to_python(make(start, CACHED, long.encode()))
        expected = [s for i in range(start, start + CACHED) for s in (f"v{i}", f"{long}{i}")]
        assert result == {"list": expected, "kind": "orc"}
    assert len(convert._TEXTS) <= CACHED
    assert not any(len(text) > CACHED_TEXT_BYTES for text in convert._TEXTS)
    bad = lua.eval(b'function() return { "\\xff" } end')
    with pytest.raises(ConversionError, match=r"\[1\] is not valid UTF-8"):
        to_python(bad())
    assert b"\xff" not in convert._TEXTS
