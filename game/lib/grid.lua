-- Small helpers for games on a rectangular grid of cells {x = 1..w, y = 1..h}.
-- A module is a plain Lua file under game/ that returns a table; `require("lib.grid")` loads
-- game/lib/grid.lua once per match and caches it in _ASOBI_LOADED.

local grid = {}

grid.DIRECTIONS = {
  up = { x = 0, y = -1 },
  down = { x = 0, y = 1 },
  left = { x = -1, y = 0 },
  right = { x = 1, y = 0 },
}

-- The cell one step from `cell` in direction `dir`, kept inside a w x h board.
function grid.step(cell, dir, w, h)
  local d = grid.DIRECTIONS[dir]
  local x = math.min(math.max(cell.x + d.x, 1), w)
  local y = math.min(math.max(cell.y + d.y, 1), h)
  return { x = x, y = y }
end

function grid.same(a, b)
  return a.x == b.x and a.y == b.y
end

function grid.distance(a, b)
  return math.abs(a.x - b.x) + math.abs(a.y - b.y)
end

-- A random cell for which `taken(cell)` is false, drawn with `random` (pass game.random so a
-- match replays identically from its seed).  Nil when every cell is taken.
function grid.free_cell(w, h, taken, random)
  local free = {}
  for y = 1, h do
    for x = 1, w do
      local cell = { x = x, y = y }
      if not taken(cell) then free[#free + 1] = cell end
    end
  end
  if #free == 0 then return nil end
  return free[random(#free)]
end

return grid
