"""The in-memory view Lua works against, and the ordered write-behind stream behind it.

Why this shape: Lua callbacks are synchronous and run one after another on the event-loop
thread, so a callback can never wait for a database round trip without stalling every match.
Instead, everything a callback may read is already in memory when it runs:

- all leaderboards and all global storage, loaded at start (in a cluster, kept in step with
  the other nodes' writes through `asobi.store.sync.StoreSync`);
- a player's wallet and player storage while the player is connected (`acquire` on
  session.connect, `release` when the connection goes).

A callback's writes go into a `UnitOfWork` (read-your-writes, checks against memory plus the
work so far).  The engine commits it with the callback's frames, or drops it when the callback
fails.  Commit applies the writes to memory and appends them to one ordered stream; a single
task drains the stream into the database in batches (one transaction each).  Because callbacks
never interleave, check-then-debit against memory is atomic across matches: a wallet cannot be
overdrawn however many matches debit it.

Loads travel in the same stream as writes, so a player's snapshot contains exactly the writes
committed before the load was queued; writes committed while it loads are replayed on top.

Two halves: `asobi.store.model.StoreModel` is the memory and the queue, with no I/O and no event
loop; `Store` here is the writer, the asyncio task that carries the queue to the `Backend` and
turns loads and flushes into futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any, Protocol

import structlog

from asobi.extras import require
from asobi.store import errors as E
from asobi.store import ops
from asobi.store.board import Board
from asobi.store.errors import BackendUnavailable, StoreError
from asobi.store.model import Barrier, Batch, Load, StoreModel, UnitOfWork
from asobi.store.ops import Job, units_of
from asobi.store.sync import NoSync, StoreSync, changes_of

__all__ = ["Backend", "Store", "UnitOfWork", "open_backend"]

log = structlog.get_logger("asobi.store")

# Pause before retrying the stream's head after a retryable failure, doubling up to the cap.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
# How long a player's load waits for the server that held their data before (`StoreSync`).
HANDOVER_TIMEOUT_S = 2.0


class Backend(Protocol):
    dialect: str

    def describe(self) -> str: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def transact(self, job: Job) -> Any: ...


def open_backend(database_url: str | None, data_dir: Path) -> Backend:
    """SQLite in the data dir unless `database_url` names PostgreSQL (or another SQLite file)."""
    url = (database_url or "").strip()
    if url.startswith(("postgresql://", "postgres://")):
        require("asyncpg", "postgres", "ASOBI_DATABASE_URL names a PostgreSQL database")
        from asobi.store.postgres import PostgresBackend

        return PostgresBackend(url)
    from asobi.store.sqlite import SQLiteBackend

    if url.startswith("sqlite:///"):
        return SQLiteBackend(Path(url[len("sqlite:///") :]))
    if url:
        raise ValueError("ASOBI_DATABASE_URL must start with postgresql:// or sqlite:///")
    return SQLiteBackend(data_dir / "asobi.db")


class Store:
    """The writer: drains the model's queue into the backend, one step at a time, in order."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_pending: int = 100_000,
        batch_max: int = 1000,
        value_max_bytes: int = 64 * 1024,
    ) -> None:
        self.backend = backend
        self._wake = asyncio.Event()
        self.model = StoreModel(
            max_pending=max_pending,
            batch_max=batch_max,
            value_max_bytes=value_max_bytes,
            on_queued=self._wake.set,
        )
        self._waiters: dict[Load | Barrier, asyncio.Future[None]] = {}
        self._handovers: dict[Load, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # Who hears of this server's batches (nobody on a single server; asobi.store.sync).
        self.sync: StoreSync = NoSync()

    # -- the model's reads and writes, for callers that hold the store ----------------------------
    @property
    def available(self) -> bool:
        return self.model.available

    @property
    def value_max_bytes(self) -> int:
        return self.model.value_max_bytes

    def release(self, player_id: str) -> None:
        self.model.release(player_id)
        self.sync.released(player_id)

    def resident(self, player_id: str) -> bool:
        return self.model.resident(player_id)

    def unit(self, match_id: str | None = None, key: tuple[int, int] | None = None) -> UnitOfWork:
        return self.model.unit(match_id, key)

    def check_writable(self) -> None:
        self.model.check_writable()

    def commit(self, work: UnitOfWork) -> None:
        self.model.commit(work)

    def wallet(self, player_id: str) -> dict[str, int]:
        return self.model.wallet(player_id)

    def player_storage(self, player_id: str) -> dict[tuple[str, str], Any]:
        return self.model.player_storage(player_id)

    def board(self, name: str) -> Board | None:
        return self.model.board(name)

    def top(self, board: str, n: int) -> list[dict[str, object]]:
        return self.model.top(board, n)

    # -- other servers' writes (asobi.store.sync) -------------------------------------------------
    def merge_scores(self, entries: Any) -> None:
        """Leaderboard entries `(board, player, score)` another server committed."""
        self.model.merge_scores(entries)

    def refresh_global(self, keys: Any) -> None:
        """Global keys another server changed: the writer re-reads them, between batches."""
        self.model.stale_global.update((str(c), str(k)) for c, k in keys)
        self._wake.set()

    def refresh_all(self) -> None:
        """Re-read every leaderboard and all global storage (after missing notices)."""
        self.model.stale_all = True
        self._wake.set()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the database, migrate it, load what is always resident, start the writer."""
        await self.backend.open()
        applied = await self.backend.transact(ops.migrate(self.backend.dialect))
        self.model.install(
            await self.backend.transact(ops.load_boards()),
            await self.backend.transact(ops.load_global_storage()),
        )
        self._task = asyncio.get_running_loop().create_task(self._writer())
        log.info(
            "store_opened",
            backend=self.backend.describe(),
            migrations_applied=applied,
            boards=len(self.model.boards),
            global_keys=len(self.model.global_storage),
        )

    async def stop(self, timeout: float = 5.0) -> None:
        """Write out everything committed, then close.  What cannot be written is reported."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                log.error("store_stop_unflushed", pending_ops=self.model.pending_ops)
        await self.backend.close()
        log.info("store_closed", durable_ops=self.model.durable_ops, batches=self.model.batches)

    # -- futures for the model's loads and barriers -----------------------------------------------
    def acquire(self, player_id: str) -> asyncio.Future[None]:
        """Make the player's wallet and storage resident; the future resolves when they are."""
        load = self.model.acquire(player_id)
        if load is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        future = self._waiters.get(load)
        if future is None:
            future = self._waiters[load] = asyncio.get_running_loop().create_future()
            handover = self.sync.handover(player_id)
            if handover is not None:  # runs while the load waits its turn in the queue
                task = self._handovers[load] = asyncio.ensure_future(handover)
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return future

    def _resolve(self, entry: Load | Barrier, error: Exception | None = None) -> None:
        future = self._waiters.pop(entry, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything committed so far is in the database."""
        barrier = self.model.add_barrier()
        future = self._waiters[barrier] = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(future, timeout)

    # -- reads (database) -------------------------------------------------------------------------
    async def ledger(self, player_id: str, limit: int = 1000) -> list[tuple[Any, ...]]:
        return list(await self.backend.transact(ops.ledger(player_id, limit)))

    async def match_marks(self) -> dict[str, tuple[int, int]]:
        """Each match's last committed unit of work, `(tick, seq)` (`asobi.restore`)."""
        marks: dict[str, tuple[int, int]] = await self.backend.transact(ops.load_marks())
        return marks

    async def create_account(self, player_id: str, username: str, password_hash: str) -> bool:
        return bool(
            await self.backend.transact(ops.create_account(player_id, username, password_hash))
        )

    async def find_account(self, username: str) -> tuple[str, str] | None:
        found: tuple[str, str] | None = await self.backend.transact(ops.find_account(username))
        return found

    async def update_hash(self, player_id: str, password_hash: str) -> None:
        await self.backend.transact(ops.update_hash(player_id, password_hash))

    # -- the writer -------------------------------------------------------------------------------
    async def _writer(self) -> None:
        model = self.model
        backoff = RETRY_FIRST_S
        while True:
            if not model.queue and (self._closing or not model.has_stale()):
                if self._closing:
                    return
                if not model.available:
                    await self._probe(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                if model.has_stale() and not self._closing:
                    await self._refresh()
                for barrier in model.pop_barriers():  # resolve without touching the database
                    self._resolve(barrier)
                head = model.head()
                if isinstance(head, Load):
                    await self._load(head)
                elif head is not None and not isinstance(head, Barrier):
                    batch = model.next_batch()
                    result = await self.backend.transact(self._apply(batch))
                    model.batch_written(batch, result)
            except BackendUnavailable as exc:
                # Retryable: the head stays where it is (order matters) and is tried again
                # after a pause that doubles up to a cap, so an outage costs no CPU.
                model.unavailable(str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            except Exception as exc:  # refused for good: never retried, never blocks the stream
                head = model.head()
                if isinstance(head, Load):
                    error = model.load_failed(head, exc)
                    self._resolve(
                        head,
                        StoreError(E.UNAVAILABLE, f"loading the player's data failed: {error}"),
                    )
                else:
                    log.exception("store_batch_rejected", error=str(exc))
                    await self._split_batch()
            backoff = RETRY_FIRST_S
            if not model.available:
                model.recovered()

    async def _split_batch(self) -> None:
        """Write the failed batch one op (or one match unit with its mark) at a time, so one bad
        op cannot block the stream."""
        batch = self.model.take_batch()
        if batch is None:
            return
        for unit in units_of(batch.ops):
            single = Batch(uuid.uuid4().hex, unit)
            try:
                result = await self.backend.transact(self._apply(single))
            except BackendUnavailable:
                # Keep the rest queued (in order) for the normal retry path.
                return
            except Exception as exc:
                log.error("store_op_dropped", op=repr(unit)[:500], error=str(exc))
                result = ops.BatchResult()
            self.model.batch_written(single, result)

    def _apply(self, batch: Batch) -> Job:
        return ops.apply_batch(batch.id, batch.ops, self.sync.announce(changes_of(batch.ops)))

    async def _refresh(self) -> None:
        """Re-read what other servers changed.  Runs on the writer, between batches, so what is
        read and what this server still has queued never overlap (`global_refreshed`)."""
        model = self.model
        every, keys = model.take_stale()
        try:
            if every:
                model.merge_scores(await self.backend.transact(ops.load_boards()))
                rows = await self.backend.transact(ops.load_global_storage())
            else:
                rows = await self.backend.transact(ops.load_global_keys(keys))
            changed = model.global_refreshed(rows, None if every else keys)
        except BackendUnavailable:
            model.stale_all |= every  # read again once the database answers
            model.stale_global.update(keys)
            raise
        except Exception as exc:  # an unreadable row: reading again would fail the same way
            log.error("store_refresh_failed", keys=len(keys), every=every, error=str(exc)[:500])
            return
        if every:
            log.info(
                "store_refreshed",
                boards=len(model.boards),
                global_keys=len(model.global_storage),
                changed=changed,
            )

    async def _load(self, load: Load) -> None:
        rows: Any = (None, None)
        handover = self._handovers.pop(load, None)
        if handover is not None:
            if load.cancelled:
                handover.cancel()
            else:
                await self._await_handover(load.player_id, handover)
        if not load.cancelled:
            rows = await self.backend.transact(ops.load_player(load.player_id))
        self.model.load_answered(load, *rows)
        self._resolve(load)

    async def _await_handover(self, player_id: str, handover: asyncio.Future[None]) -> None:
        """Hold the player's load (and the writer) until the server that held their data has
        written it out, up to a bound: past it, or if the handover fails, the load goes ahead
        and may miss that server's last writes (docs/persistence.md)."""
        try:
            await asyncio.wait_for(asyncio.shield(handover), HANDOVER_TIMEOUT_S)
        except Exception as exc:
            handover.cancel()
            log.warning(
                "player_handover_failed",
                player_id=player_id,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )

    async def _probe(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.backend.transact(ops.ping())
        except BackendUnavailable as exc:
            self.model.last_error = str(exc)
            return
        self.model.recovered()
