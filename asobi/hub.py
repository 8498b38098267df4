"""Who is connected: player id -> the peer that carries their frames.

The engine and the matchmaker address players by id; the hub turns that into a write on the
player's current connection.  A player who is not connected simply misses the frame.  This is the
single-node `asobi.directory.Connections`: every player's connection is in this process.
"""

from __future__ import annotations

from collections.abc import Callable

from asobi.directory import Peer

__all__ = ["Hub", "Peer"]


class Hub:
    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}
        # Sees every frame addressed to a player (the console's live match inspector); None
        # unless someone is watching, so the frame path pays one attribute test.
        self.tap: Callable[[str, bytes], None] | None = None

    def attach(self, player_id: str, peer: Peer) -> Peer | None:
        """Bind the player to `peer`; returns the connection it replaces, if any."""
        previous = self._peers.get(player_id)
        self._peers[player_id] = peer
        return previous if previous is not peer else None

    def detach(self, player_id: str, peer: Peer) -> bool:
        if self._peers.get(player_id) is peer:
            del self._peers[player_id]
            return True
        return False

    def peer(self, player_id: str) -> Peer | None:
        return self._peers.get(player_id)

    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        if self.tap is not None:
            self.tap(player_id, frame)
        peer = self._peers.get(player_id)
        return peer is not None and peer.send_frame(frame, droppable=droppable)

    def __len__(self) -> int:
        return len(self._peers)
