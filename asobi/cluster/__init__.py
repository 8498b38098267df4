"""A cluster of asobi nodes sharing one Redis (docs/cluster.md).

`ASOBI_REDIS_URL` makes a server a node.  The single node needs none of this package: `App.create`
builds a `Cluster` only when the setting is there, and hands its parts to the callers through the
`asobi.directory` interfaces, so sessions, the matchmaker and the engine never ask whether they
run in a cluster.  What lives here:

- `link`: the Redis connection, its health (`Unavailable` while Redis cannot be reached) and the
  bus (pub/sub messages to every node or to one node, with request/reply).
- `nodes`: this node's heartbeat with its load, and the live nodes as last read.

The tick path never touches Redis: every Redis call runs in a background task or in reply to a
player's request, and a match's frames only ever go to sockets of the node the match runs on.
"""

from asobi.cluster.link import RedisLink, Unavailable
from asobi.cluster.node import Cluster
from asobi.cluster.nodes import NodeDirectory, NodeInfo

__all__ = ["Cluster", "NodeDirectory", "NodeInfo", "RedisLink", "Unavailable"]
