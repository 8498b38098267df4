"""Draining a node: every match it runs moves to another node, with no tick lost or repeated.

`asobi drain` (the admin frame `admin.drain`) and SIGTERM on a node of a cluster run `drain`:

1. Between two ticks, every match is snapshotted (`Snapshotter.take`) and stops ticking here.
   Its snapshot and the store's queued writes are written out (the journal, then the database,
   so the marks of its last units are in before another node commits any).
2. The matches are dealt to the other live nodes, least loaded first (as the failover deals a
   dead node's), and each node is asked to `drain.take` its share: it claims each match in the
   journal (`RedisJournal.claim`, atomic) and restores it through the single node's restore
   without starting its clock.
3. Each player connected here is sent `match.moved {match_id, node_id, node_url, seat_token}` and
   reconnects there with the seat token; the taking node starts the match's clock once every
   player sent over has arrived (or after `arrival_s`), so the first tick there is the snapshot's
   tick plus one and the players miss none of it.  Players whose seat was held (disconnected) keep
   their resume token, which now leads to the new node (`seats.follow`).

A match no node took (the node did not answer, refused it) is restored here again from the same
snapshot, unless the journal says another node claimed it meanwhile (then that node runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from asobi.cluster.failover import Failover, deal
from asobi.cluster.journal import RedisJournal
from asobi.cluster.link import Unavailable
from asobi.journal import Snapshot
from asobi.match import Match
from asobi.protocol import encode

if TYPE_CHECKING:
    from asobi.app import App
    from asobi.cluster.node import Cluster

log = structlog.get_logger("asobi.cluster.drain")

TAKE = "drain.take"
REQUEST_S = 10.0
FLUSH_S = 5.0
BATCH = 10  # matches per `drain.take` request


@dataclass
class Moving:
    """A match stopped here for its move: the match, and the players connected here."""

    match: Match
    connected: list[str]


@dataclass
class DrainResult:
    moved: dict[str, str] = field(default_factory=dict)  # match id -> node
    kept: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "moved": len(self.moved),
            "kept": len(self.kept),
            "nodes": sorted(set(self.moved.values())),
            "elapsed_ms": round(self.elapsed_ms, 1),
            "reason": self.reason,
        }


class Drainer:
    def __init__(
        self,
        app: App,
        cluster: Cluster,
        journal: RedisJournal,
        failover: Failover,
        *,
        arrival_s: float = 2.0,
    ) -> None:
        self.app = app
        self.cluster = cluster
        self.journal = journal
        self.failover = failover
        self.node_id = cluster.node_id
        self.arrival_s = arrival_s
        self.draining = False
        self._waits: set[asyncio.Task[None]] = set()
        cluster.link.on(TAKE, self._on_take)

    async def stop(self) -> None:
        for task in list(self._waits):
            task.cancel()

    # -- the draining node ------------------------------------------------------------------------
    async def drain(self) -> DrainResult:
        """Move every match of this node to the others."""
        started = time.perf_counter()
        result = DrainResult()
        engine = self.app.engine
        targets = [n for n in self.failover.order() if n != self.node_id]
        snapshots = engine.snapshots
        if not targets or snapshots is None or self.draining:
            result.reason = (
                "already draining"
                if self.draining
                else "no other live node"
                if not targets
                else "the journal is off (ASOBI_SNAPSHOT_TICKS=-1)"
            )
            result.kept = list(engine.matches)
            log.warning("drain_refused", node=self.node_id, reason=result.reason)
            return result
        self.draining = True
        try:
            await self._drain(result, targets)
        finally:
            self.draining = False
        result.elapsed_ms = (time.perf_counter() - started) * 1000
        log.info("drain_done", node=self.node_id, **result.as_dict())
        return result

    async def _drain(self, result: DrainResult, targets: list[str]) -> None:
        engine = self.app.engine
        snapshots = engine.snapshots
        assert snapshots is not None
        moving: dict[str, Moving] = {}
        # One synchronous pass, between ticks: every match stops after the same tick it is at.
        for match in list(engine.matches.values()):
            if match.finished or snapshots.take(match) is None:
                continue  # a state that cannot be copied plays on here until the node stops
            hub = self.app.hub
            connected = [p for p in match.players if hub.peer(p) is not None]
            self.app.engine.release(match)
            moving[match.id] = Moving(match, connected)
        if not moving:
            return
        log.info("drain_started", node=self.node_id, matches=len(moving), targets=targets)
        await self._write_out()
        plan = deal(list(moving), targets)
        shares: dict[str, list[str]] = {}
        for match_id, node in plan.items():
            shares.setdefault(node, []).append(match_id)
        # In batches: the players of the first batch move while the node restores the next.
        batches = [
            (node, ids[i : i + BATCH])
            for node, ids in shares.items()
            for i in range(0, len(ids), BATCH)
        ]
        await asyncio.gather(*(self._hand(node, ids, moving, result) for node, ids in batches))
        for match_id, entry in moving.items():
            if match_id not in result.moved and await self._keep(entry):
                result.kept.append(match_id)
            entry.match.close()

    async def _write_out(self) -> None:
        """The snapshots into Redis, the matches' queued writes into the database."""
        waits = [self.journal.flush_now()]
        if self.app.store is not None:
            waits.append(self.app.store.flush())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), FLUSH_S)

    async def _hand(
        self, node: str, match_ids: list[str], moving: dict[str, Moving], result: DrainResult
    ) -> None:
        """Ask `node` to take these matches; tell the players of those it took."""
        payload = {
            "from": self.node_id,
            "matches": [[m, moving[m].connected] for m in match_ids],
        }
        try:
            reply = await self.cluster.link.request(node, TAKE, payload, timeout_s=REQUEST_S)
        except Unavailable as exc:
            log.warning("drain_node_unanswered", node=node, matches=len(match_ids), error=str(exc))
            return
        taken = reply.get("taken")
        for match_id in taken if isinstance(taken, list) else []:
            if match_id in moving and match_id not in result.moved:
                result.moved[match_id] = node
                self._tell_moved(moving[match_id], node)

    def _tell_moved(self, entry: Moving, node: str) -> None:
        url = self.cluster.nodes.url_of(node)
        seats = self.app.presence
        match = entry.match
        for pid in match.players:
            seats.forget(pid)
        for pid in entry.connected:
            token = self.cluster.seat_tokens.issue(pid, match.id, node)
            frame = encode(
                "match.moved",
                {"match_id": match.id, "node_id": node, "node_url": url, "seat_token": token},
            )
            self.app.hub.send(pid, frame)
        log.info(
            "match_moved",
            match_id=match.id,
            node=node,
            tick=match.tick_no,
            players=list(match.players),
        )

    async def _keep(self, entry: Moving) -> bool:
        """No node took the match: run it here again from the same snapshot, if it is still
        this node's in the journal."""
        match_id = entry.match.id
        try:
            snapshot = await self.journal.claim(match_id, self.node_id)
        except Unavailable:
            snapshot = None
        if snapshot is None:
            log.warning("drain_match_lost", match_id=match_id, node=self.node_id)
            return False
        if self.failover.restore(snapshot, None, self.node_id, notify=False) is None:
            return False
        for pid in entry.connected:
            # Still connected here: their seat is theirs, not held for a reconnect.
            self.app.presence.reclaim(pid)
            self.app.engine.resync(pid)
        log.info("drain_match_kept", match_id=match_id, tick=snapshot.tick)
        return True

    # -- the taking node --------------------------------------------------------------------------
    async def _on_take(self, message: dict[str, Any]) -> None:
        giver = str(message.get("from"))
        entries = message.get("matches")
        arriving: dict[str, list[str]] = {}
        for entry in entries if isinstance(entries, list) else []:
            with contextlib.suppress(IndexError, TypeError):
                arriving[str(entry[0])] = [str(p) for p in entry[1]]
        claimed = await self.journal.claim_many(list(arriving), giver)
        taken: list[Snapshot] = []
        waiting: list[tuple[Match, list[str]]] = []
        for match_id, snapshot in claimed.items():
            match = self.failover.restore(snapshot, None, giver, schedule=False, notify=False)
            if match is None:
                continue
            taken.append(snapshot)
            waiting.append((match, arriving[match_id]))
            log.info("match_taken", match_id=match_id, from_node=giver, tick=snapshot.tick)
        await self.cluster.link.reply(message, {"taken": [s.match_id for s in taken]})
        if waiting:
            task = asyncio.get_running_loop().create_task(self._start_when_arrived(waiting))
            self._waits.add(task)
            task.add_done_callback(self._waits.discard)
        await self.failover.announce(taken)

    async def _start_when_arrived(self, waiting: list[tuple[Match, list[str]]]) -> None:
        """Start each match's clock once its players sent over are connected here (or after
        `arrival_s`): they see its next tick, not the ones they were reconnecting through."""
        engine, hub = self.app.engine, self.app.hub
        deadline = time.monotonic() + self.arrival_s
        while waiting:
            late = time.monotonic() >= deadline
            still = []
            for match, players in waiting:
                if match.finished:
                    continue
                if late or all(hub.peer(p) is not None for p in players if p in match.players):
                    engine.adopt(match)
                    if late:
                        log.info("match_started_without_players", match_id=match.id)
                else:
                    still.append((match, players))
            waiting = still
            if waiting:
                await asyncio.sleep(0.005)
