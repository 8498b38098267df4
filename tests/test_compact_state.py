"""The compact state encoding (`asobi.compact_state`) as `asobi.state_frames` sends it: a client
that decodes the frames with its key table holds exactly the state a full frame carries, through
dropped frames, resyncs, reconnects, full frames every N ticks and key tables that start again;
bad frames are refused with a clear error."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asobi import compact_state, merge_patch
from asobi.compact_state import CompactClient, CompactError
from asobi.state_frames import StateFrames

# A few keys repeat across states (interned once), generated ones keep coming (new keys in
# patches); "__proto__" and "constructor" are keys like any other here.
KEYS = st.one_of(
    st.sampled_from(["a", "b", "hp", "pos", "1", "", "__proto__", "constructor", "ключ"]),
    st.text(min_size=1, max_size=4),
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
# What get_state can return: no null anywhere (a Lua table cannot hold nil), {} and [] apart.
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
STATES = st.dictionaries(KEYS, VALUES, max_size=6)
# What happens to one frame on its way to the client.
FATES = ["delivered", "delivered", "delivered", "dropped", "reconnected", "reconnected_late"]


def exact(value: Any) -> bytes:
    """`value` spelled so that 1, 1.0 and true differ, and {} and [] differ, key order aside."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class Player:
    """One client of the chain: the compact reference decoder, or JSON frames applied as the
    JS client applies them."""

    def __init__(self, pid: str, compact: bool) -> None:
        self.pid = pid
        self.compact = compact
        self.reset()

    def reset(self) -> None:
        self.decoder = CompactClient()
        self.seq: int | None = None
        self.state: Any = None

    def receive(self, frame: bytes) -> Any:
        """The state after `frame`, or None when it does not apply (the client asks for a
        resync)."""
        assert compact_state.is_binary(frame) is self.compact
        if self.compact:
            return self.decoder.receive(frame)
        parsed = orjson.loads(frame)
        if parsed["type"] == "match.patch":
            if parsed["base"] != self.seq:
                return None
            self.state = merge_patch.apply(self.state, parsed["payload"])
        else:
            self.state = parsed["payload"]
        self.seq = parsed["seq"]
        return self.state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), shared=st.booleans(), full_every=st.integers(1, 6))
def test_decoded_frames_always_rebuild_the_state(
    data: st.DataObject, shared: bool, full_every: int
) -> None:
    players = [Player("a", True), Player("b", True), Player("j", False)]
    by_id = {p.pid: p for p in players}
    frames = StateFrames()
    everyone = {p.pid for p in players}
    compact = {p.pid for p in players if p.compact}
    kinds: list[int] = []
    for tick in range(data.draw(st.integers(1, 14), label="ticks")):
        frames.begin()
        out: list[tuple[str, bytes, Any]] = []
        if shared:
            state = data.draw(STATES, label=f"state {tick}")
            out = [
                (pid, frame, state)
                for pid, frame in frames.frames(by_id, state, everyone, tick, full_every, compact)
            ]
        else:
            for pid in by_id:
                state = data.draw(STATES, label=f"state {tick} {pid}")
                sent = frames.frames([pid], state, everyone, tick, full_every, compact)
                out += [(p, frame, state) for p, frame in sent]
        for pid, frame, state in out:
            player = by_id[pid]
            fate = data.draw(st.sampled_from(FATES), label=f"fate {tick} {pid}")
            if player.compact:
                kinds.append(frame[0] & compact_state.KINDS)
            if fate == "dropped":
                frames.settle(pid, False)
                continue
            frames.settle(pid, True)
            if fate.startswith("reconnected"):
                # The frame was written, the connection died before the client read it: a new
                # socket holds nothing.  On resume the server resyncs at once; a client that
                # gets a patch first (`_late`) must notice and ask.
                player.reset()
                if fate == "reconnected":
                    frames.resync(pid)
                continue
            rebuilt = player.receive(frame)
            if rebuilt is None:
                frames.resync(pid)
                continue
            assert exact(rebuilt) == exact(state), (pid, tick)
    assert kinds[0] == compact_state.FULL


