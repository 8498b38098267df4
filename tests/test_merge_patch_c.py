"""`merge_patch.diff` in C (`asobi/_merge_patch.c`) gives the patch the Python definition gives.

Compared as orjson's bytes, so that a patch that differs only in a type (`1` for `1.0`, `true`
for `1`) or in key order counts as different.  The values are built to collide: few keys, and
scalars that Python calls equal but JSON spells differently (0, 0.0, -0.0, False, 1, 1.0, True).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
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


# -- diff_text: the same patch from and to JSON text, for frame bodies ---------------------------

# What a frame body holds: no infinities (the encoders refuse them; orjson would write null).
_finite_json = st.recursive(
    st.one_of(
        st.sampled_from([0, 0.0, -0.0, False, 1, 1.0, True, None, "", "a", '"', "\\", 2**62]),
        st.integers(-3, 3),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=3),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from("abcde"), inner, max_size=5)
    ),
    max_leaves=30,
)
_objects = st.dictionaries(st.sampled_from("abcde"), _finite_json, max_size=5)


def _canonical(value: Any) -> bytes:
    """Sorted keys and zeros without a sign: the text diff sends 0.0 -> -0.0 as a change (the
    numbers are spelled differently), the object diff sees equal numbers and sends nothing."""
    return orjson.dumps(_unsigned_zeros(value), option=orjson.OPT_SORT_KEYS)


def _unsigned_zeros(value: Any) -> Any:
    if type(value) is float and value == 0.0:
        return 0.0
    if type(value) is list:
        return [_unsigned_zeros(v) for v in value]
    if type(value) is dict:
        return {k: _unsigned_zeros(v) for k, v in value.items()}
    return value


def _text_patch_applies_as_diff(old: Any, new: Any) -> None:
    """The text patch, applied, gives what the Python diff gives applied (a merge patch cannot
    carry a null member, so "reproduces `new`" is the diff's own promise, tested elsewhere); and
    it is the Python diff's patch byte for byte except where the two are documented to differ
    (0.0 against -0.0 is sent)."""
    assert merge_patch.diff_text is not None
    text = merge_patch.diff_text(orjson.dumps(old), orjson.dumps(new))
    assert text is not None
    expected = merge_patch.python_diff(old, new)
    assert _canonical(merge_patch.apply(old, orjson.loads(text))) == _canonical(
        merge_patch.apply(old, expected)
    )
    if b"0.0" not in orjson.dumps(old) + orjson.dumps(new):
        assert text == orjson.dumps(expected)


@settings(max_examples=600, deadline=None)
@given(_objects, _objects)
@example({"a": 0.0}, {"a": -0.0})  # a change to the text diff, none to the object diff
def test_text_diff_of_any_two_objects(old: Any, new: Any) -> None:
    _text_patch_applies_as_diff(old, new)
    _text_patch_applies_as_diff(old, _reordered(old))
    _text_patch_applies_as_diff(_reordered(new), new)
    _text_patch_applies_as_diff(old, {**old, "e": {"nested": new}})


def test_text_diff_of_a_field_view_lists_only_what_moved() -> None:
    old = {"you": {"x": 1.5, "y": 2}, "npcs": {str(i): {"x": i, "y": i} for i in range(60)}}
    new = {"you": {"x": 1.75, "y": 2}, "npcs": {str(i): {"x": i, "y": i} for i in range(1, 61)}}
    new["npcs"]["7"]["y"] = -1
    assert merge_patch.diff_text is not None
    text = merge_patch.diff_text(orjson.dumps(old), orjson.dumps(new))
    assert orjson.loads(text or b"") == {
        "you": {"x": 1.75},
        "npcs": {"7": {"y": -1}, "60": {"x": 60, "y": 60}, "0": None},
    }


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"{",
        b"[1]",
        b'"text"',
        b'{"a"}',
        b'{"a":}',
        b'{"a":1,}',
        b'{"a":"x',
        b'{"a":"x\\',
        b'{"a":[1,2}',
        b'{ "a":1}',
        b'{"a":1 }',
        b'{"a":1}x',
        b'{"a":' * 100 + b"1" + b"}" * 100,
    ],
)
def test_text_diff_declines_what_its_encoders_do_not_write(bad: bytes) -> None:
    assert merge_patch.diff_text is not None
    assert merge_patch.diff_text(b'{"a":2}', bad) is None
    assert merge_patch.diff_text(bad, b'{"a":2}') is None
