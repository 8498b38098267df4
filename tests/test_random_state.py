"""The match's random generator keeps its state as data: save it, restore it, same numbers."""

from __future__ import annotations

from typing import Any

import pytest
from lupa import lua54

from asobi.lua.runtime import Limits, MatchLua, compile_script

DRAWS = b"""
function draws(n, a, b)
  local out = {}
  for i = 1, n do
    if a == nil then out[i] = game.random()
    elseif b == nil then out[i] = math.random(a)
    else out[i] = game.random(a, b) end
  end
  return out
end
function kinds()
  return math.type(math.random()), math.type(math.random(3)), math.type(game.random(2, 9)),
    math.type(math.random(0))
end
function bad(...) return pcall(math.random, ...) end
"""


class Host:
    def log(self, level: bytes, message: bytes, meta: Any) -> None:
        return None

    def send(self, player_id: Any, payload: Any) -> None:
        return None

    def broadcast(self, event: Any, payload: Any) -> None:
        return None

    def module(self, name: bytes) -> tuple[bytes | None, bytes]:
        return None, b"no modules here"


def match_lua(seed: int) -> MatchLua:
    # One call makes up to 6,000 draws (~7 ms here): with the default 50 ms budget a loaded CI
    # machine could cut it, and this module is about the sequence, not budgets.
    lua = MatchLua(Host(), Limits(tick=2.0), seed=seed)
    lua.load(compile_script(DRAWS, "draws.lua"), "draws.lua")
    return lua


def draw(lua: MatchLua, n: int, *bounds: int) -> list[Any]:
    result = lua.call("draws", n, *bounds)
    assert result.ok, result.error
    return [result.value[i + 1] for i in range(n)]


@pytest.mark.parametrize("bounds", [(), (6,), (-5, 1_000_003)])
def test_restored_state_continues_the_sequence_in_a_fresh_state(bounds: tuple[int, ...]) -> None:
    lua = match_lua(seed=424242)
    draw(lua, 100, *bounds)
    saved = lua.random_state()
    expected = draw(lua, 50, *bounds)
    fresh = match_lua(seed=1)  # another seed: only the restored state can make the numbers agree
    assert draw(fresh, 50, *bounds) != expected
    fresh.set_random_state(saved)
    assert draw(fresh, 50, *bounds) == expected
    assert fresh.random_state() == lua.random_state()


def test_state_is_plain_unsigned_integers() -> None:
    state = match_lua(seed=7).random_state()
    assert len(state) == 4
    assert all(type(w) is int and 0 <= w < 2**64 for w in state)
    assert any(w >= 2**63 for w in match_lua(seed=7).random_state() + match_lua(8).random_state())


def test_same_numbers_as_lua_math_random_for_a_seed() -> None:
    """The generator is Lua 5.4's own algorithm: a seed logged before replays the same way."""
    seed = 123456789012
    real = lua54.LuaRuntime()
    real.execute(f"math.randomseed({seed})")
    ours = draw(match_lua(seed), 200, -7, 1_000_003)
    assert ours == [real.execute("return math.random(-7, 1000003)") for _ in range(200)]


def test_distribution_and_kinds() -> None:
    lua = match_lua(seed=99)
    floats = draw(lua, 2000)
    assert all(isinstance(x, float) and 0.0 <= x < 1.0 for x in floats)
    assert 0.45 < sum(floats) / len(floats) < 0.55
    dice = draw(lua, 6000, 6)
    assert all(isinstance(x, int) and 1 <= x <= 6 for x in dice)
    assert {dice.count(face) for face in range(1, 7)} <= set(range(850, 1151))
    ranged = draw(lua, 3000, -3, 3)
    assert set(ranged) == set(range(-3, 4))
    result = lua.call("kinds")
    assert result.ok and result.values == (b"float", b"integer", b"integer", b"integer")


def test_api_errors_like_math_random() -> None:
    lua = match_lua(seed=5)
    for args, message in [
        ((3, 1), "interval is empty"),
        ((1.5,), "number has no integer representation"),
        ((1, 2, 3), "wrong number of arguments"),
    ]:
        result = lua.call("bad", *args)
        assert result.ok and result.values[0] is False
        assert message in result.values[1].decode(), result.values


def test_refuses_a_state_that_is_not_one() -> None:
    lua = match_lua(seed=5)
    for state in [(0, 0, 0, 0), (1, 2, 3), (1, 2, 3, 2**64), (1, 2, 3, -1), (1, 2, 3, 1.0)]:
        with pytest.raises(ValueError):
            lua.set_random_state(state)  # type: ignore[arg-type]
