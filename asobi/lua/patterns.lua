-- Lua 5.4 pattern matching written in Lua.
--
-- The C string library matches patterns with a backtracking matcher that no debug hook can
-- interrupt: `string.find(("a"):rep(3000), ".-.-.-.-b$")` runs for minutes inside one C call.
-- This module follows the C implementation (lstrlib.c) step by step, in Lua bytecode, so the
-- sandbox's count hook keeps firing and the callback's time budget stops a pathological pattern
-- like any other loop.  The sandbox uses it only for calls whose estimated cost is too high for C;
-- cheap calls keep the fast path.
--
-- Behaviour, including when and with which message malformed patterns fail, is meant to be the
-- same as the C library's: classes are compiled lazily, at the moment C would first look at them,
-- so a malformed tail of a pattern that is never reached does not raise here either.
--
-- Subject positions are 1-based indexes; a match "returns" the index just past its last byte.

local sbyte, ssub, sfind, sformat = string.byte, string.sub, string.find, string.format
local error_, pcall_, type_, tostring_, tonumber_ = error, pcall, type, tostring, tonumber
local pairs_, tunpack, tconcat, tointeger = pairs, table.unpack, table.concat, math.tointeger

local MAXCCALLS = 200 -- recursion limit of the C matcher ("pattern too complex")
local MAXCAPTURES = 32
local CAP_UNFINISHED, CAP_POSITION = -1, -2
local SPECIALS = "[%^%$%*%+%?%.%(%[%%%-]"

---------------------------------------------------------------------------------------------------
-- Errors.  Raised as a tagged table deep in the matcher, turned back into the C library's message
-- at the caller's level by `finish`, so the position prefix points at the script line.
---------------------------------------------------------------------------------------------------
local TAG = {}

local function throw(msg)
  error_({ [TAG] = msg }, 0)
end

-- Always tail-called by the public functions, so level 2 is the code that called them.
local function finish(ok, ...)
  if ok then return ... end
  local e = ...
  if type_(e) == "table" and e[TAG] then error_(e[TAG], 2) end
  error_(e, 0)
end

---------------------------------------------------------------------------------------------------
-- Character classes of the C locale, as sets: set[byte] == true.
---------------------------------------------------------------------------------------------------
local function make_set(pred)
  local t = {}
  for c = 0, 255 do
    if pred(c) then t[c] = true end
  end
  return t
end

local function between(c, a, b) return c >= a and c <= b end
local function is_lower(c) return between(c, 97, 122) end
local function is_upper(c) return between(c, 65, 90) end
local function is_digit(c) return between(c, 48, 57) end
local function is_alpha(c) return is_lower(c) or is_upper(c) end
local function is_alnum(c) return is_alpha(c) or is_digit(c) end
local function is_graph(c) return between(c, 33, 126) end

local CLASS = {
  [97] = make_set(is_alpha), -- a
  [99] = make_set(function(c) return c < 32 or c == 127 end), -- c
  [100] = make_set(is_digit), -- d
  [103] = make_set(is_graph), -- g
  [108] = make_set(is_lower), -- l
  [112] = make_set(function(c) return is_graph(c) and not is_alnum(c) end), -- p
  [115] = make_set(function(c) return between(c, 9, 13) or c == 32 end), -- s
  [117] = make_set(is_upper), -- u
  [119] = make_set(is_alnum), -- w
  [120] = make_set(function(c) return is_digit(c) or between(c, 97, 102) or between(c, 65, 70) end),
  [122] = make_set(function(c) return c == 0 end), -- z (deprecated, still accepted by 5.4)
}

local ANY = make_set(function() return true end)
local LITERAL, ESCAPE = {}, {} -- LITERAL[c]: just c; ESCAPE[c]: what `%c` matches
for c = 0, 255 do
  LITERAL[c] = { [c] = true }
end
for c = 0, 255 do
  local lower = is_upper(c) and c + 32 or c
  local class = CLASS[lower]
  if not class then
    ESCAPE[c] = LITERAL[c]
  elseif lower == c then
    ESCAPE[c] = class
  else
    ESCAPE[c] = make_set(function(x) return not class[x] end)
  end
end

-- The set a bracket class `[...]` (from `open` to the closing `close`) matches, walked exactly
-- like matchbracketclass walks it.
local function bracket_set(p, open, close)
  local marks, negate = {}, false
  local q = open
  if sbyte(p, q + 1) == 94 then
    negate = true
    q = q + 1
  end
  q = q + 1
  while q < close do
    local c = sbyte(p, q)
    if c == 37 then
      q = q + 1
      for x in pairs_(ESCAPE[sbyte(p, q)]) do marks[x] = true end
    elseif sbyte(p, q + 1) == 45 and q + 2 < close then
      for x = c, sbyte(p, q + 2) do marks[x] = true end
      q = q + 2
    else
      marks[c] = true
    end
    q = q + 1
  end
  if not negate then return marks end
  local out = {}
  for x = 0, 255 do
    if not marks[x] then out[x] = true end
  end
  return out
