"""`match.list` across the cluster: every node's running matches, from Redis.

Each node writes the list of its running matches to one key every `interval_s` (the key expires
with the node: a node killed with -9 leaves the listing within the TTL, as it leaves the node
directory) and, in the same round trip, reads the lists of the other live nodes.  `list` answers
synchronously from that last read, so a `match.list` never waits on Redis and keeps answering
(a little stale) while Redis is down; a match another node started shows up within two
intervals.  `where` tells the router which node runs a match it does not hold, so a `match.join`
can send the player there.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import structlog

from asobi.cluster.every import Every
from asobi.cluster.link import RedisLink, Unavailable, key
from asobi.cluster.nodes import NodeDirectory
from asobi.directory import MatchInfo
from asobi.local import LocalListing

log = structlog.get_logger("asobi.cluster")

LIMIT = 100


def matches_key(node_id: str) -> str:
    return key("matches", node_id)


class ClusterListing:
    def __init__(
        self,
        local: LocalListing,
        link: RedisLink,
        nodes: NodeDirectory,
        *,
        interval_s: float = 1.0,
        ttl_s: float = 5.0,
    ) -> None:
        self.local = local
        self.link = link
        self.nodes = nodes
        self.node_id = link.node_id
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        # The other nodes' matches as of the last read, by node id.
        self._remote: dict[str, list[MatchInfo]] = {}
        self._every = Every(interval_s, self.exchange, "match_listing_failed", self.node_id)

    def list(self, mode: str | None = None) -> list[MatchInfo]:
        """This node's matches first (live), then the other live nodes' (as last read)."""
        out = self.local.list(mode)
        for node_id in sorted(self._remote):
            if not self.nodes.alive(node_id):
                continue
            out.extend(m for m in self._remote[node_id] if mode is None or m.mode == mode)
        return out[:LIMIT]

    def where(self, match_id: str) -> str | None:
        """The live node that runs `match_id`, as last read (None: unknown, or this node)."""
        for node_id, matches in self._remote.items():
            if self.nodes.alive(node_id) and any(m.match_id == match_id for m in matches):
                return node_id
        return None

    async def exchange(self) -> None:
        """Write this node's matches and read the other live nodes' (raises `Unavailable`)."""
        own = orjson.dumps([_as_dict(m) for m in self.local.list()])
        others = sorted(n for n in self.nodes.nodes if n != self.node_id)
        redis = self.link.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(matches_key(self.node_id), own, px=int(self.ttl_s * 1000))
            if others:
                pipe.mget([matches_key(n) for n in others])
            replies = await self.link.call("publish the match listing", pipe.execute())
        remote: dict[str, list[MatchInfo]] = {}
        for node_id, raw in zip(others, replies[1] if others else [], strict=False):
            if raw is None:
                continue
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, ValueError):
                remote[node_id] = [_from_dict(d) for d in orjson.loads(raw)]
        self._remote = remote

    async def start(self) -> None:
        await self._every.start()

    async def stop(self) -> None:
        """Stop publishing and remove this node's list: a clean stop is seen at once."""
        await self._every.stop()
        with contextlib.suppress(Unavailable):
            await self.link.call(
                "withdraw the match listing", self.link.redis.delete(matches_key(self.node_id))
            )


def _as_dict(match: MatchInfo) -> dict[str, Any]:
    return {
        "match_id": match.match_id,
        "mode": match.mode,
        "players": match.players,
        "max_players": match.max_players,
    }


def _from_dict(data: dict[str, Any]) -> MatchInfo:
    return MatchInfo(
        str(data["match_id"]),
        str(data["mode"]),
        [str(p) for p in data.get("players", [])],
        int(data.get("max_players", 0)),
    )
