"""Which nodes are alive, where clients reach them, and how loaded they are.

Every node writes its own record each `heartbeat_s` to a key that expires after `node_ttl_s`: a
node killed with -9 simply stops refreshing it and is gone from every listing within the TTL.  A
sorted set indexes the records so a listing is two commands, not a key scan.  The same pass reads
every live record into `nodes`, the copy placement and redirects consult synchronously: it is at
most one heartbeat old, which is what a load figure is anyway.

A record also names the process behind the node id, its `incarnation` (random, new at every
start): a node killed and restarted at once under the same id writes the same key, and only the
incarnation tells the new process from the dead one.  The journal marks every match with the
incarnation running it, so a claim can tell a live owner from a dead one (`asobi.cluster.journal`).

Listeners registered with `on_gone` hear about a node that disappeared (once per node), so the
parts that hold its tickets or route to its matches can react.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import structlog

from asobi.cluster.every import Every
from asobi.cluster.link import RedisLink, Unavailable, key

log = structlog.get_logger("asobi.cluster")

INDEX = key("nodes")
GONE_KEPT_S = 600.0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node's heartbeat record (plain data: it is what `GET /api/v1/cluster` lists)."""

    node_id: str
    public_url: str
    started_at: float
    seen_at: float
    matches: int = 0
    players: int = 0
    lateness_p99_ms: float = 0.0
    cpu: float = 0.0  # share of one core this process used since the previous heartbeat
    version: str = ""
    incarnation: str = ""  # this process among all that ran under `node_id` (see the module doc)

    def load(self) -> tuple[float, int, int]:
        """Sort key for placement: the least loaded node first."""
        return (self.cpu, self.players, self.matches)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def new_incarnation() -> str:
    """A fresh id for this process: unique among the processes that ever ran as one node."""
    return secrets.token_hex(8)


LoadProbe = Callable[[], dict[str, float]]


