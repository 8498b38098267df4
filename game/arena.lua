-- Gem arena: two players race around a small grid collecting gems.
--
-- Queue for mode "arena" (`matchmaker.add {mode = "arena"}`).  Send moves as
--   {"type": "match.input", "payload": {"move": "up"}}       -- up, down, left or right
-- One move per player is applied each tick (the last one sent wins).  The first player to
-- TARGET gems wins; when the clock runs out the higher score wins (or it is a draw).  A player
-- who leaves or disconnects forfeits.
--
-- Frames players receive:
--   match.state    every tick, your own view (get_state below)
--   match.gem      someone picked up a gem (broadcast)
--   match.hurry    ten seconds left (broadcast)
--   match.message  private: a welcome with your spawn point, or why your input was refused
--   match.finished {result = {winner, reason, scores}}
-- The winner's score goes to the "arena" leaderboard (`leaderboard.top {board = "arena"}`) and
-- they are granted that many "gems" (game.economy).

local grid = require("lib.grid")

match_size = 2
max_players = 2
tick_rate = 10

local W, H = 7, 7
local GEMS = 3
local TARGET = 3
local ROUND_SECONDS = 60
local SPAWNS = { { x = 1, y = 1 }, { x = W, y = H } }

local function occupied(state, cell)
  for _, gem in ipairs(state.gems) do
    if grid.same(gem, cell) then return true end
  end
  for _, p in pairs(state.players) do
    if grid.same(p, cell) then return true end
  end
  return false
end

local function spawn_gem(state)
  local cell = grid.free_cell(W, H, function(c) return occupied(state, c) end, game.random)
  if cell then state.gems[#state.gems + 1] = cell end
end

local function scores(state)
  local out = {}
  for pid, p in pairs(state.players) do out[pid] = p.score end
  return out
end

local function finish(state, winner, reason)
  state._finished = true
  state._result = { winner = winner, reason = reason, scores = scores(state) }
  game.log("info", "arena over", { winner = winner or "draw", reason = reason })
  if winner then
    -- Persistent results (docs/persistence.md): the best score per player on the "arena" board,
    -- and a prize.  They are written only if this callback succeeds, together with the state.
    game.leaderboard.submit("arena", winner, state.players[winner].score)
    game.economy.grant(winner, "gems", state.players[winner].score, "arena win")
  end
end

function init(state, ctx)
  state.players = {}
  state.order = {}
  state.gems = {}
  state.ticks_left = ROUND_SECONDS * tick_rate
  return state
end

function join(state, player_id)
  if #state.order >= 2 then return nil, "the arena holds two players" end
  local spawn = SPAWNS[#state.order + 1]
  state.players[player_id] = { x = spawn.x, y = spawn.y, score = 0 }
  state.order[#state.order + 1] = player_id
  if #state.order == 2 then
    for _ = 1, GEMS do spawn_gem(state) end
  end
  game.send(player_id, {
    welcome = "first to " .. TARGET .. " gems wins",
    spawn = spawn,
    board = { w = W, h = H },
  })
  return state
end

function leave(state, player_id)
  if state._finished then return state end
  local winner
  for _, pid in ipairs(state.order) do
    if pid ~= player_id then winner = pid end
  end
  finish(state, winner, "forfeit")
  return state
end

function handle_input(state, player_id, input)
  local move = input.move
  if type(move) ~= "string" or grid.DIRECTIONS[move] == nil then
    game.send(player_id, { refused = "move must be up, down, left or right" })
    return state
  end
  state.players[player_id].next_move = move
  return state
end

function tick(state)
  if state._finished then return state end
  for _, pid in ipairs(state.order) do
    local p = state.players[pid]
    if p.next_move then
      local to = grid.step(p, p.next_move, W, H)
      p.x, p.y, p.next_move = to.x, to.y, nil
      for i, gem in ipairs(state.gems) do
        if grid.same(gem, p) then
          table.remove(state.gems, i)
          p.score = p.score + 1
          game.broadcast("gem", { player = pid, score = p.score, at = { x = p.x, y = p.y } })
          spawn_gem(state)
          break
        end
      end
      if p.score >= TARGET then
        finish(state, pid, "target")
        return state
      end
    end
  end
  state.ticks_left = state.ticks_left - 1
  if state.ticks_left == 10 * tick_rate then
    game.broadcast("hurry", { seconds_left = 10 })
  end
  if state.ticks_left <= 0 then
    local a, b = state.order[1], state.order[2]
    local sa, sb = state.players[a].score, state.players[b].score
    if sa == sb then
      finish(state, nil, "time")
    else
      finish(state, sa > sb and a or b, "time")
    end
  end
  return state
end

function get_state(state, player_id)
  local players = {}
  for i, pid in ipairs(state.order) do
    local p = state.players[pid]
    players[i] = { id = pid, x = p.x, y = p.y, score = p.score }
  end
  return {
    you = player_id,
    players = players,
    gems = state.gems,
    board = { w = W, h = H },
    target = TARGET,
    seconds_left = math.ceil(state.ticks_left / tick_rate),
  }
end
