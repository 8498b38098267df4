"""The pure-Lua pattern matcher (asobi/lua/patterns.lua) against the C string library.

Every generated call runs through both implementations inside a real match runtime and must give
the same results, or fail with the same message.  A second layer checks the sandbox's dispatch:
with `pattern_budget=0` every pattern call a script makes takes the Lua path, with an infinite
budget every call takes C, and a script must not be able to tell the difference.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asobi.lua.runtime import Limits, MatchLua, compile_script


def load_source(lua: MatchLua, source: bytes, name: str) -> Any:
    """Load script text as the server does: compiled once, then loaded as bytecode."""
    return lua.load(compile_script(source, name), name)


class _QuietHost:
    """A ScriptHost for runtimes that never call game.*."""

    def log(self, level: bytes, message: bytes, meta: Any) -> None:
        pass

    def send(self, player_id: Any, payload: Any) -> Any:
        return True

    def broadcast(self, event: Any, payload: Any) -> Any:
        return True

    def module(self, name: bytes) -> tuple[bytes | None, bytes]:
        return None, b"no modules here"


def runtime(**limits: Any) -> MatchLua:
    return MatchLua(_QuietHost(), Limits(**limits), seed=1)


# Runs one call through the C library and through patterns.lua (host side, with pcall) and
# describes the first difference, or returns nil.  gmatch results are collected; gsub replacement
# kinds other than strings are built here: "fn" joins its arguments (and returns nil sometimes),
# "tbl" maps a few keys (one of them to false).
COMPARE = b"""
local P = ...
local function pack(ok, ...) return { n = select("#", ...), ok = ok, ... } end
local function show(r)
  local parts = {}
  for i = 1, r.n do parts[i] = tostring(r[i]) .. "<" .. (math.type(r[i]) or type(r[i])) .. ">" end
  return (r.ok and "ok: " or "error: ") .. table.concat(parts, ", ")
end
local function same(a, b)
  if a.ok ~= b.ok or a.n ~= b.n then return false end
  for i = 1, a.n do
    if a[i] ~= b[i] or math.type(a[i]) ~= math.type(b[i]) then return false end
  end
  return true
