"""Resume tokens that say which node issued them, and seats granted by seat tokens.

A player's seat lives in the memory of the node that runs their match, so a resume only works
there.  Clients reconnect wherever their address leads them (a load balancer, a restarted app),
so the token itself names its node: `<node_id>.<random>`.  A node that receives a token of
another node needs no lookup to answer: the node directory it already holds (one heartbeat old)
says whether that node lives and where clients reach it; the session then sends the client there
(`session.redirect`), or, when the node is gone, tells the player their match was lost.

Seat tokens (`asobi.cluster.seat_tokens`) are how a player arrives at a node they were sent to:
the token is checked against the shared secret, the player and this node's id, with no I/O.
"""

from __future__ import annotations

import secrets

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

    def new_token(self) -> str:
        return f"{self.node_id}{SEPARATOR}{secrets.token_urlsafe(24)}"

    def locate(self, resume_token: str | None) -> Elsewhere | None:
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
