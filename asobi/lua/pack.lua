-- A match's state written to a string and read back: its snapshot (docs/durability.md).  A host
-- chunk, loaded by sandbox.lua with the reload copy's `refuse` and the host clock.
--
-- `pack` walks the state exactly as the reload's copy (`api.copy`) does: breadth first, tables
-- numbered in the order they are met, so shared references and cycles keep their shape.  It
-- refuses exactly what the copy refuses, through the same `refuse`: a state that survives a
-- reload survives a restart, and the other way round.  Integers and floats keep their Lua type,
-- strings are binary-safe, keys may be any data.
--
-- Layout: "ASN1", then per table in walk order a pair count and its pairs; a value is a tag byte
-- and its bytes (1 string, 2 integer, 3 float, 4 true, 5 false, 6 table number).
--
-- Why it is written this way: the snapshot runs on the tick path, once a second for every match,
-- and its cost is the state's size.  One `string.pack` call per value made a string per value
-- (each one interned, then garbage for the collector); here the pairs of a run of tables go to
-- one `string.pack` call, a format of constant pieces and the values as its arguments.  It runs
-- without the count hook that budgets script code (with a hook set, Lua checks it at every
-- instruction): no script code runs during the walk, so it checks the clock itself, every
-- CHECK_EVERY pairs and tables.
local refuse, now = ...

local type_, next_, getmetatable_, error_, tostring_ = type, next, getmetatable, error, tostring
local spack, sunpack, ssub, mtype = string.pack, string.unpack, string.sub, math.type
local tconcat, tunpack = table.concat, table.unpack

local P = {}

