"""Leaderboards and global storage shared live by every node, through PostgreSQL NOTIFY.

Every node keeps all leaderboards and all global storage in memory (`asobi.store`).  When a
node's writer commits a batch that changed some, the same transaction sends a notification on a
channel named after the database and schema the nodes share; every other node hears it on a
connection of its own that only listens, merges the leaderboard entries the notice carries and
has its writer re-read the named global keys.

Why NOTIFY rather than a message on the Redis bus after the commit: a notification is part of the
batch's transaction, so it goes out exactly when the batch commits and never when it rolls back,
in commit order, and it needs no second system to be up.  A bus message sent after the commit is
lost when the node dies between the two, or while Redis is away; covering that would need a
periodic re-read as well.  The one way to miss a notice here is the listening connection
dropping; every (re)connect therefore starts with a full re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any

import asyncpg
import orjson
import structlog

from asobi.cluster.wallets import WalletHandover
from asobi.store import Store
from asobi.store.sync import Changes, Statement

log = structlog.get_logger("asobi.cluster")

# One channel per database and schema: deployments (and test runs) that share a PostgreSQL
# server but not a schema never hear each other.  Computed by PostgreSQL on both sides.
CHANNEL_SQL = "'asobi_store_' || left(md5(current_database() || '.' || current_schema()), 16)"
NOTIFY_SQL = f"SELECT pg_notify({CHANNEL_SQL}, ?)"
# PostgreSQL refuses payloads of 8000 bytes or more; a batch's changes are split below that.
PAYLOAD_MAX = 7000
HEALTH_S = 2.0
RETRY_S = 0.5
CONNECT_TIMEOUT_S = 5.0


class PostgresStoreSync:
    """`StoreSync` for a cluster: announces this node's batches, listens to the others', and
    hands players' data over between nodes (`asobi.cluster.wallets`)."""

    def __init__(
        self,
        store: Store,
        database_url: str,
        node_id: str,
        wallets: WalletHandover | None = None,
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.node_id = node_id
        self.wallets = wallets
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()

    # -- announcing (runs on the writer, inside the batch's transaction) -------------------------
    def announce(self, changes: Changes) -> list[Statement]:
        return [(NOTIFY_SQL, (payload,)) for payload in self.payloads(changes)]

    def payloads(self, changes: Changes) -> list[str]:
        """The notices for one batch, each under PostgreSQL's payload limit."""
        out: list[str] = []
        notice: dict[str, Any] = self._notice()
        size = 0
        items = [("scores", list(s)) for s in changes.scores]
        items += [("keys", list(k)) for k in changes.keys]
        for field, item in items:
            item_size = len(orjson.dumps(item)) + 1
            if size + item_size > PAYLOAD_MAX - 200 and size:
                out.append(orjson.dumps(notice).decode())
                notice, size = self._notice(), 0
            notice[field].append(item)
            size += item_size
        if size:
            out.append(orjson.dumps(notice).decode())
        return out

    def _notice(self) -> dict[str, Any]:
        return {"node": self.node_id, "at": int(time.time() * 1000), "scores": [], "keys": []}

    # -- players' data --------------------------------------------------------------------------
    def handover(self, player_id: str) -> Awaitable[None] | None:
        return self.wallets.handover(player_id) if self.wallets is not None else None

    def released(self, player_id: str) -> None:
        if self.wallets is not None:
            self.wallets.released(player_id)

    # -- listening ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        """Hold a listening connection forever; each new one starts with a full re-read, since
        notices sent while no connection listened are gone."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.database_url,
                    timeout=CONNECT_TIMEOUT_S,
                    server_settings={"application_name": f"asobi-store-sync:{self.node_id}"[:63]},
                )
                self._lost.clear()
                conn.add_termination_listener(lambda _conn: self._lost.set())
                channel = await conn.fetchval("SELECT " + CHANNEL_SQL)
                await conn.add_listener(channel, self._heard)
                self.store.refresh_all()
                log.info("store_sync_listening", node_id=self.node_id, channel=channel)
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._lost.wait(), HEALTH_S)
                    if self._lost.is_set():
                        raise ConnectionError("the listening connection closed")
                    await conn.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_S)
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 1.0)
                raise
            except Exception as exc:
                log.warning("store_sync_lost", node_id=self.node_id, error=str(exc)[:300])
                if conn is not None:
                    conn.terminate()
                await asyncio.sleep(RETRY_S)

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            notice = orjson.loads(payload)
            if notice.get("node") == self.node_id:
                return  # our own batch: memory was ahead of it already
            scores = [(str(b), str(p), int(s)) for b, p, s in notice.get("scores", ())]
            keys = [(str(c), str(k)) for c, k in notice.get("keys", ())]
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            log.warning("store_sync_notice_invalid", node_id=self.node_id, error=str(exc)[:200])
            return
        self.store.merge_scores(scores)
        if keys:
            self.store.refresh_global(keys)
        log.debug(
            "store_changes_heard",
            node_id=self.node_id,
            sender=notice.get("node"),
            scores=len(scores),
            keys=len(keys),
            lag_ms=int(time.time() * 1000) - int(notice.get("at", 0)),
        )
