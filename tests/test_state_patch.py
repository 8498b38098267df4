"""`match.patch` frames on a real server: a client that applies them holds, tick for tick, the
state a client taking full frames is sent; full frames come on join, every `full_state_every`
ticks, on `match.resync` and on resume."""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
import pytest

from asobi import merge_patch
from asobi.engine import Engine
from asobi.scripts import ScriptRegistry, vet_script
from asobi.state_frames import UNPARSED
from tests.conftest import Client, Running, engine_match

pytestmark = pytest.mark.timeout(30)

# Every kind of change a patch must carry: a counter, entities appearing and disappearing, an
# array growing, a table that is sometimes empty, a nested value changing kind.
GAME = """\
match_size = 2
tick_rate = 30
state_sync = "patch"
full_state_every = EVERY
function init(state)
  state.tick = 0
  return state
end
function tick(state)
  state.tick = state.tick + 1
  return state
end
function get_state(state, player_id)
  local t = state.tick
  local s = { tick = t, label = "t" .. (t % 3), ents = {}, trail = {}, bag = {} }
  for i = 1, t % 5 do s.ents["e" .. ((t + i) % 7)] = { x = i * t, alive = (t + i) % 2 == 0 } end
  for i = 1, t % 4 do s.trail[i] = t - i end
  if t % 2 == 0 then s.bag.thing = { deep = { t } } end
  if t % 3 == 0 then s.odd = t / 2 else s.odd = { half = t } end
  return s
end
"""


def game(every: int) -> str:
    return GAME.replace("EVERY", str(every))


