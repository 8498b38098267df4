"""SQLite backend: stdlib `sqlite3` on one dedicated thread, WAL mode, full fsync per commit.

One thread owns the connection, so every job runs in submission order (the store relies on that
order) and the event loop never waits on disk.  `synchronous=FULL` makes a commit survive power
loss, not only a crash of the process; write-behind batching keeps the fsync count low.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from asobi.store.errors import BackendUnavailable
from asobi.store.ops import Job

BUSY_TIMEOUT_MS = 2000


class SQLiteBackend:
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asobi-sqlite")

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    async def open(self) -> None:
        await self._run(self._connect)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._conn = conn

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._run(shut)
        finally:
            self._pool.shutdown(wait=True)

    async def transact(self, job: Job) -> Any:
        return await self._run(self._transact, job)

    def _transact(self, job: Job) -> Any:
        conn = self._conn
        if conn is None:
            raise BackendUnavailable("the database is closed")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                sql, params = next(job)
                while True:
                    rows = conn.execute(sql, params).fetchall()
                    sql, params = job.send(rows)
            except StopIteration as done:
                conn.execute("COMMIT")
                return done.value
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise BackendUnavailable(f"sqlite: {exc}") from exc

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)
