"""Identifiers match their rule from the first to the last character: a trailing newline (which
`re.match` with `$` lets through) is refused everywhere a name enters the server."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from asobi import names
from asobi.auth import ALGORITHM, ISSUER, TokenSigner
from tests.conftest import Client

SECRET = "test-secret-with-enough-length-for-hs256"  # what tests/conftest.py starts servers with

RULES = {
    "MODE": "hello",
    "BOARD": "arena.s1",
    "STORAGE_KEY": "a/b@c",
    "CURRENCY": "gold",
    "USERNAME": "alice",
    "PLAYER_ID": "guest-1",
    "MODULE": "lib.util",
}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "\x00"])
def test_every_rule_matches_the_whole_name(rule: str, suffix: str) -> None:
    check: names.NameRule = getattr(names, rule)
    good = RULES[rule]
    assert check.accepts(good)
    assert not check.accepts(good + suffix)
    assert not check.accepts(suffix + good)
    assert not check.accepts(good.encode())  # bytes are not names


def test_each_rule_is_defined_once() -> None:
    """Boards and collections share a rule, as do modes and event names: one object each."""
    assert names.COLLECTION is names.BOARD
    assert names.EVENT is names.MODE
    import asobi.lua.persist
    import asobi.session

    for module in (asobi.lua.persist, asobi.session):
        assert not [n for n in vars(module) if n.endswith("_RE")], module.__name__


# -- over the socket -------------------------------------------------------------------------------
async def _reply(client: Client, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    await client.send(kind, payload, cid=kind)
    while True:
        frame = await client.recv()
        if frame.get("cid") == kind:
            return frame


async def test_socket_names_with_a_trailing_newline_are_refused(start_server) -> None:
    server = await start_server()
    c = await server.client()
    bad = await _reply(c, "auth.register", {"username": "alice\n", "password": "password-1"})
    assert bad["payload"]["code"] == "invalid_account_input", bad
    ok = await _reply(c, "auth.register", {"username": "alice", "password": "password-1"})
    assert ok["type"] == "auth.token"
    await c.expect("session.connected")  # auth.* opens the session on a fresh connection
    bad = await _reply(c, "matchmaker.add", {"mode": "match\n"})
    assert bad["payload"]["code"] == "invalid_message", bad
    bad = await _reply(c, "leaderboard.top", {"board": "arena\n"})
    assert bad["payload"]["code"] == "invalid_message", bad
    assert (await _reply(c, "leaderboard.top", {"board": "arena"}))["type"] == "leaderboard.top"


async def test_a_token_whose_subject_ends_in_a_newline_is_refused(start_server) -> None:
    server = await start_server()
    with pytest.raises(ValueError):
        TokenSigner(SECRET).issue("alice\n")
    now = int(time.time())
    claims = {"sub": "alice\n", "iat": now, "exp": now + 60, "iss": ISSUER}
    forged = jwt.encode(claims, SECRET, algorithm=ALGORITHM)
    c = await server.client()
    refused = await _reply(c, "session.connect", {"token": forged})
    assert refused["type"] == "error", refused
    assert "no valid player" in refused["payload"]["message"]


# -- from Lua --------------------------------------------------------------------------------------
NAMES_LUA = r"""
local function try(f, ...)
  local ok, r = pcall(f, ...)
  if not ok then return "raised: " .. tostring(r) end
  if type(r) == "table" then return r.error or "ok" end
  return "ok"
end

function init(state) return state end
function tick(state) return state end
function get_state(state, player_id) return state end
function handle_input(state, pid, input)
  local nl = "\n"
  game.send(pid, {
    submit = try(game.leaderboard.submit, "arena" .. nl, pid, 1),
    grant = try(game.economy.grant, pid, "gold" .. nl, 1),
    set_collection = try(game.storage.set, "config" .. nl, "k", 1),
    set_key = try(game.storage.set, "config", "k" .. nl, 1),
    player = try(game.storage.player_set, pid .. nl, "c", "k", 1),
    broadcast = try(game.broadcast, "hello" .. nl, {}),
    require = try(require, "lib" .. nl),
    control = try(game.leaderboard.submit, "arena", pid, 1),
  })
  return state
end
"""


async def test_lua_names_with_a_trailing_newline_are_refused(start_server) -> None:
    server = await start_server({"names.lua": NAMES_LUA, "lib.lua": "return {}"})
    c = await server.player("names")
    await c.expect("matchmaker.matched")
    await c.send("match.input", {})
    got = (await c.expect("match.message"))["payload"]["payload"]
    assert got.pop("control") == "ok"
    assert got.pop("broadcast").startswith("raised: game.broadcast: event name must match")
    assert got.pop("require").startswith("raised: invalid module name")
    assert got == {
        "submit": "invalid_argument",
        "grant": "invalid_argument",
        "set_collection": "invalid_argument",
        "set_key": "invalid_argument",
        "player": "invalid_argument",
    }
