"""What crosses the Lua/host boundary: game.* calls answer with Lua values only, and data the
host cannot carry faithfully (colliding keys, NaN, infinity, integers past 64 bits) is refused
with an error naming its path, the same way in frames, messages and storage."""

from __future__ import annotations

from typing import Any

import orjson

from tests.conftest import Client, Logs

# Every input runs one probe inside pcall and reports, as plain data, what the game.* call
# answered: a host object (a Python exception) would show up as a userdata.
PROBE = r"""
tick_rate = 20

local function nest(depth)
  local root = {}
  local t = root
  for _ = 2, depth do t.x = {} t = t.x end
  return root
end

local function depth_of(v)
  local n = 0
  while type(v) == "table" do n = n + 1 v = v.x end
  return n
end

local function describe(r)
  if type(r) ~= "table" then return { kind = type(r) } end
  local out = { kind = "table", error = r.error, message = r.message }
  if type(r.ok) == "table" then out.ok_depth = depth_of(r.ok)
  elseif r.ok ~= nil then out.ok = r.ok end
  return out
end

local probes = {}
function probes.nested(input)
  local set = game.storage.set("deep", "k" .. input.depth, nest(input.depth))
  return { set = describe(set), get = describe(game.storage.get("deep", "k" .. input.depth)) }
end
function probes.get(input)
  return { get = describe(game.storage.get(input.collection, input.key)) }
end
function probes.set_value(input)
  local values = {
    nan = 0/0, inf = math.huge, ninf = -math.huge,
    collide = { [1] = "a", ["1"] = "b" },
    collide_bool = { [true] = 1, ["true"] = 2 },
  }
  return { set = describe(game.storage.set("vals", input.which, { v = values[input.which] })) }
end
function probes.send_value(input, pid)
  local values = {
    nan = { v = 0/0 }, inf = { v = math.huge }, collide = { [1] = "a", ["1"] = "b" },
  }
  local ok, err = pcall(game.send, pid, values[input.which])
  return { ok = ok, err = type(err) == "string" and err or type(err) }
end

function init(state) state.show = nil return state end
function tick(state) return state end

function handle_input(state, pid, input)
  local ok, r = pcall(probes[input.probe], input, pid)
  local reply = { id = input.id, pcall = ok }
  if ok then reply.r = r else reply.err_type = type(r) reply.err = tostring(r) end
  game.send(pid, reply)
  if input.show then state.show = input.show end
  return state
end

function get_state(state, player_id)
  local show = state.show
  if show == "collide" then return { [1] = "a", ["1"] = "b" } end
  if show == "nested_collide" then return { level = { inner = { [2] = "x", ["2"] = "y" } } } end
  if show == "nan" then return { hp = 0/0 } end
  if show == "inf" then return { list = { 1, -math.huge } } end
  return { ok = true }
end
"""

FILES = {"probe.lua": PROBE}
_ids = iter(range(1, 1_000_000))


async def probe(client: Client, name: str, **fields: Any) -> dict[str, Any]:
    ident = next(_ids)
    await client.send("match.input", {"probe": name, "id": ident, **fields})
    while True:
        frame = await client.expect("match.message", skip=("matchmaker.matched",))
        payload = frame["payload"]["payload"]
        if payload.get("id") == ident:
            return payload


async def test_storage_get_of_a_nested_value_answers_with_a_table(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player_for(server)
    # The deepest value storage accepts comes back whole, inside its {ok = ...} wrapper.
    reply = await probe(a, "nested", depth=32)
    assert reply["pcall"] is True, reply
    assert reply["r"]["set"] == {"kind": "table", "ok": True}
    assert reply["r"]["get"] == {"kind": "table", "ok_depth": 32}
    # One level more is refused when written, as a table, never raised.
    reply = await probe(a, "nested", depth=33)
    assert reply["pcall"] is True, reply
    assert reply["r"]["set"]["error"] == "invalid_argument"
    assert "deeper than 32" in reply["r"]["set"]["message"]


async def test_a_stored_value_lua_cannot_hold_is_an_error_table(start_server, logs: Logs) -> None:
    """Values already in the database that Lua cannot represent (written by hand, or by an
    older server) load at start and come back as `{error = ...}`, not as a Python exception."""
    first = await start_server(FILES)
    too_deep: Any = "leaf"
    for _ in range(40):
        too_deep = {"x": too_deep}

    def write_by_hand() -> Any:
        for key, value in (("deep", too_deep), ("huge", {"n": 2**63})):
            yield (
                "INSERT INTO storage (owner, collection, key, value, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                ("", "hand", key, orjson.dumps(value).decode(), 0),
            )

    await first.app.store.backend.transact(write_by_hand())
    await first.server.stop()
    first.clients.clear()
    server = await start_server(FILES)
    a = await bank_player_for(server)
    for key, problem in (("deep", "deeper than"), ("huge", "64-bit")):
        reply = await probe(a, "get", collection="hand", key=key)
        assert reply["pcall"] is True, reply
        got = reply["r"]["get"]
        assert got["kind"] == "table" and got["error"] == "too_large", got
        assert problem in got["message"], got
    # The match is unharmed.
    assert (await probe(a, "nested", depth=2))["r"]["get"]["ok_depth"] == 2


async def test_colliding_keys_nan_and_infinity_are_refused_in_storage(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player_for(server)
    expected = {
        "nan": "argument 3.v is NaN",
        "inf": "argument 3.v is infinite",
        "ninf": "argument 3.v is infinite",
        "collide": 'argument 3.v has two keys that both become "1"',
        "collide_bool": 'argument 3.v has two keys that both become "true"',
    }
    for which, message in expected.items():
        reply = await probe(a, "set_value", which=which)
        got = reply["r"]["set"]
        assert got["error"] == "invalid_argument", (which, got)
        assert message in got["message"], (which, got)
    await server.app.store.flush(5)
    assert not [k for k in server.app.store.model.global_storage if k[0] == "vals"]


async def test_colliding_keys_nan_and_infinity_are_refused_in_messages(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player_for(server)
    for which, message in (
        ("nan", "game.send payload.v is NaN"),
        ("inf", "game.send payload.v is infinite"),
        ("collide", 'game.send payload has two keys that both become "1"'),
    ):
        reply = await probe(a, "send_value", which=which)
        assert reply["r"]["ok"] is False, reply
        assert message in reply["r"]["err"], reply


async def test_colliding_keys_nan_and_infinity_are_refused_in_frames(
    start_server, logs: Logs
) -> None:
    server = await start_server(FILES)
    a = await bank_player_for(server)
    for show, message in (
        ("collide", 'get_state result has two keys that both become "1"'),
        ("nested_collide", 'get_state result.level.inner has two keys that both become "2"'),
        ("nan", "get_state result.hp is NaN"),
        ("inf", "get_state result.list[2] is infinite"),
    ):
        await probe(a, "nested", depth=1, show=show)
        failed = await logs.wait_for(
            "callback_failed",
            lambda e, m=message: e["callback"] == "get_state" and m in e["error"],
        )
        assert failed["mode"] == "probe"
    # Back to a state JSON can carry: frames flow again, whole.
    await probe(a, "nested", depth=1, show="plain")
    assert await a.states(3) == [{"ok": True}] * 3


async def bank_player_for(server: Any) -> Client:
    client = await server.player("probe")
    await client.expect("matchmaker.matched")
    return client