class Reconstructing:
    """Applies `match.state` / `match.patch` frames as a client does: state by tick."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seq: int | None = None
        self.state: Any = None
        self.by_tick: dict[int, Any] = {}
        self.kinds: list[tuple[str, int]] = []  # (frame type, tick)

    async def take(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < count:
            frame = await self.client.recv(max(deadline - time.monotonic(), 0.001))
            kind = frame["type"]
            if kind == "match.state":
                self.seq = frame.get("seq")
                self.state = frame["payload"]
            elif kind == "match.patch":
                assert self.seq is not None, "a patch before any full frame"
                assert frame["base"] == self.seq, (frame["base"], self.seq)
                assert frame["seq"] > self.seq
                self.seq = frame["seq"]
                self.state = merge_patch.apply(self.state, frame["payload"])
            else:
                continue
            seen += 1
            self.by_tick[self.state["tick"]] = self.state
            self.kinds.append((kind, self.state["tick"]))


async def pair(run: Running) -> tuple[Client, Client]:
    """Two players in one match: the first takes patches, the second asked for full frames."""
    patched = await run.client()
    await patched.login_guest()
    full = await run.client()
    await full.send("auth.guest", {"state_sync": "full"})
    await full.expect("auth.token")
    await full.expect("session.connected")
    for client in (patched, full):
        await client.send("matchmaker.add", {"mode": "duel"})
        await client.expect("matchmaker.queued")
    for client in (patched, full):
        await client.expect("matchmaker.matched")
    return patched, full


async def test_patches_rebuild_the_full_state_tick_for_tick(start_server) -> None:
    run = await start_server({"match.lua": game(8)})
    patched, full = await pair(run)
    reader = Reconstructing(patched)
    await reader.take(40)
    full_states = {s["tick"]: s for s in await full.states(45)}
    assert not any("seq" in s for s in full_states.values())
    common = sorted(set(reader.by_tick) & set(full_states))
    assert len(common) >= 30
    for tick in common:
        assert reader.by_tick[tick] == full_states[tick], tick
    kinds = [k for k, _ in reader.kinds]
    assert kinds[0] == "match.state"
    assert kinds.count("match.patch") >= 30
    # A full frame every 8 ticks, and patches in between.
    full_ticks = [t for k, t in reader.kinds if k == "match.state"]
    assert len(full_ticks) >= 4
    assert {b - a for a, b in itertools.pairwise(full_ticks)} == {8}


async def test_resync_sends_a_full_frame(start_server) -> None:
    run = await start_server({"match.lua": game(100_000)})
    patched, _ = await pair(run)
    reader = Reconstructing(patched)
    await reader.take(5)
    assert [k for k, _ in reader.kinds].count("match.state") == 1
    await patched.send("match.resync")
    await reader.take(6)
    assert [k for k, _ in reader.kinds].count("match.state") == 2
    assert reader.kinds[-1][0] == "match.patch", "one full frame, then patches again"


async def test_resync_outside_a_match_is_refused(start_server) -> None:
    run = await start_server({"match.lua": game(10)})
    client = await run.player()
    await client.send("match.resync", cid=1)
    error = await client.expect("error")
    assert error["payload"]["code"] == "not_in_match"
    assert error["cid"] == 1


async def test_a_resuming_connection_starts_with_a_full_frame(start_server) -> None:
    """The new socket resumes while the old one is still open (a page reload racing its own
    close): the match was sending patches to the old one, the new one holds nothing yet."""
    run = await start_server({"match.lua": game(100_000)})
    patched = await run.client()
    await patched.send("auth.guest")
    token = (await patched.expect("auth.token"))["payload"]["token"]
    resume = (await patched.expect("session.connected"))["payload"]["resume_token"]
    other = await run.player()
    for client in (patched, other):
        await client.send("matchmaker.add", {"mode": "duel"})
        await client.expect("matchmaker.queued")
    await Reconstructing(patched).take(3)
    again = await run.client()
    await again.send("session.connect", {"token": token, "resume_token": resume})
    connected = await again.expect("session.connected")
    assert connected["payload"]["resumed"] is True
    await again.expect("match.rejoined")
    reader = Reconstructing(again)
    await reader.take(4)
    assert [k for k, _ in reader.kinds] == ["match.state"] + ["match.patch"] * 3


async def test_a_connection_can_ask_for_patches_from_a_full_frame_script(start_server) -> None:
    source = game(100_000).replace('state_sync = "patch"\n', "")
    run = await start_server({"match.lua": source})
    asking = await run.client()
    await asking.send("auth.guest", {"state_sync": "patch"})
    await asking.expect("session.connected", skip=("auth.token",))
    other = await run.player()
    for client in (asking, other):
        await client.send("matchmaker.add", {"mode": "duel"})
        await client.expect("matchmaker.queued")
    reader = Reconstructing(asking)
    await reader.take(5)
    assert [k for k, _ in reader.kinds] == ["match.state"] + ["match.patch"] * 4
    plain = await other.recv()
    while plain["type"] != "match.state":
        plain = await other.recv()
    assert "seq" not in plain


async def test_a_bad_state_sync_choice_is_refused(start_server) -> None:
    run = await start_server({"match.lua": game(10)})
    client = await run.client()
    await client.send("auth.guest", {"state_sync": "binary"}, cid=3)
    error = await client.expect("error")
    assert error["payload"]["code"] == "invalid_message"
    assert "state_sync" in error["payload"]["message"]


class Wire:
    """An outbox that keeps each player's frames and can refuse them, as the socket layer does
    for a slow reader or a player who is not connected."""

    def __init__(self) -> None:
        self.frames: dict[str, list[dict[str, Any]]] = {}
        self.refusing: set[str] = set()

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        if player_id in self.refusing:
            return False
        self.frames.setdefault(player_id, []).append(orjson.loads(frame))
        return True


@pytest.mark.parametrize("shared", [False, True])
def test_a_dropped_frame_restarts_the_chain_with_a_full_frame(tmp_path, shared: bool) -> None:
    source = game(100_000)
    if shared:
        source = "shared_state = true\n" + source
    (tmp_path / "match.lua").write_text(source)
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    wire = Wire()
    engine = Engine(registry, wire)
    script = registry.get("match.lua")
    assert script is not None
    match = engine.start_match("duel", script, ["a", "b"])
    match.release_held()
    for _ in range(3):
        match.run_tick()
    wire.refusing.add("a")
    match.run_tick()
    wire.refusing.clear()
    for _ in range(3):
        match.run_tick()
    kinds = {pid: [f["type"] for f in frames] for pid, frames in wire.frames.items()}
    patch, full = "match.patch", "match.state"
    assert kinds["a"] == [full, patch, patch, full, patch, patch]
    assert kinds["b"] == [full] + [patch] * 6
    # Each player's frames rebuild the states of the ticks they got, the same for both.
    rebuilt: dict[str, dict[int, Any]] = {}
    for pid, frames in wire.frames.items():
        held: Any = None
        for frame in frames:
            payload = frame["payload"]
            held = payload if frame["type"] == full else merge_patch.apply(held, payload)
            rebuilt.setdefault(pid, {})[held["tick"]] = held
    assert sorted(rebuilt["a"]) == [1, 2, 3, 5, 6, 7]
    assert sorted(rebuilt["b"]) == list(range(1, 8))
    assert all(rebuilt["a"][t] == rebuilt["b"][t] for t in rebuilt["a"])


@pytest.mark.parametrize(
    ("line", "problem"),
    [('state_sync = "delta"', "state_sync must be"), ("full_state_every = 0", "full_state_every")],
)
def test_a_bad_state_sync_global_is_refused_at_load(tmp_path, line: str, problem: str) -> None:
    body = game(10).replace('state_sync = "patch"', "").replace("full_state_every", "--")
    (tmp_path / "match.lua").write_text(line + "\n" + body)
    errors = ScriptRegistry(tmp_path).load_all()
    assert len(errors) == 1
    assert problem in errors[0].errors[0]


async def test_the_console_shows_the_state_patches_built(start_server) -> None:
    """The console's view of a player is what they were last sent: patches applied to their
    last full frame (`full_state_every` is out of reach here)."""
    admin = "admin-test-token-0123456789"
    run = await start_server({"match.lua": game(100_000)}, admin_token=admin)
    patched, _ = await pair(run)
    reader = Reconstructing(patched)
    await reader.take(2)
    match_id = run.app.engine.match_of(patched.player_id or "")
    assert match_id is not None
    console = await run.client()
    await console.request("admin.auth", {"token": admin}, "admin.authed")
    await console.request("admin.watch", {"match_id": match_id.id}, "admin.watching")
    ticks = []
    for _ in range(2):
        pushed = (await console.expect("admin.match", timeout=3))["payload"]
        view = pushed["views"][patched.player_id]
        assert view == merge_patch.apply(view, {})  # a plain state, not a patch
        assert set(view) >= {"tick", "label", "ents", "trail", "bag"}
        ticks.append(view["tick"])
    assert ticks[1] > ticks[0] > 2
    await reader.take(60)
    # Watching costs one full frame (the tap's views start from it), then patches again.
    assert [k for k, _ in reader.kinds].count("match.state") == 2
    assert reader.kinds[-1][0] == "match.patch"


def test_patch_chains_hold_across_a_rolled_back_and_a_successful_reload(tmp_path) -> None:
    """A reload whose get_state fails (for the second player) is rolled back after rendering
    the first player's frame: nothing it staged may reach a player's record.  A reload that
    succeeds changes the state's shape: the next patch turns the old shape into the new one."""

    def source(body: str) -> str:
        return "max_players = 3\n" + body

    (tmp_path / "match.lua").write_text(source(game(100_000)))
    registry = ScriptRegistry(tmp_path)
    assert registry.load_all() == []
    wire = Wire()
    engine = Engine(registry, wire)
    engine.state_sync["c"] = False  # a full-frame player: the truth to compare with
    script = registry.get("match.lua")
    assert script is not None
    match = engine.start_match("duel", script, ["a", "b"])
    match.release_held()
    assert match.join("c") is None
    for _ in range(3):
        match.run_tick()
    broken = source(
        game(100_000).replace(
            "return s\n", 's.new = true\n  if player_id == "b" then error("no") end\n  return s\n'
        )
    )
    reshaped = source(game(100_000).replace("return s\n", 'return { tick = t, shape = "new" }\n'))
    for text in (broken, reshaped):
        vetted = vet_script("match.lua", text.encode(), registry.limits, registry.modules())
        version = registry.install("match.lua", vetted)
        assert version is not None and not hasattr(version, "errors")
        engine.schedule_reload(version)  # type: ignore[arg-type]
        match.run_tick()
        assert (match.script is version) is (text is reshaped)
        match.run_tick()
    truth = [f["payload"] for f in wire.frames["c"] if f["type"] == "match.state"]
    for pid in ("a", "b"):
        held: Any = None
        seq = None
        rebuilt = []
        for frame in wire.frames[pid]:
            if frame["type"] == "match.state":
                held = frame["payload"]
            elif frame["type"] == "match.patch":
                assert frame["base"] == seq
                held = merge_patch.apply(held, frame["payload"])
            else:
                continue
            seq = frame["seq"]
            rebuilt.append(held)
        assert rebuilt == truth[-len(rebuilt) :]
        assert rebuilt[-1] == {"tick": rebuilt[-1]["tick"], "shape": "new"}
        assert [f["type"] for f in wire.frames[pid]].count("match.state") == 1


