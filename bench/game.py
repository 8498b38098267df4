"""The benchmark game: the tutorial's counter and message, with ~20 fields changing every tick.

`get_state` is per player (as in the tutorial) and returns 20 fields.  `counter` lets clients see a
skipped, repeated or dropped frame; `message` is a constant of the code (not of the state), so
clients see which code version produced a frame.
The Colyseus room in `bench/peers/colyseus/server.js` keeps the same fields.
"""

from __future__ import annotations

import os
from pathlib import Path

MODE = "bench"
TICK_RATE = 10
MATCH_SIZE = 4

SCRIPT = """\
match_size = %(players)d
max_players = %(players)d
tick_rate = 10

local MESSAGE = "%(message)s"

function init(state)
  state.counter = 0
  state.phase = "play"
  state.x, state.y, state.vx, state.vy = 0.0, 0.0, 1.5, -0.5
  state.hp, state.mana, state.score, state.level = 100, 50, 0, 1
  state.round, state.timer, state.seed = 1, 600, 12345
  state.a, state.b, state.c, state.d = 0, 0, 0, 0
  return state
end

function tick(state)
  local c = state.counter + 1
  state.counter = c
  state.x = state.x + state.vx
  state.y = state.y + state.vy
  state.hp = 100 - c %% 100
  state.mana = (state.mana + 3) %% 200
  state.score = state.score + 7
  state.level = 1 + c // 100
  state.timer = state.timer - 1
  state.seed = (state.seed * 1103515245 + 12345) %% 2147483648
  state.a, state.b, state.c, state.d = c %% 3, c %% 5, c %% 7, c %% 11
  return state
end

function get_state(state, player_id)
  return {
    counter = state.counter, message = MESSAGE, phase = state.phase, you = player_id,
    x = state.x, y = state.y, vx = state.vx, vy = state.vy,
    hp = state.hp, mana = state.mana, score = state.score, level = state.level,
    round = state.round, timer = state.timer, seed = state.seed,
    a = state.a, b = state.b, c = state.c, d = state.d, players = #game.players(),
  }
end
"""


def script(message: str, shared: bool = False, players: int = MATCH_SIZE) -> str:
    """The bench script; `shared` makes get_state player-independent (`shared_state = true`):
    called once per tick, encoded once, the same frame for all players of a match."""
    text = SCRIPT % {"message": message, "players": players}
    if shared:
        text = "shared_state = true\n" + text.replace(" you = player_id,", ' you = "all",')
    return text


def write_script(
    game_dir: Path, message: str, shared: bool = False, players: int = MATCH_SIZE
) -> None:
    """Save like an editor does: write a temp file, then rename it over match.lua."""
    target = game_dir / "match.lua"
    tmp = game_dir / ".match.lua.tmp"
    tmp.write_text(script(message, shared, players))
    os.replace(tmp, target)
