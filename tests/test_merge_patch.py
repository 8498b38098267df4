"""`asobi.merge_patch`: applying the patches in order to the first state reproduces every state.

The states are what full `match.state` frames carry: random Python data sent through a real Lua
state and back (`to_lua` then `to_python`), so empty tables are `{}`, arrays have no holes and no
value is `null`.  Patches cross the wire as JSON between diff and apply, as they do in frames.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from lupa import lua54

from asobi import merge_patch
from asobi.lua.convert import to_lua, to_python

LUA = lua54.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)

KEYS = st.sampled_from(["a", "b", "c", "hp", "pos", "items", "1", "x y"])
SCALARS = (
    st.text(max_size=6)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
STATES = st.dictionaries(KEYS, VALUES, max_size=6)


def as_sent(value: Any) -> Any:
    """`value` as a full frame carries it: through a Lua table and back."""
    return to_python(to_lua(LUA, value))


def wire(value: Any) -> bytes:
    """The JSON a frame would hold, keys sorted: equal bytes means equal JSON values, telling
    `1`, `1.0` and `true` apart."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@settings(max_examples=400, deadline=None)
@given(st.lists(STATES, min_size=2, max_size=8))
def test_patches_applied_in_order_reproduce_every_state(raw_states: list[Any]) -> None:
    states = [as_sent(s) for s in raw_states]
    held = orjson.loads(orjson.dumps(states[0]))
    for previous, state in itertools.pairwise(states):
        before = copy.deepcopy(previous)
        patch = orjson.loads(orjson.dumps(merge_patch.diff(previous, state)))
        assert previous == before, "diff must not change its input"
        target, snapshot = held, copy.deepcopy(held)
        held = merge_patch.apply(target, patch)
        assert wire(target) == wire(snapshot), "apply must not change its target"
        assert wire(held) == wire(state)


@given(STATES)
def test_an_unchanged_state_patches_to_nothing(raw: Any) -> None:
    state = as_sent(raw)
    assert merge_patch.diff(state, copy.deepcopy(state)) == {}


def test_rfc_7396_rules() -> None:
    old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": {"deep": True}}
    new = {"a": 1, "b": {"c": [1, 2, 3], "d": "x"}, "e": {}}
    patch = merge_patch.diff(old, new)
    # Removed keys become null, arrays go whole, unchanged keys are left out.
    assert patch == {"gone": None, "b": {"c": [1, 2, 3]}, "e": {}}
    assert merge_patch.apply(old, patch) == new
    assert old["b"] == {"c": [1, 2], "d": "x"}, "apply must not change its target"


def test_a_change_of_kind_replaces_the_value() -> None:
    cases = [({"v": [1]}, {"v": {}}), ({"v": {}}, {"v": [1]}), ({"v": 1}, {"v": {"a": 1}})]
    for old, new in cases:
        patch = merge_patch.diff(old, new)
        assert wire(merge_patch.apply(old, patch)) == wire(new)


def test_json_spellings_that_python_calls_equal_are_sent() -> None:
    for old, new in [(1, True), (1, 1.0), ([1], [True]), ([{"a": 0}], [{"a": 0.0}])]:
        patch = merge_patch.diff({"v": old}, {"v": new})
        assert patch == {"v": new}
        assert wire(merge_patch.apply({"v": old}, patch)) == wire({"v": new})


def test_top_level_values_that_are_not_objects_are_sent_whole() -> None:
    for old, new in [({"a": 1}, [1, 2]), ([1], {"a": 1}), ({"a": 1}, "text"), ("t", None)]:
        assert merge_patch.apply(old, merge_patch.diff(old, new)) == new
