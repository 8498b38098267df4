"""First-come-first-served matchmaking per mode.

Tickets wait in one queue per mode; as soon as `match_size` players of a mode are waiting the
oldest ones are matched and a match starts.  A player holds at most one ticket per mode, and a
ticket that waits longer than its time to live expires (`matchmaker.expired`), so a queue never
fills with players who stopped waiting.  The matchmaker knows nothing about sockets: it tells
players what happened through the same `Outbox` the engine uses.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from asobi.engine import Engine, Outbox
from asobi.match import MatchStartError
from asobi.protocol import ErrorCode, encode, encode_error
from asobi.scripts import ScriptRegistry

log = structlog.get_logger("asobi.matchmaker")


@dataclass(frozen=True, slots=True)
class Ticket:
    ticket_id: str
    player_id: str
    mode: str
    expires_at: float = float("inf")
    queued_at: float = 0.0


class UnknownMode(Exception):
    pass


class Matchmaker:
    def __init__(
        self,
        registry: ScriptRegistry,
        engine: Engine,
        outbox: Outbox,
        *,
        ticket_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.outbox = outbox
        self.ticket_ttl_s = ticket_ttl_s
        self.clock = clock
        self.on_error = on_error
        self._queues: dict[str, OrderedDict[str, Ticket]] = {}
        self._by_player: dict[str, list[Ticket]] = {}

    def add(self, player_id: str, mode: str) -> tuple[Ticket, bool]:
        """Queue the player; returns the ticket and whether it already existed."""
        if self.registry.resolve_mode(mode) is None:
            raise UnknownMode(mode)
        for ticket in self._by_player.get(player_id, ()):
            if ticket.mode == mode:
                return ticket, True
        expires = self.clock() + self.ticket_ttl_s if self.ticket_ttl_s > 0 else float("inf")
        ticket = Ticket(uuid.uuid4().hex, player_id, mode, expires, self.clock())
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

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queues(self) -> list[tuple[str, int, float]]:
        """(mode, depth, seconds the oldest ticket has waited) for every non-empty queue."""
        now = self.clock()
        return [
            (mode, len(queue), now - next(iter(queue.values())).queued_at)
            for mode, queue in sorted(self._queues.items())
            if queue
        ]

    def expire(self, now: float | None = None) -> list[Ticket]:
        """Drop tickets past their time to live and tell their players."""
        now = self.clock() if now is None else now
        expired = []
        for queue in self._queues.values():
            # One TTL for all tickets: queue order is expiry order, so stop at the first live one.
            while queue:
                ticket = next(iter(queue.values()))
                if ticket.expires_at > now:
                    break
                self._forget(ticket)
                expired.append(ticket)
        for ticket in expired:
            self.outbox.send(
                ticket.player_id,
                encode("matchmaker.expired", {"ticket_id": ticket.ticket_id, "mode": ticket.mode}),
            )
            log.info(
                "ticket_expired",
                ticket_id=ticket.ticket_id,
                player_id=ticket.player_id,
                mode=ticket.mode,
            )
        return expired

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
                self._error()
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
            self._error()
            reason = match.refused.get(pid, "refused")
            self.outbox.send(
                pid, encode_error(ErrorCode.MATCH_FAILED, f"the match refused you: {reason}")
            )
        log.info("matched", match_id=match.id, mode=mode, players=match.players)

    def _error(self) -> None:
        if self.on_error is not None:
            self.on_error(str(ErrorCode.MATCH_FAILED))