end

---------------------------------------------------------------------------------------------------
-- Compiled pattern facts, computed lazily per pattern position and cached per pattern string:
-- ends[pi] is where the single-character class starting at pi ends (classEnd), sets[pi] what it
-- matches.
---------------------------------------------------------------------------------------------------
local cache, cached = {}, 0
local CACHE_SIZE = 64

local function compiled(p)
  local c = cache[p]
  if c then return c end
  if cached >= CACHE_SIZE then
    cache, cached = {}, 0
  end
  c = { ends = {}, sets = {} }
  cache[p] = c
  cached = cached + 1
  return c
end

local function class_end(P, p, pend, pi)
  local c = sbyte(p, pi)
  local ep, set
  if c == 37 then -- '%'
    if pi + 1 >= pend then throw("malformed pattern (ends with '%')") end
    ep = pi + 2
    set = ESCAPE[sbyte(p, pi + 1)]
  elseif c == 91 then -- '['
    local q = pi + 1
    if sbyte(p, q) == 94 then q = q + 1 end
    repeat
      if q >= pend then throw("malformed pattern (missing ']')") end
      local cc = sbyte(p, q)
      q = q + 1
      if cc == 37 and q < pend then q = q + 1 end
    until sbyte(p, q) == 93
    ep = q + 1
    set = bracket_set(p, pi, q)
  elseif c == 46 then -- '.'
    ep, set = pi + 1, ANY
  else
    ep, set = pi + 1, LITERAL[c]
  end
  P.ends[pi], P.sets[pi] = ep, set
  return ep
end

