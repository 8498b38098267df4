-- Host side of a match's Lua state.
--
-- This chunk runs once in every fresh Lua state, with the real standard library, before any game
-- code.  It loads the budget machinery (calls.lua) and the bounded library (clib.lua), builds what
-- game scripts see, and returns the host API (a table only Python holds).  Game code can never
-- reach the real globals, `debug`, `load`, `string.dump` or the lupa module: it only sees the
-- environment `new_env` made for its version, and every function in it was chosen here.
local host = ...

local host_log, host_send, host_broadcast, host_module = host.log, host.send, host.broadcast, host.module
local host_persist = host.persist

local co_status, co_yield = coroutine.status, coroutine.yield
local co_running, co_isyieldable = coroutine.running, coroutine.isyieldable
local pcall_, error_, type_, select_, next_ = pcall, error, type, select, next
local tostring_, setmetatable_, getmetatable_, rawget_, load_ = tostring, setmetatable, getmetatable, rawget, load
local smatch = string.match
local tconcat = table.concat

-- `ctx` is written by the host before callbacks (tick number, players).
local ctx = { match_id = "", tick = 0, players = {} }
local B = load_(host.calls_chunk, "=asobi", "b")(host, ctx)
local lib = load_(host.clib_chunk, "=asobi", "b")(host, B)
local reraise_if_exceeded, host_call, check = B.reraise_if_exceeded, B.host_call, B.check

local api = {}
api.call = B.call
api.call_each = B.call_each
api.call_inputs = B.call_inputs

-- Method calls on strings (`s:find(...)`) go through the string metatable: point it at a safe
-- table and lock it, so `getmetatable("").__index` cannot hand out the real string library.
local safe_string = lib.string
local string_mt = lib.string_mt
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
  "assert", "ipairs", "next", "pairs", "rawequal", "rawget", "rawlen", "rawset", "tostring", "type",
  "getmetatable",
} do
  base[name] = _G[name]
end
base._VERSION = _VERSION
base.tonumber, base.select, base.error = lib.tonumber, lib.select, lib.error
base.pcall, base.xpcall = B.pcall, B.xpcall

local lib_table, lib_math, lib_utf8, lib_os = lib.table, lib.math, lib.utf8, lib.os

-- The match's one random generator (random.lua): `math.random`, `math.randomseed` and
-- `game.random` all draw from it, and its state is data the host can save and set back.
local rng = load_(host.random_chunk, "=asobi", "b")(host.seed)
lib_math.random, lib_math.randomseed = rng.random, rng.randomseed
api.random_state, api.set_random_state = rng.state, rng.set_state

-- Finalizers are refused: a `__gc` runs during whatever allocation happens to finish a collection
-- cycle, in another callback, in host code or while the state is closed, outside any budget.
-- Lua only marks an object for finalization if its metatable has `__gc` (read raw) when
-- setmetatable is called; a `__gc` added later is never called.
function base.setmetatable(t, mt)
  if type_(mt) == "table" and rawget_(mt, "__gc") ~= nil then
    error_("__gc metamethods are not allowed in match scripts", 2)
  end
  return setmetatable_(t, mt)
end

local lib_coroutine = {
  create = B.co_new,
  resume = B.co_resume,
  wrap = B.co_wrap,
  yield = co_yield,
  status = co_status,
  running = co_running,
  isyieldable = co_isyieldable,
  close = B.co_close,
}

---------------------------------------------------------------------------------------------------
-- game.* and require.
---------------------------------------------------------------------------------------------------
api.ctx = ctx

-- The match's tick in one crossing, where it took three: the tick number game.tick() reads, the
-- script's tick under its budget, and whether the state the tick leaves asks to end the match.
-- Given get_state and its arguments (`state_prefix` ..., then the ids), the round of state frames
-- after it too, where that took a second crossing: only when the tick succeeded, left a table (or
-- nothing) and made no host calls, so that no effect of the tick is held and what the host does
-- between the two (adopt the state) changes nothing Lua sees.  `B.tick` (calls.lua) does it:
-- api.tick(prefix, suffix, until_time, tick_no, fn, state, ...) returns finished, ok, the tick's
-- first result, then, if get_state ran, call_each's results.
api.tick = B.tick

