-- Budgets and the call machinery of a match's Lua state (a host chunk, loaded by sandbox.lua).
--
-- Every callback runs under a wall-clock deadline.  A count hook checks the clock every
-- HOOK_COUNT instructions; host functions (game.*, require) check it on entry and on exit, and
-- library wrappers whose C work grows with their data check it through `charge`.  Past the
-- deadline the budget error is raised and `exceeded` stays set until the host call returns, so a
-- script cannot swallow it with pcall, xpcall or coroutine.resume: the wrappers re-raise it.
--
-- The deadline stays armed until the protected call has fully unwound: `__close` handlers of
-- to-be-closed variables run while an error unwinds, after the message handler, and they are
-- script code like any other.  Only `finish`, once `xpcall` has returned, lifts it.
-- `ctx` is sandbox.lua's: the tick number and the players the host writes there.
local host, ctx = ...

local now = host.now
local HOOK_COUNT = host.hook_count

local sethook, getinfo, traceback = debug.sethook, debug.getinfo, debug.traceback
local co_create, co_resume, co_close = coroutine.create, coroutine.resume, coroutine.close
local pcall_, xpcall_, error_, type_, tostring_ = pcall, xpcall, error, type, tostring
local rawget_ = rawget
local ssub = string.sub
local huge = math.huge

local B = {}

-- What every budgeted call shares, in one table that the C calls (`_budget.c`) read and write
-- too: the deadline (host clock; `huge` between calls), the budget error once raised (nil until
-- then), the budget message's two halves, the count of host calls made, and `cut`.  The table is
-- built with all six slots, so writing any of them never allocates.
local DEADLINE, EXCEEDED, PREFIX, SUFFIX, HOST_CALLS, CUT = 1, 2, 3, 4, 5, 6
local S = { huge, false, "callback exceeded its budget", "", 0, false }
S[EXCEEDED] = nil

-- "match.lua:12": the innermost frame of a game script (not of these host chunks), so the message
-- points at the script line that was running when the budget ran out.
local function script_position()
  for level = 2, 5000 do -- the Lua pattern matcher can be deep; a cap keeps this cheap
    local info = getinfo(level, "Sl")
    if info == nil then return nil end
    if ssub(info.source, 1, 1) == "@" then
      return info.short_src .. ":" .. tostring_(info.currentline)
    end
  end
  return nil
end

local hook

