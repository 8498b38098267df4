-- The standard library as match scripts get it (a host chunk, loaded by sandbox.lua).
--
-- Nothing interrupts Lua while it is inside a C function, so every library function whose work
-- grows with its arguments is bounded here: either its work is charged (`calls.charge`, for
-- linear work; the clock is checked about every megabyte), or large calls take a path the count
-- hook can stop (the same algorithm in Lua, or the C function on bounded chunks), or arguments
-- that would make one call run for long are refused.  The table in docs/lua-api.md lists each
-- function, its worst case and its bound; keep the two in step.
local host, B = ...

local charge, c_call, c_result = B.charge, B.c_call, B.c_result
local PATTERN_BUDGET = host.pattern_budget

local pcall_, error_, type_, select_, next_ = pcall, error, type, select, next
local tostring_, tonumber_, rawlen_, load_ = tostring, tonumber, rawlen, load
local sfind, smatch, sgmatch, sgsub, sformat, sbyte, ssub, srep =
  string.find, string.match, string.gmatch, string.gsub, string.format, string.byte,
  string.sub, string.rep
local tconcat = table.concat
local tointeger = math.tointeger

local L = {}

local function copy(t)
  local out = {}
  for k, v in next_, t do out[k] = v end
  return out
end

---------------------------------------------------------------------------------------------------
-- Numerals.  A string used as a number is converted by C (strtod), linearly in its length and
-- uninterruptibly: a 16 MB string of digits takes ~30 ms per conversion.  Strings longer than
-- MAX_NUMERAL bytes are not numbers here (Lua's own locale fallback stops at 200 too).
---------------------------------------------------------------------------------------------------
local MAX_NUMERAL = 200

local function long_numeral(v)
  return type_(v) == "string" and #v > MAX_NUMERAL
end

local function numeral_error(what, level)
  error_(what .. ": a string longer than " .. MAX_NUMERAL .. " bytes is not a number", level + 1)
end

-- A math function that refuses long strings in any argument (they all take numbers only).  The
-- same in C when the budgeted calls are (`_budget.c`): one copy of the code for every state.
local numeric_in_c = B.numeric
local function numeric(fn, name)
  if numeric_in_c then return numeric_in_c(fn, name, MAX_NUMERAL) end
  return function(...)
    local a, b = ...
    if long_numeral(a) or long_numeral(b) then numeral_error(name, 2) end
    local n = select_("#", ...)
    if n > 2 then
      local args = { ... }
      for i = 3, n do
        if long_numeral(args[i]) then numeral_error(name, 2) end
      end
    end
    return c_result(pcall_(fn, ...))
  end
end

function L.tonumber(v, base)
  if long_numeral(v) then
    charge(#v)
    return nil
  end
  return tonumber_(v, base)
end

-- Arithmetic on strings goes through the string metatable (Lua 5.4): the same bound applies.
local string_mt = getmetatable("")
for _, event in next_, { "__add", "__sub", "__mul", "__div", "__mod", "__pow", "__unm", "__idiv" } do
  local original = string_mt[event]
  if original then
    string_mt[event] = function(a, b)
      if long_numeral(a) or long_numeral(b) then
        error_("attempt to perform arithmetic on a string longer than " .. MAX_NUMERAL ..
          " bytes", 2)
      end
      return original(a, b)
    end
  end
end
L.string_mt = string_mt

L.math = copy(math)
for name, fn in next_, math do
  if type_(fn) == "function" and name ~= "type" then L.math[name] = numeric(fn, "math." .. name) end
end

---------------------------------------------------------------------------------------------------
-- Pattern functions.  The C matcher backtracks inside one C call where no hook fires, so a
-- pathological pattern could stall the server for minutes.  Each call's worst-case work is
-- estimated; cheap calls take the C fast path, expensive ones run the same algorithm in Lua
-- (patterns.lua), where the count hook keeps checking the budget: a pathological call then fails
-- like any runaway loop, and an ordinary call on a long string still gets the right answer.
--
-- Estimate: attempts (1 when anchored, else one per start position) x per-attempt work.  Per
-- attempt, every repetition item (`*`, `+`, `-`), `%b` and back-reference can try every position
-- of the subject, a `?` doubles the work, and the items themselves cost up to the pattern length.
-- A plain search (`find` with plain, or no special characters) is memchr/memcmp: cheap per byte.
-- gsub with a replacement string also copies that string once per match.
---------------------------------------------------------------------------------------------------
-- The Lua matcher is loaded on first use: building its tables costs more than the rest of a new
-- match state, and most matches never need it.
local patterns_chunk, patterns = host.patterns_chunk, nil
local function lua_matcher()
  if patterns == nil then patterns = load_(patterns_chunk, "=patterns.lua", "b")() end
  return patterns
end
L.lua_matcher = lua_matcher
local function pfind(...) return lua_matcher().find(...) end
local function pmatch(...) return lua_matcher().match(...) end
local function pgmatch(...) return lua_matcher().gmatch(...) end
local function pgsub(...) return lua_matcher().gsub(...) end
local SPECIALS = "[%^%$%*%+%?%.%(%[%%%-]" -- as in patterns.lua
local PLAIN_BYTES_PER_STEP = 32

local function pattern_cost(n, p, anchored_ok)
  local m, i = #p, 1
  local reps, optional = 0, 0
  local in_set = false
  while i <= m do
    local c = sbyte(p, i)
    if c == 37 then -- '%': look at the escaped character
      local e = sbyte(p, i + 1)
      if not in_set and (e == 98 or (e and e >= 49 and e <= 57)) then reps = reps + 1 end
      i = i + 1
    elseif in_set then
      if c == 93 then in_set = false end -- ']'
    elseif c == 91 then -- '['
      in_set = true
      if sbyte(p, i + 1) == 94 then i = i + 1 end -- '[^'
      if sbyte(p, i + 1) == 93 then i = i + 1 end -- literal ']' first in set
    elseif c == 42 or c == 43 or c == 45 then -- '*', '+', '-'
      reps = reps + 1
    elseif c == 63 then -- '?'
      optional = optional + 1
    end
    i = i + 1
  end
  local starts = (anchored_ok and sbyte(p, 1) == 94) and 1 or n + 1
  local items = m < n + 1 and m or n + 1
  return starts * items * (n + 1) ^ reps * 2 ^ optional
end

-- True when the C matcher could run too long for this subject and pattern; otherwise the C call
-- will run, and its estimated work is charged.  `repl_len`: a gsub replacement string's length.
local function expensive(s, p, anchored_ok, plain, repl_len)
  local n = #s
  local cost
  if plain or not sfind(p, SPECIALS) then
    local m = #p
    cost = (n + 1) * (m < n + 1 and m or n + 1) / PLAIN_BYTES_PER_STEP
  else
    cost = pattern_cost(n, p, anchored_ok)
  end
  if repl_len then cost = cost + (n + 1) * repl_len end
  if cost > PATTERN_BUDGET then return true end
  charge(cost * 4 + n)
  return false
end

-- Numbers are valid subjects and patterns (the C library converts them); convert them the same
-- way first so the estimate sees the real text.
local function as_text(v)
  if type_(v) == "number" then return tostring_(v) end
  return v
end

local S = {}
for k, v in next_, string do
  if k ~= "dump" then S[k] = v end
end
L.string = S

function S.find(s, p, init, plain)
  s, p = as_text(s), as_text(p)
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, true, plain) then
    return pfind(s, p, init, plain)
  end
  return c_result(pcall_(sfind, s, p, init, plain))
end
function S.match(s, p, init)
  s, p = as_text(s), as_text(p)
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, true, false) then
    return pmatch(s, p, init)
  end
  return c_result(pcall_(smatch, s, p, init))
