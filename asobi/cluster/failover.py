"""A dead node's matches start again on the live ones, from their latest snapshots.

Every node hears that a node is gone (`NodeDirectory.on_gone`, once its heartbeat expired, and
not during the TTL after a Redis reset, when a missing record proves nothing).  Each then reads
the dead node's matches from the journal (`asobi.cluster.journal`) and plans who adopts which:
the live nodes ordered by load (`NodeInfo.load`, as placement's `least_loaded`), the matches dealt
round robin, so the least loaded node takes the first and a big loss is spread.  Each node adopts
its share at once; after `sweep_s` every node adopts whatever is still the dead node's (a node
that saw another plan, or died as well).  Adopting is `RedisJournal.claim` with `only_dead`,
atomic in Redis: two processes never both win a match, and none takes one from a live process.

A node killed and restarted at once under the same id is a new process (a new incarnation, see
`asobi.cluster.nodes`): once its first heartbeat names it, it takes its old matches back by the
same claim (`take_back`), racing any node that saw the old process go; each match goes to
whichever claims first.  A process that finds a match it runs claimed by another (its journal
write is fenced: it lost its heartbeat for longer than the TTL, and the others adopted its
matches) stops its copy and sends its players to the claimer with `match.moved` (`lost`).

The match then restarts through the single node's restore (`asobi.restore.restore_match`): the
same tick, random generator and seats, `lost_ticks` from the marks in the shared database, and
the re-run ticks' writes skipped.  The adopter tells every node which resume tokens now lead to
it (`seats.follow` on the bus): a player reconnecting anywhere with the token they held is sent
to the adopter (`session.redirect`), which takes them back into the match and sends
`match.restored`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import structlog

from asobi.cluster.journal import RedisJournal, node_key
from asobi.cluster.link import Unavailable
from asobi.cluster.seats import ClusterSeats
from asobi.journal import Snapshot
from asobi.match import Match
from asobi.protocol import encode
from asobi.restore import RestoreRefused, restore_match

if TYPE_CHECKING:
    from asobi.app import App
    from asobi.cluster.node import Cluster

log = structlog.get_logger("asobi.cluster.failover")

FOLLOW = "seats.follow"


def deal(match_ids: list[str], nodes: list[str]) -> dict[str, str]:
    """Match id -> the node that adopts it: `nodes` least loaded first, dealt round robin."""
    if not nodes:
        return {}
    return {match_id: nodes[i % len(nodes)] for i, match_id in enumerate(sorted(match_ids))}


class Failover:
    def __init__(
        self,
        app: App,
        cluster: Cluster,
        journal: RedisJournal,
        seats: ClusterSeats,
        *,
        sweep_s: float | None = None,
    ) -> None:
        self.app = app
        self.cluster = cluster
        self.journal = journal
        self.seats = seats
        self.node_id = cluster.node_id
        # After this, every node adopts what the plan's node did not (two heartbeats).
        self.sweep_s = sweep_s if sweep_s is not None else 2 * cluster.settings.heartbeat_s
        self._tasks: set[asyncio.Task[Any]] = set()
        cluster.nodes.on_gone(self._gone)
        cluster.link.on(FOLLOW, self._on_follow)
        journal.on_lost = self.lost

    async def start(self) -> None:
        """Take back this node id's matches left by an earlier process (before serving, as a
        single node restores its own), then adopt the matches of nodes that left no trace in
        the heartbeat index: a node that stopped cleanly while it ran alone removed its record,
        its snapshots stayed (a node restarted under another id, e.g. the default hostname-pid,
        would never see them)."""
        if not await self._take_back_once():
            self._spawn(self._take_back_until_done())
        self._spawn(self._sweep_orphans())

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def take_back(self) -> int:
        """Claim the matches an earlier process of this node id ran (it was killed, or stopped
        with no node to drain to).  Called once this process's heartbeat record is written: a
        node that saw the old process go claims by the same script and fails on any match
        claimed here, and any claimed there first is not ours any more."""
        ids = await self.journal.match_ids(self.node_id)
        adopted = await self.adopt_all(self.node_id, ids)
        if ids:
            log.info("matches_taken_back", node=self.node_id, matches=len(ids), adopted=adopted)
        return adopted

    async def _take_back_once(self) -> bool:
        try:
            await self.take_back()
        except Unavailable as exc:
            log.warning("take_back_unavailable", node=self.node_id, error=str(exc))
            return False
        return True

    async def _take_back_until_done(self) -> None:
        """Redis away at the start: nobody else will adopt this id's old matches (the id is
        alive again), so keep trying."""
        while True:
            await asyncio.sleep(self.cluster.settings.heartbeat_s)
            if await self._take_back_once():
                return

    async def _sweep_orphans(self) -> None:
        prefix = node_key("")
        try:
            keys = [k async for k in self.cluster.link.redis.scan_iter(match=prefix + "*")]
        except Exception as exc:  # Redis away: the next node_gone or start tries again
            log.warning("failover_sweep_failed", error=str(exc)[:200])
            return
        for raw in keys:
            node = (raw.decode() if isinstance(raw, bytes) else str(raw))[len(prefix) :]
            if node and node != self.node_id and not self.cluster.nodes.alive(node):
                await self.take_over(node)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _gone(self, node_id: str) -> None:
        self._spawn(self.take_over(node_id))

    def order(self) -> list[str]:
        """The live nodes, least loaded first, as of the last heartbeat: every node reads the
        same records, so every node deals the same plan."""
        ranked = sorted(self.cluster.nodes.nodes.values(), key=lambda n: (n.load(), n.node_id))
        ids = [n.node_id for n in ranked]
        if self.node_id not in ids:
            ids.append(self.node_id)
        return ids

    async def take_over(self, dead: str) -> int:
        """Adopt this node's share of `dead`'s matches, then, after `sweep_s`, any left."""
        adopted = 0
        try:
            ids = await self.journal.match_ids(dead)
            if not ids:
                return 0
            plan = deal(ids, self.order())
            mine = [m for m in ids if plan.get(m) == self.node_id]
            log.info("failover_started", node=dead, matches=len(ids), mine=len(mine))
            adopted += await self.adopt_all(dead, mine)
            await asyncio.sleep(self.sweep_s)
            adopted += await self.adopt_all(dead, await self.journal.match_ids(dead))
        except Unavailable as exc:
            log.warning("failover_unavailable", node=dead, error=str(exc))
            return adopted
        log.info("failover_done", node=dead, adopted=adopted)
        return adopted

    async def adopt_all(self, from_node: str, match_ids: list[str]) -> int:
        match_ids = [m for m in match_ids if m not in self.app.engine.matches]
        if not match_ids:
            return 0
        marks = await self.app.store.match_marks() if self.app.store is not None else {}
        # The others: taken by another process, or their owner is alive (restarted meanwhile).
        claimed = await self.journal.claim_many(match_ids, from_node, only_dead=True)
        elsewhere = [m for m in match_ids if m not in claimed]
        if elsewhere:
            log.info("matches_claimed_elsewhere", from_node=from_node, matches=elsewhere)
        adopted = []
        for match_id, snapshot in claimed.items():
            match = self.restore(snapshot, marks.get(match_id), from_node)
            if match is not None:
                adopted.append(snapshot)
                log.info(
                    "match_adopted",
                    match_id=match_id,
                    from_node=from_node,
                    node=self.node_id,
                    tick=snapshot.tick,
                    players=list(match.players),
                )
        await self.announce(adopted)
        return len(adopted)

    def restore(
        self,
        snapshot: Snapshot,
        mark: tuple[int, int] | None,
        from_node: str,
        *,
        schedule: bool = True,
        notify: bool = True,
        present: dict[str, str | None] | None = None,
    ) -> Match | None:
        """Start a claimed match here (None: it cannot be restored, and is dropped)."""
        try:
            return restore_match(
                self.app, snapshot, mark, schedule=schedule, notify=notify, present=present
            )
        except (RestoreRefused, ValueError) as exc:
            log.error(
                "match_restore_refused",
                match_id=snapshot.match_id,
                mode=snapshot.mode,
                script=snapshot.script,
                tick=snapshot.tick,
                from_node=from_node,
                error=str(exc),
            )
            self.journal.forget(snapshot.match_id)
            return None

    async def announce(self, snapshots: list[Snapshot]) -> None:
        """Tell every node that these snapshots' resume tokens lead here now."""
        tokens = [token for s in snapshots for _, token in s.seats if token]
        if not tokens:
            return
        self.seats.follow(self.node_id, tokens)
        try:
            await self.cluster.link.broadcast(FOLLOW, {"node": self.node_id, "tokens": tokens})
        except Unavailable as exc:
            log.warning("seats_follow_unsent", matches=len(snapshots), error=str(exc))

    def lost(self, match_id: str, node: str) -> None:
        """Another process claimed `match_id` while this one ran it: stop it here, and send its
        connected players to `node` as a drain does (their resume tokens follow the claimer)."""
        engine = self.app.engine
        match = engine.matches.get(match_id)
        if match is None or match.finished:
            return
        connected = [p for p in match.players if self.app.hub.peer(p) is not None]
        engine.release(match)
        url = self.cluster.nodes.url_of(node)
        for pid in match.players:
            self.seats.forget(pid)
        for pid in connected if url is not None else []:
            token = self.cluster.seat_tokens.issue(pid, match_id, node)
            frame = encode(
                "match.moved",
                {"match_id": match_id, "node_id": node, "node_url": url, "seat_token": token},
            )
            self.app.hub.send(pid, frame)
        log.error(
            "match_lost",
            match_id=match_id,
            node=self.node_id,
            to_node=node,
            tick=match.tick_no,
            players=list(match.players),
        )
        match.close()

    def _on_follow(self, message: dict[str, Any]) -> None:
        node, tokens = message.get("node"), message.get("tokens")
        if isinstance(node, str) and isinstance(tokens, list):
            self.seats.follow(node, [t for t in tokens if isinstance(t, str)], time.monotonic())
