-- Tug of war: two players pull a rope; the first to drag the knot to their side wins.
--
-- Queue for mode "tug" (`matchmaker.add {mode = "tug"}`), then pull with
--   {"type": "match.input", "payload": {"pull": 1}}
-- Each pull moves the knot one step towards you (at most one pull per player per tick counts).
-- The knot starts at 0; the first player wins at -5, the second at +5.

match_size = 2
max_players = 2
tick_rate = 10

local WIN_AT = 5

function init(state, ctx)
  state.knot = 0
  state.sides = {}   -- player id -> -1 (first player) or 1 (second)
  state.pulled = {}  -- players who pulled since the last tick
  return state
end

function join(state, player_id)
  local taken = 0
  for _ in pairs(state.sides) do taken = taken + 1 end
  if taken >= 2 then return nil, "a rope has two ends" end
  state.sides[player_id] = taken == 0 and -1 or 1
  game.send(player_id, { side = state.sides[player_id], win_at = WIN_AT * state.sides[player_id] })
  return state
end

function leave(state, player_id)
  state.sides[player_id] = nil
  for other in pairs(state.sides) do
    state._finished = true
    state._result = { winner = other, reason = "forfeit" }
  end
  return state
end

function handle_input(state, player_id, input)
  if input.pull ~= 1 then
    game.send(player_id, { refused = 'send {"pull": 1}' })
    return state
  end
  state.pulled[player_id] = true
  return state
end

function tick(state)
  for pid in pairs(state.pulled) do
    state.knot = state.knot + (state.sides[pid] or 0)
  end
  state.pulled = {}
  for pid, side in pairs(state.sides) do
    if state.knot * side >= WIN_AT then
      state._finished = true
      state._result = { winner = pid, reason = "pulled", knot = state.knot }
    end
  end
  return state
end

function get_state(state, player_id)
  local side = state.sides[player_id]
  return { knot = state.knot, you = side, win_at = side and WIN_AT * side }
end
