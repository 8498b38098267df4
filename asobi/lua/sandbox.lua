-- Host side of a match's Lua state.
--
-- This chunk runs once in every fresh Lua state, with the real standard library, before any game
-- code.  It captures what the host needs in locals, builds the whitelisted library that game
-- scripts see, and returns the host API (a table only Python holds).  Game code can never reach
-- the real globals, `debug`, `load`, `string.dump` or the lupa module: it only sees the
-- environment `new_env` made for its version, and every function in it was chosen here.
local host = ...
math.randomseed(host.seed)

local now = host.now
local host_log, host_send, host_broadcast, host_module = host.log, host.send, host.broadcast, host.module
local host_persist = host.persist
local HOOK_COUNT = host.hook_count
local PATTERN_BUDGET = host.pattern_budget

local sethook, traceback = debug.sethook, debug.traceback
local co_create, co_resume, co_status, co_yield = coroutine.create, coroutine.resume, coroutine.status, coroutine.yield
local co_running, co_isyieldable, co_close = coroutine.running, coroutine.isyieldable, coroutine.close
local pcall_, xpcall_, error_, type_, select_, next_ = pcall, xpcall, error, type, select, next
local tostring_, setmetatable_, getmetatable_, rawget_, load_ = tostring, setmetatable, getmetatable, rawget, load
local sfind, smatch, sgmatch, sgsub, sformat, sbyte =
  string.find, string.match, string.gmatch, string.gsub, string.format, string.byte
local tconcat = table.concat
local mtype, huge = math.type, math.huge

---------------------------------------------------------------------------------------------------
-- Budgets.  A count hook checks the wall clock every HOOK_COUNT instructions; past the deadline it
-- raises.  `exceeded` stays set until the host call returns, so a script cannot swallow the error
-- with pcall, xpcall or coroutine.resume: the wrappers below re-raise it.
---------------------------------------------------------------------------------------------------
local deadline = huge
local exceeded = nil
local budget_label = "callback"

local function hook()
  if now() > deadline then
    exceeded = exceeded or (budget_label .. " exceeded its time budget")
    error_(exceeded, 0)
  end
end

-- One VM instruction can also be expensive on its own (`s .. s` on megabytes, a table resize):
-- hundreds of those fit between two count-hook checks.  Such instructions allocate, so the garbage
-- collector keeps finishing cycles; a finalizer that re-arms itself every cycle checks the clock
-- and, past the deadline, makes the hook fire at the very next instruction.  (Errors cannot be
-- raised from a finalizer, hence the hook.)  A false alarm costs one hook call and the count is
-- restored.
local probe_mt = {}
probe_mt.__gc = function()
  if deadline ~= huge and now() > deadline then sethook(hook, "", 1) end
  setmetatable_({}, probe_mt)
end
setmetatable_({}, probe_mt)

local function reraise_if_exceeded(...)
  if exceeded then error_(exceeded, 0) end
  return ...
end

local function message_handler(e)
  deadline = huge -- the handler itself must not be interrupted
  if exceeded then return exceeded end
  local msg
  if type_(e) == "string" then
    msg = e
  elseif type_(e) == "number" or type_(e) == "boolean" or e == nil then
    msg = tostring_(e)
  else
    -- Never call __tostring on an error object: it is script code and could misbehave here.
    msg = "error object of type " .. type_(e)
  end
  return traceback(msg, 2)
end

local function finish(ok, ...)
  deadline = huge
  sethook()
  local ex = exceeded
  exceeded = nil
  if ex then return false, ex end
  if not ok then return false, (...) end
  return true, ...
end

local api = {}

-- Call fn(...) until a wall-clock deadline (host perf_counter seconds; the host computes it, which
-- saves a call back into the host per call).  Returns true, results... or false, message.
function api.call(label, until_time, fn, ...)
  exceeded = nil
  budget_label = label
  deadline = until_time
  sethook(hook, "", HOOK_COUNT)
  return finish(xpcall_(fn, message_handler, ...))
end

