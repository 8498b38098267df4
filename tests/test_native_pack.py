"""The snapshot packer in C (`asobi/lua/_pack.c`) writes exactly pack.lua's bytes.

Both run on the same Lua state and the same table (a table's iteration order is its state's
own), so any difference in walk order, numbering or layout shows as different bytes.  What
pack.lua refuses, the C packer declines (nil), so that pack.lua's error, with its path, is the
one reported (`tests/test_snapshot_pack.py` checks those errors through `MatchLua.pack_state`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asobi.lua import native
from tests import test_snapshot_pack
from tests.test_state_copy import runtime

pytestmark = pytest.mark.skipif(
    native.library() is None,
    reason="asobi's Lua C functions are not built here (no C compiler at install)",
)

PACK_LUA = resources.files("asobi.lua").joinpath("pack.lua").read_bytes()


def packers(lua_runtime: Any) -> tuple[Callable[[Any], bytes], Callable[..., Any]]:
    """pack.lua's `pack` (its pieces joined) and the C packer, both in `lua_runtime`."""
    refuse = lua_runtime.execute(b"return function() error('refused', 0) end")
    module = lua_runtime.execute(PACK_LUA, refuse, time.perf_counter)
    joined = lua_runtime.execute(
        b"return function(P, root) local out, n = P.pack(root, {}, math.huge, 'over budget') "
        b"return table.concat(out, '', 1, n) end"
    )
    library = native.library()
    assert library is not None
    c_pack = native.load_into(lua_runtime, library).pack

    def in_c(root: Any, deadline: float = float("inf")) -> Any:
        return c_pack(root, deadline, time.perf_counter)

    return (lambda root: joined(module, root)), in_c


def test_shared_tables_cycles_and_any_keys() -> None:
    lua = runtime()  # test_state_copy's BUILD: shared tables, cycles, table/float/bool keys
    in_lua, in_c = packers(lua.runtime)
    state = lua.call("build").value
    assert in_c(state) == in_lua(state)


_keys = st.one_of(
    st.text(max_size=4),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.binary(max_size=4),
)
_values = st.recursive(
    st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=True),
        st.booleans(),
        st.text(max_size=8),
        st.binary(max_size=8),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(_keys, inner, max_size=6)),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=8))
def test_any_data_is_written_as_pack_lua_writes_it(state: dict[Any, Any]) -> None:
    lua = runtime()
    in_lua, in_c = packers(lua.runtime)
    table = lua.to_lua(state)
    assert in_c(table) == in_lua(table)


@pytest.mark.parametrize(("setup", "message"), test_snapshot_pack.REFUSED)
def test_what_pack_lua_refuses_is_declined(setup: str, message: str) -> None:
    lua = runtime()
    _, in_c = packers(lua.runtime)
    state = lua.runtime.execute(f"local s = {{ ok = 1 }} {setup} return s".encode())
    assert in_c(state) is None


def test_past_the_deadline_it_stops() -> None:
    lua = runtime()
    _, in_c = packers(lua.runtime)
    big = lua.runtime.execute(b"local s = {} for i = 1, 5000 do s[i] = { i } end return s")
    assert in_c(big, deadline=0.0) is False
    assert isinstance(in_c(big), bytes)
