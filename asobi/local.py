"""The single-node implementations of `asobi.directory`: every answer comes from this process.

`App.create` picks these when the server runs alone.  They are thin: the engine already keeps
who plays where, so the router, the listing and the placement only translate between the
interfaces' plain data and the engine's `Match` objects, which never leave this module.
"""

from __future__ import annotations

from typing import Any

from asobi.directory import MatchInfo, PlacementFailed, SeatReservation
from asobi.engine import Engine
from asobi.match import Match, MatchStartError
from asobi.scripts import ScriptRegistry
from asobi.state_frames import SyncChoice

NODE = "local"


def info(match: Match) -> MatchInfo:
    return MatchInfo(match.id, match.mode, list(match.players), match.script.meta.max_players)


class LocalRouter:
    """Players' matches are in this process's engine: inputs, leaves and joins are calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def match_of(self, player_id: str) -> MatchInfo | None:
        match = self.engine.match_of(player_id)
        return info(match) if match is not None else None

    def submit_input(self, player_id: str, payload: Any) -> bool:
        return self.engine.submit_input(player_id, payload)

    def leave(self, player_id: str) -> MatchInfo | None:
        match = self.engine.remove_player(player_id)
        return info(match) if match is not None else None

    def join(self, player_id: str, match_id: str) -> MatchInfo:
        return info(self.engine.join_match(player_id, match_id))

    def notify_reloads(self, player_id: str, on: bool) -> None:
        if on:
            self.engine.reload_subscribers.add(player_id)
        else:
            self.engine.reload_subscribers.discard(player_id)

    def state_sync(self, player_id: str, choice: SyncChoice | None) -> None:
        if choice is None:
            self.engine.state_sync.pop(player_id, None)
        else:
            self.engine.state_sync[player_id] = choice

    def resync(self, player_id: str) -> bool:
        return self.engine.resync(player_id)


class LocalListing:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def list(self, mode: str | None = None) -> list[MatchInfo]:
        return [info(m) for m in self.engine.list_matches(mode)]


class LocalPlacement:
    """Every match starts here: reserving seats is starting the match on this node."""

    def __init__(self, registry: ScriptRegistry, engine: Engine) -> None:
        self.registry = registry
        self.engine = engine

    def reserve(self, mode: str, players: list[str]) -> SeatReservation:
        script = self.registry.resolve_mode(mode)
        if script is None:
            raise PlacementFailed(f"no script serves mode {mode!r}")
        try:
            match = self.engine.start_match(mode, script, players)
        except MatchStartError as exc:
            raise PlacementFailed(str(exc)) from None
        refused = {p: match.refused.get(p, "refused") for p in players if p not in match.players}
        return SeatReservation(NODE, info(match), refused)

    def open(self, reservation: SeatReservation) -> None:
        match = self.engine.matches.get(reservation.match.match_id)
        if match is not None:
            match.release_held()