local function cut()
  if not S[EXCEEDED] then
    local at = script_position()
    S[EXCEEDED] = S[PREFIX] .. (at and (" at " .. at) or "") .. S[SUFFIX]
  end
  -- From now on the hook fires at every instruction: whatever still runs while the call unwinds
  -- (__close handlers, a script's message handler) is stopped at once.
  sethook(hook, "", 1)
  error_(S[EXCEEDED], 0)
end
S[CUT] = cut

-- B.call, B.call_each, B.tick_then_each and finish: once xpcall has returned the call is over, and
-- nothing is cut there.
local call_fn, finish_fn, each_fn, tick_each_fn

hook = function()
  if now() > S[DEADLINE] then
    local running = getinfo(2, "f").func
    if running ~= call_fn and running ~= finish_fn and running ~= each_fn
      and running ~= tick_each_fn then
      cut()
    end
  end
end
B.hook = hook

-- The clock check of host functions and charged library wrappers.
function B.check()
  if now() > S[DEADLINE] then cut() end
end

-- One VM instruction can also be expensive on its own (`s .. s` on megabytes, a table resize):
-- hundreds of those fit between two count-hook checks.  Such instructions allocate, so the garbage
-- collector keeps finishing cycles; a finalizer that re-arms itself every cycle checks the clock
-- and, past the deadline, makes the hook fire at the very next instruction.  (Errors cannot be
-- raised from a finalizer, hence the hook.)  A false alarm costs one hook call and the count is
-- restored.  This is host code; scripts cannot install finalizers (see setmetatable).
local probe_mt = {}
probe_mt.__gc = function()
  if S[DEADLINE] ~= huge and now() > S[DEADLINE] then sethook(hook, "", 1) end
  setmetatable({}, probe_mt)
end
setmetatable({}, probe_mt)

function B.exceeded() return S[EXCEEDED] end

function B.reraise_if_exceeded(...)
  if S[EXCEEDED] then error_(S[EXCEEDED], 0) end
  return ...
end

-- The deadline is left armed here: a count hook firing in this handler (an ordinary error raised
-- just before the deadline) is itself contained by Lua, and the budget error is what `finish`
-- reports.  Error objects are never converted with __tostring: that is script code.  A failed
-- call's error object is therefore always a string: this handler's, or Lua's own for the errors
-- that skip it ("not enough memory", "error in error handling").
local function message_handler(e)
  if S[EXCEEDED] then return S[EXCEEDED] end
  local msg
  if type_(e) == "string" then
    msg = e
  elseif type_(e) == "number" or type_(e) == "boolean" or e == nil then
    msg = tostring_(e)
  else
    msg = "error object of type " .. type_(e)
  end
  return traceback(msg, 2)
end

local function finish(ok, ...)
  S[DEADLINE] = huge
  sethook()
  local ex = S[EXCEEDED]
  S[EXCEEDED] = nil
  if ex then return false, ex end
  if not ok then return false, (...) end
  return true, ...
end

-- Call fn(...) until a wall-clock deadline (host perf_counter seconds; the host computes it, which
-- saves a call back into the host per call).  `prefix` and `suffix` make the budget message:
-- "tick exceeded its 50 ms budget" .. " at match.lua:12" .. " (raise with ASOBI_LUA_TICK)".
-- Returns true, results... or false, message.
function B.call(prefix, suffix, until_time, fn, ...)
  S[EXCEEDED], S[PREFIX], S[SUFFIX], S[DEADLINE] = nil, prefix, suffix, until_time
  sethook(hook, "", HOOK_COUNT)
  return finish(xpcall_(fn, message_handler, ...))
end
call_fn, finish_fn = B.call, finish

---------------------------------------------------------------------------------------------------
-- Work done inside one C call is invisible to the count hook, which only counts VM instructions:
-- a loop of `s:upper()` on an 8 MB string runs hundreds of such calls between two hook checks and
-- overshoots the budget by seconds.  Wrappers of library functions whose cost grows with their
-- data charge that cost here; past about a millisecond of accumulated work the clock is checked.
---------------------------------------------------------------------------------------------------
local CHARGE_STEP = 1 << 20 -- units are bytes of simple C work (copying, scanning)
local charged = 0

function B.charge(units)
  charged = charged + units
  if charged >= CHARGE_STEP then
    charged = 0
    if now() > S[DEADLINE] then cut() end
  end
end

-- Errors of wrapped C functions are re-raised one level up, so that they point at the script
-- line that made the call, not at the wrapper.
function B.c_result(ok, ...)
  if ok then return ... end
  if S[EXCEEDED] then error_(S[EXCEEDED], 0) end
  error_((...), 2)
end

-- Run a C function; its error is re-raised at the level of the script that called the wrapper
-- (level 1 is this function, 2 the wrapper, 3 the script).
function B.c_call(fn, ...)
  local ok, r = pcall_(fn, ...)
  if not ok then
    if S[EXCEEDED] then error_(S[EXCEEDED], 0) end
    error_(r, 3)
  end
  return r
end

---------------------------------------------------------------------------------------------------
-- Host functions (Python).  Time spent in them belongs to the callback that called them: the
-- clock is checked before and after each call, so a loop of refused `game.storage.set` calls or of
-- `game.broadcast` inside pcall stops at its budget like any loop.  An exception they raise
-- reaches Lua as a Python object: scripts get its text instead, so no Python object is ever
-- within their reach.
---------------------------------------------------------------------------------------------------
local function host_result(ok, ...)
  if now() > S[DEADLINE] then cut() end
  if ok then return ... end
  if S[EXCEEDED] then error_(S[EXCEEDED], 0) end
  local e = ...
  if type_(e) ~= "string" then e = tostring_(e) end
  error_(e, 2)
end

-- Host work about to start that is expected to take `seconds`: when it cannot end before the
-- deadline, the callback is cut now instead of after it (a single conversion of a 100,000-value
-- table takes ~0.1 s of Python, far past a tick's budget).
function B.reserve(seconds)
  if now() + seconds > S[DEADLINE] then cut() end
end

-- Host calls made so far (game.* functions, require): `B.call_each` stops a batch after a call
-- that made any, so that the host can still tell whose effects they were.
function B.host_call(fn, ...)
  S[HOST_CALLS] = S[HOST_CALLS] + 1
  if now() > S[DEADLINE] then cut() end
  return host_result(pcall_(fn, ...))
end

function B.host_calls() return S[HOST_CALLS] end

---------------------------------------------------------------------------------------------------
-- One crossing for a whole round of state frames: `B.call_each` calls fn(state, id) for each id,
-- each under a deadline of its own, and hands every result back at once.  (Flattening the results
-- here into one tuple of plain values was measured too: lupa's conversion of each value costs as
-- much as the host's walk of the table, so the walk stays on the host.)
---------------------------------------------------------------------------------------------------
local unpack_, select_ = table.unpack, select
-- More ids than this in one batch and it ends early (results are returned on Lua's stack).
local MAX_IDS = 1000

-- The JSON encoder (`_tojson.c`, nil when it is not built): a result it can write crosses as its
-- JSON text, marked ENCODED; one it refuses crosses as the value, for the host's walk to convert
-- or to name what is wrong with it.  It runs after the call, outside the deadline: it is host
-- code, bounded by MAX_NODES values.  pcall: a heap at its memory cap refuses the text's string,
-- and the host's walk then does the work.
local tojson, MAX_NODES = host.tojson, host.max_nodes
local ENCODED = 1

-- Per id, in order: true, value; ENCODED, JSON text; or false, message (the call failed).  The
-- batch ends early after a call that made host calls (so its effects are that id's alone); the
-- host calls again for the rest.
function B.call_each(prefix, suffix, budget, fn, state, ...)
  local ids = select_("#", ...)
  if ids > MAX_IDS then ids = MAX_IDS end
  -- One id (a shared_state frame): its result is returned as it is, no table gathers it.
  local out, n = ids ~= 1 and {} or nil, 0
  for i = 1, ids do
    local id = (select_(i, ...))
    local calls_before = S[HOST_CALLS]
    S[EXCEEDED], S[PREFIX], S[SUFFIX], S[DEADLINE] = nil, prefix, suffix, now() + budget
    sethook(hook, "", HOOK_COUNT)
    local ok, value = finish(xpcall_(fn, message_handler, state, id))
    if ok and tojson then
      local written, text = pcall_(tojson, value, MAX_NODES)
      if written and text then ok, value = ENCODED, text end
    end
    if ids == 1 then return ok, value end
    out[n + 1], out[n + 2] = ok, value
    n = n + 2
    if S[HOST_CALLS] ~= calls_before then break end
  end
  return unpack_(out, 1, n)
end
each_fn = B.call_each
local call_each = B.call_each

-- The tick, then the round of get_state calls on the state it left, in one function: `B.call`
-- and the read of `_finished` inlined (each nested call and vararg pass is per-state code that is
-- cold at every match-tick).  `finished` says whether the state the host adopts asks to end the
-- match: the table tick returned, or the one it was given when it returned nothing or failed;
-- `_finished` is read without metamethods (no script code runs outside a budget).  Returns
-- finished, ok, the tick's first result, then call_each's results when `state_fn` is given and
-- the tick succeeded with a table (or nothing) and made no host calls.
function B.tick_then_each(prefix, suffix, until_time, fn, state,
                          state_prefix, state_suffix, state_budget, state_fn, ...)
  local before = S[HOST_CALLS]
  S[EXCEEDED], S[PREFIX], S[SUFFIX], S[DEADLINE] = nil, prefix, suffix, until_time
  sethook(hook, "", HOOK_COUNT)
  local ok, value = finish(xpcall_(fn, message_handler, state))
  local adopted = state
  if ok and type_(value) == "table" then adopted = value end
  local flag = type_(adopted) == "table" and rawget_(adopted, "_finished")
  local finished = flag ~= nil and flag ~= false
  if state_fn == nil or ok ~= true or S[HOST_CALLS] ~= before
    or (value ~= nil and type_(value) ~= "table") then
    return finished, ok, value
  end
  return finished, ok, value,
    call_each(state_prefix, state_suffix, state_budget, state_fn, adopted, ...)
end
tick_each_fn = B.tick_then_each
local tick_then_each = B.tick_then_each

---------------------------------------------------------------------------------------------------
-- One crossing for a tick's inputs: `B.call_inputs` calls fn(state, player, input) for each
-- (player, input) pair in turn, passing each call the state the one before left.  They share one
-- deadline (`until_time`): each call gets what is left of it.  A call after the first of the
-- tick (`first`) starts only if twice `peak`, the expected cost of a call, still fits (the same
-- handler runs slower on a busy machine, and an honest input must not be cut halfway); `peak`
-- rises to a slower call at once and decays by a tenth per call, so one call delayed by a busy
-- machine does not hold the match to one input per tick for good.
--
-- The batch ends after a call that failed, that returned something other than a table or
-- nothing (the host refuses it), or that made host calls (its effects are then its own).
--
-- Each input arrives as its player, then either -1 and the input as it is, or n and the n keys
-- and values of a flat table, built here: lupa makes a table from Python data at several times
-- the cost (`convert.input_args`).  The arguments are gathered into one table first, so reading
-- them stays linear however many there are.
-- Returns: calls made, the new peak, the state after the last call that succeeded, and the last
-- call's outcome (true, its value; or false, the message).
---------------------------------------------------------------------------------------------------
function B.call_inputs(prefix, suffix, until_time, peak, first, fn, state, ...)
  local n = select_("#", ...)
  local args = { ... }
  local made, last_ok, last_value = 0, true, nil
  local started = now()
  local i = 1
  while i < n do
    local left = until_time - started
    if left <= 0 or ((made > 0 or not first) and left < 2 * peak) then break end
    local player, count = args[i], args[i + 1]
    local input
    if count < 0 then
      input = args[i + 2]
      i = i + 3
    else
      input = {}
      local last = i + 1 + 2 * count
      for j = i + 2, last, 2 do input[args[j]] = args[j + 1] end
      i = last + 1
    end
    local calls_before = S[HOST_CALLS]
    local ok, value = B.call(prefix, suffix, until_time, fn, state, player, input)
    local ended = now() -- one clock reading per call: the end of this one starts the next
    local cost = ended - started
    started = ended
    if cost >= peak then peak = cost else peak = peak - (peak - cost) * 0.1 end
    made = made + 1
    last_ok, last_value = ok, value
    if not ok or (value ~= nil and type_(value) ~= "table") then break end
    if value ~= nil then state = value end
    if S[HOST_CALLS] ~= calls_before then break end
  end
  return made, peak, state, last_ok, last_value
end

---------------------------------------------------------------------------------------------------
-- pcall, xpcall and coroutines as scripts see them.
---------------------------------------------------------------------------------------------------
function B.pcall(f, ...)
  return B.reraise_if_exceeded(pcall_(f, ...))
end

-- An error raised by the hook leaves Lua's hooks switched off while the message handler runs: a
-- script handler would run with no budget at all.  Once the budget is spent, the script's handler
-- is therefore skipped.
function B.xpcall(f, handler, ...)
  local function guarded(e)
    if S[EXCEEDED] then return S[EXCEEDED] end
    return handler(e)
  end
  return B.reraise_if_exceeded(xpcall_(f, guarded, ...))
end

-- Hooks are per coroutine: every coroutine a script makes gets the budget hook.  A coroutine
-- keeps it for life, so its `__close` handlers (run by coroutine.close in a later callback) are
-- under that callback's deadline.
function B.co_new(f)
  local co = co_create(f)
  sethook(co, hook, "", HOOK_COUNT)
  return co
end

local function wrap_results(ok, ...)
  if S[EXCEEDED] then error_(S[EXCEEDED], 0) end
  if not ok then error_((...), 0) end
  return ...
end

function B.co_resume(co, ...) return B.reraise_if_exceeded(co_resume(co, ...)) end

-- Closing a suspended coroutine runs its pending `__close` handlers (in that coroutine, under its
-- hook); a budget error raised there comes back as a result, and is raised again.
function B.co_close(co) return B.reraise_if_exceeded(co_close(co)) end

function B.co_wrap(f)
  local co = B.co_new(f)
  return function(...) return wrap_results(co_resume(co, ...)) end
end

-- The match's tick in one crossing (sandbox.lua's `api.tick`): the tick number game.tick() reads
-- set in `ctx`, then `B.tick_then_each`.
function B.tick(prefix, suffix, until_time, tick_no, ...)
  ctx.tick = tick_no
  return tick_then_each(prefix, suffix, until_time, ...)
end

---------------------------------------------------------------------------------------------------
-- The same calls in C (`_budget.c`, when asobi's Lua C functions are there): `B.call`,
-- `B.call_each` and `B.tick`, then `B.players` (game.players()) and `B.numeric` (clib.lua's math
-- wrapper), run one copy of code shared by every Lua state instead of this state's own, so that
-- no host code of the state's own runs on the tick path.  `call_inputs` reaches `B.call`
-- through B, so it runs the C one.
---------------------------------------------------------------------------------------------------
if host.budget then
  local call, each, tick, players, numeric =
    host.budget(S, message_handler, HOOK_COUNT, MAX_NODES, ctx)
  if call then
    B.call, B.call_each, B.tick, B.players, B.numeric = call, each, tick, players, numeric
  end
end

return B
