"""`python -m bench.lua_states` compares three layouts of the same matches: they must run the same
game, each match on its own state, whatever shares a Lua state (the figures themselves are in
docs/performance.md, item 10)."""

from __future__ import annotations

import orjson
import pytest

from asobi.lua import native
from bench import lua_states


@pytest.mark.skipif(native.library() is None, reason="asobi's C encoder is not built")
def test_every_layout_runs_each_match_on_its_own_state() -> None:
    library = native.library()
    assert library is not None
    frames_by_layout = []
    for per_state in (1, 2, 5):
        group, _runtimes = lua_states.build(5, per_state, library)
        # Matches advance unevenly: match i ticks i + 1 times.
        last: list[list[bytes]] = []
        for i, match in enumerate(group):
            for _ in range(i + 1):
                frames = lua_states.tick_frames(match)
            last.append(frames)
        decoded = [[orjson.loads(f) for f in frames] for frames in last]
        for i, states in enumerate(decoded):
            assert [s["counter"] for s in states] == [i + 1] * 4
            assert [s["you"] for s in states] == ["p1", "p2", "p3", "p4"]
            assert states[0]["score"] == 7 * (i + 1)
        frames_by_layout.append(decoded)
    assert frames_by_layout[0] == frames_by_layout[1] == frames_by_layout[2]


def test_the_table_prints_every_layout(capsys: pytest.CaptureFixture[str]) -> None:
    if native.library() is None:
        pytest.skip("asobi's C encoder is not built")
    lua_states.main(["--pod", "2", "4"])
    out = capsys.readouterr().out
    assert "| 4 |" in out and "| matches | a state per match | pods | one state |" in out
