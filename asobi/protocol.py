"""The wire protocol: frame parsing, validation, encoding and error codes.

Pure functions only (no sockets, no server state), so every rule about what a client may send is
in one place and testable on its own.  A frame is a JSON text message
`{"type": str, "payload": object, "cid"?: str|int}`; every reply to a frame echoes its `cid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from asobi import names

MAX_CID_LENGTH = 128
# match.input payloads become Lua tables: keep them within what the Lua bridge converts
# (nesting depth of asobi.lua.convert, Lua's 64-bit integers) and bounded in size.
MAX_INPUT_DEPTH = 32
MAX_INPUT_NODES = 10_000
LUA_INT_MIN, LUA_INT_MAX = -(2**63), 2**63 - 1


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    UNAUTHENTICATED = "unauthenticated"
    INVALID_TOKEN = "invalid_token"
    UNKNOWN_MODE = "unknown_mode"
    ALREADY_AUTHENTICATED = "already_authenticated"
    TOO_MANY_TICKETS = "too_many_tickets"
    MATCHMAKER_FULL = "matchmaker_full"
    ALREADY_IN_MATCH = "already_in_match"
    NOT_IN_MATCH = "not_in_match"
    MATCH_FAILED = "match_failed"
    MATCH_NOT_FOUND = "match_not_found"
    MATCH_FULL = "match_full"
    JOIN_REFUSED = "join_refused"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    INTERNAL = "internal_error"
    USERNAME_TAKEN = "username_taken"
    INVALID_CREDENTIALS = "invalid_credentials"
    INVALID_ACCOUNT_INPUT = "invalid_account_input"
    STORE_UNAVAILABLE = "store_unavailable"
    ADMIN_DISABLED = "admin_disabled"
    ADMIN_UNAUTHORIZED = "admin_unauthorized"
    PLAYER_NOT_FOUND = "player_not_found"
    # Cluster (docs/cluster.md): Redis cannot be reached right now (matchmaking, cross-node
    # joins); the node holding the player's match is gone.
    UNAVAILABLE = "unavailable"
    MATCH_LOST = "match_lost"
    # A seat token that is forged, expired, or for another player or node.
    INVALID_SEAT = "invalid_seat"


class ProtocolError(Exception):
    """A frame the server refuses; becomes an `error` frame to the sender."""

    def __init__(self, code: ErrorCode, message: str, cid: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cid = cid


@dataclass(frozen=True, slots=True)
class Frame:
    type: str
    payload: dict[str, Any] = field(default_factory=dict)
    cid: str | int | None = None


# The console's frames (docs/protocol.md, "Admin frames"), handled by asobi.admin.
ADMIN_TYPES = (
    "admin.auth",
    "admin.overview",
    "admin.matches",
    "admin.match",
    "admin.watch",
    "admin.unwatch",
    "admin.end_match",
    "admin.kick",
    "admin.message",
    "admin.reloads",
    "admin.reload",
    "admin.queues",
    "admin.push",
    "admin.push_data",
    "admin.drain",
)

# Frames a client may send.  Frames in AUTH_FREE need no session.
CLIENT_TYPES = frozenset(
    {
        "auth.guest",
        "session.connect",
        "session.heartbeat",
        "matchmaker.add",
        "matchmaker.remove",
        "match.input",
        "match.leave",
        "auth.register",
        "auth.login",
        "leaderboard.top",
        "match.list",
        "match.join",
        "match.resync",
    }
) | frozenset(ADMIN_TYPES)
# Admin frames check the admin token themselves (asobi.admin), not a player session.
AUTH_FREE = frozenset(
    {"auth.guest", "session.connect", "session.heartbeat", "auth.register", "auth.login"}
) | frozenset(ADMIN_TYPES)


def parse_frame(data: str | bytes) -> Frame:
    """Parse and validate the envelope of one client frame."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "frame must be a JSON object")
    cid = doc.get("cid")
    if cid is not None and not _valid_cid(cid):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"cid must be a string of at most {MAX_CID_LENGTH} characters or an integer",
        )
    kind = doc.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "frame needs a string 'type'", cid)
    payload = doc.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "'payload' must be a JSON object", cid)
    if kind not in CLIENT_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:64]!r}", cid)
    return Frame(kind, payload, cid)


def _valid_cid(cid: Any) -> bool:
    if isinstance(cid, bool):
        return False
    if isinstance(cid, int):
        return -(2**53) <= cid <= 2**53
    return isinstance(cid, str) and len(cid) <= MAX_CID_LENGTH


def optional_str(frame: Frame, key: str, *, max_length: int = 4096) -> str | None:
    """An optional string field: absent or null is None, anything else must be a string."""
    value = frame.payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"{frame.type}: payload.{key} must be a non-empty string "
            f"of at most {max_length} characters",
            frame.cid,
        )
    return value


def require_str(frame: Frame, key: str, *, max_length: int = 4096) -> str:
    value = optional_str(frame, key, max_length=max_length)
    if value is None:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"{frame.type} needs payload.{key}", frame.cid
        )
    return value


def _valid_mode(frame: Frame, mode: str) -> str:
    if not names.MODE.accepts(mode):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"mode must match {names.MODE}", frame.cid)
    return mode


def require_mode(frame: Frame) -> str:
    return _valid_mode(frame, require_str(frame, "mode", max_length=64))


def optional_mode(frame: Frame) -> str | None:
    mode = optional_str(frame, "mode", max_length=64)
    return None if mode is None else _valid_mode(frame, mode)


def check_input(frame: Frame) -> dict[str, Any]:
    """The payload of a match.input, refused when Lua could not take it (walked iteratively:
    the nesting is what is being checked, so it must not cost recursion)."""
    stack: list[tuple[Any, int]] = [(frame.payload, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_INPUT_NODES:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"match.input payload holds more than {MAX_INPUT_NODES} values",
                frame.cid,
            )
        if isinstance(value, dict | list):
            if depth >= MAX_INPUT_DEPTH:
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE,
                    f"match.input payload is nested deeper than {MAX_INPUT_DEPTH} levels",
                    frame.cid,
                )
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(value, int) and not LUA_INT_MIN <= value <= LUA_INT_MAX:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                "match.input integers must fit in 64 bits (signed)",
                frame.cid,
            )
    return frame.payload


def encode(kind: str, payload: Any, cid: Any = None) -> bytes:
    """One server frame as UTF-8 JSON bytes, ready to send as a text message."""
    if cid is None:
        return orjson.dumps({"type": kind, "payload": payload})
    return orjson.dumps({"type": kind, "payload": payload, "cid": cid})


def encode_error(code: ErrorCode, message: str, cid: Any = None) -> bytes:
    return encode("error", {"code": str(code), "message": message}, cid)


def encode_raw_payload(kind: str, payload_json: bytes) -> bytes:
    """A frame around an already-encoded payload (the per-tick path encodes the payload once)."""
    return b'{"type":"' + kind.encode() + b'","payload":' + payload_json + b"}"
