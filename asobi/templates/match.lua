function init(state)
  state.counter = 0
  state.message = "hello"
  return state
end
function tick(state)
  state.counter = state.counter + 1
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, message = state.message }
end
