"""The match journal of a cluster: every match's latest snapshot in Redis, and who runs it.

A node's matches must outlive the node: another node restarts them from their snapshots
(`asobi.cluster.failover`), or receives them from a node that drains (`asobi.cluster.drain`).
So the snapshots cannot live in one node's memory, nor in the shared PostgreSQL without saying
whose they are (a node starting would restore its live neighbours' matches).  Each match has one
hash, `asobi:journal:m:<match>` (`tick`, `saved_at`, `meta`, `state`, `node`: the node that runs
it, and `owner`: the incarnation of that node, i.e. the very process), and each node a set of its
matches, `asobi:journal:n:<node>`.

Saving never waits, as in the single node's `StoreJournal`: `save` and `forget` note the newest
word on a match, and one writer task carries the notes to Redis in one pipeline off the tick
path.  While Redis is away the notes wait (the newest per match) and go out when it answers.

Who runs a match changes only through `claim`, one Lua script: it moves the match from one
node's set to another's and rewrites `node` and `owner` only if `node` still names the node it is
taken from.  Two nodes adopting the same match of a dead node cannot both win.  A node id alone
does not say which process runs a match: a node killed with -9 and restarted at once under the
same id is a new process racing the adopters of the old one's matches.  So a failover claim
(`only_dead`) also refuses a match whose `owner` is the incarnation that the node's live
heartbeat record names: the restarted process (which writes its record before it claims) and an
adopter take the old process's matches by the same atomic claim, and whoever comes second finds
a live owner.  Writes are fenced the same way: a snapshot or a forget of a match whose `owner` is
another process is refused (that process claimed it; ours is a stale copy), and `on_lost` hears
of it so that the copy stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from asobi.cluster.link import RedisLink, Unavailable, key
from asobi.journal import COALESCE_S, Snapshot, WriteBehindJournal, forget_marks

log = structlog.get_logger("asobi.cluster.journal")

FIELDS = ("tick", "saved_at", "meta", "state")

# KEYS: the match's hash, the giving node's set, the taking node's set, the giving node's
# heartbeat record.
# ARGV: the match id, the giving node, the taking node, the taking incarnation, "1" to take the
# match only from a dead incarnation (a failover), "0" from whichever (a drain hands it over).
# Returns the snapshot's fields, or nil when the match is no longer the giver's (or its owner is
# alive and `only_dead`).
CLAIM = """
local node = redis.call('HGET', KEYS[1], 'node')
if node ~= ARGV[2] then
  if not node then redis.call('SREM', KEYS[2], ARGV[1]) end
  return nil
end
if ARGV[5] == '1' then
  local owner = redis.call('HGET', KEYS[1], 'owner') or ''
  local record = redis.call('GET', KEYS[4])
  if record then
    local ok, info = pcall(cjson.decode, record)
    local live = ''
    if ok and type(info) == 'table' and type(info.incarnation) == 'string' then
      live = info.incarnation
    end
    if live == owner then return nil end
  end
