"""This process as a node of a cluster: its Redis link and heartbeat, started and stopped with
the server.

The parts that answer the `asobi.directory` questions cluster-wide (matchmaking, seats,
listings, pushed scripts, shared data) hang off `Cluster` and start with it; `App.create` wires
them in and nothing else has to know.  Before anything else, `start` checks that every node signs
with the same secret: a token issued by one node must open a session on any other, and a node
with its own secret would refuse every redirected player.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from asobi.cluster.link import RedisLink, Unavailable, key
from asobi.cluster.nodes import LoadProbe, NodeDirectory, default_node_id, new_incarnation
from asobi.cluster.seat_tokens import SeatTokens
from asobi.config import Settings

log = structlog.get_logger("asobi.cluster")

SECRET_CHECK = key("secret-check")


class ClusterMisconfigured(Exception):
    """A setting makes this node unfit to join the cluster; the message says which."""


Hook = Callable[[], Awaitable[None]]


class Cluster:
    def __init__(self, settings: Settings, secret: str, load: LoadProbe) -> None:
        self.settings = settings
        self.node_id = settings.node_id or default_node_id()
        # This process, told apart from any earlier one that ran under the same node id.
        self.incarnation = new_incarnation()
        self.public_url = settings.public_url
        self.link = RedisLink(settings.redis_url, self.node_id)
        self.nodes = NodeDirectory(
            self.link,
            self.public_url,
            load,
            heartbeat_s=settings.heartbeat_s,
            ttl_s=settings.node_ttl_s,
            incarnation=self.incarnation,
        )
        self.nodes.on_gone(self.link.abandon)
        self.seat_tokens = SeatTokens(secret)
        self._secret_digest = hmac.new(
            secret.encode(), b"asobi-cluster", hashlib.sha256
        ).hexdigest()
        # Parts that start after the link and the heartbeat, and stop before them.
        self._starts: list[Hook] = []
        self._stops: list[Hook] = []

    def on_start(self, start: Hook, stop: Hook | None = None) -> None:
        self._starts.append(start)
        if stop is not None:
            self._stops.append(stop)

    async def start(self, port: int) -> None:
        if not self.public_url:
            self.public_url = default_public_url(self.settings.host, port)
            self.nodes.public_url = self.public_url
        if not await self.link.ping():
            raise ClusterMisconfigured(
                f"cannot reach Redis at {self.settings.redis_url} (ASOBI_REDIS_URL)"
            )
        await self._check_secret()
        await self.link.start()
        await self.nodes.start()
        for start in self._starts:
            await start()
        log.info(
            "node_joined",
            node_id=self.node_id,
            incarnation=self.incarnation,
            public_url=self.public_url,
        )

    async def stop(self) -> None:
        for stop in reversed(self._stops):
            try:
                await stop()
            except Exception:
                log.exception("cluster_stop_failed", node_id=self.node_id)
        await self.nodes.stop()
        await self.link.stop()
        log.info("node_left", node_id=self.node_id)

    async def _check_secret(self) -> None:
        redis = self.link.redis
        await self.link.call(
            "check the secret", redis.set(SECRET_CHECK, self._secret_digest, nx=True)
        )
        stored = await self.link.call("check the secret", redis.get(SECRET_CHECK))
        if stored is not None and stored.decode() != self._secret_digest:
            raise ClusterMisconfigured(
                "this node's secret differs from the cluster's: set the same ASOBI_SECRET on "
                "every node (tokens issued by one node must open sessions on all of them)"
            )

    def describe(self) -> dict[str, Any]:
        """`GET /api/v1/cluster`: this node and every live node's last heartbeat."""
        nodes = sorted(self.nodes.nodes.values(), key=lambda n: n.node_id)
        return {
            "cluster": True,
            "node_id": self.node_id,
            "redis": "up" if self.link.up else "down",
            "nodes": [n.as_dict() for n in nodes],
        }


def default_public_url(host: str, port: int) -> str:
    """Where clients reach this node when ASOBI_PUBLIC_URL is not set: fine on one machine; a
    real deployment sets the address its clients can route to."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"ws://{host}:{port}/ws"


def check_settings(settings: Settings) -> None:
    """Refuse settings a node cannot run with, before anything starts."""
    url = settings.database_url.strip()
    if not url.startswith(("postgresql://", "postgres://")):
        raise ClusterMisconfigured(
            "a cluster (ASOBI_REDIS_URL) needs PostgreSQL shared by every node: set "
            "ASOBI_DATABASE_URL=postgresql://... (SQLite is one node's file)"
        )


__all__ = ["Cluster", "ClusterMisconfigured", "Unavailable", "check_settings"]
