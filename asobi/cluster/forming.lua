-- The cluster's ticket queue, as one Redis script (asobi/cluster/forming.py, docs/cluster.md).
--
-- Every change to the queue is one call of this script, and Redis runs a script alone: a ticket
-- is in a queue, in one leased group, or gone, never two of these at once, whichever node asks.
-- ARGV[1] names the operation, ARGV[2] is the key prefix ("asobi:mm:"), ARGV[3] the prefix of
-- the nodes' heartbeat keys ("asobi:node:"; a node whose key expired is dead).  Times are Redis's
-- own clock (TIME), so the nodes' clocks never have to agree.
--
-- Keys (P = the prefix):
--   P.."t:"..id      hash: player, mode, node (the player's home node), score, expires
--   P.."q:"..mode    sorted set: ticket id -> score (queue order, oldest first)
--   P.."p:"..player  hash: mode -> ticket id (the player's queued tickets)
--   P.."n:"..node    sorted set: ticket id -> expiry (the tickets a node's players hold)
--   P.."modes"       set: the modes with a ticket queued
--   P.."g:"..group   string: a formed group, JSON {mode, former, tickets, claimed_by}
--   P.."leases"      sorted set: group id -> lease deadline
--   P.."seq"         counter for group ids

local op = ARGV[1]
local P = ARGV[2]
local NODE = ARGV[3]

local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function read(id)
  local f = redis.call("HMGET", P .. "t:" .. id, "player", "mode", "node", "score", "expires")
  if not f[1] then return nil end
  return {id = id, player = f[1], mode = f[2], node = f[3],
          score = tonumber(f[4]), expires = tonumber(f[5])}
end

-- Take a ticket out of every index (its record goes too).
local function unlink(t)
  redis.call("ZREM", P .. "q:" .. t.mode, t.id)
  if redis.call("HGET", P .. "p:" .. t.player, t.mode) == t.id then
    redis.call("HDEL", P .. "p:" .. t.player, t.mode)
  end
  redis.call("ZREM", P .. "n:" .. t.node, t.id)
  redis.call("DEL", P .. "t:" .. t.id)
  if redis.call("ZCARD", P .. "q:" .. t.mode) == 0 then
    redis.call("SREM", P .. "modes", t.mode)
  end
end

-- Put a ticket (back) in its queue at its own score: a handed-back ticket keeps its place.
local function link(t)
  redis.call("HSET", P .. "t:" .. t.id, "player", t.player, "mode", t.mode, "node", t.node,
             "score", t.score, "expires", t.expires)
  redis.call("ZADD", P .. "q:" .. t.mode, t.score, t.id)
  redis.call("HSET", P .. "p:" .. t.player, t.mode, t.id)
  redis.call("ZADD", P .. "n:" .. t.node, t.expires, t.id)
  redis.call("SADD", P .. "modes", t.mode)
end

local function alive(node)
  return redis.call("EXISTS", NODE .. node) == 1
end

-- Hand a group's tickets back to their queues, except those whose home node is dead (their
-- players' sockets died with it) or whose player queued again meanwhile.
local function hand_back(group)
  local back, dropped = 0, 0
  for _, t in ipairs(group.tickets) do
    if alive(t.node) and not redis.call("HGET", P .. "p:" .. t.player, t.mode) then
      link(t)
      back = back + 1
    else
      dropped = dropped + 1
    end
  end
  return back, dropped
end

if op == "add" then
  -- ARGV: id, player, mode, node, ttl_ms (0: no expiry).  A ticket the player holds for this
  -- mode, queued on whichever node, is replaced: the player is where they queued last.
  local id, player, mode, node, ttl = ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
  local old = redis.call("HGET", P .. "p:" .. player, mode)
  if old then
    local t = read(old)
    if t then unlink(t) else redis.call("HDEL", P .. "p:" .. player, mode) end
  end
  local now = now_ms()
  local expires = ttl > 0 and now + ttl or 9007199254740991
  link({id = id, player = player, mode = mode, node = node, score = now, expires = expires})
  return old or false

elseif op == "remove" then
  -- ARGV: player, id ("" for all of the player's tickets).  Returns the removed ids: a ticket
  -- already in a formed group is not removed (its match goes ahead).
  local player, id = ARGV[4], ARGV[5]
  local removed = {}
  local held = redis.call("HGETALL", P .. "p:" .. player)
  for i = 2, #held, 2 do
    if id == "" or held[i] == id then
      local t = read(held[i])
      if t then unlink(t) else redis.call("HDEL", P .. "p:" .. player, held[i - 1]) end
      removed[#removed + 1] = held[i]
    end
  end
  return removed

elseif op == "form" then
  -- ARGV: mode, size, max groups, lease_ms, former.  The atomic step: the oldest `size` live
  -- tickets leave the queue together as one group leased to `former`.  Tickets past their
  -- expiry are left for their home node to expire (it tells the player), tickets of a node
  -- whose heartbeat is missing for every node to drop (`drop_node`, when they see it gone).
  -- Returns {depth, oldest score, group JSON...}.
  local mode, size, most = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local lease, former = tonumber(ARGV[7]), ARGV[8]
  local q = P .. "q:" .. mode
  local now = now_ms()
  local out = {0, false}
  local groups, picked, gone = {}, {}, {}
  local cursor = 0
  if redis.call("ZCARD", q) >= size then
    -- Read in queue order without changing the queue, then change it once: no index shifts.
    while #groups < most do
      local ids = redis.call("ZRANGE", q, cursor, cursor + 127)
      if #ids == 0 then break end
      cursor = cursor + #ids
      for _, id in ipairs(ids) do
        local t = read(id)
        if not t then
          gone[#gone + 1] = id
        elseif t.expires > now and alive(t.node) then
          picked[#picked + 1] = t
          if #picked == size then
            groups[#groups + 1] = picked
            picked = {}
            if #groups == most then break end
          end
        end
      end
    end
  end
  for _, id in ipairs(gone) do redis.call("ZREM", q, id) end
  for _, tickets in ipairs(groups) do
    for _, t in ipairs(tickets) do unlink(t) end
    local gid = former .. ":" .. redis.call("INCR", P .. "seq")
    local body = cjson.encode({id = gid, mode = mode, former = former, tickets = tickets,
                               claimed_by = false})
    redis.call("SET", P .. "g:" .. gid, body)
    redis.call("ZADD", P .. "leases", now + lease, gid)
    out[#out + 1] = body
  end
  out[1] = redis.call("ZCARD", q)
  local oldest = redis.call("ZRANGE", q, 0, 0, "WITHSCORES")
  if oldest[2] then out[2] = oldest[2] end
  return out

elseif op == "claim" then
  -- ARGV: group, node, lease_ms.  The placing node takes the group: from here on the group is
  -- its to finish (`done`).  A group with a ticket of a dead node is not placed: the other
  -- tickets go back to their queue.  Returns the group JSON, "short", or false (gone).
  local gid, node, lease = ARGV[4], ARGV[5], tonumber(ARGV[6])
  local body = redis.call("GET", P .. "g:" .. gid)
  if not body then return false end
  local group = cjson.decode(body)
  if group.claimed_by then return false end
  for _, t in ipairs(group.tickets) do
    if not alive(t.node) then
      hand_back(group)
      redis.call("DEL", P .. "g:" .. gid)
      redis.call("ZREM", P .. "leases", gid)
      return "short"
    end
  end
  group.claimed_by = node
  body = cjson.encode(group)
  redis.call("SET", P .. "g:" .. gid, body)
  redis.call("ZADD", P .. "leases", now_ms() + lease, gid)
  return body

elseif op == "done" then
  redis.call("DEL", P .. "g:" .. ARGV[4])
  return redis.call("ZREM", P .. "leases", ARGV[4])

elseif op == "release" then
  -- ARGV: group.  Its former gives an unclaimed group back (its placing node never answered).
  local body = redis.call("GET", P .. "g:" .. ARGV[4])
  if not body then return false end
  local group = cjson.decode(body)
  if group.claimed_by then return false end
  local back, dropped = hand_back(group)
  redis.call("DEL", P .. "g:" .. ARGV[4])
  redis.call("ZREM", P .. "leases", ARGV[4])
  return {back, dropped}

elseif op == "reclaim" then
  -- Leases past their deadline: a group still waiting for its placing node (its former died,
  -- or the node it chose never claimed it), or claimed by a node that died since, goes back to
  -- the queue.  A group claimed by a live node stays its own (it finishes, or retries `done`).
  -- Returns {group id, former, claimed_by, back, dropped} per group handed back.
  local now = now_ms()
  local out = {}
  for _, gid in ipairs(redis.call("ZRANGEBYSCORE", P .. "leases", "-inf", now, "LIMIT", 0, 100)) do
    local body = redis.call("GET", P .. "g:" .. gid)
    if not body then
      redis.call("ZREM", P .. "leases", gid)
    else
      local group = cjson.decode(body)
      if group.claimed_by and alive(group.claimed_by) then
        redis.call("ZADD", P .. "leases", now + 5000, gid)
      else
        local back, dropped = hand_back(group)
        redis.call("DEL", P .. "g:" .. gid)
        redis.call("ZREM", P .. "leases", gid)
        out[#out + 1] = cjson.encode({id = gid, former = group.former,
                                      claimed_by = group.claimed_by, back = back,
                                      dropped = dropped})
      end
    end
  end
  return out

elseif op == "expire" then
  -- ARGV: node.  The node's tickets past their expiry leave their queues; returns their
  -- records as JSON (the node tells their players).
  local ids = redis.call("ZRANGEBYSCORE", P .. "n:" .. ARGV[4], "-inf", now_ms(), "LIMIT", 0, 1000)
  local out = {}
  for _, id in ipairs(ids) do
    local t = read(id)
    if t then
      unlink(t)
      out[#out + 1] = cjson.encode(t)
    else
      redis.call("ZREM", P .. "n:" .. ARGV[4], id)
    end
  end
  return out

elseif op == "drop_node" then
  -- ARGV: node, "dead" or "any".  Every ticket a dead (or restarting) node's players held goes.
  -- "dead": only if its heartbeat is still missing (a restarted Redis forgets every node's
  -- heartbeat for up to one beat; those nodes are not dead).
  if ARGV[5] == "dead" and alive(ARGV[4]) then return -1 end
  local ids = redis.call("ZRANGE", P .. "n:" .. ARGV[4], 0, -1)
  for _, id in ipairs(ids) do
    local t = read(id)
    if t then unlink(t) end
  end
  redis.call("DEL", P .. "n:" .. ARGV[4])
  return #ids
end

return redis.error_reply("unknown forming operation " .. tostring(op))
