"""The seams between a session, the matchmaker and the matches: what each may ask of the others.

A session and the matchmaker never hold an `Engine` or a `Match`: they ask these interfaces.  On
one node the answers come from memory (`asobi.local`); in a cluster they will come from Redis and
from other nodes, as new implementations chosen in `App.create`, with no change to the callers.
The shape follows Colyseus' Presence / Driver / MatchMaker split: who is connected, where a
player's match is, the ticket queue, and placement (a seat reservation on a node) are separate
questions with separate answers.  Only plain data crosses these interfaces (ids, modes, lists of
player ids, frames as bytes), never a Lua object or a socket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from asobi.state_frames import SyncChoice


class Peer(Protocol):
    """One client connection as the layers below the socket see it: a synchronous sink."""

    def send_frame(self, frame: bytes, *, droppable: bool = False) -> bool:
        """Write the frame; False when it was not written (dropped, or the connection is
        closing): a `match.patch` chain then restarts with a full frame."""
        ...

    def close(self, code: int, reason: str) -> None: ...


class Outbox(Protocol):
    """Where frames for players go.  `droppable` frames may be skipped for a slow reader."""

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        """False when the frame did not reach the player's connection (dropped, or the player
        is not connected)."""
        ...


class Connections(Outbox, Protocol):
    """Who is connected, and which connection replaces which (one per player)."""

    def attach(self, player_id: str, peer: Peer) -> Peer | None:
        """Bind the player to `peer`; returns the connection it replaces, if any."""
        ...

    def detach(self, player_id: str, peer: Peer) -> bool:
        """Unbind, unless a newer connection already replaced `peer` (then False)."""
        ...

    def __len__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Seat:
    """A seat a seat token grants on this node: `join` False is a seat the match already holds
    for the player (a resume without a resume token); True asks this node to run the backfill
    join of `match.join`.  `moving` is a seat in a match a draining node is about to hand over
    (`match.moving`): the player may arrive before the match does."""

    player_id: str
    match_id: str
    node_id: str
    join: bool
    moving: bool = False


class InvalidSeat(Exception):
    """The seat token is malformed, forged, expired, for another player or node, or this
    server grants no seats by token (a single node)."""


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """Where a resume token was issued, when not on this node: the session belongs there.
    `node_url` None means that node is gone, and with it the player's seat and match."""

    node_id: str
    node_url: str | None


class MatchElsewhere(Exception):
    """`MatchRouter.join` of a match that runs on another node: the player must go there,
    presenting `seat_token` (a `join` seat) at `node_url`."""

    def __init__(self, match_id: str, node_id: str, node_url: str, seat_token: str) -> None:
        super().__init__(f"match {match_id} runs on node {node_id}")
        self.match_id = match_id
        self.node_id = node_id
        self.node_url = node_url
        self.seat_token = seat_token


class Seats(Protocol):
    """Resume tokens and the seats held for dropped players during the grace period.

    In a cluster two more questions reach this interface, both answered without I/O: where a
    resume token was issued (`locate`: a session resumes on the node that holds its seat), and
    which seat a seat token grants on this node (`admit`).  A single node answers "here" and
    "none" to them.
    """

    grace_s: float

    def issue(self, player_id: str) -> str: ...

    def check(self, player_id: str, token: str | None) -> bool: ...

    def hold(self, player_id: str, now: float) -> bool: ...

    def reclaim(self, player_id: str) -> bool: ...

    def forget(self, player_id: str) -> None: ...

    def is_held(self, player_id: str) -> bool: ...

    def expire(self, now: float) -> list[str]:
        """Players whose grace ended (forgotten here; the caller makes them leave)."""
        ...

    def locate(self, resume_token: str | None) -> Elsewhere | None:
        """The node that issued `resume_token` when it is another one (None: this node, or a
        token that names no node; the usual resume check applies)."""
        ...

    def admit(self, player_id: str, seat_token: str) -> Seat:
        """The seat `seat_token` grants `player_id` on this node; raises `InvalidSeat`."""
        ...

    def __len__(self) -> int: ...


@dataclass(frozen=True, slots=True)
class MatchInfo:
    """A running match as callers outside the engine see it (a copy, safe to keep)."""

    match_id: str
    mode: str
    players: list[str] = field(default_factory=list)
    max_players: int = 0


class JoinRefused(Exception):
    """A join said no; `reason` is one of not_found, full, refused, in_match."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class MatchRouter(Protocol):
    """Where a player's match is, and how their input, leave or join reaches it."""

    def match_of(self, player_id: str) -> MatchInfo | None: ...

    def submit_input(self, player_id: str, payload: Any) -> bool:
        """Queue the input for the player's match's next tick; False when not in a match."""
        ...

    def leave(self, player_id: str) -> MatchInfo | None:
        """The player leaves their match (`leave` runs); None when not in one."""
        ...

    def join(self, player_id: str, match_id: str) -> MatchInfo:
        """Backfill into a running match; raises `JoinRefused`, or `MatchElsewhere` when the
        match runs on another node (the player is sent there)."""
        ...

    def notify_reloads(self, player_id: str, on: bool) -> None:
        """Whether the player gets `match.reloaded` frames."""
        ...

    def state_sync(self, player_id: str, choice: SyncChoice | None) -> None:
        """The state frames the player's connection asked for: `match.patch` frames or full ones
        only, JSON or compact (None: whatever their match's script chose, in JSON)."""
        ...

    def resync(self, player_id: str) -> bool:
        """The player's next state frame is a full one; False when not in a match."""
        ...


class MatchListing(Protocol):
    """The running matches a player may look at (`match.list`)."""

    def list(self, mode: str | None = None) -> list[MatchInfo]: ...


class PlacementFailed(Exception):
    """No match could be started for a reservation (its `init` failed)."""


@dataclass(slots=True)
class SeatReservation:
    """Seats in a started match: who got one, who the script refused (player id -> reason)."""

    node: str
    match: MatchInfo
    refused: dict[str, str] = field(default_factory=dict)


class Placement(Protocol):
    """Where a formed group plays: start a match on a node and reserve its players' seats.

    Two steps, so the matchmaker can tell the players before the match talks to them: frames the
    new match sends are held until `open` (`matchmaker.matched` always comes first).
    """

    def reserve(self, mode: str, players: list[str]) -> SeatReservation:
        """Raises `PlacementFailed`."""
        ...

    def open(self, reservation: SeatReservation) -> None: ...
