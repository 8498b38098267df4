"""Balances and amounts stay integers from 0 to 2^53 - 1 on both stores: a grant past the maximum
is refused (in memory when the balance is known, by the database otherwise) and writes nothing."""

from __future__ import annotations

from typing import Any

from asobi.store.ops import MAX_BALANCE
from tests.conftest import Client, Logs
from tests.store_helpers import BANK, bank_player, call

# `flood` grants `amount` to `pid` `count` times in one callback and counts the answers.
FLOOD = r"""
tick_rate = 20
function init(state) return state end
function tick(state) return state end
function get_state(state, player_id) return state end
function handle_input(state, pid, input)
  local tally = { ok = 0, errors = {} }
  for _ = 1, input.count do
    local r = game.economy.grant(input.pid, "gold", input.amount, "flood")
    if r.ok ~= nil then tally.ok = tally.ok + 1
    else tally.errors[r.error] = (tally.errors[r.error] or 0) + 1 end
  end
  local balance = game.economy.balance(pid)
  game.send(pid, { tally = tally, balance = balance })
  return state
end
"""

FILES = {"bank.lua": BANK, "flood.lua": FLOOD}


async def _flood(client: Client, pid: str, amount: int, count: int) -> dict[str, Any]:
    await client.send("match.input", {"pid": pid, "amount": amount, "count": count})
    return (await client.expect("match.message"))["payload"]["payload"]


async def test_a_connected_players_balance_stops_at_the_maximum(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player(server)
    assert (await call(a, "grant", amount=MAX_BALANCE + 1))["error"] == "invalid_argument"
    assert await call(a, "grant", amount=MAX_BALANCE - 1) == {"ok": MAX_BALANCE - 1}
    assert await call(a, "grant", amount=1) == {"ok": MAX_BALANCE}
    refused = await call(a, "grant", amount=1)
    assert refused["error"] == "too_large" and str(MAX_BALANCE) in refused["message"], refused
    assert await call(a, "balance") == {"ok": {"gold": MAX_BALANCE}}
    store = server.app.store
    await store.flush(5)
    assert [r[3] for r in await store.ledger(a.player_id)] == [MAX_BALANCE - 1, MAX_BALANCE]


async def test_grants_to_an_offline_player_never_overflow_the_database(
    start_server, logs: Logs
) -> None:
    """The shape of the report: thousands of grants to a player who is not connected (so no
    balance in memory to check) pushed an SQLite balance past 2^63 into a float, and the
    player's next balance read failed."""
    server = await start_server(FILES)
    granter = await server.player("flood")
    await granter.expect("matchmaker.matched")
    amount = 10**15
    fits = MAX_BALANCE // amount  # 9 grants fit, the 10th would pass the maximum
    # In one callback the grants to one offline player add up: past the maximum is refused here.
    first = await _flood(granter, "offline-1", amount, 100)
    assert first["tally"]["ok"] == fits, first
    assert first["tally"]["errors"] == {"too_large": 100 - fits}
    # Across callbacks only the database knows the balance: it refuses, nothing is written.
    for _ in range(3):
        again = await _flood(granter, "offline-1", amount, 1)
        assert again["tally"]["ok"] == 1  # accepted for writing, as the balance is unknown here
    store = server.app.store
    await store.flush(5)
    over = [e for e in logs.events("ledger_over_max") if e["player_id"] == "offline-1"]
    assert len(over) == 3 and all(e["delta"] == amount for e in over), over
    rows = await store.ledger("offline-1")
    assert len(rows) == fits and rows[-1][3] == fits * amount
    assert all(type(r[3]) is int for r in rows)

    # The player connects: their wallet loads and reads back exactly.
    client = await server.client()
    await client.send("session.connect", {"token": server.app.signer.issue("offline-1")})
    await client.expect("session.connected")
    client.player_id = "offline-1"
    await client.send("matchmaker.add", {"mode": "bank"})
    await client.expect("matchmaker.matched", skip=("matchmaker.queued",))
    assert await call(client, "balance") == {"ok": {"gold": fits * amount}}
    assert (await call(client, "grant", amount=MAX_BALANCE))["error"] == "too_large"
    assert await call(client, "debit", amount=amount) == {"ok": (fits - 1) * amount}
