"""`merge_patch.diff` in C (`asobi/_merge_patch.c`) gives the patch the Python definition gives.

Compared as orjson's bytes, so that a patch that differs only in a type (`1` for `1.0`, `true`
for `1`) or in key order counts as different.  The values are built to collide: few keys, and
scalars that Python calls equal but JSON spells differently (0, 0.0, -0.0, False, 1, 1.0, True).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asobi import merge_patch

try:
    from asobi._merge_patch import diff as c_diff
except ImportError:
    c_diff = None

pytestmark = pytest.mark.skipif(
    c_diff is None, reason="asobi/_merge_patch.c is not built here (no C compiler at install)"
)

_scalars = st.one_of(
    st.sampled_from([0, 0.0, -0.0, False, 1, 1.0, True, None, "", "a", 2**62]),
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.text(max_size=3),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from("abcde"), inner, max_size=5)
    ),
    max_leaves=30,
)


def _reordered(value: Any) -> Any:
    """The same data with every object's keys in reverse order."""
    if type(value) is dict:
        return {k: _reordered(v) for k, v in reversed(value.items())}
    if type(value) is list:
        return [_reordered(v) for v in value]
    return value


def _same_patch(old: Any, new: Any) -> None:
    assert c_diff is not None
    assert orjson.dumps(c_diff(old, new)) == orjson.dumps(merge_patch.python_diff(old, new))


@settings(max_examples=600, deadline=None)
@given(_json, _json)
def test_any_two_values(old: Any, new: Any) -> None:
    _same_patch(old, new)
    _same_patch(old, _reordered(old))
    _same_patch(_reordered(new), new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"a": 1}, {"a": 1.0}),
        ({"a": 0.0}, {"a": -0.0}),
        ({"a": [0.0]}, {"a": [-0.0]}),
        ({"a": [1]}, {"a": [True]}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": 2, "x": 1}}),
        ({"a": {"x": 1}, "b": 2}, {"a": {}}),
        ({"a": {}}, {"a": []}),
        ([1, 2], {"a": 1}),
        ({"a": 1}, "text"),
    ],
)
def test_values_python_calls_equal(old: Any, new: Any) -> None:
    _same_patch(old, new)


def test_the_module_uses_it() -> None:
    assert merge_patch.diff is c_diff
