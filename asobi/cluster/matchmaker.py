"""One matchmaker for the whole cluster: the `Matchmaker`'s calls, with the queue in Redis.

Sessions and the server call it exactly as they call the single-node `Matchmaker`, and as
synchronously: `add` checks the request and records the ticket here (so a refusal, a duplicate
and the per-player cap are answered at once, and `add` answers `QueueUnavailable` at once while
Redis is known to be down); the Redis work runs in this node's background tasks.  Writes go
through one worker in the order they were asked for (a `remove` right after an `add` never
overtakes it); a matchmaking loop forms groups after each add (the node whose write completes
a group is the one that sees it complete), hands back expired leases, and places what it formed
(`ClusterPlacement`).  Its timed passes (every `interval_s`) are only a backstop, for groups
handed back and tickets skipped while their node's heartbeat was missing: an idle cluster costs
Redis a few commands per node every two seconds, not a poll per tick.

What this node keeps is only a record of its own players' tickets; the queue itself, its depth
and its order live in Redis (`forming.lua`).  When Redis becomes unreachable the queued tickets
cannot be trusted any more (a restarted Redis has forgotten them): their players are told
(`error {code: "unavailable"}`) and queue again once it is back; before its next write this
node clears whatever of its tickets Redis may still hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from asobi.cluster.forming import Forming, QueueDepth
from asobi.cluster.link import Unavailable
from asobi.cluster.placement import ClusterPlacement
from asobi.matchmaker import QueueUnavailable, Ticket, UnknownMode, held_or_admit
from asobi.protocol import ErrorCode, encode, encode_error

if TYPE_CHECKING:
    from asobi.app import App
    from asobi.cluster.node import Cluster

log = structlog.get_logger("asobi.cluster.matchmaker")

Op = Callable[[], Awaitable[None]]
EXPIRE_EVERY_S = 0.5


class RedisMatchmaker:
    def __init__(
        self,
        app: App,
        cluster: Cluster,
        *,
        interval_s: float = 2.0,
        reclaim_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings = app.settings
        self.app = app
        self.registry = app.registry
        self.outbox = app.hub
        self.link = cluster.link
        self.node_id = cluster.node_id
        self.ticket_ttl_s = settings.ticket_ttl_s
        self.max_queues = settings.max_queues
        self.max_tickets_per_player = settings.max_tickets_per_player
        self.interval_s = interval_s
        self.reclaim_s = reclaim_s
        self.heartbeat_s = settings.heartbeat_s
        self.clock = clock
        self.forming = Forming(cluster.link)
        self.placement = ClusterPlacement(app, cluster, self.forming, on_matched=self._used)
        self._tickets: dict[str, Ticket] = {}
        self._by_player: dict[str, list[Ticket]] = {}
        # The cluster's queues as of this node's last matchmaking pass.
        self._depths: dict[str, QueueDepth] = {}
        self._ops: asyncio.Queue[Op] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._expiring = False
        self._next_expiry = 0.0
        # Redis was unreachable since this node last cleared its tickets there.
        self._interrupted = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._runners: list[asyncio.Task[None]] = []
        cluster.nodes.on_gone(self._node_gone)

    # -- the `Matchmaker` calls ---------------------------------------------------------------
    def add(self, player_id: str, mode: str) -> tuple[Ticket, bool]:
        """Queue the player cluster-wide; returns the ticket and whether it already existed."""
        if self.registry.resolve_mode(mode) is None:
            raise UnknownMode(mode)
        try:
            self.link.require_up("queue for a match")
        except Unavailable as exc:
            raise QueueUnavailable(str(exc)) from None
        existing = held_or_admit(
            self._by_player.get(player_id, ()),
            player_id,
            mode,
            queued_modes=self._depths,
            max_tickets=self.max_tickets_per_player,
            max_queues=self.max_queues,
            where="this cluster",
        )
        if existing is not None:
            return existing, True
        now = self.clock()
        expires = now + self.ticket_ttl_s if self.ticket_ttl_s > 0 else float("inf")
        ticket = Ticket(uuid.uuid4().hex, player_id, mode, expires, now)
        self._tickets[ticket.ticket_id] = ticket
        self._by_player.setdefault(player_id, []).append(ticket)
        log.info(
            "ticket_queued",
            ticket_id=ticket.ticket_id,
            player_id=player_id,
            mode=mode,
            node=self.node_id,
        )

        async def write() -> None:
            await self.forming.add(
                ticket.ticket_id, player_id, mode, self.node_id, self.ticket_ttl_s
            )
            self._wake.set()

        self._ops.put_nowait(write)
        return ticket, False

    def remove(self, player_id: str, ticket_id: str | None = None) -> list[Ticket]:
        """Drop one ticket (or all the player's tickets).  A ticket whose group is already being
        placed is not taken out of its match."""
        removed = [
            t
            for t in list(self._by_player.get(player_id, ()))
            if ticket_id is None or t.ticket_id == ticket_id
        ]
        for ticket in removed:
            self._forget(ticket.ticket_id)
        # A player's tickets are written by the node they queued on, and taken out by it when
        # their session there ends; a session here with none of them has nothing to clear, but
        # a named ticket may have been queued elsewhere (`matchmaker.remove` is cluster-wide).
        if removed or ticket_id is not None:

            async def write() -> None:
                await self.forming.remove(player_id, ticket_id)

            self._ops.put_nowait(write)
        return removed

    def process(self) -> None:
        """Run a matchmaking pass soon (groups form in the background)."""
        self._wake.set()

    def expire(self, now: float | None = None) -> list[Ticket]:
        """Expire this node's tickets past their time to live (in Redis, against the
        forming of groups); their players are told when Redis answers."""
        now = self.clock() if now is None else now
        # Only this node's players' tickets are its to expire, and it has a record of each.
        if self._tickets and not self._expiring and self.link.up and now >= self._next_expiry:
            self._expiring = True
            self._next_expiry = now + EXPIRE_EVERY_S
            self._ops.put_nowait(self._expire)
        return []

    def queued(self, mode: str) -> int:
        depth = self._depths.get(mode)
        return depth.depth if depth is not None else 0

    def __len__(self) -> int:
        return sum(d.depth for d in self._depths.values())

    def live_queues(self) -> int:
        return len(self._depths)

    def queues(self) -> list[tuple[str, int, float]]:
        """(mode, depth, seconds the oldest ticket has waited) for the cluster's queues."""
        now_ms = time.time() * 1000
        return [
            (mode, d.depth, max(now_ms - d.oldest_ms, 0.0) / 1000 if d.oldest_ms else 0.0)
            for mode, d in sorted(self._depths.items())
        ]

    # -- local records ------------------------------------------------------------------------
    def _forget(self, ticket_id: str) -> Ticket | None:
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is None:
            return None
        tickets = self._by_player.get(ticket.player_id)
        if tickets is not None:
            tickets[:] = [t for t in tickets if t.ticket_id != ticket_id]
            if not tickets:
                del self._by_player[ticket.player_id]
        return ticket

    def _used(self, ticket_ids: list[str]) -> None:
        for ticket_id in ticket_ids:
            self._forget(ticket_id)

    def _interrupt(self) -> None:
        """Redis is unreachable: the tickets queued here are lost; tell their players."""
        if self._interrupted:
            return
        self._interrupted = True
        tickets = list(self._tickets.values())
        self._tickets.clear()
        self._by_player.clear()
        self._depths.clear()
        frame = encode_error(
            ErrorCode.UNAVAILABLE,
            "matchmaking stopped: the cluster's Redis is unreachable; queue again shortly",
        )
        for ticket in tickets:
            self.outbox.send(ticket.player_id, frame)
        log.warning("tickets_interrupted", node=self.node_id, tickets=len(tickets))

    # -- background work ----------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(Unavailable):
            # A node restarted under the same id: its previous life's tickets have no sockets.
            await self.forming.drop_node(self.node_id)
        self._runners = [
            asyncio.create_task(self._work(), name="matchmaker-writes"),
            asyncio.create_task(self._loop(), name="matchmaker-loop"),
        ]

    async def stop(self) -> None:
        for task in [*self._runners, *self._tasks]:
            task.cancel()
        for task in [*self._runners, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Unavailable):
            await self.forming.drop_node(self.node_id)

    async def _work(self) -> None:
        """Carry out the writes in the order they were asked for."""
        while True:
            op = await self._ops.get()
            try:
                if self._interrupted:
                    await self.forming.drop_node(self.node_id)
                    self._interrupted = False
                    log.info("matchmaker_recovered", node=self.node_id)
                await op()
            except Unavailable:
                self._interrupt()
            except Exception:
                log.exception("matchmaker_write_failed", node=self.node_id)

    async def _expire(self) -> None:
        try:
            expired = await self.forming.expire(self.node_id)
        finally:
            self._expiring = False
        for t in expired:
            self._forget(t.id)
            self.outbox.send(
                t.player, encode("matchmaker.expired", {"ticket_id": t.id, "mode": t.mode})
            )
            log.info("ticket_expired", ticket_id=t.id, player_id=t.player, mode=t.mode)

    async def _loop(self) -> None:
        last_reclaim = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            if not self.link.up:
                self._interrupt()
                continue
            if self._interrupted and self._ops.empty():
                self._ops.put_nowait(_nothing)  # the writer clears this node's tickets first
            try:
                now = self.clock()
                if now - last_reclaim >= self.reclaim_s:
                    last_reclaim = now
                    await self._reclaim()
                await self._form()
            except Unavailable:
                self._interrupt()
            except Exception:
                log.exception("matchmaking_pass_failed", node=self.node_id)

    async def _form(self) -> None:
        depths: dict[str, QueueDepth] = {}
        for mode in await self.forming.modes():
            script = self.registry.resolve_mode(mode)
            if script is None:
                continue  # a mode another node serves; that node forms it
            groups, depth = await self.forming.form(mode, script.meta.match_size, self.node_id)
            if depth.depth:
                depths[mode] = depth
            for group in groups:
                log.info("group_formed", group_id=group.id, mode=mode, players=group.players)
                self._spawn(self.placement.place(group))
        self._depths = depths

    async def _reclaim(self) -> None:
        for back in await self.forming.reclaim():
            log.warning(
                "group_handed_back",
                group_id=back.id,
                former=back.former,
                claimed_by=back.claimed_by,
                back=back.back,
                dropped=back.dropped,
                node=self.node_id,
            )
            self._wake.set()
        for group_id in list(self.placement.unfinished):
            await self.forming.done(group_id)
            self.placement.unfinished.discard(group_id)

    def _node_gone(self, node_id: str) -> None:
        async def drop() -> None:
            # A node also looks gone for a beat after Redis restarted (every heartbeat key went
            # with it): drop its tickets only if it still has none after two more beats.
            await asyncio.sleep(2 * self.heartbeat_s)
            dropped = await self.forming.drop_node(node_id, only_if_dead=True)
            if dropped > 0:
                log.warning("tickets_dropped", node=node_id, tickets=dropped, by=self.node_id)

        self._spawn(drop())

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Unavailable:
                self._interrupt()
            except Exception:
                log.exception("matchmaker_task_failed", node=self.node_id)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _nothing() -> None:
    return None
