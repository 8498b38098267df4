"""First-come-first-served matchmaking per mode.

Tickets wait in one queue per mode; as soon as `match_size` players of a mode are waiting the
oldest ones are matched and a match starts.  The matchmaker knows nothing about sockets: it tells
players what happened through the same `Outbox` the engine uses.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

import structlog

from asobi.engine import Engine, MatchStartError, Outbox
from asobi.protocol import ErrorCode, encode, encode_error
from asobi.scripts import ScriptRegistry

log = structlog.get_logger("asobi.matchmaker")


@dataclass(frozen=True, slots=True)
class Ticket:
    ticket_id: str
    player_id: str
    mode: str


class UnknownMode(Exception):
    pass


class Matchmaker:
    def __init__(self, registry: ScriptRegistry, engine: Engine, outbox: Outbox) -> None:
        self.registry = registry
        self.engine = engine
        self.outbox = outbox
        self._queues: dict[str, OrderedDict[str, Ticket]] = {}
        self._by_player: dict[str, list[Ticket]] = {}

    def add(self, player_id: str, mode: str) -> tuple[Ticket, bool]:
        """Queue the player; returns the ticket and whether it already existed."""
        if self.registry.resolve_mode(mode) is None:
            raise UnknownMode(mode)
        for ticket in self._by_player.get(player_id, ()):
            if ticket.mode == mode:
                return ticket, True
        ticket = Ticket(uuid.uuid4().hex, player_id, mode)
        self._queues.setdefault(mode, OrderedDict())[ticket.ticket_id] = ticket
        self._by_player.setdefault(player_id, []).append(ticket)
        log.info("ticket_queued", ticket_id=ticket.ticket_id, player_id=player_id, mode=mode)
        return ticket, False

    def remove(self, player_id: str, ticket_id: str | None = None) -> list[Ticket]:
        """Drop one ticket (or all of a player's tickets when `ticket_id` is None)."""
        removed = []
        for ticket in list(self._by_player.get(player_id, ())):
            if ticket_id is None or ticket.ticket_id == ticket_id:
                self._forget(ticket)
                removed.append(ticket)
        return removed

    def _forget(self, ticket: Ticket) -> None:
        queue = self._queues.get(ticket.mode)
        if queue is not None:
            queue.pop(ticket.ticket_id, None)
        tickets = self._by_player.get(ticket.player_id)
        if tickets is not None:
            tickets[:] = [t for t in tickets if t.ticket_id != ticket.ticket_id]
            if not tickets:
                del self._by_player[ticket.player_id]

    def queued(self, mode: str) -> int:
        return len(self._queues.get(mode, ()))

    def process(self) -> None:
        """Start a match for every mode with enough waiting players."""
        for mode, queue in list(self._queues.items()):
            while queue:
                script = self.registry.resolve_mode(mode)
                if script is None:
                    break
                size = script.meta.match_size
                if len(queue) < size:
                    break
                tickets = [queue[k] for k in list(queue)[:size]]
                for ticket in tickets:
                    self.remove(ticket.player_id)
                self._start(mode, tickets)

    def _start(self, mode: str, tickets: list[Ticket]) -> None:
        script = self.registry.resolve_mode(mode)
        players = [t.player_id for t in tickets]
        if script is None:
            return
        try:
            match = self.engine.start_match(mode, script, players)
        except MatchStartError as exc:
            frame = encode_error(ErrorCode.MATCH_FAILED, f"match could not start: {exc}")
            for pid in players:
                self.outbox.send(pid, frame)
            return
        frame = encode(
            "matchmaker.matched", {"match_id": match.id, "mode": mode, "players": match.players}
        )
        for pid in match.players:
            self.outbox.send(pid, frame)
        match.release_held()
        refused = [p for p in players if p not in match.players]
        for pid in refused:
            reason = match.refused.get(pid, "refused")
            self.outbox.send(
                pid, encode_error(ErrorCode.MATCH_FAILED, f"the match refused you: {reason}")
            )
        log.info("matched", match_id=match.id, mode=mode, players=match.players)
