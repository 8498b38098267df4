"""The match journal of a cluster: every match's latest snapshot in Redis, and who runs it.

A node's matches must outlive the node: another node restarts them from their snapshots
(`asobi.cluster.failover`), or receives them from a node that drains (`asobi.cluster.drain`).
So the snapshots cannot live in one node's memory, nor in the shared PostgreSQL without saying
whose they are (a node starting would restore its live neighbours' matches).  Each match has one
hash, `asobi:journal:m:<match>` (`tick`, `saved_at`, `meta`, `state`, and `node`: the node that
runs it), and each node a set of its matches, `asobi:journal:n:<node>`.

Saving never waits, as in the single node's `StoreJournal`: `save` and `forget` note the newest
word on a match, and one writer task carries the notes to Redis in one pipeline off the tick
path.  While Redis is away the notes wait (the newest per match) and go out when it answers.

Who runs a match changes only through `claim`, one Lua script: it moves the match from one
node's set to another's and rewrites `node` only if `node` still names the node it is taken
from.  Two nodes adopting the same match of a dead node cannot both win.
"""

from __future__ import annotations

from typing import Any

import structlog

from asobi.cluster.link import RedisLink, Unavailable, key
from asobi.journal import COALESCE_S, Snapshot, WriteBehindJournal, forget_marks

log = structlog.get_logger("asobi.cluster.journal")

FIELDS = ("tick", "saved_at", "meta", "state")

# KEYS: the match's hash, the giving node's set, the taking node's set.
# ARGV: the match id, the giving node, the taking node.
# Returns the snapshot's fields, or nil when the match is no longer the giver's.
CLAIM = """
local node = redis.call('HGET', KEYS[1], 'node')
if node ~= ARGV[2] then
  if not node then redis.call('SREM', KEYS[2], ARGV[1]) end
  return nil
end
redis.call('HSET', KEYS[1], 'node', ARGV[3])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return redis.call('HMGET', KEYS[1], 'tick', 'saved_at', 'meta', 'state')
"""


def match_key(match_id: str) -> str:
    return key("journal", "m", match_id)


def node_key(node_id: str) -> str:
    return key("journal", "n", node_id)


class RedisJournal(WriteBehindJournal):
    """`asobi.journal.Journal` kept in Redis, each snapshot marked with the node running it."""

    RETRYABLE = (Unavailable,)

    def __init__(
        self, link: RedisLink, *, coalesce_s: float = COALESCE_S, backend: Any = None
    ) -> None:
        super().__init__(coalesce_s=coalesce_s)
        self.link = link
        # The store's backend, where the marks of ended matches are deleted.
        self.backend = backend
        self.node_id = link.node_id
        self._claim: Any = link.redis.register_script(CLAIM)

    async def latest(self, match_id: str) -> Snapshot | None:
        redis = self.link.redis
        values = await self.link.call("read a snapshot", redis.hmget(match_key(match_id), FIELDS))
        return _snapshot(match_id, values)

    async def all(self) -> list[Snapshot]:
        """This node's snapshots (a node restarted under its own id takes its matches back)."""
        return await self.of_node(self.node_id)

    # -- the cluster's side -----------------------------------------------------------------------
    async def of_node(self, node_id: str) -> list[Snapshot]:
        """The snapshots of the matches `node_id` runs, oldest first."""
        ids = await self.match_ids(node_id)
        redis = self.link.redis
        async with redis.pipeline(transaction=False) as pipe:
            for match_id in ids:
                pipe.hmget(match_key(match_id), FIELDS)
            rows = await self.link.call("read the journal", pipe.execute()) if ids else []
        out = [s for s in (_snapshot(m, v) for m, v in zip(ids, rows, strict=True)) if s]
        return sorted(out, key=lambda s: s.saved_at_ms)

    async def match_ids(self, node_id: str) -> list[str]:
        members = await self.link.call(
            "read the journal", self.link.redis.smembers(node_key(node_id))
        )
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def claim(self, match_id: str, from_node: str) -> Snapshot | None:
        """Make this node the one running `match_id`, if `from_node` still is; its snapshot, or
        None when another node claimed it first (or it ended)."""
        return (await self.claim_many([match_id], from_node)).get(match_id)

    async def claim_many(self, match_ids: list[str], from_node: str) -> dict[str, Snapshot]:
        """`claim` for many matches in one round trip: the snapshots of those claimed."""
        if not match_ids:
            return {}
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for match_id in match_ids:
                await self._claim(  # queued on the pipeline (sent by `execute`)
                    keys=[match_key(match_id), node_key(from_node), node_key(self.node_id)],
                    args=[match_id, from_node, self.node_id],
                    client=pipe,
                )
            replies = await self.link.call("claim matches", pipe.execute())
        out = {}
        for match_id, values in zip(match_ids, replies, strict=True):
            snapshot = _snapshot(match_id, values) if values else None
            if snapshot is not None:
                out[match_id] = snapshot
        return out

    async def write(self, notes: dict[str, Snapshot | None]) -> None:
        own = node_key(self.node_id)
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for match_id, snapshot in notes.items():
                if snapshot is None:
                    pipe.delete(match_key(match_id))
                    pipe.srem(own, match_id)
                    continue
                mapping = {
                    "tick": snapshot.tick,
                    "saved_at": snapshot.saved_at_ms,
                    "meta": snapshot.meta(),
                    "state": snapshot.state,
                    "node": self.node_id,
                }
                pipe.hset(match_key(match_id), mapping=mapping)
                pipe.sadd(own, match_id)
            await self.link.call("write the journal", pipe.execute())
        ended = [match_id for match_id, snapshot in notes.items() if snapshot is None]
        if ended and self.backend is not None:
            try:
                await self.backend.transact(forget_marks(ended))
            except Exception as exc:  # a leftover mark row is harmless: logged, not retried
                log.warning("match_marks_not_deleted", matches=len(ended), error=str(exc)[:200])


def _snapshot(match_id: str, values: list[Any] | None) -> Snapshot | None:
    """A snapshot from its hash fields (None: absent, or unreadable: logged)."""
    if not values or any(v is None for v in values):
        return None
    tick, saved_at, meta, state = values
    try:
        return Snapshot.from_row(match_id, int(tick), int(saved_at), meta, state)
    except (ValueError, KeyError, TypeError) as exc:
        log.error("journal_row_unreadable", match_id=match_id, error=repr(exc)[:300])
        return None