---------------------------------------------------------------------------------------------------
-- Work done inside one C call is invisible to the count hook, which only counts VM instructions:
-- a loop of `s:upper()` on an 8 MB string runs hundreds of such calls between two hook checks and
-- overshoots the budget by seconds.  Wrappers of library functions whose cost grows with their
-- data charge that cost here; past about a millisecond of accumulated work the clock is checked.
---------------------------------------------------------------------------------------------------
local CHARGE_STEP = 1 << 20 -- units are bytes of simple C work (copying, scanning)
local charged = 0

local function charge(units)
  charged = charged + units
  if charged >= CHARGE_STEP then
    charged = 0
    hook()
  end
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
---------------------------------------------------------------------------------------------------
-- The Lua matcher is loaded on first use: building its tables costs more than the rest of a new
-- match state, and most matches never need it.
local patterns_chunk, patterns = host.patterns_chunk, nil
local function lua_matcher()
  if patterns == nil then patterns = load_(patterns_chunk, "=patterns.lua", "b")() end
  return patterns
end
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
-- will run, and its estimated work is charged.
local function expensive(s, p, anchored_ok, plain)
  local n = #s
  local cost
  if plain or not sfind(p, SPECIALS) then
    local m = #p
    cost = (n + 1) * (m < n + 1 and m or n + 1) / PLAIN_BYTES_PER_STEP
  else
    cost = pattern_cost(n, p, anchored_ok)
  end
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

-- Errors of the C functions are re-raised one level up, so that like the Lua path's they point at
-- the script line that made the call, not at these wrappers.  Calls that run script code (gsub
-- with a function or table) are not wrapped: their errors must pass through untouched.
local function c_result(ok, ...)
  if ok then return ... end
  if exceeded then error_(exceeded, 0) end
  error_((...), 2)
end

local safe_string = {}
for k, v in next_, string do
  if k ~= "dump" then safe_string[k] = v end
end
function safe_string.find(s, p, init, plain)
  s, p = as_text(s), as_text(p)
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, true, plain) then
    return pfind(s, p, init, plain)
  end
  return c_result(pcall_(sfind, s, p, init, plain))
end
function safe_string.match(s, p, init)
  s, p = as_text(s), as_text(p)
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, true, false) then
    return pmatch(s, p, init)
  end
  return c_result(pcall_(smatch, s, p, init))
end
function safe_string.gmatch(s, p, init)
  s, p = as_text(s), as_text(p)
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, false, false) then
    return pgmatch(s, p, init)
  end
  local ok, iter = pcall_(sgmatch, s, p, init)
  if not ok then error_(iter, 2) end
  return iter
end
function safe_string.gsub(s, p, repl, n)
  s, p = as_text(s), as_text(p)
  if type_(s) == "string" and type_(p) == "string" and expensive(s, p, true, false) then
    return pgsub(s, p, repl, n)
  end
  local tr = type_(repl)
  if tr == "function" or tr == "table" then return sgsub(s, p, repl, n) end
  return c_result(pcall_(sgsub, s, p, repl, n))
end

-- Charged string functions.  `("").rep(s, huge)` is answered directly: C would loop `huge` times
-- copying nothing.
local srep, supper, slower, sreverse, ssub_, spack_ = string.rep, string.upper, string.lower,
  string.reverse, string.sub, string.pack
local tointeger, tonumber_ = math.tointeger, tonumber

