"""game.leaderboard from Lua, and leaderboard.top over the socket."""

from __future__ import annotations

from tests.store_helpers import BANK, bank_player, call

FILES = {"bank.lua": BANK}


async def test_submit_keeps_best_and_ranks(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player(server)
    scores = {"p1": 50, "p2": 80, "p3": 80, "p4": 10, "p5": 65}
    for pid, score in scores.items():
        assert (await call(a, "submit", board="arena", pid=pid, score=score))["ok"][
            "improved"
        ] is True
    assert await call(a, "submit", board="arena", pid="p1", score=40) == {
        "ok": {"best": 50, "improved": False}
    }
    assert await call(a, "submit", board="arena", pid="p1", score=70) == {
        "ok": {"best": 70, "improved": True}
    }
    top = (await call(a, "top", board="arena", n=3))["ok"]
    # Ties go to whoever got there first.
    assert top == [
        {"rank": 1, "player_id": "p2", "score": 80},
        {"rank": 2, "player_id": "p3", "score": 80},
        {"rank": 3, "player_id": "p1", "score": 70},
    ]
    assert await call(a, "rank", board="arena", pid="p5") == {
        "ok": {"rank": 4, "score": 65, "total": 5}
    }
    assert await call(a, "rank", board="arena", pid="nobody") == {}  # ok is nil: not ranked
    around = (await call(a, "around", board="arena", pid="p1", n=1))["ok"]
    assert [e["player_id"] for e in around] == ["p3", "p1", "p5"]
    assert (await call(a, "top", board="empty-board", n=5)) == {"ok": {}}  # empty list
    assert (await call(a, "submit", board="bad board", pid="p1", score=1))["error"] == (
        "invalid_argument"
    )
    assert (await call(a, "submit", board="arena", pid="p1", score=1.5))["error"] == (
        "invalid_argument"
    )


async def test_leaderboard_top_over_the_socket(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player(server)
    for i in range(12):
        await call(a, "submit", board="weekly", pid=f"p{i}", score=i * 10)
    viewer = await server.player()
    reply = await viewer.request("leaderboard.top", {"board": "weekly", "n": 3})
    assert reply["cid"] == "leaderboard.top"
    assert reply["payload"] == {
        "board": "weekly",
        "entries": [
            {"rank": 1, "player_id": "p11", "score": 110},
            {"rank": 2, "player_id": "p10", "score": 100},
            {"rank": 3, "player_id": "p9", "score": 90},
        ],
    }
    default = await viewer.request("leaderboard.top", {"board": "weekly"})
    assert len(default["payload"]["entries"]) == 10
    none = await viewer.request("leaderboard.top", {"board": "nothing-here"})
    assert none["payload"]["entries"] == []
    for payload in ({"board": "weekly", "n": 0}, {"board": "weekly", "n": 101}, {"board": "a b"}):
        await viewer.send("leaderboard.top", payload, cid="bad")
        err = await viewer.expect("error")
        assert err["payload"]["code"] == "invalid_message" and err["cid"] == "bad"
    # Clients must be signed in (as a guest at least).
    anon = await server.client()
    await anon.send("leaderboard.top", {"board": "weekly"})
    assert (await anon.expect("error"))["payload"]["code"] == "unauthenticated"