end
redis.call('HSET', KEYS[1], 'node', ARGV[3], 'owner', ARGV[4])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return redis.call('HMGET', KEYS[1], 'tick', 'saved_at', 'meta', 'state')
"""

# One call writes a batch (a script call costs several times the writes it makes): KEYS: this
# node's set, then each match's hash.  ARGV: this node, this incarnation, then six per match: "w"
# (save) or "f" (forget), the match id, tick, saved_at, meta, state.  Returns one reply per
# match: 1, or the node now running it when another process owns it (nothing written).
WRITE = """
local out = {}
for i = 2, #KEYS do
  local a = (i - 2) * 6 + 2
  local hash, match = KEYS[i], ARGV[a + 2]
  local owner = redis.call('HGET', hash, 'owner')
  if owner and owner ~= ARGV[2] then
    local node = redis.call('HGET', hash, 'node') or ''
    if node ~= ARGV[1] then redis.call('SREM', KEYS[1], match) end
    out[#out + 1] = node
  elseif ARGV[a + 1] == 'f' then
    redis.call('SREM', KEYS[1], match)
    redis.call('DEL', hash)
    out[#out + 1] = 1
  elseif owner then  -- ours already: in our set, `node` and `owner` said
    redis.call('HSET', hash, 'tick', ARGV[a + 3], 'saved_at', ARGV[a + 4], 'meta', ARGV[a + 5],
      'state', ARGV[a + 6])
    out[#out + 1] = 1
  else
    redis.call('HSET', hash, 'tick', ARGV[a + 3], 'saved_at', ARGV[a + 4], 'meta', ARGV[a + 5],
      'state', ARGV[a + 6], 'node', ARGV[1], 'owner', ARGV[2])
    redis.call('SADD', KEYS[1], match)
    out[#out + 1] = 1
  end
end
return out
"""
# Matches per WRITE call: a few hundred microseconds of Redis at most, other clients wait that.
WRITE_BATCH = 100

# A match another process runs now: (match id, the node running it).
LostListener = Callable[[str, str], None]


def match_key(match_id: str) -> str:
    return key("journal", "m", match_id)


def node_key(node_id: str) -> str:
    return key("journal", "n", node_id)


class RedisJournal(WriteBehindJournal):
    """`asobi.journal.Journal` kept in Redis, each snapshot marked with the node running it."""

    RETRYABLE = (Unavailable,)

    def __init__(
        self,
        link: RedisLink,
        *,
        incarnation: str = "",
        coalesce_s: float = COALESCE_S,
        backend: Any = None,
    ) -> None:
        super().__init__(coalesce_s=coalesce_s)
        self.link = link
        # The store's backend, where the marks of ended matches are deleted.
        self.backend = backend
        self.node_id = link.node_id
        self.incarnation = incarnation
        self.on_lost: LostListener | None = None
        self._claim: Any = link.redis.register_script(CLAIM)
        self._write: Any = link.redis.register_script(WRITE)

    async def latest(self, match_id: str) -> Snapshot | None:
        redis = self.link.redis
        values = await self.link.call("read a snapshot", redis.hmget(match_key(match_id), FIELDS))
        return _snapshot(match_id, values)

    async def all(self) -> list[Snapshot]:
        """None: a node restarted under its own id takes its matches back by claiming them
        (`Failover.take_back`, once its heartbeat names this process), not by reading them, as
        a single node's start does: an adopter may be claiming them at the same moment."""
        return []

    # -- the cluster's side -----------------------------------------------------------------------
    async def match_ids(self, node_id: str) -> list[str]:
        members = await self.link.call(
            "read the journal", self.link.redis.smembers(node_key(node_id))
        )
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def claim(
        self, match_id: str, from_node: str, *, only_dead: bool = False
    ) -> Snapshot | None:
        """Make this process the one running `match_id`, if `from_node` still is; its snapshot,
        or None when another process claimed it first (or it ended).  `only_dead`: and only if
        the process of `from_node` that ran it is gone (a failover, not a hand-over)."""
        return (await self.claim_many([match_id], from_node, only_dead=only_dead)).get(match_id)

    async def claim_many(
        self, match_ids: list[str], from_node: str, *, only_dead: bool = False
    ) -> dict[str, Snapshot]:
        """`claim` for many matches in one round trip: the snapshots of those claimed."""
        if not match_ids:
            return {}
        record = key("node", from_node)
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for match_id in match_ids:
                await self._claim(  # queued on the pipeline (sent by `execute`)
                    keys=[match_key(match_id), node_key(from_node), node_key(self.node_id), record],
                    args=[
                        match_id,
                        from_node,
                        self.node_id,
                        self.incarnation,
                        "1" if only_dead else "0",
                    ],
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
        items = list(notes.items())
        async with self.link.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(items), WRITE_BATCH):
                keys = [own]
                args: list[str | int | bytes] = [self.node_id, self.incarnation]
                for match_id, snapshot in items[start : start + WRITE_BATCH]:
                    keys.append(match_key(match_id))
                    if snapshot is None:
                        args += ["f", match_id, 0, 0, b"", b""]
                    else:
                        args += ["w", match_id, snapshot.tick, snapshot.saved_at_ms]
                        args += [snapshot.meta(), snapshot.state]
                await self._write(keys=keys, args=args, client=pipe)
            batches = await self.link.call("write the journal", pipe.execute())
        replies = [reply for batch in batches for reply in batch]
        ended = []
        for (match_id, snapshot), reply in zip(items, replies, strict=True):
            if isinstance(reply, bytes | str):
                self._lost(match_id, reply.decode() if isinstance(reply, bytes) else reply)
            elif snapshot is None:
                ended.append(match_id)
        if ended and self.backend is not None:
            try:
                await self.backend.transact(forget_marks(ended))
            except Exception as exc:  # a leftover mark row is harmless: logged, not retried
                log.warning("match_marks_not_deleted", matches=len(ended), error=str(exc)[:200])

    def _lost(self, match_id: str, node: str) -> None:
        """Another process claimed this match: our copy is stale (its exactly-once marks stay,
        the claimer's ticks need them)."""
        log.warning(
            "journal_write_fenced",
            match_id=match_id,
            node=self.node_id,
            incarnation=self.incarnation,
            owner_node=node,
        )
        if self.on_lost is not None:
            try:
                self.on_lost(match_id, node)
            except Exception:
                log.exception("match_lost_listener_failed", match_id=match_id)


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
