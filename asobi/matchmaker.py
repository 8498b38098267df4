"""First-come-first-served matchmaking per mode.

Tickets wait in one queue per mode; as soon as `match_size` players of a mode are waiting the
oldest ones are matched and a match starts.  A player holds at most one ticket per mode, and a
ticket that waits longer than its time to live expires (`matchmaker.expired`), so a queue never
fills with players who stopped waiting.  The matchmaker knows nothing about sockets: it tells
players what happened through the same `Outbox` the engine uses.  It is only the ticket queue:
where a formed group plays is the `Placement`'s answer (a seat reservation on a node), so a
cluster can keep this queue and place matches elsewhere.

Any valid mode name that a script serves (with a `match.lua`, every name) gets its own queue, and
every tick walks all queues: a queue is freed as soon as it is empty, the number of live queues
is capped (`max_queues`) and so is the number of tickets one player holds
(`max_tickets_per_player`), so that names made up by clients cannot pile up and slow every tick.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from asobi.directory import Outbox, Placement, PlacementFailed
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


class TicketQueue(Protocol):
    """What sessions, the server and the console ask of the matchmaker: this module's
    `Matchmaker` on one node, `asobi.cluster.matchmaker.RedisMatchmaker` in a cluster."""

    def add(self, player_id: str, mode: str) -> tuple[Ticket, bool]: ...

    def remove(self, player_id: str, ticket_id: str | None = None) -> list[Ticket]: ...

    def process(self) -> None: ...

    def expire(self, now: float | None = None) -> list[Ticket]: ...

    def queued(self, mode: str) -> int: ...

    def __len__(self) -> int: ...

    def live_queues(self) -> int: ...

    def queues(self) -> list[tuple[str, int, float]]: ...


class UnknownMode(Exception):
    pass


class QueueUnavailable(Exception):
    """The queue cannot take tickets right now (a cluster's Redis is unreachable); the message
    says so.  The single-node queue never raises it."""


class QueueLimit(Exception):
    """A new ticket would pass a cap; `per_player` says which one."""

    def __init__(self, message: str, *, per_player: bool) -> None:
        super().__init__(message)
        self.per_player = per_player


def held_or_admit(
    held: Sequence[Ticket],
    player_id: str,
    mode: str,
    *,
    queued_modes: Collection[str],
    max_tickets: int,
    max_queues: int,
    where: str,
) -> Ticket | None:
    """The ticket the player already holds for `mode`, else None when a new one is within the
    caps (per player, and modes with players waiting, counted by `queued_modes`); raises
    `QueueLimit` otherwise.  Shared by the single-node queue and the cluster's."""
    for ticket in held:
        if ticket.mode == mode:
            return ticket
    if len(held) >= max_tickets:
        raise QueueLimit(
            f"you already hold {len(held)} tickets, the most one player may hold",
            per_player=True,
        )
    if mode not in queued_modes and len(queued_modes) >= max_queues:
        log.warning("matchmaker_queues_full", player_id=player_id, mode=mode)
        raise QueueLimit(
            f"{len(queued_modes)} modes already have players waiting, the most {where} keeps; "
            "try a mode others are queued for",
            per_player=False,
        )
    return None


class Matchmaker:
    def __init__(
        self,
        registry: ScriptRegistry,
        placement: Placement,
        outbox: Outbox,
        *,
        ticket_ttl_s: float = 60.0,
        max_queues: int = 1000,
        max_tickets_per_player: int = 16,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.placement = placement
        self.outbox = outbox
        self.ticket_ttl_s = ticket_ttl_s
        self.max_queues = max_queues
        self.max_tickets_per_player = max_tickets_per_player
        self.clock = clock
        self.on_error = on_error
        self._queues: dict[str, OrderedDict[str, Ticket]] = {}
        self._by_player: dict[str, list[Ticket]] = {}

    def add(self, player_id: str, mode: str) -> tuple[Ticket, bool]:
        """Queue the player; returns the ticket and whether it already existed."""
        if self.registry.resolve_mode(mode) is None:
            raise UnknownMode(mode)
        held = self._by_player.get(player_id, ())
        existing = held_or_admit(
            held,
            player_id,
            mode,
            queued_modes=self._queues,
            max_tickets=self.max_tickets_per_player,
            max_queues=self.max_queues,
            where="this server",
        )
        if existing is not None:
            return existing, True
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
            if not queue:
                del self._queues[ticket.mode]
        tickets = self._by_player.get(ticket.player_id)
        if tickets is not None:
            tickets[:] = [t for t in tickets if t.ticket_id != ticket.ticket_id]
            if not tickets:
                del self._by_player[ticket.player_id]

    def queued(self, mode: str) -> int:
        return len(self._queues.get(mode, ()))

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def live_queues(self) -> int:
        """Modes with at least one waiting ticket (an empty queue is freed at once)."""
        return len(self._queues)

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
        for queue in list(self._queues.values()):
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
        players = [t.player_id for t in tickets]
        try:
            seats = self.placement.reserve(mode, players)
        except PlacementFailed as exc:
            frame = encode_error(ErrorCode.MATCH_FAILED, f"match could not start: {exc}")
            for pid in players:
                self._error()
                self.outbox.send(pid, frame)
            return
        match = seats.match
        frame = encode(
            "matchmaker.matched",
            {"match_id": match.match_id, "mode": mode, "players": match.players},
        )
        for pid in match.players:
            self.outbox.send(pid, frame)
        self.placement.open(seats)
        for pid, reason in seats.refused.items():
            self._error()
            self.outbox.send(
                pid, encode_error(ErrorCode.MATCH_FAILED, f"the match refused you: {reason}")
            )
        log.info(
            "matched", match_id=match.match_id, mode=mode, players=match.players, node=seats.node
        )

    def _error(self) -> None:
        if self.on_error is not None:
            self.on_error(str(ErrorCode.MATCH_FAILED))
