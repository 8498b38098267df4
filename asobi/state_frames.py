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

A connection may also choose the compact encoding (`asobi.compact_state`): the same frames, binary,
with interned keys.  A compact chain's record also holds its key table, which the same rules keep
equal to the client's: every full frame starts a new one, and a patch only ever extends the table
of the frame it is based on.  A chain whose patches added too many keys starts again with a full
frame (`KeyTable.overgrown`).

What a connection chose arrives in its `session.connect` or `match.join` frame; reading and
checking that choice (`state_sync_choice`) lives here, beside what it selects.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Any, NamedTuple

import orjson

from asobi import compact_state, merge_patch
from asobi.compact_state import KeyTable
from asobi.protocol import ErrorCode, Frame, ProtocolError, encode_raw_payload

NOBODY: frozenset[str] = frozenset()


class SyncChoice(NamedTuple):
    """What a connection asked for in `state_sync` and `state_encoding`."""

    patch: bool | None = None  # `match.patch` frames (True), full ones (False), as the script says
    compact: bool = False  # binary frames of `asobi.compact_state` instead of JSON


def state_sync_choice(frame: Frame) -> SyncChoice | None:
    """A connection's `state_sync` ("patch", "full", absent: the match script decides) and
    `state_encoding` ("json", the default, or "compact") choices; None when it made neither."""
    sync: object = frame.payload.get("state_sync")
    encoding: object = frame.payload.get("state_encoding")
    if sync is not None and sync != "patch" and sync != "full":
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f'{frame.type}: payload.state_sync must be "patch" or "full"',
            frame.cid,
        )
    if encoding is not None and encoding != "json" and encoding != "compact":
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f'{frame.type}: payload.state_encoding must be "json" or "compact"',
            frame.cid,
        )
    if sync is None and encoding is None:
        return None
    return SyncChoice(None if sync is None else sync == "patch", encoding == "compact")


class Sent(NamedTuple):
    """What one player holds: the data of frame `seq` (`UNPARSED` when only its JSON `text` was
    needed), the tick of their last full frame, in the compact encoding the key table as of that
    frame, and the data as JSON text when the Lua-side encoder wrote it."""

    seq: int
    data: Any
    full_tick: int
    keys: KeyTable | None = None
    text: bytes | None = None


# `data` not parsed from its text (yet): JSON patches are diffed text to text (`diff_text`).
UNPARSED: Any = object()


def _data(sent: Sent) -> Any:
    return orjson.loads(sent.text) if sent.data is UNPARSED else sent.data  # type: ignore[arg-type]


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
        patching: Set[str],
        tick: int,
        full_every: int,
        compact: Set[str] = NOBODY,
        text: bytes | None = None,
    ) -> list[tuple[str, bytes]]:
        """One frame per target for the state `data` (shared by all of them); `text`, when
        given, is `data` as JSON already (written by the Lua-side encoder), and `data` may then be
        `UNPARSED`: it is parsed only if a frame needs objects (compact frames, a patch the text
        diff declined).

        The full frame and each distinct patch are encoded once per encoding: with
        `shared_state`, every player who got the previous frame holds the same data (and, in the
        compact encoding, players who got the same frames hold the same key table), so one patch
        serves them all.
        """
        out: list[tuple[str, bytes]] = []
        body = text
        plain: bytes | None = None
        full: bytes | None = None
        packed: tuple[bytes, KeyTable] | None = None
        diffs: dict[int, Any] = {}
        patches: dict[int, bytes] = {}
        compact_patches: dict[tuple[int, int], tuple[KeyTable, bytes, KeyTable]] = {}
        seq, sent, staged = self.seq, self.sent, self.staged
        if data is UNPARSED and (compact or text is None):
            data = orjson.loads(text)  # type: ignore[arg-type]
        for pid in targets:
            binary = pid in compact
            if pid not in patching:
                if sent:
                    sent.pop(pid, None)
                if binary:
                    packed = packed or compact_state.encode_full(seq, data)
                    out.append((pid, packed[0]))
                    continue
                if plain is None:
                    body = body or orjson.dumps(data)
                    plain = encode_raw_payload("match.state", body)
                out.append((pid, plain))
                continue
            last = sent.get(pid)
            keys = last.keys if last is not None else None
            if (
                last is None
                or tick - last.full_tick >= full_every
                or binary is (keys is None)  # the encoding changed: its chain starts again
                or (keys is not None and keys.overgrown())
            ):
                if binary:
                    packed = packed or compact_state.encode_full(seq, data)
                    staged[pid] = Sent(seq, data, tick, packed[1])
                    out.append((pid, packed[0]))
                    continue
                if full is None:
                    body = body or orjson.dumps(data)
                    full = b'{"type":"match.state","seq":%d,"payload":%b}' % (seq, body)
                staged[pid] = Sent(seq, data, tick, None, text)
                out.append((pid, full))
                continue
            if keys is not None:
                patch = diffs.get(last.seq, diffs)
                if patch is diffs:
                    patch = diffs[last.seq] = merge_patch.diff(_data(last), data)
                made = compact_patches.get((last.seq, id(keys)))
                if made is None or made[0] is not keys:
                    packed_patch, grown = compact_state.encode_patch(seq, last.seq, patch, keys)
                    made = compact_patches[last.seq, id(keys)] = (keys, packed_patch, grown)
                staged[pid] = Sent(seq, data, last.full_tick, made[2])
                out.append((pid, made[1]))
                continue
            frame = patches.get(last.seq)
            if frame is None:
                payload = None
                if text is not None and last.text is not None and merge_patch.diff_text:
                    payload = merge_patch.diff_text(last.text, text)
                if payload is None:
                    if data is UNPARSED:
                        data = orjson.loads(text)  # type: ignore[arg-type]
                    payload = orjson.dumps(merge_patch.diff(_data(last), data))
                frame = b'{"type":"match.patch","seq":%d,"base":%d,"payload":%b}' % (
                    seq,
                    last.seq,
                    payload,
                )
                patches[last.seq] = frame
            staged[pid] = Sent(seq, data, last.full_tick, None, text)
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
