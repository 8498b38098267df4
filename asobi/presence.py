"""Seats kept for dropped players, and the resume tokens that reclaim them.

When a player's connection drops mid-match they keep their seat for a grace period: `leave` is
not called yet and the match runs on.  A new connection that presents the player's current
resume token within the grace period takes the seat back; after it, the player leaves for real.

A resume token is an opaque random value (not a signed one): the seat it reclaims lives only in
this process's memory, so a server-side value costs nothing extra, can be rotated on every
`session.connect` (a token is good for one resumption) and is forgotten with the seat.  It binds
the new socket to the session that held the seat; the long-lived player token alone only proves
who the player is.  This is the single-node `asobi.directory.Seats`.
"""

from __future__ import annotations

import secrets

from asobi.directory import Elsewhere, InvalidSeat, Seat


class Presence:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._tokens: dict[str, str] = {}
        self._seat_deadlines: dict[str, float] = {}

    def issue(self, player_id: str) -> str:
        """A fresh resume token for the player's new session (the previous one stops working)."""
        token = self.new_token()
        self._tokens[player_id] = token
        return token

    def new_token(self) -> str:
        return secrets.token_urlsafe(24)

    def token_of(self, player_id: str) -> str | None:
        """The player's current resume token (a match's snapshot keeps it with the seat)."""
        return self._tokens.get(player_id)

    def restore(self, player_id: str, token: str | None, now: float) -> bool:
        """A seat of a match restored after a restart: held for the grace period, reclaimed by
        the resume token the player held before (`asobi.restore`).  False without a grace
        period or a token: the seat cannot be reclaimed."""
        if token is None:
            return False
        self._tokens[player_id] = token
        return self.hold(player_id, now)

    def check(self, player_id: str, token: str | None) -> bool:
        current = self._tokens.get(player_id)
        return token is not None and current is not None and secrets.compare_digest(current, token)

    def hold(self, player_id: str, now: float) -> bool:
        """The player's socket dropped: keep their seat until `now + grace`.  False when there is
        no grace period (the caller should remove them right away)."""
        if self.grace_s <= 0:
            self._tokens.pop(player_id, None)
            return False
        self._seat_deadlines[player_id] = now + self.grace_s
        return True

    def reclaim(self, player_id: str) -> bool:
        """A new connection arrived: the hold ends; True when there was one."""
        return self._seat_deadlines.pop(player_id, None) is not None

    def forget(self, player_id: str) -> None:
        self._seat_deadlines.pop(player_id, None)
        self._tokens.pop(player_id, None)

    def is_held(self, player_id: str) -> bool:
        return player_id in self._seat_deadlines

    def expire(self, now: float) -> list[str]:
        """Players whose grace ended, forgotten here; the caller makes them leave their match."""
        gone = [pid for pid, deadline in self._seat_deadlines.items() if deadline <= now]
        for pid in gone:
            self.forget(pid)
        return gone

    def locate(self, resume_token: str | None) -> Elsewhere | None:
        """Every resume token of a single node is this node's."""
        return None

    def admit(self, player_id: str, seat_token: str) -> Seat:
        """Seat tokens send players between the nodes of a cluster; alone, none is genuine."""
        raise InvalidSeat("this server runs alone and grants no seats by token")

    def __len__(self) -> int:
        return len(self._seat_deadlines)
