"""The cluster's ticket queue in Redis, changed only by one script (`forming.lua`).

Every change to a queue is one script call, and Redis runs a script alone: that is the whole
of the matchmaking's consistency.  A ticket is in a queue, in one leased group, or gone; the
script that forms a group takes its tickets out of the queue in the same step, so two nodes
forming at once can never both take a ticket.  A formed group is leased: the node that places
it `claim`s it and ends it with `done`; a group whose lease runs out unclaimed (its former
died), or claimed by a node that died since, is handed back to the queue by `reclaim`, which
any node runs.  See docs/cluster.md, "One matchmaker".

The script is registered with `register_script` (EVALSHA, loading it again when Redis forgot
it, e.g. after a restart), so nothing has to be installed in Redis beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import orjson

from asobi.cluster.link import RedisLink, key

PREFIX = key("mm") + ":"
NODE_PREFIX = key("node") + ":"
SOURCE = files("asobi.cluster").joinpath("forming.lua").read_text()


@dataclass(frozen=True, slots=True)
class QueuedTicket:
    """A ticket as Redis holds it: `node` is the home node of the player (where they queued)."""

    id: str
    player: str
    mode: str
    node: str
    score: float
    expires: float


@dataclass(frozen=True, slots=True)
class Group:
    """Tickets that left their queue together, leased to the node that formed them."""

    id: str
    mode: str
    former: str
    tickets: list[QueuedTicket]

    @property
    def players(self) -> list[str]:
        return [t.player for t in self.tickets]


@dataclass(frozen=True, slots=True)
class QueueDepth:
    depth: int
    oldest_ms: float | None  # Redis time the oldest waiting ticket was queued (ms)


@dataclass(frozen=True, slots=True)
class HandedBack:
    """A group whose lease ran out: `back` tickets returned to the queue, `dropped` belonged to
    dead nodes (or to players who had queued again)."""

    id: str
    former: str
    claimed_by: str | None
    back: int
    dropped: int


class Short(Exception):
    """A claimed group held a ticket of a dead node: its other tickets went back to the queue."""


def _ticket(raw: dict[str, Any]) -> QueuedTicket:
    return QueuedTicket(
        str(raw["id"]),
        str(raw["player"]),
        str(raw["mode"]),
        str(raw["node"]),
        float(raw["score"]),
        float(raw["expires"]),
    )


def _group(body: bytes | str) -> Group:
    raw = orjson.loads(body)
    return Group(
        str(raw["id"]), str(raw["mode"]), str(raw["former"]), [_ticket(t) for t in raw["tickets"]]
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Forming:
    """Typed calls of the forming script; each raises `Unavailable` while Redis is down."""

    def __init__(self, link: RedisLink, *, lease_ms: int = 3000, claim_ms: int = 10_000) -> None:
        self.link = link
        self.lease_ms = lease_ms
        self.claim_ms = claim_ms
        self._script = link.redis.register_script(SOURCE)

    async def _run(self, doing: str, op: str, *args: Any) -> Any:
        return await self.link.call(
            doing, self._script(keys=[], args=[op, PREFIX, NODE_PREFIX, *args])
        )

    async def add(self, ticket_id: str, player: str, mode: str, node: str, ttl_s: float) -> None:
        ttl_ms = max(int(ttl_s * 1000), 0)
        await self._run("queue for a match", "add", ticket_id, player, mode, node, ttl_ms)

    async def remove(self, player: str, ticket_id: str | None = None) -> list[str]:
        removed = await self._run("leave the queue", "remove", player, ticket_id or "")
        return [_text(i) for i in removed]

    async def form(
        self, mode: str, size: int, former: str, most: int = 16
    ) -> tuple[list[Group], QueueDepth]:
        reply = await self._run("form a match", "form", mode, size, most, self.lease_ms, former)
        depth = QueueDepth(int(reply[0]), float(reply[1]) if reply[1] else None)
        return [_group(body) for body in reply[2:]], depth

    async def claim(self, group_id: str, node: str) -> Group | None:
        """The group, now this node's to place; None when it is gone (handed back meanwhile).
        Raises `Short` when a ticket's node died."""
        reply = await self._run("place a match", "claim", group_id, node, self.claim_ms)
        if not reply:
            return None
        if _text(reply) == "short":
            raise Short(group_id)
        return _group(reply)

    async def done(self, group_id: str) -> None:
        await self._run("finish placing a match", "done", group_id)

    async def release(self, group_id: str) -> tuple[int, int] | None:
        reply = await self._run("hand a group back", "release", group_id)
        return (int(reply[0]), int(reply[1])) if reply else None

    async def reclaim(self) -> list[HandedBack]:
        out = []
        for body in await self._run("hand expired leases back", "reclaim"):
            raw = orjson.loads(body)
            claimed = raw.get("claimed_by")
            out.append(
                HandedBack(
                    str(raw["id"]),
                    str(raw["former"]),
                    str(claimed) if claimed else None,
                    int(raw["back"]),
                    int(raw["dropped"]),
                )
            )
        return out

    async def expire(self, node: str) -> list[QueuedTicket]:
        return [_ticket(orjson.loads(b)) for b in await self._run("expire tickets", "expire", node)]

    async def drop_node(self, node: str, *, only_if_dead: bool = False) -> int:
        """Drop the node's tickets; -1 when `only_if_dead` and its heartbeat is there."""
        mode = "dead" if only_if_dead else "any"
        return int(await self._run("drop a node's tickets", "drop_node", node, mode))

    async def modes(self) -> list[str]:
        members = await self.link.call(
            "read the queues", self.link.redis.smembers(PREFIX + "modes")
        )
        return sorted(_text(m) for m in members)
