-- A match's random generator, written in Lua so that its state is data the host can read and set.
--
-- Lua 5.4's own `math.random` keeps its state inside the C library, where it cannot be read back:
-- a snapshot or a replay could not continue its sequence.  This is the same algorithm
-- (xoshiro256**), seeded the same way and drawing the same way, so for one seed it yields the very
-- numbers `math.random` would: `random()` a float in [0, 1), `random(m)` an integer in [1, m],
-- `random(m, n)` one in [m, n], `random(0)` an integer with all bits random.  The state is four
-- 64-bit integers (`state` / `set_state`), kept in upvalues of these functions only.
local seed = ...
local error_, type_, select_ = error, type, select
local tointeger, ult = math.tointeger, math.ult

local s0, s1, s2, s3 = 0, 0, 0, 0

local function rotl(x, n)
  return (x << n) | (x >> (64 - n))
end

local function next_value()
  local result = rotl(s1 * 5, 7) * 9
  local t = s1 << 17
  s2 = s2 ~ s0
  s3 = s3 ~ s1
  s1 = s1 ~ s2
  s0 = s0 ~ s3
  s2 = s2 ~ t
  s3 = rotl(s3, 45)
  return result
end

local function set_seed(n1, n2)
  s0, s1, s2, s3 = n1, 0xff, n2, 0 -- 0xff: never an all-zero state
  for _ = 1, 16 do next_value() end -- spread the seed, as lmathlib.c does
end

-- `ran` reduced to [0, n] (unsigned) without bias: mask to the smallest 2^b - 1 >= n and draw
-- again while the result is above n.
local function project(ran, n)
  if n & (n + 1) == 0 then return ran & n end
  local lim = n
  lim = lim | (lim >> 1)
  lim = lim | (lim >> 2)
  lim = lim | (lim >> 4)
  lim = lim | (lim >> 8)
  lim = lim | (lim >> 16)
  lim = lim | (lim >> 32)
  ran = ran & lim
  while ult(n, ran) do ran = next_value() & lim end
  return ran
end

local function integer_arg(value, position)
  local i = tointeger(value)
  if i == nil then
    if type_(value) == "number" then
      error_("bad argument #" .. position .. " to 'random' (number has no integer representation)", 3)
    end
    error_("bad argument #" .. position .. " to 'random' (number expected, got "
      .. (value == nil and "no value" or type_(value)) .. ")", 3)
  end
  return i
end

local R = {}

function R.random(...)
  local rv = next_value()
  local argc = select_("#", ...)
  local low, up
  if argc == 0 then
    return (rv >> 11) * 0x1p-53
  elseif argc == 1 then
    low, up = 1, integer_arg((...), 1)
    if up == 0 then return rv end
  elseif argc == 2 then
    local a, b = ...
    low, up = integer_arg(a, 1), integer_arg(b, 2)
  else
    error_("wrong number of arguments", 2)
  end
  if not (low <= up) then error_("bad argument #1 to 'random' (interval is empty)", 2) end
  return project(rv, up - low) + low
end

function R.randomseed(n1, n2)
  if n1 == nil then
    -- No seed given: one drawn from this generator, so a replay stays a replay.
    n1, n2 = next_value(), next_value()
  else
    n1, n2 = integer_arg(n1, 1), n2 == nil and 0 or integer_arg(n2, 2)
  end
  set_seed(n1, n2)
  return n1, n2
end

function R.state()
  return s0, s1, s2, s3
end

function R.set_state(a, b, c, d)
  s0, s1, s2, s3 = a, b, c, d
end

set_seed(seed, 0)
return R