local function charged_result(r)
  if type_(r) == "string" then charge(#r) end
  return r
end

-- Run a C function; its error is re-raised at the level of the script that called the wrapper
-- (level 1 is this function, 2 the wrapper, 3 the script).
local function c_call(fn, ...)
  local ok, r = pcall_(fn, ...)
  if not ok then
    if exceeded then error_(exceeded, 0) end
    error_(r, 3)
  end
  return r
end

local function charged_count(...)
  charge(select_("#", ...))
  return ...
end

function safe_string.rep(s, n, sep)
  if s == "" and (sep == nil or sep == "") and (type_(n) == "number" or type_(n) == "string") then
    local k = tointeger(tonumber_(n))
    if k and k > 1 then n = 1 end
  end
  return charged_result(c_call(srep, s, n, sep))
end
function safe_string.upper(s) return charged_result(c_call(supper, s)) end
function safe_string.lower(s) return charged_result(c_call(slower, s)) end
function safe_string.reverse(s) return charged_result(c_call(sreverse, s)) end
function safe_string.sub(s, i, j) return charged_result(c_call(ssub_, s, i, j)) end
function safe_string.format(fmt, ...) return charged_result(c_call(sformat, fmt, ...)) end
function safe_string.pack(fmt, ...) return charged_result(c_call(spack_, fmt, ...)) end
function safe_string.byte(s, i, j) return charged_count(sbyte(s, i, j)) end
function safe_string.char(...)
  charge(select_("#", ...))
  return charged_result(string.char(...))
end

-- Method calls on strings (`s:find(...)`) go through the string metatable: point it at a safe
-- table and lock it, so `getmetatable("").__index` cannot hand out the real string library.
local string_mt = getmetatable_("")
string_mt.__index = safe_string
string_mt.__metatable = false

---------------------------------------------------------------------------------------------------
-- What game scripts see.  The library tables and functions are built once per Lua state; every
-- loaded version of a script then gets its own environment (`new_env`) holding copies of them.
-- A reload compiles the new code into a fresh environment of the same state and a rolled-back
-- reload just drops it: nothing one version can write to is shared with another, and the string
-- metatable always points at the active version's `string` table (`api.activate`).
---------------------------------------------------------------------------------------------------
local function copy(t)
  local out = {}
  for k, v in next_, t do out[k] = v end
  return out
end

local base = {}
for _, name in next_, {
  "assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget", "rawlen", "rawset", "select",
  "tonumber", "tostring", "type", "getmetatable",
} do
  base[name] = _G[name]
end
base._VERSION = _VERSION

local lib_table = copy(table)
local lib_math = copy(math)
local lib_utf8 = copy(utf8)

-- Table and utf8 functions whose single C call can walk a whole table or string are charged; a
-- large sort without a comparator gets a Lua one, so the hook can stop it between comparisons.
do
  local t_concat, t_insert, t_remove, t_move, t_sort, t_unpack =
    table.concat, table.insert, table.remove, table.move, table.sort, table.unpack
  local rawlen_ = rawlen
  local function size(t)
    if type_(t) == "table" then return rawlen_(t) end
    return 0
  end
  local function less(a, b) return a < b end
  lib_table.concat = function(t, sep, i, j) return charged_result(t_concat(t, sep, i, j)) end
  lib_table.insert = function(t, ...)
    if select_("#", ...) > 1 then charge(size(t) * 16) end
    return t_insert(t, ...)
  end
  lib_table.remove = function(t, ...)
    if select_("#", ...) > 0 then charge(size(t) * 16) end
    return t_remove(t, ...)
  end
  lib_table.move = function(a1, f, e, t, a2)
    if type_(f) == "number" and type_(e) == "number" and e > f then charge((e - f) * 16) end
    return t_move(a1, f, e, t, a2)
  end
  lib_table.sort = function(t, comp)
    local n = size(t)
    charge(n * 16)
    if comp == nil and n > 20000 then comp = less end
    return t_sort(t, comp)
  end
  lib_table.unpack = function(t, i, j) return charged_count(t_unpack(t, i, j)) end
  local u_len, u_codepoint, u_offset, u_char = utf8.len, utf8.codepoint, utf8.offset, utf8.char
  lib_utf8.len = function(s, ...)
    if type_(s) == "string" then charge(#s) end
    return u_len(s, ...)
  end
  lib_utf8.offset = function(s, ...)
    if type_(s) == "string" then charge(#s) end
    return u_offset(s, ...)
  end
  lib_utf8.codepoint = function(s, i, j, lax) return charged_count(u_codepoint(s, i, j, lax)) end
  lib_utf8.char = function(...)
    charge(select_("#", ...))
    return charged_result(u_char(...))
  end
end
local lib_os = { time = os.time, clock = os.clock, date = os.date }

function base.setmetatable(t, mt)
  if type_(mt) == "table" and rawget_(mt, "__gc") ~= nil then
    error_("__gc metamethods are not allowed in match scripts", 2)
  end
  return setmetatable_(t, mt)
end

function base.pcall(f, ...)
  return reraise_if_exceeded(pcall_(f, ...))
end

-- An error raised by the hook leaves Lua's hooks switched off until the protected call unwinds,
-- and the message handler runs before that: a script handler would run with no budget at all.
-- Once the budget is spent, the script's handler is therefore skipped.
function base.xpcall(f, handler, ...)
  local function guarded(e)
    if exceeded then return exceeded end
    return handler(e)
  end
  return reraise_if_exceeded(xpcall_(f, guarded, ...))
end

local function co_new(f)
  local co = co_create(f)
  sethook(co, hook, "", HOOK_COUNT)
  return co
end

local function wrap_results(ok, ...)
  if exceeded then error_(exceeded, 0) end
  if not ok then error_((...), 0) end
  return ...
end

local lib_coroutine = {
  create = co_new,
  resume = function(co, ...) return reraise_if_exceeded(co_resume(co, ...)) end,
  wrap = function(f)
    local co = co_new(f)
    return function(...) return wrap_results(co_resume(co, ...)) end
  end,
  yield = co_yield,
  status = co_status,
  running = co_running,
  isyieldable = co_isyieldable,
  close = co_close,
}

---------------------------------------------------------------------------------------------------
-- game.* and require.  `ctx` is written by the host before callbacks (tick number, players).
---------------------------------------------------------------------------------------------------
local ctx = { match_id = "", tick = 0, players = {} }
api.ctx = ctx

local function log_value(v)
  if type_(v) == "string" then return v end
  return tostring_(v)
end

-- Host functions are Python: an exception they raise reaches Lua as a Python object.  Scripts get
-- its text instead, so no Python object is ever within their reach.
local function host_result(ok, ...)
  if ok then return ... end
  if exceeded then error_(exceeded, 0) end
  local e = ...
  if type_(e) ~= "string" then e = tostring_(e) end
  error_(e, 2)
end

local function host_call(fn, ...)
  return host_result(pcall_(fn, ...))
end

local lib_game = {}
function lib_game.id() return ctx.match_id end
function lib_game.tick() return ctx.tick end
function lib_game.players()
  local out = {}
  for i, p in next_, ctx.players do out[i] = p end
  return out
end
function lib_game.log(level, msg, meta)
  host_call(host_log, log_value(level), log_value(msg), type_(meta) == "table" and meta or nil)
end
-- The host returns an error message rather than raising, so the error is reported at the
-- script line that called game.send / game.broadcast.
function lib_game.send(player_id, payload)
  local err = host_call(host_send, player_id, payload)
  if err ~= nil then error_(err, 2) end
  return true
end
function lib_game.broadcast(event, payload)
  local err = host_call(host_broadcast, event, payload)
  if err ~= nil then error_(err, 2) end
  return true
end
lib_game.random = math.random

-- Persistence: every call returns a table, {ok = value} or {error = code, message = text}.
-- Writes belong to the running callback and take effect only if it succeeds.
local function persist(name)
  return function(...)
    if not host_persist then return { error = "not_configured" } end
    return host_persist(name, ...)
  end
end
local lib_persist = {
  economy = {
    grant = persist("economy.grant"),
    debit = persist("economy.debit"),
    balance = persist("economy.balance"),
  },
  leaderboard = {
    submit = persist("leaderboard.submit"),
    top = persist("leaderboard.top"),
    rank = persist("leaderboard.rank"),
    around = persist("leaderboard.around"),
  },
  storage = {
    get = persist("storage.get"),
    set = persist("storage.set"),
    player_get = persist("storage.player_get"),
    player_set = persist("storage.player_set"),
  },
}

function base.print(...)
  local parts = {}
  for i = 1, select_("#", ...) do parts[i] = log_value((select_(i, ...))) end
  host_call(host_log, "info", tconcat(parts, "\t"), nil)
end

-- Scripts and modules arrive compiled (the host compiles a saved file once, from text, and hands
-- the same bytecode to every match); this is the only place that loads them.
local function load_compiled(code, chunkname, env)
  return load_(code, chunkname, "b", env)
end

local env_strings = setmetatable_({}, { __mode = "k" })

-- A new environment: every table in it is new, every function in it one of those built above.
-- The tables are written out in full (rather than copied in a loop) because this runs on every
-- reload of every match: a constructor allocates each table at its final size in one go.  This is
-- also the complete list of what game code can reach.
local function new_env()
  local S, T, M, U, O, C, B = safe_string, lib_table, lib_math, lib_utf8, lib_os, lib_coroutine, base
  local G, E, L, P = lib_game, lib_persist.economy, lib_persist.leaderboard, lib_persist.storage
  local string_ = {
    byte = S.byte, char = S.char, find = S.find, format = S.format, gmatch = S.gmatch,
    gsub = S.gsub, len = S.len, lower = S.lower, match = S.match, pack = S.pack,
    packsize = S.packsize, rep = S.rep, reverse = S.reverse, sub = S.sub, unpack = S.unpack,
    upper = S.upper,
  }
  local env = {
    assert = B.assert, error = B.error, getmetatable = B.getmetatable, ipairs = B.ipairs,
    next = B.next, pairs = B.pairs, pcall = B.pcall, print = B.print, rawequal = B.rawequal,
    rawget = B.rawget, rawlen = B.rawlen, rawset = B.rawset, select = B.select,
    setmetatable = B.setmetatable, tonumber = B.tonumber, tostring = B.tostring, type = B.type,
    xpcall = B.xpcall, _VERSION = B._VERSION,
    string = string_,
    table = {
      concat = T.concat, insert = T.insert, move = T.move, pack = T.pack, remove = T.remove,
      sort = T.sort, unpack = T.unpack,
    },
    math = {
      abs = M.abs, acos = M.acos, asin = M.asin, atan = M.atan, ceil = M.ceil, cos = M.cos,
      deg = M.deg, exp = M.exp, floor = M.floor, fmod = M.fmod, huge = M.huge, log = M.log,
      max = M.max, maxinteger = M.maxinteger, min = M.min, mininteger = M.mininteger,
      modf = M.modf, pi = M.pi, rad = M.rad, random = M.random, randomseed = M.randomseed,
      sin = M.sin, sqrt = M.sqrt, tan = M.tan, tointeger = M.tointeger, type = M.type,
      ult = M.ult,
    },
    utf8 = {
      char = U.char, charpattern = U.charpattern, codepoint = U.codepoint, codes = U.codes,
      len = U.len, offset = U.offset,
    },
    os = { clock = O.clock, date = O.date, time = O.time },
    coroutine = {
      close = C.close, create = C.create, isyieldable = C.isyieldable, resume = C.resume,
      running = C.running, status = C.status, wrap = C.wrap, yield = C.yield,
    },
    game = {
      id = G.id, tick = G.tick, players = G.players, log = G.log, send = G.send,
      broadcast = G.broadcast, random = G.random,
      economy = { grant = E.grant, debit = E.debit, balance = E.balance },
      leaderboard = { submit = L.submit, top = L.top, rank = L.rank, around = L.around },
      storage = {
        get = P.get, set = P.set, player_get = P.player_get, player_set = P.player_set,
      },
    },
  }
  env._G = env
  env_strings[env] = string_

  local loaded, loading = {}, {}
  env._ASOBI_LOADED = loaded
  function env.require(name)
    if type_(name) ~= "string" then error_("require expects a module name", 2) end
    local cached = rawget_(loaded, name)
    if cached ~= nil then return cached end
    if loading[name] then error_("module '" .. name .. "' is required in a loop", 2) end
    local code, chunkname = host_call(host_module, name)
    if code == nil then error_(chunkname, 2) end
    local chunk, err = load_compiled(code, chunkname, env)
    if not chunk then error_(err, 2) end
    loading[name] = true
    local ok, result = pcall_(chunk, name)
    loading[name] = nil
    reraise_if_exceeded()
    if not ok then error_(result, 0) end
    if result == nil then result = true end
    loaded[name] = result
    return result
  end
  return env
end

-- Load a compiled script into a new environment and run its top level (the host calls this under
-- the "load" budget).  Returns the environment and what the chunk returned, or nil and the loader's
-- message.  From the moment its top level starts, the new version is the active one: string
-- methods are looked up in its `string` table.
function api.install(code, chunkname)
  local env = new_env()
  local chunk, err = load_compiled(code, chunkname, env)
  if not chunk then return nil, err end
  string_mt.__index = env_strings[env]
  return env, chunk()
end

-- Make `env` the running version again (a reload rolled back); nil before any script is loaded.
function api.activate(env)
  string_mt.__index = env and env_strings[env] or safe_string
end

function api.global(env, name)
  return rawget_(env, name)
end

-- A field of a script table read without metamethods: the host reads state._finished after every
-- tick, outside any budget, and a script's __index must not run there.
function api.field(t, key)
  if type_(t) ~= "table" then return nil end
  return rawget_(t, key)
end

api.patterns = lua_matcher -- for tests that compare it with the C library

---------------------------------------------------------------------------------------------------
-- State copy for a reload.  The new version runs on a copy, so a rolled-back reload leaves the
-- running state untouched.  Only data is copied: tables (shared references and cycles keep their
-- shape), strings, integers and floats, booleans.  Functions, coroutines and tables with a
-- metatable belong to the old code; meeting one fails the copy with the path to it.
---------------------------------------------------------------------------------------------------
local function path_join(path, key)
  if type_(key) == "string" and smatch(key, "^[%a_][%w_]*$") then return path .. "." .. key end
  return path .. "[" .. tostring_(key) .. "]"
end

local KEY = {} -- marks a step to a table that was reached as a key

local function step(path, key)
  if key == KEY then return path .. "(key)" end
  return path_join(path, key)
end

-- The path of `target` in the state, found the way the copy walks it (breadth first).  Only
-- built for an error message, so the copy itself does not track paths.
local function path_to(root, target)
  local parent, via, queue, i = { [root] = false }, {}, { root }, 1
  while queue[i] do
    local t = queue[i]
    if t == target then break end
    for k, v in next_, t do
      if type_(k) == "table" and parent[k] == nil then
        parent[k], via[k] = t, KEY
        queue[#queue + 1] = k
      end
      if type_(v) == "table" and parent[v] == nil then
        parent[v], via[v] = t, k
        queue[#queue + 1] = v
      end
    end
    i = i + 1
  end
  if target == root then return "state" end
  return step(path_to(root, parent[target]), via[target])
end

local function refuse(root, src, key, v)
  local t = type_(v)
  local what = t == "table" and " has a metatable" or (" is a " .. t)
  error_(step(path_to(root, src), key) .. what .. "; only plain data survives a reload", 0)
end

-- The copy of `x`, a key or a value found in table `src` (`key` says which, for an error).
local function copy_of(x, copies, queue, root, src, key)
  local t = type_(x)
  if t == "string" or t == "number" or t == "boolean" then return x end
  if t ~= "table" then refuse(root, src, key, x) end
  local c = copies[x]
  if c == nil then
    if getmetatable_(x) ~= nil then refuse(root, src, key, x) end
    c = {}
    copies[x] = c
    queue[#queue + 1] = x
  end
  return c
end

function api.copy(root)
  if type_(root) ~= "table" then error_("state is a " .. type_(root) .. ", not a table", 0) end
  if getmetatable_(root) ~= nil then
    error_("state has a metatable; only plain data survives a reload", 0)
  end
  local out = {}
  local copies, queue, i = { [root] = out }, { root }, 1
  while queue[i] do
    local src = queue[i]
    local dst = copies[src]
    for k, v in next_, src do
      dst[copy_of(k, copies, queue, root, src, KEY)] = copy_of(v, copies, queue, root, src, k)
    end
    i = i + 1
  end
  return out
end

return api
