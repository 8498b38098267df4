"""A player's wallet and storage are resident on one node at a time: where their session is.

Each node checks debits against the balance it holds in memory, so two nodes holding one wallet
could each allow a debit the other does not know about (the database then refuses the second:
`ledger_conflict`, after the script was told it succeeded), and a node loading a wallet while
another still has writes for it queued would load a stale balance.  So a load is a handover:

1. The loading node records itself as the holder in Redis (`SET ... GET`), learning the previous
   holder in the same step.
2. If that node is alive, it is asked (`store_handover` on the bus) to drop its copy and write out
   everything it has queued; the load waits for its answer (bounded: `HANDOVER_WAIT_S`).
3. A node that releases a player forgets the record, unless another node has taken it since.

A node that died took its queued writes with it; one that does not answer in time, or Redis
being down, lets the load go ahead (logged as `player_handover_failed`): the database still never
lets a balance go negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from asobi.cluster.link import RedisLink, Unavailable, key
from asobi.cluster.nodes import NodeDirectory
from asobi.store import Store

log = structlog.get_logger("asobi.cluster")

HOLDER_TTL_S = 24 * 3600  # a record outlives any session; a crashed node's records expire
HANDOVER_WAIT_S = 1.5  # below the store's own bound (HANDOVER_TIMEOUT_S)
FLUSH_WAIT_S = 1.4
# Delete the record only if it still names this node.
FORGET = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


def holder_key(player_id: str) -> str:
    return key("holder", player_id)


class WalletHandover:
    def __init__(self, link: RedisLink, nodes: NodeDirectory, store: Store, node_id: str) -> None:
        self.link = link
        self.nodes = nodes
        self.store = store
        self.node_id = node_id
        self._tasks: set[asyncio.Task[None]] = set()
        link.on("store_handover", self._hand_over)

    async def handover(self, player_id: str) -> None:
        """Become the player's holder; wait until the previous holder wrote their data out."""
        previous = await self.link.call(
            "record where a player's data is held",
            self.link.redis.set(holder_key(player_id), self.node_id, ex=HOLDER_TTL_S, get=True),
        )
        if previous is None:
            return
        holder = previous.decode()
        # Asked of Redis when not listed: a holder started within the last heartbeat is alive
        # and may have writes queued; skipping it would load a stale balance.
        if holder == self.node_id or not await self.nodes.is_alive(holder):
            return
        started = time.monotonic()
        answer = await self.link.request(
            holder, "store_handover", {"player_id": player_id}, timeout_s=HANDOVER_WAIT_S
        )
        waited_ms = round((time.monotonic() - started) * 1000, 1)
        if not answer.get("flushed"):
            raise Unavailable(f"node {holder} could not write the player's data out in time")
        log.info(
            "player_handed_over",
            player_id=player_id,
            from_node=holder,
            node_id=self.node_id,
            waited_ms=waited_ms,
        )

    def released(self, player_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._forget(player_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forget(self, player_id: str) -> None:
        with contextlib.suppress(Unavailable):
            await self.link.call(
                "forget where a player's data is held",
                self.link.redis.eval(FORGET, 1, holder_key(player_id), self.node_id),
            )

    async def _hand_over(self, message: dict[str, Any]) -> None:
        """Another node loads this player's data: drop our copy, write out what is queued."""
        player_id = message.get("player_id")
        if not isinstance(player_id, str):
            return
        self.store.model.release(player_id)  # not `Store.release`: the record is theirs now
        try:
            await self.store.flush(timeout=FLUSH_WAIT_S)
        except TimeoutError:  # our database is behind or down: say so rather than stay silent
            await self.link.reply(message, {"flushed": False})
            return
        await self.link.reply(message, {"flushed": True})
