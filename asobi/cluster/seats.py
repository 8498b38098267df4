"""Resume tokens that say which node issued them, and seats granted by seat tokens.

A player's seat lives in the memory of the node that runs their match, so a resume only works
there.  Clients reconnect wherever their address leads them (a load balancer, a restarted app),
so the token itself names its node: `<node_id>.<random>`.  A node that receives a token of
another node needs no lookup to answer: the node directory it already holds (one heartbeat old)
says whether that node lives and where clients reach it; the session then sends the client there
(`session.redirect`), or, when the node is gone, tells the player their match was lost.

A match can outlive its node: a node that drains hands it to another, and when a node dies
another restarts it from its snapshot (docs/durability.md, "In a cluster").  The node that takes
a match tells every node which resume tokens follow it there (`follow`): such a token is then
sent to that node instead of to the one it names, and answers `match_lost` only when no node
took the match.

Seat tokens (`asobi.cluster.seat_tokens`) are how a player arrives at a node they were sent to:
the token is checked against the shared secret, the player and this node's id, with no I/O.
"""

from __future__ import annotations

import secrets
import time

from asobi.cluster.nodes import NodeDirectory
from asobi.cluster.seat_tokens import SeatTokens
from asobi.directory import Elsewhere, Seat
from asobi.presence import Presence

SEPARATOR = "."


class ClusterSeats(Presence):
    """`Presence` whose resume tokens route themselves, and that honours seat tokens."""

    def __init__(self, grace_s: float, nodes: NodeDirectory, seat_tokens: SeatTokens) -> None:
        super().__init__(grace_s)
        self.nodes = nodes
        self.seat_tokens = seat_tokens
        self.node_id = nodes.node_id
        # resume token -> (the node its match moved to, until when the seat is held there).
        self.followed: dict[str, tuple[str, float]] = {}

    def follow(self, node_id: str, tokens: list[str], now: float | None = None) -> None:
        """These resume tokens' seats are now held by `node_id`, for the reconnect grace."""
        now = time.monotonic() if now is None else now
        self.followed = {t: v for t, v in self.followed.items() if v[1] > now}
        until = now + max(self.grace_s, 1.0)
        for token in tokens:
            self.followed[token] = (node_id, until)

    def new_token(self) -> str:
        return f"{self.node_id}{SEPARATOR}{secrets.token_urlsafe(24)}"

    def locate(self, resume_token: str | None) -> Elsewhere | None:
        moved = self.followed.get(resume_token) if resume_token else None
        if moved is not None and moved[1] > time.monotonic():
            if moved[0] == self.node_id:
                return None
            return Elsewhere(moved[0], self.nodes.url_of(moved[0]))
        node_id = node_of(resume_token)
        if node_id is None or node_id == self.node_id:
            return None
        return Elsewhere(node_id, self.nodes.url_of(node_id))

    def admit(self, player_id: str, seat_token: str) -> Seat:
        return self.seat_tokens.verify(seat_token, player_id, self.node_id)


def node_of(resume_token: str | None) -> str | None:
    """The node a resume token names (None: no token, or one without a node, e.g. issued by a
    server running alone).  Node ids may hold dots (hostnames); the random part is base64url,
    which has none, so the node is everything before the last dot."""
    if not resume_token or SEPARATOR not in resume_token:
        return None
    node_id = resume_token.rpartition(SEPARATOR)[0]
    return node_id or None
