"""The match router of a node: local matches as on a single node, other nodes' by redirect.

Inputs, leaves and resyncs only ever concern the player's match on this node (a player whose
match runs elsewhere is connected there), so they stay the local router's.  Only a `match.join`
can name a match this node does not run: the listing says which node does, and the player gets
a `join` seat token for it; the session sends them there (`match.redirect`), where the join
runs when they arrive.  Nothing is forwarded between nodes.
"""

from __future__ import annotations

import structlog

from asobi.cluster.listing import ClusterListing
from asobi.cluster.nodes import NodeDirectory
from asobi.cluster.seat_tokens import SeatTokens
from asobi.directory import MatchElsewhere, MatchInfo
from asobi.engine import Engine
from asobi.local import LocalRouter

log = structlog.get_logger("asobi.cluster")


class ClusterRouter(LocalRouter):
    def __init__(
        self,
        engine: Engine,
        listing: ClusterListing,
        nodes: NodeDirectory,
        seat_tokens: SeatTokens,
    ) -> None:
        super().__init__(engine)
        self.listing = listing
        self.nodes = nodes
        self.seat_tokens = seat_tokens

    def join(self, player_id: str, match_id: str) -> MatchInfo:
        """Join here when the match runs here (or the player already plays here: refused as
        usual); raise `MatchElsewhere` with a seat token when another live node runs it."""
        if match_id not in self.engine.matches and self.engine.match_of(player_id) is None:
            node_id = self.listing.where(match_id) or self._started_by(match_id)
            url = self.nodes.url_of(node_id) if node_id is not None else None
            if node_id is not None and url is not None:
                token = self.seat_tokens.issue(player_id, match_id, node_id, join=True)
                raise MatchElsewhere(match_id, node_id, url, token)
        return super().join(player_id, match_id)

    def _started_by(self, match_id: str) -> str | None:
        """The live node a match id says started it (`match_id_prefix`), when the listing has
        not shown the match (it lists a bounded number per node, once a second)."""
        node_id, sep, _ = match_id.partition(MATCH_ID_SEPARATOR)
        if sep and node_id != self.nodes.node_id and node_id in self.nodes.nodes:
            return node_id
        return None


MATCH_ID_SEPARATOR = "~"
MAX_PREFIXED_NODE_ID = 30  # match ids stay within the protocol's 64 characters


def match_id_prefix(node_id: str) -> str:
    """What a node puts in front of its match ids ("" for an id too long to fit)."""
    if len(node_id) > MAX_PREFIXED_NODE_ID or MATCH_ID_SEPARATOR in node_id:
        return ""
    return node_id + MATCH_ID_SEPARATOR
