"""The example game in game/, played end to end by real clients on a real server.

`game/match.lua` must stay the tutorial script word for word; `game/arena.lua` (with its helper
module `game/lib/grid.lua`) is a small two-player gem race played here by two bots to a winner.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.conftest import TUTORIAL, Client, Logs

GAME_DIR = Path(__file__).resolve().parent.parent / "game"


def game_files(**replace: tuple[str, str]) -> dict[str, str]:
    """The real game dir's scripts, optionally with one text substitution per file."""
    files = {}
    for path in sorted(GAME_DIR.rglob("*.lua")):
        name = path.relative_to(GAME_DIR).as_posix()
        text = path.read_text()
        if name in replace:
            old, new = replace[name]
            assert old in text, (name, old)
            text = text.replace(old, new)
        files[name] = text
    return files


def towards(me: dict[str, int], target: dict[str, int]) -> str:
    if target["x"] > me["x"]:
        return "right"
    if target["x"] < me["x"]:
        return "left"
    return "down" if target["y"] > me["y"] else "up"


async def play(client: Client, *, greedy: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Walk to the nearest gem every tick until the match finishes; return what was seen."""
    seen: dict[str, list[dict[str, Any]]] = {"state": [], "gem": [], "message": [], "other": []}
    while True:
        frame = await client.recv()
        kind, payload = frame["type"], frame["payload"]
        if kind == "match.finished":
            seen["finished"] = [payload]
            return seen
        if kind == "match.state":
            seen["state"].append(payload)
            me = next(p for p in payload["players"] if p["id"] == payload["you"])
            if greedy and payload["gems"]:
                gem = min(
                    payload["gems"], key=lambda g: abs(g["x"] - me["x"]) + abs(g["y"] - me["y"])
                )
                await client.send("match.input", {"move": towards(me, gem)})
        elif kind == "match.gem":
            seen["gem"].append(payload)
        elif kind == "match.message":
            seen["message"].append(payload["payload"])
        else:
            seen["other"].append(frame)


def test_match_lua_is_the_tutorial() -> None:
    assert (GAME_DIR / "match.lua").read_text() == TUTORIAL


async def test_two_players_race_to_a_winner(start_server, logs: Logs) -> None:
    server = await start_server(game_files(), match_seed=20240601)
    a = await server.player("arena")
    b = await server.player("arena")
    info = (await a.expect("matchmaker.matched"))["payload"]
    await b.expect("matchmaker.matched")
    ids = [a.player_id, b.player_id]
    assert info["players"] == ids
    seen_a, seen_b = await asyncio.wait_for(asyncio.gather(play(a), play(b)), 20)

    result = seen_a["finished"][0]
    assert seen_b["finished"][0] == result
    assert result["match_id"] == info["match_id"]
    outcome = result["result"]
    winner = outcome["winner"]
    loser = ids[1 - ids.index(winner)]
    assert outcome["reason"] == "target"
    assert outcome["scores"][winner] == 3 and outcome["scores"][loser] < 3
    # Every point scored was announced to both players, in the same order.
    assert seen_a["gem"] == seen_b["gem"]
    for pid in ids:
        gems = [g["score"] for g in seen_a["gem"] if g["player"] == pid]
        assert gems == list(range(1, outcome["scores"][pid] + 1))
    # The final state shows the winning score, and the board always holds three gems.
    final = seen_a["state"][-1]
    assert {p["id"]: p["score"] for p in final["players"]} == outcome["scores"]
    assert all(len(s["gems"]) == 3 for s in seen_a["state"])
    # Private welcomes went to their own player only.
    assert [m["spawn"] for m in seen_a["message"]] == [{"x": 1, "y": 1}]
    assert [m["spawn"] for m in seen_b["message"]] == [{"x": 7, "y": 7}]
    assert seen_a["other"] == seen_b["other"] == []
    assert info["match_id"] not in server.app.engine.matches
    line = await logs.wait_for("script_log", lambda ln: ln["message"] == "arena over")
    assert line["meta"] == {"winner": winner, "reason": "target"}
    # The winner's score is on the leaderboard, as any client can read it.
    viewer = await server.player()
    board = await viewer.request("leaderboard.top", {"board": "arena", "n": 5})
    assert board["payload"]["entries"][0]["player_id"] == winner
    assert board["payload"]["entries"][0]["score"] == outcome["scores"][winner]


async def test_bad_input_is_refused_privately_and_a_leaver_forfeits(start_server) -> None:
    server = await start_server(game_files(), reconnect_grace_s=0.2)
    a = await server.player("arena")
    b = await server.player("arena")
    await a.expect("matchmaker.matched")
    await b.expect("matchmaker.matched")
    await a.expect("match.message")  # welcome
    await b.expect("match.message")
    await a.send("match.input", {"move": "jump"})
    refused = await a.expect("match.message")
    assert refused["payload"]["payload"] == {"refused": "move must be up, down, left or right"}
    await b.close()
    finished = await a.expect("match.finished")
    outcome = finished["payload"]["result"]
    assert outcome["winner"] == a.player_id and outcome["reason"] == "forfeit"
    assert outcome["scores"] == {a.player_id: 0, b.player_id: 0}


async def test_the_clock_ends_an_idle_round_in_a_draw(start_server) -> None:
    files = game_files(**{"arena.lua": ("local ROUND_SECONDS = 60", "local ROUND_SECONDS = 1")})
    server = await start_server(files)
    a = await server.player("arena")
    b = await server.player("arena")
    seen_a, _ = await asyncio.wait_for(
        asyncio.gather(play(a, greedy=False), play(b, greedy=False)), 5
    )
    outcome = seen_a["finished"][0]["result"]
    assert "winner" not in outcome
    assert outcome["reason"] == "time"
    assert outcome["scores"] == {a.player_id: 0, b.player_id: 0}
    assert [s["seconds_left"] for s in seen_a["state"]][-1] == 0