end
local function collect(gmatch, s, p, init)
  local ok, it = pcall(gmatch, s, p, init)
  if not ok then return pack(false, it) end
  local out = {}
  local ok2, err = pcall(function()
    while #out < 200 do
      local r = pack(true, it())
      if r.n == 0 or r[1] == nil then break end
      out[#out + 1] = show(r)
    end
  end)
  if not ok2 then return pack(false, err) end
  return pack(true, table.concat(out, " | "))
end
local function replacement(kind, value)
  if kind == "fn" then
    return function(...)
      local n = select("#", ...)
      if n == 2 then return nil end
      local parts = {}
      for i = 1, n do parts[i] = tostring((select(i, ...))) end
      return table.concat(parts, ",") .. "#" .. n
    end
  elseif kind == "tbl" then
    return { a = "A", ab = 1.5, [1] = "one", b = false, x = 7 }
  elseif kind == "bad" then
    return function() return {} end
  end
  return value
end
return function(fname, s, p, a3, a4, kind)
  local c, l
  if fname == "gmatch" then
    c, l = collect(string.gmatch, s, p, a3), collect(P.gmatch, s, p, a3)
  elseif fname == "gsub" then
    local r = replacement(kind, a3)
    c, l = pack(pcall(string.gsub, s, p, r, a4)), pack(pcall(P.gsub, s, p, r, a4))
  else
    c, l = pack(pcall(string[fname], s, p, a3, a4)), pack(pcall(P[fname], s, p, a3, a4))
  end
  if same(c, l) then return nil end
  return "C " .. show(c) .. "  /  Lua " .. show(l)
end
"""

SUBJECT_CHARS = "aab b1_x().[]%-^$\n\0\xe9"
LITERALS = [*"abx1_ \0\xe9"]
# fmt: off
CLASSES = [
    ".", "%a", "%A", "%d", "%D", "%s", "%S", "%w", "%W", "%x", "%p", "%P", "%c", "%g", "%l",
    "%u", "%U", "%.", "%%", "%(", "%]", "%z", "[ab]", "[^ab]", "[a-c]", "[%d_]", "[]]", "[^]a]",
    "[a-]", "[%a-]", "[%]]", "[^%s%d]", "[.%-]", "[\0-a]",
]
QUANTIFIERS = ["", "", "", "*", "+", "-", "?"]
SPECIAL_ITEMS = [
    "(", ")", "()", "%b()", "%bab", "%f[%a]", "%f[^%s]", "%f[%z]", "%1", "%2", "%0", "$", "^",
]
# fmt: on
RAW_CHARS = "ab%[]()^$*+-?.1fbx"


@st.composite
def patterns(draw: st.DrawFn) -> str:
    """Mostly well-formed patterns built from items; sometimes raw text to hit the errors."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(RAW_CHARS, max_size=8))
    parts = ["^"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind < 4:
            parts.append(draw(st.sampled_from(LITERALS)) + draw(st.sampled_from(QUANTIFIERS)))
        elif kind < 8:
            parts.append(draw(st.sampled_from(CLASSES)) + draw(st.sampled_from(QUANTIFIERS)))
        else:
            parts.append(draw(st.sampled_from(SPECIAL_ITEMS)))
    if draw(st.integers(0, 3)) == 0:
        parts.append("$")
    text = "".join(parts)
    # Balance most of the captures so that matches (not only errors) are common.
    if draw(st.integers(0, 3)) and text.count("(") > text.count(")"):
        text += ")" * (text.count("(") - text.count(")"))
    return text


subjects = st.text(SUBJECT_CHARS, max_size=12)
inits = st.one_of(st.none(), st.integers(-15, 15))
REPLACEMENTS = ["", "<%0>", "%1", "%2-%1", "%%", "x%", "%a", "[%1%1]", "%9"]


def latin1(text: str) -> bytes:
    return text.encode("latin-1")


@pytest.fixture(scope="module")
def compare() -> Any:
    lua = runtime()
    return lua.runtime.execute(COMPARE, lua.api[b"patterns"]())


FAST = settings(
    max_examples=700,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FAST
@given(s=subjects, p=patterns(), init=inits, plain=st.sampled_from([None, False, True]))
def test_find_matches_c(compare: Any, s: str, p: str, init: int | None, plain: Any) -> None:
    assert compare(b"find", latin1(s), latin1(p), init, plain) is None


@FAST
@given(s=subjects, p=patterns(), init=inits)
def test_match_matches_c(compare: Any, s: str, p: str, init: int | None) -> None:
    assert compare(b"match", latin1(s), latin1(p), init) is None


@FAST
@given(s=subjects, p=patterns(), init=inits)
def test_gmatch_matches_c(compare: Any, s: str, p: str, init: int | None) -> None:
    assert compare(b"gmatch", latin1(s), latin1(p), init) is None


@FAST
@given(
    s=subjects,
    p=patterns(),
    repl=st.sampled_from(REPLACEMENTS),
    kind=st.sampled_from(["str", "str", "fn", "tbl", "bad", "num"]),
    n=st.one_of(st.none(), st.integers(-1, 4)),
)
def test_gsub_matches_c(compare: Any, s: str, p: str, repl: str, kind: str, n: Any) -> None:
    value: Any = 42 if kind == "num" else latin1(repl)
    assert compare(b"gsub", latin1(s), latin1(p), value, n, kind.encode()) is None


@pytest.mark.parametrize(
    ("fname", "s", "p", "a3", "a4"),
    [
        ("match", "a" * 201, "a?" * 201, None, None),  # pattern too complex (C recursion limit)
        ("match", "a" * 199, "a?" * 199, None, None),
        ("find", "x", "(" * 33, None, None),  # too many captures
        ("match", "x" * 40, "(x)" * 32, None, None),
        ("find", "abc", "x[", None, None),  # malformed tail never reached: no error
        ("find", "abc", "b", 1.0, None),
        ("find", "abc", "b", 1.5, None),
        ("find", "abc", "b", "2", None),
        ("find", "abc", "b", True, None),
        ("gsub", "abc", "b", None, None),
        ("gsub", "abc", "b", "x", 1.5),
        ("gsub", "hello world", "o", "0", 0),
        ("gmatch", "key=1, other=22", "(%w+)=(%d+)", None, None),
        ("find", "a+b", "+", None, None),
        ("find", "", "", None, None),
        ("find", "abc", "", 4, None),
        ("find", "abc", "", 5, None),
        ("match", 12345, 3, None, None),
    ],
)
def test_edge_cases_match_c(compare: Any, fname: str, s: Any, p: Any, a3: Any, a4: Any) -> None:
    lua_s = latin1(s) if isinstance(s, str) else s
    lua_p = latin1(p) if isinstance(p, str) else p
    lua_a3 = latin1(a3) if isinstance(a3, str) else a3
    assert compare(fname.encode(), lua_s, lua_p, lua_a3, a4, b"str") is None


# A script exercising the string functions the way game code does, including method calls,
# errors caught with pcall (their messages carry the script position) and long subjects.
SCRIPT = rb"""
local out = {}
local function add(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  out[#out + 1] = table.concat(parts, ",")
end
function run(s, p, r)
  add(s:find(p)); add(s:find(p, 3)); add(s:find(p, -5, true)); add(s:match(p))
  add(string.match(s, p, 2))
  for a, b in s:gmatch(p) do add(a, b) end
  add(s:gsub(p, r)); add(s:gsub(p, r, 2))
  add(s:gsub(p, function(a) return a and #tostring(a) end))
  add(pcall(function() local a, b = s:find("[" .. p) return a, b end))
  add(pcall(function() local a, b = s:gsub(p, "%9") return a, b end))
  local result = table.concat(out, "\n")
  out = {}
  return result
end
"""

SCRIPT_CASES = [
    ("key=value; other=1; x=22", "(%w+)=(%w+)", "%2=%1"),
    ("  padded text  ", "^%s*(.-)%s*$", "[%1]"),
    ("f(a(b)c)d e(f)", "%b()", "<%0>"),
    ("THE (quick) fox", "%f[%a]%a+", "%0!"),
    ("2024-01-02T10:20:30", "(%d+)-(%d+)-(%d+)", "%3/%2/%1"),
    ("aaa bbb aaa", "(a+)%s*(b*)", "%2%1"),
    ("x" * 300 + "y", "x-y", "z"),
    ("word " * 400, "(%a+)()", "%2"),
    ("a,b,,c", "([^,]*)", "<%1>"),
    ("hello", "", "-"),
]


@pytest.mark.parametrize(("s", "p", "r"), SCRIPT_CASES)
def test_scripts_cannot_tell_the_lua_path_from_c(s: str, p: str, r: str) -> None:
    # What is compared is the answer, not the time: the long subjects take tens of ms on the Lua
    # path, which the default 50 ms wall-clock tick budget would cut on a busy machine.
    via_c = runtime(pattern_budget=float("inf"), tick=5.0)
    via_lua = runtime(pattern_budget=0.0, tick=5.0)
    results = []
    for lua in (via_c, via_lua):
        load_source(lua, SCRIPT, "patterns_test.lua")
        result = lua.call("run", s.encode(), p.encode(), r.encode())
        assert result.ok, result.error
        results.append(result.value)
    assert results[0] == results[1]
    assert b"patterns_test.lua:" in results[0]  # malformed-pattern errors point at the script


def test_pathological_pattern_is_stopped_by_the_budget() -> None:
    lua = runtime(tick=0.05)
    load_source(
        lua, b'function tick() return string.find(("a"):rep(3000), ".-.-.-.-b$") end', "p.lua"
    )
    started = time.perf_counter()
    result = lua.call("tick")
    elapsed = time.perf_counter() - started
    assert not result.ok
    # `return string.find(...)` is a tail call: no frame of p.lua is left to point at.
    assert result.error == "tick exceeded its 50 ms budget (raise with ASOBI_LUA_TICK)"
    assert elapsed < 0.5


def test_long_subject_gets_the_right_answer_through_the_fallback() -> None:
    lua = runtime(tick=2.0)
    load_source(
        lua,
        b"""
        function tick()
          local s = ("k=v "):rep(5000) .. "end=42"
          local count = 0
          for k, v in s:gmatch("(%w+)=(%w+)") do count = count + 1 end
          return count, s:match("(%w+)=(%d+)$"), select(2, s:gsub("%w+=%w+", ""))
        end
        """,
        "long.lua",
    )
    result = lua.call("tick")
    assert result.ok, result.error
    assert result.values == (5001, b"end", 5001)


@pytest.mark.parametrize(
    "source",
    [
        b'local s = ("a"):rep(200000) return s:find(("a"):rep(100000) .. "b", 1, true)',
        b'local s = ("a"):rep(200000) return s:find(("a"):rep(100000) .. "b")',
        b'local s = ("a"):rep(200000) return s:gsub(("a"):rep(100000) .. "b", "")',
        b'return string.find(("a"):rep(30), ("a*"):rep(20) .. "b")',
    ],
)
def test_quadratic_and_short_exponential_calls_are_budgeted(source: bytes) -> None:
    lua = runtime(tick=0.05)
    load_source(lua, b"function tick() " + source + b" end", "q.lua")
    started = time.perf_counter()
    result = lua.call("tick")
    assert time.perf_counter() - started < 0.5
    assert not result.ok and result.error.startswith("tick exceeded its 50 ms budget")