---------------------------------------------------------------------------------------------------
-- The matcher for one subject and one pattern (MatchState plus match() and its helpers).
---------------------------------------------------------------------------------------------------
local function new_matcher(s, p)
  local n, pend = #s, #p + 1
  local P = compiled(p)
  local ends, sets = P.ends, P.sets
  local level, depth = 0, MAXCCALLS
  local cinit, clen = {}, {}
  local match

  local function max_expand(i, pi, ep)
    local set, k = sets[pi], 0
    if set == ANY then
      k = n - i + 1
      if k < 0 then k = 0 end
    else
      while set[sbyte(s, i + k)] do k = k + 1 end
    end
    ep = ep + 1
    while k >= 0 do
      local res = match(i + k, ep)
      if res then return res end
      k = k - 1
    end
    return nil
  end

  local function min_expand(i, pi, ep)
    local set = sets[pi]
    ep = ep + 1
    while true do
      local res = match(i, ep)
      if res then return res end
      if set[sbyte(s, i)] then
        i = i + 1
      else
        return nil
      end
    end
  end

  local function start_capture(i, pi, what)
    if level >= MAXCAPTURES then throw("too many captures") end
    level = level + 1
    cinit[level], clen[level] = i, what
    local res = match(i, pi)
    if not res then level = level - 1 end
    return res
  end

  local function end_capture(i, pi)
    local l = level
    while l >= 1 and clen[l] ~= CAP_UNFINISHED do l = l - 1 end
    if l < 1 then throw("invalid pattern capture") end
    clen[l] = i - cinit[l]
    local res = match(i, pi)
    if not res then clen[l] = CAP_UNFINISHED end
    return res
  end

  local function match_capture(i, digit)
    local l = digit - 48
    if l < 1 or l > level or clen[l] == CAP_UNFINISHED then
      throw(sformat("invalid capture index %%%d", l))
    end
    local len = clen[l]
    if len >= 0 and n - i + 1 >= len then
      local init = cinit[l]
      if ssub(s, i, i + len - 1) == ssub(s, init, init + len - 1) then return i + len end
    end
    return nil
  end

  local function match_balance(i, pi)
    if pi >= pend - 1 then throw("malformed pattern (missing arguments to '%b')") end
    local b = sbyte(p, pi)
    if sbyte(s, i) ~= b then return nil end
    local e, cont = sbyte(p, pi + 1), 1
    i = i + 1
    while i <= n do
      local c = sbyte(s, i)
      if c == e then
        cont = cont - 1
        if cont == 0 then return i + 1 end
      elseif c == b then
        cont = cont + 1
      end
      i = i + 1
    end
    return nil
  end

  match = function(i, pi)
    if depth == 0 then throw("pattern too complex") end
    depth = depth - 1
    while pi < pend do
      local pc = sbyte(p, pi)
      local default = false
      if pc == 40 then -- '('
        if sbyte(p, pi + 1) == 41 then
          i = start_capture(i, pi + 2, CAP_POSITION)
        else
          i = start_capture(i, pi + 1, CAP_UNFINISHED)
        end
        break
      elseif pc == 41 then -- ')'
        i = end_capture(i, pi + 1)
        break
      elseif pc == 36 and pi + 1 == pend then -- '$' at the end
        if i ~= n + 1 then i = nil end
        break
      elseif pc == 37 then -- '%'
        local nx = sbyte(p, pi + 1)
        if nx == 98 then -- %b
          i = match_balance(i, pi + 2)
          if not i then break end
          pi = pi + 4
        elseif nx == 102 then -- %f
          pi = pi + 2
          if sbyte(p, pi) ~= 91 then throw("missing '[' after '%f' in pattern") end
          local ep = ends[pi] or class_end(P, p, pend, pi)
          local set = sets[pi]
          local prev = i == 1 and 0 or sbyte(s, i - 1)
          if not set[prev] and set[sbyte(s, i) or 0] then
            pi = ep
          else
            i = nil
            break
          end
        elseif nx and nx >= 48 and nx <= 57 then -- %0-%9
          i = match_capture(i, nx)
          if not i then break end
          pi = pi + 2
        else
          default = true
        end
      else
        default = true
      end
      if default then
        local ep = ends[pi] or class_end(P, p, pend, pi)
        local suffix = sbyte(p, ep)
        if not sets[pi][sbyte(s, i)] then
          if suffix == 42 or suffix == 63 or suffix == 45 then -- '*', '?', '-' accept empty
            pi = ep + 1
          else
            i = nil
            break
          end
        elseif suffix == 63 then -- '?'
          local res = match(i + 1, ep + 1)
          if res then
            i = res
            break
          end
          pi = ep + 1
        elseif suffix == 43 then -- '+'
          i = max_expand(i + 1, pi, ep)
          break
        elseif suffix == 42 then -- '*'
          i = max_expand(i, pi, ep)
          break
        elseif suffix == 45 then -- '-'
          i = min_expand(i, pi, ep)
          break
        else
          i, pi = i + 1, ep
        end
      end
    end
    depth = depth + 1
    return i
  end

  local M = {}

  -- One match attempt at subject position i (reprepstate + match).
  function M.attempt(i, pi)
    level, depth = 0, MAXCCALLS
    return match(i, pi)
  end

  -- Capture k (1-based) of the match [si, ei); the whole match when there are no captures.
  local function capture(k, si, ei)
    if k > level then
      if k ~= 1 then throw(sformat("invalid capture index %%%d", k)) end
      return ssub(s, si, ei - 1)
    end
    local l = clen[k]
    if l == CAP_UNFINISHED then throw("unfinished capture") end
    if l == CAP_POSITION then return cinit[k] end
    local init = cinit[k]
    return ssub(s, init, init + l - 1)
  end
  M.capture = capture

  -- All captures (push_captures); `si` nil means "none when the pattern has no captures" (find).
  function M.captures(si, ei)
    local count = (level == 0 and si) and 1 or level
    if count == 0 then return end
    if count == 1 then return capture(1, si, ei) end
    local out = {}
    for k = 1, count do out[k] = capture(k, si, ei) end
    return tunpack(out, 1, count)
  end

  return M
end

---------------------------------------------------------------------------------------------------
-- Arguments, as luaL_check* would treat them.
---------------------------------------------------------------------------------------------------
local function arg_error(argn, fname, msg)
  throw(sformat("bad argument #%d to 'string.%s' (%s)", argn, fname, msg))
end

local function check_string(v, argn, fname)
  local t = type_(v)
  if t == "string" then return v end
  if t == "number" then return tostring_(v) end
  arg_error(argn, fname, "string expected, got " .. (v == nil and "no value" or t))
end

local function opt_integer(v, argn, fname, default)
  if v == nil then return default end
  local x = v
  if type_(x) == "string" then x = tonumber_(x) end
  if type_(x) ~= "number" then
    arg_error(argn, fname, "number expected, got " .. type_(v))
  end
  local i = tointeger(x)
  if not i then arg_error(argn, fname, "number has no integer representation") end
  return i
end

-- Relative initial position, clipped to [1, inf) (posrelatI).
local function start_index(pos, len)
  if pos > 0 then return pos end
  if pos == 0 or pos < -len then return 1 end
  return len + pos + 1
end

---------------------------------------------------------------------------------------------------
-- The string functions.
---------------------------------------------------------------------------------------------------
local patterns = {}

-- Plain search, one candidate at a time so the hook can fire between candidates.
local function plain_find(s, p, start)
  local m = #p
  if m == 0 then return start, start - 1 end
  local first = ssub(p, 1, 1)
  local last = #s - m + 1
  local i = start
  while i <= last do
    i = sfind(s, first, i, true)
    if not i or i > last then return nil end
    if ssub(s, i, i + m - 1) == p then return i, i + m - 1 end
    i = i + 1
  end
  return nil
