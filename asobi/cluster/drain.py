"""Draining a node: every match it runs moves to another node, with no tick lost or repeated
and no pause longer than the hand-over itself.

`asobi drain` (the admin frame `admin.drain`) and SIGTERM on a node of a cluster run `drain`.
The matches are dealt to the other live nodes, least loaded first (as the failover deals a dead
node's), in batches; they move *make before break*:

1. **Sent ahead.** While its matches play on here, each connected player gets
   `match.moving {match_id, node_id, node_url, seat_token}` and opens a second connection to the
   taking node with that seat token, keeping this one; the taking node answers `drain.arrive`
   once they are all connected there (or after `arrival_s`).  Reconnecting is what takes time (a
   WebSocket handshake per player), so it happens before the match stops, not during the pause;
   a batch every `WAVE_S`, and every batch's before the first cut, so the reconnections neither
   land on the taking node at once nor compete with a hand-over for its time.
2. **Cut.** Batch by batch, between two ticks the batch's matches are snapshotted
   (`Snapshotter.take`) and stop ticking here; their snapshots and the store's queued writes
   are written out (the journal, then the database, so the marks of their last units are in
   before another node commits any).
3. **Taken.** The taking node (`drain.take`) claims each match in the journal
   (`RedisJournal.claim`, atomic), restores it through the single node's restore, seats the
   players already connected there, and starts its clock when its next tick was due here: the
   first frame there is the snapshot's tick plus one, one hand-over after the last frame here.
   Players who did not come ahead (a client that does not know `match.moving`) get
   `match.moved {match_id, node_id, node_url, seat_token}` and reconnect the old way; the match
   then starts once they are there (or after `arrival_s`).  Players whose seat was held
   (disconnected) keep their resume token, which now leads to the new node (`seats.follow`).

A match no node took (the node did not answer, refused it) is restored here again from the same
snapshot, unless the journal says another node claimed it meanwhile (then that node runs it);
its players sent ahead stay here, and their second connection simply carries no match.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
ARRIVE = "drain.arrive"
REQUEST_S = 10.0
FLUSH_S = 5.0
BATCH = 10  # matches per `drain.take` request
WAVE_S = 0.025  # between two batches' `match.moving` frames, at least
AHEAD_WINDOW = 4  # batches whose players are on their way at once, at most
# How often a taking node looks whether the players sent ahead have arrived: this wait comes
# before the cut, so it lengthens the drain, not the pause the players see.
ARRIVAL_POLL_S = 0.02


@dataclass
class Moving:
    """A match stopped here for its move: the players connected here when it stopped, those of
    them already connected to the taking node, and when its next tick was due (seconds)."""

    match: Match
    connected: list[str]
    arrived: list[str]
    due_in_s: float


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
        cluster.link.on(ARRIVE, self._on_arrive)

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
        running = [m.id for m in engine.matches.values() if not m.finished]
        if not running:
            return
        log.info("drain_started", node=self.node_id, matches=len(running), targets=targets)
        shares: dict[str, list[str]] = {}
        for match_id, node in deal(running, targets).items():
            shares.setdefault(node, []).append(match_id)
        batches = {
            node: [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]
            for node, ids in shares.items()
        }
        # The players first, in waves: wave k goes to one node, wave k + 1 to the next.
        waves = [
            wave
            for group in itertools.zip_longest(
                *([(node, ids) for ids in share] for node, share in batches.items())
            )
            for wave in group
            if wave is not None
        ]
        arrived: set[str] = set()
        window = asyncio.Semaphore(AHEAD_WINDOW)
        for found in await asyncio.gather(
            *(self._ahead(k * WAVE_S, window, node, ids) for k, (node, ids) in enumerate(waves))
        ):
            arrived |= found
        # Then the matches, batch by batch on each node, the nodes side by side.
        await asyncio.gather(
            *(self._cut_and_hand(node, share, arrived, result) for node, share in batches.items())
        )

    async def _ahead(
        self, delay_s: float, window: asyncio.Semaphore, node: str, ids: list[str]
    ) -> set[str]:
        """Send one batch's players ahead; those who arrived.  A wave every `WAVE_S` at most,
        and at most `AHEAD_WINDOW` batches on their way at once, so the reconnections never
        land on the taking node (nor on anyone's network) faster than it seats them."""
        await asyncio.sleep(delay_s)
        async with window:
            told = self._send_ahead(node, ids)
            return await self._arrivals(node, told) if told else set()

    async def _cut_and_hand(
        self, node: str, batches: list[list[str]], arrived: set[str], result: DrainResult
    ) -> None:
        """Once every player sent ahead is there (so no reconnection competes with a
        hand-over for the taking node's time), cut and hand the batches over one by one."""
        for ids in batches:
            moving = self._cut(ids, arrived)
            if not moving:
                continue
            await self._write_out()
            await self._hand(node, moving, result)
            for match_id, entry in moving.items():
                if match_id not in result.moved and await self._keep(entry):
                    result.kept.append(match_id)
                entry.match.close()

    def _send_ahead(self, node: str, match_ids: list[str]) -> list[str]:
        """`match.moving` to the connected players of these matches; the players told."""
        url = self.cluster.nodes.url_of(node)
        engine, hub = self.app.engine, self.app.hub
        snapshots = engine.snapshots
        if url is None or snapshots is None:
            return []
        told = []
        for match_id in match_ids:
            match = engine.matches.get(match_id)
            if match is None or match.finished or match_id in snapshots.refused:
                continue  # ended meanwhile, or cannot be copied: it stays here
            for pid in match.players:
                if hub.peer(pid) is None:
                    continue
                token = self.cluster.seat_tokens.issue(pid, match_id, node, moving=True)
                payload = {"match_id": match_id, "node_id": node, "node_url": url}
                hub.send(pid, encode("match.moving", dict(payload, seat_token=token)))
                told.append(pid)
        return told

    async def _arrivals(self, node: str, players: list[str]) -> set[str]:
        """The players sent ahead who are connected to `node` (it waits up to `arrival_s`)."""
        try:
            reply = await self.cluster.link.request(
                node, ARRIVE, {"players": players}, timeout_s=self.arrival_s + REQUEST_S
            )
        except Unavailable as exc:
            log.warning("drain_node_unanswered", node=node, players=len(players), error=str(exc))
            return set()
        arrived = reply.get("arrived")
        return {str(p) for p in arrived} if isinstance(arrived, list) else set()

    def _cut(self, match_ids: list[str], arrived: set[str]) -> dict[str, Moving]:
        """One synchronous pass, between two ticks: each match is snapshotted and stops here
        after the tick it is at."""
        engine, hub = self.app.engine, self.app.hub
        snapshots = engine.snapshots
        assert snapshots is not None
        moving: dict[str, Moving] = {}
        for match_id in match_ids:
            match = engine.matches.get(match_id)
            if match is None or match.finished or snapshots.take(match) is None:
                continue  # a state that cannot be copied plays on here until the node stops
            connected = [p for p in match.players if hub.peer(p) is not None]
            due_in_s = engine.due_in(match)
            engine.release(match)
            ahead = [p for p in connected if p in arrived]
            moving[match_id] = Moving(match, connected, ahead, due_in_s)
        return moving

    async def _write_out(self) -> None:
        """The snapshots into Redis, the matches' queued writes into the database."""
        waits = [self.journal.flush_now()]
        if self.app.store is not None:
            waits.append(self.app.store.flush())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), FLUSH_S)

    async def _hand(self, node: str, moving: dict[str, Moving], result: DrainResult) -> None:
        """Ask `node` to take these matches; tell the players of those it took."""
        payload = {
            "from": self.node_id,
            "matches": [[m, e.connected, round(e.due_in_s * 1000, 1)] for m, e in moving.items()],
        }
        try:
            reply = await self.cluster.link.request(node, TAKE, payload, timeout_s=REQUEST_S)
        except Unavailable as exc:
            log.warning("drain_node_unanswered", node=node, matches=len(moving), error=str(exc))
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
            if pid in entry.arrived:
                continue  # already there: the taking node seated them
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
            ahead=len(entry.arrived),
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
    async def _on_arrive(self, message: dict[str, Any]) -> None:
        """Answer once the players sent ahead are all connected here (or after `arrival_s`)."""
        players = message.get("players")
        expected = {str(p) for p in players} if isinstance(players, list) else set()
        hub = self.app.hub
        deadline = time.monotonic() + self.arrival_s
        while any(hub.peer(p) is None for p in expected) and time.monotonic() < deadline:
            await asyncio.sleep(ARRIVAL_POLL_S)
        arrived = [p for p in expected if hub.peer(p) is not None]
        await self.cluster.link.reply(message, {"arrived": arrived})

    async def _on_take(self, message: dict[str, Any]) -> None:
        giver = str(message.get("from"))
        entries = message.get("matches")
        handed: dict[str, tuple[list[str], float]] = {}
        for entry in entries if isinstance(entries, list) else []:
            with contextlib.suppress(IndexError, TypeError, ValueError):
                connected = [str(p) for p in entry[1]]
                handed[str(entry[0])] = (connected, float(entry[2]) / 1000)
        claimed = await self.journal.claim_many(list(handed), giver)
        engine, hub, presence = self.app.engine, self.app.hub, self.app.presence
        taken: list[Snapshot] = []
        waiting: list[tuple[Match, list[str]]] = []
        for match_id, snapshot in claimed.items():
            connected, due_in_s = handed[match_id]
            # Players who came ahead keep the session (and resume token) they opened here;
            # also those the giver did not see arrive before it cut.
            present = {p: presence.token_of(p) for p in connected if hub.peer(p) is not None}
            match = self.failover.restore(
                snapshot, None, giver, schedule=False, notify=False, present=present
            )
            if match is None:
                continue
            taken.append(snapshot)
            rejoined = encode("match.rejoined", {"match_id": match.id, "mode": match.mode})
            for pid in present:
                engine.resync(pid)
                hub.send(pid, rejoined)
            if all(hub.peer(p) is not None for p in connected if p in match.players):
                engine.adopt(match, due_in_s)
            else:
                waiting.append((match, connected))
            log.info(
                "match_taken",
                match_id=match_id,
                from_node=giver,
                tick=snapshot.tick,
                ahead=len(present),
                late=len(connected) - len(present),
            )
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