local function log_value(v)
  if type_(v) == "string" then return v end
  return tostring_(v)
end

-- Every host function is called through `host_call` (calls.lua): its time is the callback's.

local lib_game = {}
function lib_game.id() return ctx.match_id end
function lib_game.tick() return ctx.tick end
-- A copy the script may change; in C when the budgeted calls are (calls.lua).
lib_game.players = B.players or function()
  local out = {}
  for i, p in next_, ctx.players do out[i] = p end
  return out
end
function lib_game.log(level, msg, meta)
  host_call(host_log, log_value(level), log_value(msg), type_(meta) == "table" and meta or nil)
end
-- The host returns an error message rather than raising, so the error is reported at the
-- script line that called game.send / game.broadcast.
-- Values the host will walk to convert `v` (it stops past MAX_VALUES; so does this count, which
-- also ends cycles).  Counted raw, in Lua, under the budget.
local MAX_VALUES = 100001
local SECONDS_PER_VALUE = 1e-6 -- conversion in the host, measured ~0.7 us a value, with margin

local function values_in(v, n)
  if type_(v) ~= "table" then return n + 1 end
  local stack, top = { v }, 1
  while top > 0 and n < MAX_VALUES do
    local t = stack[top]
    stack[top] = nil
    top = top - 1
    for k, x in next_, t do
      n = n + 2
      if type_(x) == "table" then
        top = top + 1
        stack[top] = x
      end
      if n >= MAX_VALUES then break end
    end
  end
  return n
end

local function reserve_for(...)
  local n = 0
  for i = 1, select_("#", ...) do n = values_in((select_(i, ...)), n) end
  B.reserve(n * SECONDS_PER_VALUE)
end

function lib_game.send(player_id, payload)
  reserve_for(payload)
  local err = host_call(host_send, player_id, payload)
  if err ~= nil then error_(err, 2) end
  return true
end
function lib_game.broadcast(event, payload)
  reserve_for(payload)
  local err = host_call(host_broadcast, event, payload)
  if err ~= nil then error_(err, 2) end
  return true
end
lib_game.random = rng.random

-- Persistence: every call returns a table, {ok = value} or {error = code, message = text}.
-- Writes belong to the running callback and take effect only if it succeeds.
local function persist(name)
  return function(...)
    if not host_persist then return { error = "not_configured" } end
    reserve_for(...)
    return host_call(host_persist, name, ...)
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
    check() -- loading a large module is work done for this callback
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

api.patterns = lib.lua_matcher -- for tests that compare it with the C library

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

---------------------------------------------------------------------------------------------------
-- The same copy written to a string: a match's snapshot (pack.lua, docs/durability.md).  It
-- refuses through `refuse` above, so the snapshot and the reload agree on what is data.
---------------------------------------------------------------------------------------------------
local packer = load_(host.pack_chunk, "=asobi", "b")(refuse, host.now)
local random_state, tunpack = rng.state, table.unpack

-- The same bytes written in C when it is built (`_pack.c`, asobi/lua/native.py): it declines
-- (nil) what pack.lua refuses, and pack.lua then raises the error that names the path.
local native_pack, host_now = host.pack, host.now
local function pack(root, KEY, deadline, budget_error)
  if native_pack then
    local packed = native_pack(root, deadline, host_now)
    if packed then return { packed }, 1 end
    if packed == false then error_(budget_error, 0) end
  end
  return packer.pack(root, KEY, deadline, budget_error)
end

local function snapshot_of(ok, out, n)
  if not ok then
    if type_(out) ~= "string" then out = "error object of type " .. type_(out) end
    return false, out
  end
  local a, b, c, d = random_state()
  return true, a, b, c, d, tunpack(out, 1, n)
end

-- The state and the random generator's state at the same moment, in one crossing: true, the
-- generator's four words, then the pieces of the packed state (the host joins them); or false,
-- why it cannot be copied.  Past `deadline` (host clock) the walk stops with `budget_error`.  It
-- runs no script code, hence no budget hook (pack.lua).
function api.snapshot(budget_error, deadline, root)
  return snapshot_of(pcall_(pack, root, KEY, deadline, budget_error))
end

api.unpack = packer.unpack

return api