local MAGIC = "ASN1"
-- Pairs written per `string.pack` call: past CHUNK pending pairs, the next table starts a new
-- call; a single table is split every SPLIT pairs (the arguments sit on Lua's stack).
local CHUNK, SPLIT = 128, 256
-- Pairs and tables between two looks at the clock (a few hundred microseconds of work).
local CHECK_EVERY = 1024

-- Scratch for a table's format pieces and arguments, reused from one snapshot to the next.
-- Only the range a call fills is ever read, and entries only ever hold numbers and strings.
local fmt, args = { "<" }, {}

-- The format piece of a pair by its value's type, indexed by its key's kind: 1 a string key,
-- 2 an integer key (both written with the value), 0 a key `put` wrote already.
local INT = { [0] = "Bj", "Bs4Bj", "BjBj" }
local FLOAT = { [0] = "Bn", "Bs4Bn", "BjBn" }
local STRING = { [0] = "Bs4", "Bs4Bs4", "BjBs4" }
local TABLE = { [0] = "BI4", "Bs4BI4", "BjBI4" }
local KEY_ONLY = { "Bs4", "Bj" }

-- Appends x (a key or a value of table `src`, `key` says which for an error) to the format and
-- arguments at nf and na; returns the new nf, na and the number of tables numbered so far.  The
-- common cases (string keys, number and string values) are inlined in `pack`.
local function put(x, nf, na, ids, queue, nq, root, src, key)
  local t = type_(x)
  if t == "string" then
    fmt[nf + 1], args[na + 1], args[na + 2] = "Bs4", 1, x
    return nf + 1, na + 2, nq
  elseif t == "number" then
    if mtype(x) == "integer" then
      fmt[nf + 1], args[na + 1] = "Bj", 2
    else
      fmt[nf + 1], args[na + 1] = "Bn", 3
    end
    args[na + 2] = x
    return nf + 1, na + 2, nq
  elseif t == "boolean" then
    fmt[nf + 1], args[na + 1] = "B", x and 4 or 5
    return nf + 1, na + 1, nq
  elseif t ~= "table" then
    refuse(root, src, key, x)
  end
  local id = ids[x]
  if id == nil then
    if getmetatable_(x) ~= nil then refuse(root, src, key, x) end
    nq = nq + 1
    id = nq
    ids[x], queue[nq] = id, x
  end
  fmt[nf + 1], args[na + 1], args[na + 2] = "BI4", 6, id
  return nf + 1, na + 2, nq
end

-- pack(root, KEY, deadline, budget_error): the state as pieces of a string, `out[1..n]`, for
-- the host to join (a string made here would be one more copy of the state in the collector's
-- care).  `KEY` is the copy's marker for a table reached as a key; past `deadline` (host clock)
-- it raises `budget_error`.
--
-- The pairs of consecutive tables share a `string.pack` call (small tables are the common case:
-- a hundred entities of six fields are a hundred tables), each table's count an argument of the
-- call filled in once the table is walked.  A table still growing when the call is full has its
-- count written on its own.
function P.pack(root, KEY, deadline, budget_error)
  if type_(root) ~= "table" then error_("state is a " .. type_(root) .. ", not a table", 0) end
  if getmetatable_(root) ~= nil then
    error_("state has a metatable; only plain data survives a reload", 0)
  end
  local out, n = { MAGIC }, 1
  local ids, queue, nq, i = { [root] = 1 }, { root }, 1, 1
  -- fmt[1] is "<"; pending: nf format pieces, na arguments, `pending` pairs.
  local nf, na, pending, work = 1, 0, 0, 0
  while i <= nq do
    local src = queue[i]
    if pending >= CHUNK then
      n = n + 1
      out[n] = spack(tconcat(fmt, "", 1, nf), tunpack(args, 1, na))
      nf, na, work, pending = 1, 0, work + pending, 0
    end
    work = work + 1
    if work >= CHECK_EVERY then
      work = 0
      if now() > deadline then error_(budget_error, 0) end
    end
    -- This table's count: piece and argument at head_f, head_a (or out[count_at] once split).
    nf, na = nf + 1, na + 1
    local head_f, head_a, count_at, count = nf, na, nil, 0
    fmt[nf] = "I4"
    for k, v in next_, src do
      -- A string or integer key's piece is written with its value's: one piece per pair.
      local kk = 0
      if type_(k) == "string" then
        kk, args[na + 1], args[na + 2] = 1, 1, k
        na = na + 2
      elseif mtype(k) == "integer" then
        kk, args[na + 1], args[na + 2] = 2, 2, k
        na = na + 2
      else
        nf, na, nq = put(k, nf, na, ids, queue, nq, root, src, KEY)
      end
      local mt = mtype(v) -- "integer", "float", or nil for any other type
      if mt == "integer" then
        fmt[nf + 1], args[na + 1], args[na + 2] = INT[kk], 2, v
        nf, na = nf + 1, na + 2
      elseif mt then
        fmt[nf + 1], args[na + 1], args[na + 2] = FLOAT[kk], 3, v
        nf, na = nf + 1, na + 2
      else
        local tv = type_(v)
        if tv == "string" then
          fmt[nf + 1], args[na + 1], args[na + 2] = STRING[kk], 1, v
          nf, na = nf + 1, na + 2
        elseif tv == "table" and ids[v] then
          fmt[nf + 1], args[na + 1], args[na + 2] = TABLE[kk], 6, ids[v]
          nf, na = nf + 1, na + 2
        elseif tv == "table" and getmetatable_(v) == nil then
          nq = nq + 1
          ids[v], queue[nq] = nq, v
          fmt[nf + 1], args[na + 1], args[na + 2] = TABLE[kk], 6, nq
          nf, na = nf + 1, na + 2
        else
          if kk ~= 0 then
            fmt[nf + 1] = KEY_ONLY[kk]
            nf = nf + 1
          end
          nf, na, nq = put(v, nf, na, ids, queue, nq, root, src, k)
        end
      end
      count, pending = count + 1, pending + 1
      if pending == SPLIT then
        if count_at == nil then
          -- First split of this table: the tables before it, its count (later), its pairs.
          if head_f > 2 then
            n = n + 1
            out[n] = spack(tconcat(fmt, "", 1, head_f - 1), tunpack(args, 1, head_a - 1))
          end
          n = n + 1
          count_at = n
          fmt[head_f] = "<"
          n = n + 1
          out[n] = spack(tconcat(fmt, "", head_f, nf), tunpack(args, head_a + 1, na))
        else
          n = n + 1
          out[n] = spack(tconcat(fmt, "", 1, nf), tunpack(args, 1, na))
        end
        nf, na, work, pending = 1, 0, work + SPLIT, 0
        if work >= CHECK_EVERY then
          work = 0
          if now() > deadline then error_(budget_error, 0) end
        end
      end
    end
    if count_at == nil then
      args[head_a] = count
    else
      out[count_at] = spack("<I4", count)
    end
    i = i + 1
  end
  if nf > 1 then
    n = n + 1
    out[n] = spack(tconcat(fmt, "", 1, nf), tunpack(args, 1, na))
  end
  return out, n
end

-- The state `pack` wrote, rebuilt as new tables of this Lua state.
function P.unpack(data)
  if type_(data) ~= "string" or ssub(data, 1, 4) ~= MAGIC then
    error_("not a packed state", 0)
  end
  local tables, pos, i = { {} }, 5, 1
  local function value()
    local tag
    tag, pos = sunpack("<B", data, pos)
    if tag == 1 then
      local s
      s, pos = sunpack("<s4", data, pos)
      return s
    elseif tag == 2 or tag == 3 then
      local num
      num, pos = sunpack(tag == 2 and "<j" or "<n", data, pos)
      return num
    elseif tag == 4 or tag == 5 then
      return tag == 4
    elseif tag == 6 then
      local id
      id, pos = sunpack("<I4", data, pos)
      local t = tables[id]
      if t == nil then
        if id ~= #tables + 1 then error_("packed state refers to table " .. id .. " out of order", 0) end
        t = {}
        tables[id] = t
      end
      return t
    end
    error_("packed state has an unknown tag " .. tostring_(tag), 0)
  end
  while i <= #tables do
    local dst, count = tables[i], nil
    count, pos = sunpack("<I4", data, pos)
    for _ = 1, count do
      local k = value()
      if k == nil or k ~= k then error_("packed state has a nil or NaN key", 0) end
      dst[k] = value()
    end
    i = i + 1
  end
  if pos ~= #data + 1 then error_("packed state has trailing bytes", 0) end
  return tables[1]
end

return P