def test_a_full_frame_is_self_contained() -> None:
    """A client that held another chain's keys decodes a full frame all the same, and its old
    keys are gone (a later patch may reuse their integers)."""
    first, _ = compact_state.encode_full(1, {"x": 1, "y": {"z": 2}})
    full, keys = compact_state.encode_full(7, {"b": {}, "a": [{"b": 1.0}], "c": []})
    client = CompactClient()
    client.receive(first)
    assert client.receive(full) == {"b": {}, "a": [{"b": 1.0}], "c": []}
    assert client.keys == ["b", "a", "c"] and keys.ids == {"b": 0, "a": 1, "c": 2}
    patch, grown = compact_state.encode_patch(8, 7, {"b": None, "d": {"x": True}}, keys)
    assert client.receive(patch) == {"a": [{"b": 1.0}], "c": [], "d": {"x": True}}
    assert client.keys == ["b", "a", "c", "d", "x"] and grown.ids["x"] == 4
    assert keys.ids == {"b": 0, "a": 1, "c": 2}, "a table is never changed once made"
    # Later frames carry the key's integer, not its name.
    again, same = compact_state.encode_patch(9, 8, {"d": {"x": False}}, grown)
    assert b"x" not in again and same is grown
    assert client.receive(again) == {"a": [{"b": 1.0}], "c": [], "d": {"x": False}}


def test_a_chain_that_keeps_adding_keys_starts_again_with_a_full_frame() -> None:
    """Ever-new ids (bullets): the table grows with each patch until the chain starts again
    from a full frame that defines only the keys in use."""
    frames = StateFrames()
    client = CompactClient()
    kinds = []
    for tick in range(compact_state.MAX_NEW_KEYS + 40):
        frames.begin()
        state = {"bullets": {f"b{tick}": tick, f"b{tick + 1}": tick + 1}}
        [(_, frame)] = frames.frames(["p"], state, {"p"}, tick, 10**9, {"p"})
        frames.settle("p", True)
        kinds.append(frame[0] & compact_state.KINDS)
        assert client.receive(frame) == state
    restarts = [t for t, kind in enumerate(kinds) if kind == compact_state.FULL]
    assert restarts[0] == 0 and len(restarts) == 2, restarts
    # The new full frame defined only the keys in use (3), each patch since then one more.
    assert len(client.keys) == 3 + len(kinds) - 1 - restarts[1]


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"", "not a compact state frame"),
        (b"\x09\x01\x80", "not a compact state frame"),
        (b"\x01", "bad frame header"),
        (b"\x01\xa1x\x80", "bad frame header"),
        (b"\x01\x01\x81\x05\x01", "not in the key table"),
        (b"\x05\x01\x91\x01\x81\x00\x01", "not an array of strings"),
        (b"\x01\x01\x81\xff\x01", "not in the key table"),
        (b"\x01\x01\x80\x80", "bytes after the frame body"),
        (b"\x01\x01\x81\x00", "bad frame body"),
    ],
)
def test_a_bad_frame_is_refused_clearly(frame: bytes, problem: str) -> None:
    with pytest.raises(CompactError, match=problem):
        CompactClient().receive(frame)


def test_the_layout_is_the_documented_one() -> None:
    """docs/protocol.md spells these two frames out byte for byte."""
    full, keys = compact_state.encode_full(300, {"hp": 3, "pos": {"hp": 1.5}})
    assert full.hex(" ") == (
        "05 cd 01 2c 92 a2 68 70 a3 70 6f 73 82 00 03 01 81 00 cb 3f f8 00 00 00 00 00 00"
    )
    reader = msgpack.Unpacker(strict_map_key=False)
    reader.feed(full[1:])
    assert list(reader) == [300, ["hp", "pos"], {0: 3, 1: {0: 1.5}}]
    patch, _ = compact_state.encode_patch(302, 300, {"pos": None}, keys)
    assert patch.hex(" ") == "02 cd 01 2e 02 81 01 c0"
