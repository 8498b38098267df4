"""PostgreSQL backend through asyncpg: one connection, one job at a time, reconnect on loss.

A single connection behind a FIFO lock gives the same ordering as the SQLite worker thread
(the store relies on it).  Write-behind batching makes one connection plenty for one server.
A lost connection is dropped and re-opened on the next job, so an outage heals by itself.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg

from asobi.store.errors import BackendUnavailable
from asobi.store.ops import Job

COMMAND_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
_PLACEHOLDER = re.compile(r"\?")


def to_dollar(sql: str) -> str:
    """`?` placeholders to asyncpg's `$1, $2...` (our SQL never has `?` inside literals)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class PostgresBackend:
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._sql: dict[str, str] = {}

    def describe(self) -> str:
        return "postgresql:" + self.url.rsplit("@", 1)[-1]  # no credentials in logs

    async def open(self) -> None:
        async with self._lock:
            await self._connection()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncpg.connect(
                    self.url, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S
                )
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                raise BackendUnavailable(f"postgresql: cannot connect: {exc}") from exc
        return self._conn

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def transact(self, job: Job) -> Any:
        async with self._lock:
            conn = await self._connection()
            try:
                async with conn.transaction():
                    try:
                        sql, params = next(job)
                        while True:
                            rows = await conn.fetch(self._dollar(sql), *params)
                            sql, params = job.send([tuple(r) for r in rows])
                    except StopIteration as done:
                        return done.value
            except (
                TimeoutError,
                OSError,
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
            ) as exc:
                await self._drop()
                raise BackendUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from exc
            except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
                raise BackendUnavailable(f"postgresql: {exc}") from exc

    def _dollar(self, sql: str) -> str:
        converted = self._sql.get(sql)
        if converted is None:
            converted = self._sql[sql] = to_dollar(sql)
        return converted

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
