"""Seat tokens: a short-lived proof that a player holds a seat in a match on a given node.

When a player's match runs on another node, the node they are connected to cannot seat them
itself: it sends them the match node's URL and a seat token, and they reconnect there with
`session.connect {token, seat_token}`.  The token is a JWT signed with the cluster's shared
secret (PyJWT), so the match's node checks it without asking anyone; its audience keeps it from
ever passing for a login token, and it lives only as long as a reconnect takes.
"""

from __future__ import annotations

import time

import jwt

from asobi.directory import InvalidSeat, Seat

ALGORITHM = "HS256"
AUDIENCE = "asobi-seat"
TTL_S = 30


class SeatTokens:
    def __init__(self, secret: str, ttl_s: int = TTL_S) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(
        self,
        player_id: str,
        match_id: str,
        node_id: str,
        *,
        join: bool = False,
        moving: bool = False,
    ) -> str:
        now = int(time.time())
        claims = {
            "sub": player_id,
            "match": match_id,
            "node": node_id,
            "join": join,
            "moving": moving,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + self.ttl_s,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str, player_id: str, node_id: str) -> Seat:
        """The seat, if the token is genuine, current, and for this player on this node."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                options={"require": ["sub", "match", "node", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidSeat("seat token has expired: queue or join again") from None
        except jwt.PyJWTError:
            raise InvalidSeat("seat token is not valid") from None
        if claims.get("sub") != player_id:
            raise InvalidSeat("seat token is for another player")
        if claims.get("node") != node_id:
            raise InvalidSeat("seat token is for another node")
        return Seat(
            player_id,
            str(claims["match"]),
            node_id,
            bool(claims.get("join")),
            bool(claims.get("moving")),
        )


__all__ = ["InvalidSeat", "Seat", "SeatTokens"]
