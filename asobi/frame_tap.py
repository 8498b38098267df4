"""What a console watching a match sees of its players' frames, without touching the tick path.

`FrameTap` is installed as `hub.tap` while any console watches a match: it counts the bytes sent
to each watched match's players and keeps what each player was last shown, rebuilding the state
from `match.patch` frames and from compact binary frames (`asobi.compact_state`) as the player's
client would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from asobi import merge_patch
from asobi.compact_state import CompactClient, CompactError

if TYPE_CHECKING:
    from asobi.app import App
    from asobi.engine import Engine

STATE_PREFIX = b'{"type":"match.state",'
PATCH_PREFIX = b'{"type":"match.patch",'


class FrameTap:
    """Installed as `hub.tap` while any console watches a match: counts the bytes sent to each
    watched match's players and keeps what each player was last shown: their last `match.state`
    frame (parsed only when inspected), with the `match.patch` frames since applied to it, or
    the state a compact chain's frames decode to."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.watchers: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        # match id -> player id -> a frame (bytes) or the view patches made of it.
        self.last_state: dict[str, dict[str, Any]] = {}
        # match id -> player id -> the decoder of that player's compact chain.
        self.compact: dict[str, dict[str, CompactClient]] = {}

    def __call__(self, player_id: str, frame: bytes) -> None:
        match_id = self.engine.player_match.get(player_id)
        if match_id is None or match_id not in self.watchers:
            return
        self.bytes_sent[match_id] = self.bytes_sent.get(match_id, 0) + len(frame)
        if frame.startswith(STATE_PREFIX):
            self.last_state.setdefault(match_id, {})[player_id] = frame
        elif frame.startswith(PATCH_PREFIX):
            views = self.last_state.get(match_id)
            held = views.get(player_id) if views is not None else None
            if views is None or held is None:
                return  # no full frame seen yet: the next one starts the view
            if isinstance(held, bytes):
                held = orjson.loads(held)["payload"]
            views[player_id] = merge_patch.apply(held, orjson.loads(frame)["payload"])
        elif not frame.startswith(b"{"):  # a compact state frame (binary)
            decoder = self.compact.setdefault(match_id, {}).setdefault(player_id, CompactClient())
            try:
                state = decoder.receive(frame)
            except CompactError:
                return
            if state is not None:
                self.last_state.setdefault(match_id, {})[player_id] = state

    def watch(self, match_id: str) -> None:
        self.watchers[match_id] = self.watchers.get(match_id, 0) + 1

    def unwatch(self, match_id: str) -> None:
        left = self.watchers.get(match_id, 0) - 1
        if left > 0:
            self.watchers[match_id] = left
            return
        self.watchers.pop(match_id, None)
        self.bytes_sent.pop(match_id, None)
        self.last_state.pop(match_id, None)
        self.compact.pop(match_id, None)


def tap_of(app: App) -> FrameTap:
    tap = app.hub.tap
    if not isinstance(tap, FrameTap):
        tap = FrameTap(app.engine)
        app.hub.tap = tap
    return tap