end
function S.gmatch(s, p, init)
  s, p = as_text(s), as_text(p)
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, false, false) then
    return pgmatch(s, p, init)
  end
  local ok, iter = pcall_(sgmatch, s, p, init)
  if not ok then error_(iter, 2) end
  return iter
end
function S.gsub(s, p, repl, n)
  s, p = as_text(s), as_text(p)
  local tr = type_(repl)
  local repl_len = (tr == "string" and #repl) or (tr == "number" and 24) or nil
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, true, false, repl_len) then
    return pgsub(s, p, repl, n)
  end
  if tr == "function" or tr == "table" then return sgsub(s, p, repl, n) end
  return c_result(pcall_(sgsub, s, p, repl, n))
end

---------------------------------------------------------------------------------------------------
-- Charged and bounded string functions.
---------------------------------------------------------------------------------------------------
local supper, slower, sreverse, spack, sunpack, spacksize =
  string.upper, string.lower, string.reverse, string.pack, string.unpack, string.packsize

local function charged_result(r)
  if type_(r) == "string" then charge(#r) end
  return r
end

local function charged_count(...)
  charge(select_("#", ...) * 8)
  return ...
end

-- Linear in the string (~1.3 ns a byte), so one call is bounded by max_memory; charged, so a loop
-- of them is stopped at about a megabyte past the deadline.
function S.upper(s) return charged_result(c_call(supper, s)) end
function S.lower(s) return charged_result(c_call(slower, s)) end
function S.reverse(s) return charged_result(c_call(sreverse, s)) end
function S.sub(s, i, j)
  if long_numeral(i) or long_numeral(j) then numeral_error("string.sub", 2) end
  return charged_result(c_call(ssub, s, i, j))
end

-- C copies a short string one repetition at a time (~6 ns each): a 30 MB result of "x" takes
-- ~0.2 s in one call.  Large results are built from a 64 KiB block of repetitions instead, and
-- `("").rep(s, huge)` is answered directly (C would loop `huge` times copying nothing).
local REP_BLOCK = 1 << 16
function S.rep(s, n, sep)
  if s == "" and (sep == nil or sep == "") and (type_(n) == "number" or type_(n) == "string") then
    local k = tointeger(tonumber_(n))
    if k and k > 1 then n = 1 end
  end
  if long_numeral(n) then numeral_error("string.rep", 2) end
  local k = type_(n) == "number" and tointeger(n)
  if k and type_(s) == "string" and (sep == nil or type_(sep) == "string") then
    local unit = #s + (sep and #sep or 0)
    if unit > 0 and k * unit > REP_BLOCK and unit < REP_BLOCK and k < (1 << 40) then
      if k * unit > (1 << 31) then return c_call(srep, s, k, sep) end -- C refuses it at once
      local per = REP_BLOCK // unit
      local block = sep and (srep(s, per, sep) .. sep) or srep(s, per)
      local whole, rest = k // per, k % per
      charge(k * unit)
      if rest == 0 then
        local r = srep(block, whole)
        return sep and ssub(r, 1, #r - #sep) or r
      end
      return srep(block, whole) .. srep(s, rest, sep)
    end
  end
  return charged_result(c_call(srep, s, n, sep))
end

function S.byte(s, i, j)
  if long_numeral(i) or long_numeral(j) then numeral_error("string.byte", 2) end
  return charged_count(sbyte(s, i, j))
end
S.char = numeric(function(...)
  charge(select_("#", ...) * 8)
  return charged_result(c_call(string.char, ...))
end, "string.char")

-- string.format: every conversion can cost up to ~20 us (`%99.99f` of 1e308) and `%q` writes a
-- control character with snprintf (~100 ns per byte).  At most MAX_CONVERSIONS conversions per
-- call, and `%q` only of strings up to MAX_QUOTED bytes; the rest is linear and charged.
local MAX_CONVERSIONS = 256
local MAX_QUOTED = 1 << 16

local function check_format(fmt, ...)
  local count, at = 0, 1
  local arg = 0
  local args = { ... }
  while true do
    local _, stop, conv = sfind(fmt, "%%[-+ #0]*%d*%.?%d*(.?)", at)
    if not stop then break end
    at = stop + 1
    if conv ~= "%" then
      count = count + 1
      arg = arg + 1
      if count > MAX_CONVERSIONS then
        error_("string.format: more than " .. MAX_CONVERSIONS .. " conversions in one format", 3)
      end
      local v = args[arg]
      if conv == "q" and type_(v) == "string" and #v > MAX_QUOTED then
        error_("string.format: %q of a string longer than " .. MAX_QUOTED .. " bytes", 3)
      elseif conv ~= "s" and conv ~= "q" and long_numeral(v) then
        numeral_error("string.format", 3)
      end
    end
  end
end

function S.format(fmt, ...)
  if type_(fmt) == "string" then
    charge(#fmt)
    if sfind(fmt, "%", 1, true) then check_format(fmt, ...) end
  end
  return charged_result(c_call(sformat, fmt, ...))
end

-- string.pack/unpack/packsize: the work is the format's items plus the sizes written in it
-- (`c1000000` pads a million bytes one at a time).  Formats are at most MAX_PACK_FORMAT bytes and
-- the sizes written in one at most MAX_PACK_SIZES bytes together.
local MAX_PACK_FORMAT = 1024
local MAX_PACK_SIZES = 1 << 20

local function check_pack_format(fmt, name)
  if type_(fmt) ~= "string" then return end
  if #fmt > MAX_PACK_FORMAT then
    error_(name .. ": format longer than " .. MAX_PACK_FORMAT .. " bytes", 3)
  end
  local total = 0
  for digits in sgmatch(fmt, "%d+") do
    total = total + (tonumber_(ssub(digits, 1, 12)) or 0)
    if total > MAX_PACK_SIZES then
      error_(name .. ": sizes in the format add up to more than " .. MAX_PACK_SIZES .. " bytes", 3)
    end
  end
end

function S.pack(fmt, ...)
  check_pack_format(fmt, "string.pack")
  local n = select_("#", ...)
  if n > 0 then
    local args = { ... }
    for i = 1, n do
      if long_numeral(args[i]) and type_(fmt) == "string" and not sfind(fmt, "[szc]") then
        numeral_error("string.pack", 2)
      end
    end
  end
  return charged_result(c_call(spack, fmt, ...))
end
function S.unpack(fmt, s, pos)
  check_pack_format(fmt, "string.unpack")
  if long_numeral(pos) then numeral_error("string.unpack", 2) end
  return charged_count(sunpack(fmt, s, pos))
end
function S.packsize(fmt)
  check_pack_format(fmt, "string.packsize")
  return c_call(spacksize, fmt)
end

---------------------------------------------------------------------------------------------------
-- table.  The C functions loop over `#t` or a given range with one get/set per element, and `#t`
-- is whatever a script's __len says: `table.insert` on a table claiming 10^12 elements, or
-- `table.move({}, 1, 1e9, 2)`, would loop for minutes.  Past LOOP_C elements the same loop runs in
-- Lua (same metamethods, same result), where the hook can stop it; concat works on chunks.
---------------------------------------------------------------------------------------------------
local LOOP_C = 4096
local MAX_UNPACK = 1 << 17
local t_concat, t_insert, t_remove, t_move, t_sort, t_unpack =
  table.concat, table.insert, table.remove, table.move, table.sort, table.unpack

local T = copy(table)
L.table = T

-- An integer argument as C would read it, or nil (then the C function reports the error).
local function int_arg(v, name, level)
  if long_numeral(v) then numeral_error(name, level + 1) end
  return tointeger(tonumber_(v))
end

local function move_in_lua(a1, f, e, t, a2)
  if t > e or t <= f or a1 ~= a2 then
    for i = 0, e - f do a2[t + i] = a1[f + i] end
  else
    for i = e - f, 0, -1 do a2[t + i] = a1[f + i] end
  end
  return a2
end

T.move = function(a1, f, e, t, a2)
  if type_(a1) == "table" and (a2 == nil or type_(a2) == "table") and f ~= nil and e ~= nil
    and t ~= nil then
    f, e, t = int_arg(f, "table.move", 2), int_arg(e, "table.move", 2), int_arg(t, "table.move", 2)
    if f and e and t and e - f >= LOOP_C then
      if f <= 0 and e >= math.maxinteger + f then error_("too many elements to move", 2) end
      return move_in_lua(a1, f, e, t, a2 or a1)
    end
    if f and e then charge((e - f) * 16) end
  end
  return c_result(pcall_(t_move, a1, f, e, t, a2))
end

T.insert = function(t, ...)
  local n = select_("#", ...)
  if n == 2 and type_(t) == "table" then
    local pos, v = ...
    pos = int_arg(pos, "table.insert", 2)
    local e = #t + 1
    if pos and e - pos > LOOP_C then
      if pos < 1 or pos > e then error_("bad argument #2 to 'insert' (position out of bounds)", 2) end
      for i = e, pos + 1, -1 do t[i] = t[i - 1] end
      t[pos] = v
      return
    end
    charge((e - (pos or e)) * 16)
  end
  return c_result(pcall_(t_insert, t, ...))
end

T.remove = function(t, ...)
  if select_("#", ...) > 0 and type_(t) == "table" then
    local pos = int_arg((...), "table.remove", 2)
    local size = #t
    if pos and size - pos > LOOP_C and pos >= 1 then
      local v = t[pos]
      for i = pos, size - 1 do t[i] = t[i + 1] end
      t[size] = nil
      return v
    end
    charge((size - (pos or 0)) * 16)
  end
  return c_result(pcall_(t_remove, t, ...))
end

-- Without a comparator C compares in one uninterruptible call; large sorts get a Lua comparator.
local function less(a, b) return a < b end
T.sort = function(t, comp)
  local n = type_(t) == "table" and #t or 0
  charge(n * 16)
  if comp == nil and n > LOOP_C then comp = less end
  return c_result(pcall_(t_sort, t, comp))
end

T.concat = function(t, sep, i, j)
  if type_(t) == "table" then
    local a = i == nil and 1 or int_arg(i, "table.concat", 2)
    local z = j == nil and #t or int_arg(j, "table.concat", 2)
    if a and z and z - a >= LOOP_C then
      i, j = a, z
      local parts, n = {}, 0
      for a = i, j, LOOP_C do
        local b = a + LOOP_C - 1
        n = n + 1
        parts[n] = c_result(pcall_(t_concat, t, sep, a, b < j and b or j))
        charge((1 << 20) + #parts[n])
      end
      return c_result(pcall_(t_concat, parts, sep))
    end
    if a and z then charge((z - a + 1) * 64) end
  end
  return charged_result(c_result(pcall_(t_concat, t, sep, i, j)))
end

T.unpack = function(t, i, j)
  if i ~= nil or j ~= nil then
    local a = i == nil and 1 or int_arg(i, "table.unpack", 2)
    local b = j == nil and (type_(t) == "table" and #t or 0) or int_arg(j, "table.unpack", 2)
    if a and b and b - a >= MAX_UNPACK then error_("too many results to unpack", 2) end
  elseif type_(t) == "table" and #t > MAX_UNPACK then
    error_("too many results to unpack", 2)
  end
  return charged_count(t_unpack(t, i, j))
end

---------------------------------------------------------------------------------------------------
-- utf8 and os.
---------------------------------------------------------------------------------------------------
local U = copy(utf8)
L.utf8 = U
do
  local u_len, u_codepoint, u_offset, u_char = utf8.len, utf8.codepoint, utf8.offset, utf8.char
  U.len = function(s, i, j, lax)
    if type_(s) == "string" then charge(#s * 2) end
    if long_numeral(i) or long_numeral(j) then numeral_error("utf8.len", 2) end
    return u_len(s, i, j, lax)
  end
  U.offset = function(s, n, i)
    if type_(s) == "string" then charge(#s * 2) end
    if long_numeral(n) or long_numeral(i) then numeral_error("utf8.offset", 2) end
    return u_offset(s, n, i)
  end
  U.codepoint = function(s, i, j, lax)
    if long_numeral(i) or long_numeral(j) then numeral_error("utf8.codepoint", 2) end
    return charged_count(u_codepoint(s, i, j, lax))
  end
  U.char = numeric(function(...)
    charge(select_("#", ...) * 8)
    return charged_result(u_char(...))
  end, "utf8.char")
end

-- os.date calls strftime once per conversion: a megabyte of "%c" takes ~0.2 s in one call.
local MAX_DATE_FORMAT = 256
local os_date, os_time = os.date, os.time
L.os = {
  clock = os.clock,
  date = function(fmt, t)
    if type_(fmt) == "string" and #fmt > MAX_DATE_FORMAT then
      error_("os.date: format longer than " .. MAX_DATE_FORMAT .. " bytes", 2)
    end
    if long_numeral(t) then numeral_error("os.date", 2) end
    return c_call(os_date, fmt, t)
  end,
  time = function(t)
    if type_(t) == "table" then
      for _, field in next_, { "year", "month", "day", "hour", "min", "sec" } do
        if long_numeral(t[field]) then numeral_error("os.time", 2) end
      end
    end
    return c_call(os_time, t)
  end,
}

-- select and error take a number too.  Tail calls: error levels and results are unchanged.
function L.select(n, ...)
  if long_numeral(n) then numeral_error("select", 2) end
  return select_(n, ...)
end
function L.error(message, level)
  if long_numeral(level) then numeral_error("error", 2) end
  local lv = level == nil and 1 or tointeger(tonumber_(level))
  if lv and lv > 0 then return error_(message, lv + 1) end -- one level for this wrapper
  return error_(message, level)
end

return L
