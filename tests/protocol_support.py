"""Shared pieces of the protocol, session and limit tests: a game script exercising every
callback, and a tiny HTTP GET for the routes on the WebSocket port."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request

GAME = """\
match_size = 1
max_players = 3
tick_rate = 20
function init(state, ctx)
  state.counter = 0
  state.inputs = 0
  state.left = 0
  state.last_left = ""
  state.closed = false
  return state
end
function join(state, player_id)
  if state.closed then return nil, "match is closed" end
  return state
end
function leave(state, player_id)
  state.left = state.left + 1
  state.last_left = player_id
  game.broadcast("gone", { player_id = player_id })
  return state
end
function handle_input(state, player_id, input)
  if math.type(input.add) == "integer" then state.inputs = state.inputs + input.add end
  if type(input.whisper) == "string" then game.send(player_id, { echo = input.whisper }) end
  if type(input.shout) == "string" then
    game.broadcast("shout", { from = player_id, text = input.shout })
  end
  if input.close == true then state.closed = true end
  if input.finish == true then
    state._finished = true
    state._result = { winner = player_id }
  end
  return state
end
function tick(state)
  state.counter = state.counter + 1
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, inputs = state.inputs, left = state.left,
           last_left = state.last_left }
end
"""

PAIR = "match_size = 2\nmax_players = 2\n" + GAME.split("\n", 3)[3]


async def http_get(url: str) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of a GET (4xx/5xx included, not raised)."""

    def fetch() -> tuple[int, dict[str, str], str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    return await asyncio.to_thread(fetch)


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus exposition text (0 when absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    for line in text.splitlines():
        found = re.match(pattern, line)
        if found:
            return float(found.group(1))
    return 0.0
