"""The compact state encoding: `match.state` and `match.patch` frames as binary WebSocket frames.

A connection that asks for `state_encoding: "compact"` gets its state frames as MessagePack with
interned object keys instead of JSON (docs/protocol.md, "Compact state frames").  A frame is:

    byte 0     kind: FULL (a whole state) or PATCH (an RFC 7396 merge patch), plus NEW_KEYS when
               the frame defines keys
    msgpack    seq (unsigned int)
    msgpack    seq - base, for a PATCH only (1 when no frame was skipped)
    msgpack    the new keys, with NEW_KEYS only: an array of strings
    msgpack    the body: the state or the merge patch, every map key an integer

The integer of a key is its index in the client's key table, which the frames build: a FULL frame
starts a new, empty table, then every frame appends its new keys in order, before its body is
read.  So a key's name crosses the wire once per chain and is a small integer after that, and a
full frame is self-contained: it defines every key it uses, whatever the client held before.
A patch only applies on top of the frame it names as base (a client whose last seq is another
asks for `match.resync`, without reading the patch); since the server starts a chain again with a
full frame whenever the client may not hold its last frame (`asobi.state_frames`), the client's
table is always the one the server encoded against.

MessagePack keeps what JSON loses (`{}` stays a map, never an array; `1.0` stays a float) and
`nil` deletes in a patch as `null` does.  The first byte of a compact frame is never `{`, which
is how the server tells it from a JSON frame when it writes it (`is_binary`).

Pure functions and values: no sockets, no match.  `CompactClient` is the reference decoder that
tests and the bench read frames with, as a client would.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from asobi import merge_patch

FULL = 0x01
PATCH = 0x02
NEW_KEYS = 0x04
KINDS = FULL | PATCH
# Keys a chain may add after its full frame before the server starts it again with a full frame
# (which defines only the keys still in use): a state keyed by ever-new ids (bullets, events) would
# otherwise grow the table, on both ends, for as long as the chain runs.
MAX_NEW_KEYS = 1024

_pack = msgpack.Packer(autoreset=True).pack
_FULL = bytes((FULL,))


class KeyTable(NamedTuple):
    """The keys a client holds, key -> integer, as of one frame of its chain.

    Never changed once made: a frame that adds keys makes a new table, so players who got the
    same frames share one table (and one encoded patch), and a frame that is dropped leaves the
    table of the frame before it as it was.
    """

    ids: dict[str, int]
    # How many keys the chain's full frame defined (the rest came with patches).
    at_full: int

    def overgrown(self) -> bool:
        """Whether patches added so many keys that the chain should start again."""
        return len(self.ids) - self.at_full > MAX_NEW_KEYS


EMPTY = KeyTable({}, 0)


def encode_full(seq: int, state: Any) -> tuple[bytes, KeyTable]:
    """A FULL frame for `state`, and the key table the client holds after it."""
    body, new = _interned(state, {})
    head = bytes((FULL | NEW_KEYS,)) + _pack(seq) + _pack(new) if new else _FULL + _pack(seq)
    ids = dict(zip(new, range(len(new)), strict=True))
    return head + _pack(body), KeyTable(ids, len(ids))


def encode_patch(seq: int, base: int, patch: Any, keys: KeyTable) -> tuple[bytes, KeyTable]:
    """A PATCH frame for the merge patch from frame `base` (whose key table is `keys`)."""
    body, new = _interned(patch, keys.ids)
    if new:
        head = bytes((PATCH | NEW_KEYS,)) + _pack(seq) + _pack(seq - base) + _pack(new)
        ids = keys.ids.copy()
        ids.update(zip(new, range(len(ids), len(ids) + len(new)), strict=True))
        keys = KeyTable(ids, keys.at_full)
    else:
        head = bytes((PATCH,)) + _pack(seq) + _pack(seq - base)
    return head + _pack(body), keys


def is_binary(frame: bytes) -> bool:
    """Whether `frame` goes out as a binary WebSocket frame (every JSON frame starts with `{`)."""
    return frame[:1] != b"{"


def _interned(value: Any, ids: dict[str, int]) -> tuple[Any, list[str]]:
    """`value` with every map key replaced by its integer, and the keys `ids` did not hold (in
    the order they got their integers: `len(ids)`, `len(ids) + 1`, ...).

    This walk is most of the encoding's cost (a dict lookup per key; measured against a
    comprehension that gives up at the first new key, and a C-level `map` per map: neither was
    faster on these states).
    """
    new: list[str] = []
    added: dict[str, int] = {}
    get, first = ids.get, len(ids)

    def walk(value: Any) -> Any:
        kind = type(value)
        if kind is dict:
            out = {}
            for key, item in value.items():
                index = get(key)
                if index is None:
                    index = added.get(key)
                    if index is None:
                        index = added[key] = first + len(new)
                        new.append(key)
                out[index] = walk(item) if type(item) in _NESTED else item
            return out
        if kind is list:
            return [walk(item) if type(item) in _NESTED else item for item in value]
        return value

    return walk(value), new


_NESTED = (dict, list)


# -- reading (the reference decoder) ---------------------------------------------------------------
class CompactError(ValueError):
    """A frame that is not a compact state frame, or names a key its table does not hold."""


class Decoded(NamedTuple):
    kind: int  # FULL or PATCH
    seq: int
    base: int | None  # PATCH only
    payload: Any  # the state or the merge patch, with key names


def read_header(
    frame: bytes, keys: list[str] | None = None
) -> tuple[int, int, int | None, msgpack.Unpacker]:
    """The kind, seq and base of a frame, and the reader positioned on the rest (which names the
    map keys it reads by `keys`, when given)."""
    if not frame or frame[0] & ~(KINDS | NEW_KEYS) or frame[0] & KINDS not in (FULL, PATCH):
        raise CompactError("not a compact state frame")
    kind = frame[0] & KINDS
    hook = None if keys is None else _naming(keys)
    reader = msgpack.Unpacker(raw=False, strict_map_key=False, object_pairs_hook=hook)
    reader.feed(frame[1:])
    try:
        seq = reader.unpack()
        base = seq - reader.unpack() if kind == PATCH else None
    except (msgpack.OutOfData, ValueError, TypeError) as exc:
        raise CompactError(f"bad frame header: {exc}") from None
    if type(seq) is not int or (base is not None and type(base) is not int):
        raise CompactError("bad frame header: seq and base are integers")
    return kind, seq, base, reader


def _naming(keys: list[str]) -> Any:
    def named(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
        out = {}
        for index, value in pairs:
            if type(index) is not int or index < 0:
                raise IndexError(f"map key {index!r}")
            out[keys[index]] = value
        return out

    return named


def decode(frame: bytes, keys: list[str]) -> Decoded:
    """Read a whole frame; `keys` is the client's key table, which this updates (a FULL frame
    clears it first).  Only call it for a frame that applies: check `read_header` first."""
    kind, seq, base, reader = read_header(frame, keys)
    if kind == FULL:
        keys.clear()
    try:
        if frame[0] & NEW_KEYS:
            new = reader.unpack()
            if type(new) is not list or not all(type(k) is str for k in new):
                raise CompactError("the new keys are not an array of strings")
            keys.extend(new)
        body = reader.unpack()
    except (IndexError, TypeError) as exc:
        raise CompactError(f"a map key is not in the key table: {exc}") from None
    except (msgpack.OutOfData, ValueError) as exc:
        raise CompactError(f"bad frame body: {exc}") from None
    if reader.tell() != len(frame) - 1:
        raise CompactError("bytes after the frame body")
    return Decoded(kind, seq, base, body)


class CompactClient:
    """What a client holds of a compact chain: the state, its seq and the key table.

    `receive` gives the state after a frame, or None when the frame does not apply to what is
    held (a patch whose base is not the last seq): the client then asks for `match.resync`, and
    its key table is untouched until the full frame comes.
    """

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.seq: int | None = None
        self.state: Any = None

    def receive(self, frame: bytes) -> Any:
        kind, _seq, base, _ = read_header(frame)
        if kind == PATCH and (self.seq is None or base != self.seq):
            return None
        decoded = decode(frame, self.keys)
        if kind == FULL:
            self.state = decoded.payload
        else:
            self.state = merge_patch.apply(self.state, decoded.payload)
        self.seq = decoded.seq
        return self.state
