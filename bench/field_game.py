"""The realistic bench game ("field"): 16 players, 50 moving NPCs, per-player views.

Next to `bench/game.py` (20 scalar fields, two thirds of them changing every tick, the same for
everyone), this is the shape of a real match: a 100 x 100 field, 16 players steered by inputs
(clients send 20 per second, two per tick; the last one wins), 50 NPCs keyed by id that wander
(each walks for 2 s, rests for 2 s, turns), one NPC hit per tick, and each player sees only the
players and NPCs within 25 units of themselves (`get_state` per player).

Everything is deterministic (no random numbers) so that `bench/peers/colyseus/states.js` runs the
very same simulation as a Colyseus room with a `StateView` per client, and the bytes of both can
be compared tick for tick.  Positions are kept to one decimal, as a game would quantize them.
"""

from __future__ import annotations

import os
from pathlib import Path

MODE = "field"
TICK_RATE = 10
MATCH_SIZE = 16
NPCS = 50
VIEW_RADIUS = 25
INPUTS_PER_SECOND = 20

SCRIPT = """\
%(sync)smatch_size = %(players)d
max_players = %(players)d
tick_rate = %(tick_rate)d

local MESSAGE = "%(message)s"
local W, RADIUS2 = 100, %(radius)d * %(radius)d
local DX = { [0] = 1, 0.7, 0, -0.7, -1, -0.7, 0, 0.7 }
local DY = { [0] = 0, 0.7, 1, 0.7, 0, -0.7, -1, -0.7 }
local KINDS = { [0] = "orc", "wolf", "slime", "bat" }
local floor = math.floor

-- one decimal, wrapped onto the field
local function step(v, d)
  v = floor((v + d) * 10 + 0.5) / 10
  return floor((v %% W) * 10 + 0.5) / 10
end

function init(state)
  state.tick = 0
  state.players = {}
  state.npcs = {}
  state.dirs = {}
  for i = 1, %(npcs)d do
    state.npcs["n" .. i] = {
      x = (i * 37) %% W + 0.0, y = (i * 61) %% W + 0.0, hp = 100,
      kind = KINDS[i %% 4], name = "npc " .. i,
    }
    state.dirs["n" .. i] = i %% 8
  end
  state.inputs = {}
  state.joined = 0
  return state
end

function join(state, player_id)
  local j = state.joined + 1
  state.joined = j
  state.players[player_id] = {
    x = (j * 13) %% W + 0.0, y = (j * 29) %% W + 0.0, hp = 100, score = 0, name = "player " .. j,
  }
  state.inputs[player_id] = 8
  return state
end

function leave(state, player_id)
  state.players[player_id] = nil
  state.inputs[player_id] = nil
  return state
end

function handle_input(state, player_id, input)
  local dir = type(input) == "table" and math.tointeger(input.dir)
  if dir and dir >= 0 and dir <= 8 and state.inputs[player_id] then
    state.inputs[player_id] = dir
  end
  return state
end

function tick(state)
  local t = state.tick + 1
  state.tick = t
  for id, p in pairs(state.players) do
    local d = state.inputs[id]
    if d < 8 then
      p.x, p.y = step(p.x, DX[d]), step(p.y, DY[d])
      if t %% 10 == 0 then p.score = p.score + 1 end
    end
  end
  local dirs = state.dirs
  for i = 1, %(npcs)d do
    local id = "n" .. i
    local phase = t + 7 * i
    if phase %% 40 == 0 then dirs[id] = (dirs[id] + 3) %% 8 end
    if (phase // 20) %% 2 == 0 then
      local n, d = state.npcs[id], dirs[id]
      n.x, n.y = step(n.x, DX[d] * 0.5), step(n.y, DY[d] * 0.5)
    end
  end
  local hit = state.npcs["n" .. ((t * 7) %% %(npcs)d + 1)]
  hit.hp = hit.hp > 1 and hit.hp - 1 or 100
  return state
end

local function near(a, b)
  local dx, dy = a.x - b.x, a.y - b.y
  return dx * dx + dy * dy <= RADIUS2
end

function get_state(state, player_id)
  local me = state.players[player_id]
  local players, npcs = {}, {}
  if me then
    for id, p in pairs(state.players) do
      if near(me, p) then
        players[id] = { x = p.x, y = p.y, hp = p.hp, score = p.score, name = p.name }
      end
    end
    for id, n in pairs(state.npcs) do
      if near(me, n) then
        npcs[id] = { x = n.x, y = n.y, hp = n.hp, kind = n.kind, name = n.name }
      end
    end
  end
  return { tick = state.tick, message = MESSAGE, you = player_id, players = players, npcs = npcs }
end
"""


def script(message: str = "v0", players: int = MATCH_SIZE, sync: str | None = None) -> str:
    """The field script; `sync` puts a `state_sync` line first ("patch" or "full")."""
    return SCRIPT % {
        "message": message,
        "players": players,
        "tick_rate": TICK_RATE,
        "radius": VIEW_RADIUS,
        "npcs": NPCS,
        "sync": f'state_sync = "{sync}"\n' if sync else "",
    }


def input_dir(player_index: int, tick: int) -> int:
    """The direction (0-7, 8 = stop) player `player_index` (1-based) steers at `tick`: a new
    one every 1.5 s.  `states.js` uses the same schedule."""
    return (player_index * 5 + tick // 15) % 9


def write_script(game_dir: Path, message: str = "v0", sync: str | None = None) -> None:
    """Save like an editor does: write a temp file, then rename it over match.lua."""
    target = game_dir / "match.lua"
    tmp = game_dir / ".match.lua.tmp"
    tmp.write_text(script(message, sync=sync))
    os.replace(tmp, target)
