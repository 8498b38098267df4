"""A match script that exposes the persistence API to tests through match.input, and helpers.

Every input `{op=..., id=...}` runs one call and answers with a `match.message`
`{id, r}` (r is the call's `{ok=...}`/`{error=...}` table).  Inputs with `fail = true` raise
after the call and inputs with `spin = true` loop past their budget: their answers (frames) are
discarded with the rest of the callback's effects.  The state counts successful inputs; the
callback writes it as a new table, so a failed callback leaves the old state in place.
"""

from __future__ import annotations

import itertools
from typing import Any

from tests.conftest import Client

BANK = r"""
tick_rate = 20

local function call(pid, input)
  local op, e, lb, st = input.op, game.economy, game.leaderboard, game.storage
  local who, cur = input.pid or pid, input.currency or "gold"
  if op == "grant" then return e.grant(who, cur, input.amount, input.reason)
  elseif op == "debit" then return e.debit(who, cur, input.amount, input.reason)
  elseif op == "balance" then return e.balance(who)
  elseif op == "submit" then return lb.submit(input.board, who, input.score)
  elseif op == "top" then return lb.top(input.board, input.n)
  elseif op == "rank" then return lb.rank(input.board, who)
  elseif op == "around" then return lb.around(input.board, who, input.n)
  elseif op == "get" then return st.get(input.collection, input.key)
  elseif op == "set" then return st.set(input.collection, input.key, input.value)
  elseif op == "pget" then return st.player_get(who, input.collection, input.key)
  elseif op == "pset" then return st.player_set(who, input.collection, input.key, input.value)
  elseif op == "setbig" then return st.set(input.collection, input.key, string.rep("x", input.size))
  elseif op == "raw" then return e.grant(input.a1, input.a2, input.a3, input.a4)
  elseif op == "drain" then
    return { ok = true }
  end
  return { error = "unknown test op" }
end

function init(state)
  state.done = 0
  state.drain = nil
  state.drained = { ok = 0, insufficient = 0, other = 0 }
  return state
end

function handle_input(state, pid, input)
  local r = call(pid, input)
  local new = { done = state.done + 1, drain = state.drain, drained = state.drained }
  if input.op == "drain" then
    new.drain = { target = input.pid, left = input.count, per_tick = input.per_tick }
  end
  game.send(pid, { id = input.id, r = r })
  if input.fail then error("failing on purpose") end
  if input.spin then while true do end end
  return new
end

function tick(state)
  local d = state.drain
  if d and d.left > 0 then
    for _ = 1, math.min(d.per_tick, d.left) do
      d.left = d.left - 1
      local r = game.economy.debit(d.target, "gold", 1, "drain")
      if r.ok then state.drained.ok = state.drained.ok + 1
      elseif r.error == "insufficient_funds" then
        state.drained.insufficient = state.drained.insufficient + 1
      else state.drained.other = state.drained.other + 1 end
    end
  end
  return state
end

function get_state(state, player_id)
  local left = state.drain and state.drain.left or -1
  return { done = state.done, drained = state.drained, left = left }
end
"""

_ids = itertools.count(1)


async def call(client: Client, op: str, **fields: Any) -> dict[str, Any]:
    """Run one persistence call in the client's match; returns its result table."""
    ident = next(_ids)
    await client.send("match.input", {"op": op, "id": ident, **fields})
    while True:
        frame = await client.expect("match.message", skip=("matchmaker.matched",))
        if frame["payload"]["payload"].get("id") == ident:
            return frame["payload"]["payload"]["r"]


async def send_only(client: Client, op: str, **fields: Any) -> None:
    await client.send("match.input", {"op": op, "id": next(_ids), **fields})


async def bank_player(server: Any) -> Client:
    """A guest in their own bank match (the script's match_size is 1)."""
    client = await server.player("bank")
    await client.expect("matchmaker.matched")
    return client


async def state_where(client: Client, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (state,) = await client.states(1, timeout=max(deadline - time.monotonic(), 0.01))
        if predicate(state):
            return state
    raise AssertionError("state never matched")
