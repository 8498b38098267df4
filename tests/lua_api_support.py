"""Shared pieces of the match API tests (test_lua_api_*.py): a plain counting script and
helpers that queue players into a match and read its frames."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import Client, Logs

# A script that keeps a tally of everything the server calls, for the frames to show.
PLAIN = """
match_size = {size}
function init(state) state.n = 0 return state end
function tick(state) state.n = state.n + 1 return state end
function get_state(state, player_id) return {{ n = state.n }} end
"""


async def matched(server: Any, mode: str, count: int) -> tuple[list[Client], dict[str, Any]]:
    """`count` players queued for `mode`, in order, once the match started."""
    clients = [await server.player(mode) for _ in range(count)]
    frames = [await c.expect("matchmaker.matched") for c in clients]
    assert len({f["payload"]["match_id"] for f in frames}) == 1
    return clients, frames[0]["payload"]


async def frames_until(client: Client, kind: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every frame up to and including the first of type `kind`."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        frame = await client.recv(max(deadline - time.monotonic(), 0.001))
        out.append(frame)
        if frame["type"] == kind:
            return out


async def no_frame_of(client: Client, kinds: set[str], window: float) -> list[dict[str, Any]]:
    """Read for `window` seconds and fail if a frame of one of `kinds` arrives."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + window
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await client.recv(left)
        except TimeoutError:
            break
        assert frame["type"] not in kinds, frame
        seen.append(frame)
    return seen


def script_failures(logs: Logs, match_id: str, callback: str) -> list[dict[str, Any]]:
    return [
        line
        for line in logs.events("callback_failed")
        if line["match_id"] == match_id and line["callback"] == callback
    ]
