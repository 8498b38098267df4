"""Which state frame each player of one match gets: a full `match.state` or a `match.patch`.

A player in patch mode (the script's `state_sync = "patch"`, or their connection asked for it)
gets a full frame first, then frames carrying the RFC 7396 merge patch (`asobi.merge_patch`) from
the last frame they were *sent* to the state of this tick.  Every such frame has a `seq` (this
match's frame counter, so monotonic per player) and a patch names the `base` seq it applies to;
a client whose last seq is not the base asks for `match.resync`.

The chain needs the client to hold exactly what the server thinks it was sent, so a player gets a
full frame again: when they have none yet (join), when the server could not deliver their last
frame (dropped for a slow reader, not connected: the outbox says so), when they ask
(`match.resync`, a resumed or replaced connection), and every `full_state_every` ticks.

Rendering only *stages* what each player would have been sent; `settle` makes it theirs once the
outbox took the frame, so a reload transaction that is rolled back, or a frame that was dropped,
never leaves a record the client does not share.  Players not in patch mode cost one set lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson

from asobi import merge_patch
from asobi.protocol import encode_raw_payload

NOBODY: frozenset[str] = frozenset()


class Sent(NamedTuple):
    """What one player holds: the data of frame `seq`, and the tick of their last full frame."""

    seq: int
    data: Any
    full_tick: int


class StateFrames:
    """Per-player records of the last state frame sent, for one match."""

    __slots__ = ("sent", "seq", "staged")

    def __init__(self) -> None:
        self.seq = 0
        self.sent: dict[str, Sent] = {}
        self.staged: dict[str, Sent] = {}

    def begin(self) -> None:
        """A new round of state frames: the next seq; anything staged before is void."""
        self.seq += 1
        self.staged.clear()

    def frames(
        self,
        targets: Iterable[str],
        data: Any,
        patching: frozenset[str] | set[str],
        tick: int,
        full_every: int,
    ) -> list[tuple[str, bytes]]:
        """One frame per target for the state `data` (shared by all of them).

        The full frame and each distinct patch are encoded once: with `shared_state`, every
        player who got the previous frame holds the same data, so one patch serves them all.
        """
        out: list[tuple[str, bytes]] = []
        body: bytes | None = None
        plain: bytes | None = None
        full: bytes | None = None
        patches: dict[int, bytes] = {}
        seq, sent, staged = self.seq, self.sent, self.staged
        for pid in targets:
            if pid not in patching:
                if plain is None:
                    body = body or orjson.dumps(data)
                    plain = encode_raw_payload("match.state", body)
                if sent:
                    sent.pop(pid, None)
                out.append((pid, plain))
                continue
            last = sent.get(pid)
            if last is None or tick - last.full_tick >= full_every:
                if full is None:
                    body = body or orjson.dumps(data)
                    full = b'{"type":"match.state","seq":%d,"payload":%b}' % (seq, body)
                staged[pid] = Sent(seq, data, tick)
                out.append((pid, full))
                continue
            frame = patches.get(last.seq)
            if frame is None:
                patch = orjson.dumps(merge_patch.diff(last.data, data))
                frame = b'{"type":"match.patch","seq":%d,"base":%d,"payload":%b}' % (
                    seq,
                    last.seq,
                    patch,
                )
                patches[last.seq] = frame
            staged[pid] = Sent(seq, data, last.full_tick)
            out.append((pid, frame))
        return out

    def settle(self, player_id: str, delivered: bool) -> None:
        """The outbox took (or dropped) the frame staged for `player_id`."""
        entry = self.staged.pop(player_id, None)
        if entry is None:
            return
        if delivered:
            self.sent[player_id] = entry
        else:
            self.sent.pop(player_id, None)

    def resync(self, player_id: str) -> None:
        """Their next state frame is a full one."""
        self.sent.pop(player_id, None)