class _Kept:
    """An outbox that keeps each player's frames as sent."""

    def __init__(self) -> None:
        self.frames: dict[str, list[bytes]] = {}

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        self.frames.setdefault(player_id, []).append(frame)
        return True


@pytest.mark.skipif(merge_patch.diff_text is None, reason="asobi/_merge_patch.c not built")
def test_patches_are_diffed_as_text_without_parsing(tmp_path, monkeypatch) -> None:
    """Patch frames come from the JSON texts (`merge_patch.diff_text`), each the patch the object
    diff makes of the same two texts, and nothing kept for the chain was parsed."""
    text_diff = merge_patch.diff_text
    assert text_diff is not None
    calls: list[bytes] = []

    def checked(old: bytes, new: bytes) -> bytes | None:
        patch = text_diff(old, new)
        assert patch == orjson.dumps(merge_patch.diff(orjson.loads(old), orjson.loads(new)))
        calls.append(patch)
        return patch

    monkeypatch.setattr(merge_patch, "diff_text", checked)
    outbox = _Kept()
    match = engine_match(tmp_path, game(100_000), outbox, ["a", "b"])
    for _ in range(12):
        match.run_tick()
    assert len(calls) == 22  # per player, every tick after the first
    assert all(sent.data is UNPARSED for sent in match.state_frames.sent.values())
    for frames in outbox.frames.values():
        assert [b'"match.patch"' in frame for frame in frames] == [False] + [True] * 11