class NodeDirectory:
    """This node's heartbeat, and the cluster's live nodes as of the last one."""

    def __init__(
        self,
        link: RedisLink,
        public_url: str,
        load: LoadProbe,
        *,
        heartbeat_s: float = 1.0,
        ttl_s: float = 5.0,
        version: str = "",
        incarnation: str = "",
    ) -> None:
        self.link = link
        self.incarnation = incarnation
        self.node_id = link.node_id
        self.public_url = public_url
        self.load = load
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.version = version
        self.started_at = time.time()
        self.nodes: dict[str, NodeInfo] = {}
        self._gone_listeners: list[Callable[[str], None]] = []
        self._every = Every(heartbeat_s, self.beat, "heartbeat_failed", self.node_id)
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._last_write: float | None = None
        self._amnesty_until = 0.0
        self._suspects: set[str] = set()
        # Nodes reported gone and not listed since, with when: placement passes over them.  Kept
        # for GONE_KEPT_S, long after forming stopped taking their tickets, then forgotten, so
        # a long-lived node does not collect the id of every process that ever left.
        self._gone: dict[str, float] = {}

    def on_gone(self, listener: Callable[[str], None]) -> None:
        self._gone_listeners.append(listener)

    def url_of(self, node_id: str) -> str | None:
        node = self.nodes.get(node_id)
        return node.public_url if node is not None else None

    def alive(self, node_id: str) -> bool:
        return node_id == self.node_id or node_id in self.nodes

    async def is_alive(self, node_id: str) -> bool:
        """`alive`, with Redis asked about a node not listed here: one started since this node's
        last read is alive although not listed yet (raises `Unavailable`)."""
        if self.alive(node_id):
            return True
        found = await self.link.call("look a node up", self.link.redis.exists(key("node", node_id)))
        return bool(found)

    def seen_gone(self, node_id: str) -> bool:
        """This node reported `node_id` gone and has not listed it since."""
        return node_id in self._gone

    def least_loaded(self, among: list[str] | None = None) -> str:
        """The live node with the lightest load (this node when it knows of no other)."""
        candidates = [n for n in self.nodes.values() if among is None or n.node_id in among]
        if not candidates:
            return self.node_id
        return min(candidates, key=lambda n: (n.load(), n.node_id)).node_id

    def own_record(self) -> NodeInfo:
        now_wall, now_cpu = time.monotonic(), time.process_time()
        wall = now_wall - self._cpu_mark[0]
        cpu = (now_cpu - self._cpu_mark[1]) / wall if wall > 0 else 0.0
        self._cpu_mark = (now_wall, now_cpu)
        load = self.load()
        return NodeInfo(
            node_id=self.node_id,
            public_url=self.public_url,
            started_at=self.started_at,
            seen_at=time.time(),
            matches=int(load.get("matches", 0)),
            players=int(load.get("players", 0)),
            lateness_p99_ms=round(float(load.get("lateness_p99_ms", 0.0)), 3),
            cpu=round(cpu, 3),
            version=self.version,
            incarnation=self.incarnation,
        )

    async def beat(self) -> None:
        """Write this node's record and read everyone's (raises `Unavailable`)."""
        record = self.own_record()
        redis = self.link.redis
        ttl_ms = int(self.ttl_s * 1000)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(key("node", self.node_id), orjson.dumps(record.as_dict()), px=ttl_ms, get=True)
            pipe.zadd(INDEX, {self.node_id: record.seen_at})
            pipe.zrange(INDEX, 0, -1)
            replies = await self.link.call("send the heartbeat", pipe.execute())
        now = time.monotonic()
        self._notice_reset(replies[0] is None, now)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in replies[2]]
        values = await self.link.call(
            "read the nodes", redis.mget([key("node", i) for i in ids]) if ids else _none()
        )
        live: dict[str, NodeInfo] = {}
        dead: list[str] = []
        for node_id, raw in zip(ids, values or [], strict=False):
            if raw is None:
                dead.append(node_id)
                continue
            with contextlib.suppress(orjson.JSONDecodeError, TypeError):
                live[node_id] = NodeInfo(**orjson.loads(raw))
        if dead:
            await self.link.call("prune the nodes", redis.zrem(INDEX, *dead))
        missing = [n for n in self.nodes if n not in live] + [
            n for n in dead if n not in self.nodes
        ]
        self.nodes = live
        self._gone = {
            n: t for n, t in self._gone.items() if n not in live and now - t < GONE_KEPT_S
        }
        self._last_write = now
        if now < self._amnesty_until:
            # Redis lost every record: a node missing now may just not have beaten since.
            self._suspects.update(missing)
            return
        gone = [*missing, *(n for n in self._suspects if n not in live)]
        self._suspects.clear()
        for node_id in dict.fromkeys(gone):
            if node_id == self.node_id:
                continue
            log.warning("node_gone", node_id=node_id, seen_by=self.node_id)
            self._gone[node_id] = now
            for listener in self._gone_listeners:
                try:
                    listener(node_id)
                except Exception:
                    log.exception("node_gone_listener_failed", node_id=node_id)

    def _notice_reset(self, own_record_was_missing: bool, now: float) -> None:
        """Our own record is missing although we wrote it: Redis restarted without its data, or
        we could not reach it for longer than the TTL.  Either way the other nodes' records
        went the same way, so for one TTL a node missing from the listing is a suspect, not
        gone: it re-appears at its next beat; one that does not is gone after the TTL."""
        if own_record_was_missing and self._last_write is not None:
            self._amnesty_until = now + self.ttl_s
            self._suspects.update(self.nodes)
            log.info("redis_reset_seen", node_id=self.node_id, amnesty_s=self.ttl_s)

    async def start(self) -> None:
        await self._every.start()

    async def stop(self) -> None:
        """Stop beating and remove this node's record: a clean stop is seen at once."""
        await self._every.stop()
        with contextlib.suppress(Unavailable):
            redis = self.link.redis
            await self.link.call("leave the cluster", redis.delete(key("node", self.node_id)))
            await self.link.call("leave the cluster", redis.zrem(INDEX, self.node_id))


async def _none() -> list[Any]:
    return []