end

local function find_aux(find, fname, s, p, init, plain)
  s = check_string(s, 1, fname)
  p = check_string(p, 2, fname)
  local ls = #s
  local start = start_index(opt_integer(init, 3, fname, 1), ls)
  if start > ls + 1 then return nil end
  if find and (plain or not sfind(p, SPECIALS)) then return plain_find(s, p, start) end
  local anchor = sbyte(p, 1) == 94
  local pstart = anchor and 2 or 1
  local m = new_matcher(s, p)
  local i = start
  repeat
    local e = m.attempt(i, pstart)
    if e then
      if find then return i, e - 1, m.captures(nil, e) end
      return m.captures(i, e)
    end
    i = i + 1
  until anchor or i > ls + 1
  return nil
end

function patterns.find(s, p, init, plain)
  return finish(pcall_(find_aux, true, "find", s, p, init, plain))
end

function patterns.match(s, p, init)
  return finish(pcall_(find_aux, false, "match", s, p, init))
end

function patterns.gmatch(s, p, init)
  local ok, err = pcall_(function()
    s = check_string(s, 1, "gmatch")
    p = check_string(p, 2, "gmatch")
    init = opt_integer(init, 3, "gmatch", 1)
  end)
  if not ok then return finish(false, err) end
  local ls = #s
  local src = start_index(init, ls)
  if src > ls + 1 then src = ls + 2 end
  local m = new_matcher(s, p)
  local lastmatch = nil
  local function step()
    while src <= ls + 1 do
      local e = m.attempt(src, 1)
      if e and e ~= lastmatch then
        local b = src
        src, lastmatch = e, e
        return m.captures(b, e)
      end
      src = src + 1
    end
  end
  return function()
    return finish(pcall_(step))
  end
end

-- Append the replacement string `repl` for the match [si, ei), expanding %0-%9 and %%.
local function add_string(out, nout, repl, m, s, si, ei)
  local pos = 1
  while true do
    local q = sfind(repl, "%", pos, true)
    if not q then break end
    nout = nout + 1
    out[nout] = ssub(repl, pos, q - 1)
    local c = sbyte(repl, q + 1)
    local piece
    if c == 37 then
      piece = "%"
    elseif c == 48 then
      piece = ssub(s, si, ei - 1)
    elseif c and c >= 49 and c <= 57 then
      piece = m.capture(c - 48, si, ei)
    else
      throw("invalid use of '%' in replacement string")
    end
    nout = nout + 1
    out[nout] = piece
    pos = q + 2
  end
  nout = nout + 1
  out[nout] = ssub(repl, pos)
  return nout
end

local function gsub_aux(s, p, repl, max_n)
  s = check_string(s, 1, "gsub")
  p = check_string(p, 2, "gsub")
  local tr = type_(repl)
  if tr ~= "number" and tr ~= "string" and tr ~= "function" and tr ~= "table" then
    arg_error(3, "gsub", "string/function/table expected, got " .. (repl == nil and "nil" or tr))
  end
  if tr == "number" then repl = tostring_(repl) end
  local ls = #s
  local max_s = opt_integer(max_n, 4, "gsub", ls + 1)
  local anchor = sbyte(p, 1) == 94
  local pstart = anchor and 2 or 1
  local m = new_matcher(s, p)
  local out, nout = {}, 0
  local i, copied, lastmatch, count = 1, 1, nil, 0
  while count < max_s do
    local e = m.attempt(i, pstart)
    if e and e ~= lastmatch then
      count = count + 1
      nout = nout + 1
      out[nout] = ssub(s, copied, i - 1)
      if tr == "function" or tr == "table" then
        local v
        if tr == "function" then
          v = repl(m.captures(i, e))
        else
          v = repl[m.capture(1, i, e)]
        end
        if not v then
          v = ssub(s, i, e - 1)
        else
          local tv = type_(v)
          if tv == "number" then
            v = tostring_(v)
          elseif tv ~= "string" then
            throw(sformat("invalid replacement value (a %s)", tv))
          end
        end
        nout = nout + 1
        out[nout] = v
      else
        nout = add_string(out, nout, repl, m, s, i, e)
      end
      i, copied, lastmatch = e, e, e
    elseif i <= ls then
      i = i + 1
    else
      break
    end
    if anchor then break end
  end
  nout = nout + 1
  out[nout] = ssub(s, copied)
  return tconcat(out, "", 1, nout), count
end

function patterns.gsub(s, p, repl, n)
  return finish(pcall_(gsub_aux, s, p, repl, n))
end

-- Exposed for the sandbox's cost estimate: does a pattern need the matcher at all?
patterns.SPECIALS = SPECIALS

return patterns
