"""Where a formed group plays, and how its players hear about it.

The node that formed a group picks the node already holding most of the group's players (each
ticket records its player's home node), the least loaded among ties and when none of them is
alive, and asks it over the bus to `place` the group.  That node claims the group in Redis (from
then on finishing it is its job, even if the former dies), starts the match with its own
`LocalPlacement`, holds a seat with the reconnect grace for every player not connected to it,
tells its own players `matchmaker.matched` and every other player's home node, which sends its
players `matchmaker.matched` with the node's URL and a seat token.  The match's frames only ever
go to sockets on its node: a player elsewhere reconnects there (docs/cluster.md).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from asobi.cluster.forming import Forming, Group, Short
from asobi.cluster.link import Unavailable
from asobi.directory import PlacementFailed
from asobi.protocol import ErrorCode, encode, encode_error

if TYPE_CHECKING:
    from asobi.app import App
    from asobi.cluster.node import Cluster
    from asobi.cluster.nodes import NodeDirectory

log = structlog.get_logger("asobi.cluster.matchmaker")

PLACE = "mm.place"
MATCHED = "mm.matched"
FAILED = "mm.failed"


class ClusterPlacement:
    def __init__(
        self,
        app: App,
        cluster: Cluster,
        forming: Forming,
        *,
        on_matched: Callable[[list[str]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.cluster = cluster
        self.forming = forming
        # Told the ids of this node's tickets that a match (or its failure) used up.
        self.on_matched = on_matched
        self.clock = clock
        # Groups placed here whose `done` did not reach Redis yet (retried by the matchmaker).
        self.unfinished: set[str] = set()
        cluster.link.on(PLACE, self._on_place)
        cluster.link.on(MATCHED, self._on_matched)
        cluster.link.on(FAILED, self._on_failed)

    def choose(self, group: Group) -> str:
        return choose_node(group, self.cluster.nodes)

    async def place(self, group: Group) -> None:
        """Have the chosen node place the group; hand it back if that node never claims it."""
        target = self.choose(group)
        if target == self.cluster.node_id:
            await self.place_here(group.id)
            return
        try:
            await self.cluster.link.request(
                target, PLACE, {"group": group.id}, timeout_s=self.forming.lease_ms / 1000
            )
        except Unavailable as exc:
            released = await self.forming.release(group.id)
            log.warning(
                "group_handed_back",
                group_id=group.id,
                node=target,
                reason=str(exc),
                back=released[0] if released else 0,
            )

    async def _on_place(self, message: dict[str, Any]) -> None:
        result = await self.place_here(str(message.get("group")))
        await self.cluster.link.reply(message, result)

    async def place_here(self, group_id: str) -> dict[str, Any]:
        """Claim the group and start its match on this node."""
        node_id = self.cluster.node_id
        try:
            group = await self.forming.claim(group_id, node_id)
        except Short:
            log.info("group_short", group_id=group_id, node=node_id)
            return {"placed": False, "reason": "a player's node is gone"}
        if group is None:
            return {"placed": False, "reason": "the group was handed back"}
        players = group.players
        try:
            seats = self.app.placement.reserve(group.mode, players)
        except PlacementFailed as exc:
            message = f"match could not start: {exc}"
            await self._finish(group)
            await self._tell_failed(group, {p: message for p in players})
            return {"placed": False, "reason": message}
        match = seats.match
        now = self.clock()
        hub = self.app.hub
        for pid in match.players:
            if hub.peer(pid) is None:
                # Seated here, connected elsewhere (or gone): the seat waits for their redirect
                # for the reconnect grace, then they leave as any dropped player does.
                self.app.presence.hold(pid, now)
        frame = encode(
            "matchmaker.matched",
            {"match_id": match.match_id, "mode": group.mode, "players": match.players},
        )
        here = [t for t in group.tickets if t.node == node_id]
        for t in here:
            if t.player in match.players:
                hub.send(t.player, frame)
        self.app.placement.open(seats)
        self.on_matched([t.id for t in here])
        log.info(
            "matched",
            match_id=match.match_id,
            mode=group.mode,
            players=match.players,
            node=node_id,
            group_id=group.id,
            former=group.former,
        )
        await self._tell_homes(group, match.match_id, match.players)
        refused = {p: f"the match refused you: {r}" for p, r in seats.refused.items()}
        if refused:
            await self._tell_failed(group, refused)
        await self._finish(group)
        return {"placed": True, "match_id": match.match_id}

    async def _finish(self, group: Group) -> None:
        try:
            await self.forming.done(group.id)
        except Unavailable:
            self.unfinished.add(group.id)

    async def _tell_homes(self, group: Group, match_id: str, seated: list[str]) -> None:
        homes: dict[str, list[list[str]]] = {}
        for t in group.tickets:
            if t.node != self.cluster.node_id and t.player in seated:
                homes.setdefault(t.node, []).append([t.player, t.id])
        payload = {
            "match_id": match_id,
            "mode": group.mode,
            "players": seated,
            "node_id": self.cluster.node_id,
            "node_url": self.cluster.public_url,
        }
        for home, players in homes.items():
            await self.cluster.link.send(home, MATCHED, dict(payload, to=players))

    async def _tell_failed(self, group: Group, reasons: dict[str, str]) -> None:
        node_id = self.cluster.node_id
        remote: dict[str, list[list[str]]] = {}
        for t in group.tickets:
            if t.player not in reasons:
                continue
            if t.node == node_id:
                self.on_matched([t.id])
                self._error(t.player, reasons[t.player])
            else:
                remote.setdefault(t.node, []).append([t.player, t.id, reasons[t.player]])
        for home, failed in remote.items():
            await self.cluster.link.send(home, FAILED, {"failed": failed})

    def _error(self, player_id: str, message: str) -> None:
        self.app.metrics.error(str(ErrorCode.MATCH_FAILED))
        self.app.hub.send(player_id, encode_error(ErrorCode.MATCH_FAILED, message))

    def _on_matched(self, message: dict[str, Any]) -> None:
        """A match on another node holds seats for players of this node: send each of them
        the node to reconnect to and their seat token."""
        seated = [(str(p), str(t)) for p, t in message.get("to", [])]
        match_id, node = str(message["match_id"]), str(message["node_id"])
        self.on_matched([t for _, t in seated])
        players = [p for p, _ in seated]
        for pid in players:
            frame = encode(
                "matchmaker.matched",
                {
                    "match_id": match_id,
                    "mode": message.get("mode"),
                    "players": message.get("players"),
                    "node_id": node,
                    "node_url": message.get("node_url"),
                    "seat_token": self.cluster.seat_tokens.issue(pid, match_id, node),
                },
            )
            self.app.hub.send(pid, frame)
        log.info("matched_elsewhere", match_id=match_id, node=node, players=players)

    def _on_failed(self, message: dict[str, Any]) -> None:
        failed = [(str(p), str(t), str(r)) for p, t, r in message.get("failed", [])]
        self.on_matched([t for _, t, _ in failed])
        for pid, _, reason in failed:
            self._error(pid, reason)


def choose_node(group: Group, nodes: NodeDirectory) -> str:
    """The node holding most of the group's players, the least loaded among ties.

    Every ticket's home node had a live heartbeat in Redis when the group formed
    (`forming.lua`), so a home node counts unless this node has seen it go since.  This node's
    own listing is up to a heartbeat old: trusting it alone sent the group of a node started
    within the last heartbeat to some other node, and its players away from the node they had
    just connected to.  Such a node, not listed here yet, holds nothing yet: it wins a tie."""
    homes = Counter(t.node for t in group.tickets if not nodes.seen_gone(t.node))
    if not homes:
        return nodes.least_loaded()
    most = max(homes.values())
    tied = [n for n, count in homes.items() if count == most]
    unlisted = sorted(n for n in tied if not nodes.alive(n))
    return unlisted[0] if unlisted else nodes.least_loaded(tied)
