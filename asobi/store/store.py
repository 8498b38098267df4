"""The in-memory view Lua works against, and the ordered write-behind stream behind it.

Why this shape: Lua callbacks are synchronous and run one after another on the event-loop
thread, so a callback can never wait for a database round trip without stalling every match.
Instead, everything a callback may read is already in memory when it runs:

- all leaderboards and all global storage, loaded at start;
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
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from asobi.extras import require
from asobi.store import errors as E
from asobi.store import ops
from asobi.store.board import Board
from asobi.store.errors import BackendUnavailable, StoreError
from asobi.store.ops import GLOBAL_OWNER, MAX_BALANCE, Job, LedgerOp, Op, ScoreOp, StorageOp

log = structlog.get_logger("asobi.store")

MAX_OPS_PER_CALLBACK = 10_000
# Pause before retrying the stream's head after a retryable failure, doubling up to the cap.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
_DELETED = object()


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


@dataclass(eq=False)
class _Load:
    player_id: str
    future: asyncio.Future[None]
    replay: list[Op] = field(default_factory=list)
    cancelled: bool = False


@dataclass(eq=False)
class _Barrier:
    future: asyncio.Future[None]


@dataclass
class _Batch:
    id: str
    ops: list[Op]


class Store:
    def __init__(
        self,
        backend: Backend,
        *,
        max_pending: int = 100_000,
        batch_max: int = 1000,
        value_max_bytes: int = 64 * 1024,
    ) -> None:
        self.backend = backend
        self.max_pending = max_pending
        self.batch_max = batch_max
        self.value_max_bytes = value_max_bytes
        self.available = True
        self.last_error: str | None = None
        self.durable_ops = 0
        self.batches = 0
        self._queue: deque[Op | _Load | _Barrier] = deque()
        self._pending_ops = 0
        self._batch: _Batch | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wallets: dict[str, dict[str, int]] = {}
        self._pstore: dict[str, dict[tuple[str, str], Any]] = {}
        self._loading: dict[str, _Load] = {}
        self._load_errors: dict[str, str] = {}
        self._boards: dict[str, Board] = {}
        self._global: dict[tuple[str, str], Any] = {}

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the database, migrate it, load what is always resident, start the writer."""
        await self.backend.open()
        applied = await self.backend.transact(ops.migrate(self.backend.dialect))
        for board, pid, score in await self.backend.transact(ops.load_boards()):
            self._boards.setdefault(board, Board()).submit(pid, int(score))
        for collection, key, value in await self.backend.transact(ops.load_global_storage()):
            self._global[(collection, key)] = orjson.loads(value)
        self._task = asyncio.get_running_loop().create_task(self._writer())
        log.info(
            "store_opened",
            backend=self.backend.describe(),
            migrations_applied=applied,
            boards=len(self._boards),
            global_keys=len(self._global),
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
                log.error("store_stop_unflushed", pending_ops=self._pending_ops)
        await self.backend.close()
        log.info("store_closed", durable_ops=self.durable_ops, batches=self.batches)

    # -- residency --------------------------------------------------------------------------------
    def acquire(self, player_id: str) -> asyncio.Future[None]:
        """Make the player's wallet and storage resident; the future resolves when they are."""
        loop = asyncio.get_running_loop()
        if player_id in self._wallets:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        load = self._loading.get(player_id)
        if load is None:
            self._load_errors.pop(player_id, None)
            load = _Load(player_id, loop.create_future())
            self._loading[player_id] = load
            self._queue.append(load)
            self._wake.set()
        return load.future

    def release(self, player_id: str) -> None:
        """The player is gone: forget their resident data (their queued writes still go out)."""
        self._wallets.pop(player_id, None)
        self._pstore.pop(player_id, None)
        self._load_errors.pop(player_id, None)
        load = self._loading.pop(player_id, None)
        if load is not None:
            load.cancelled = True

    def resident(self, player_id: str) -> bool:
        return player_id in self._wallets

    # -- transactions -----------------------------------------------------------------------------
    def unit(self, match_id: str | None = None) -> UnitOfWork:
        return UnitOfWork(self, match_id)

    def check_writable(self) -> None:
        if not self.available:
            raise StoreError(E.UNAVAILABLE, f"the database is unavailable: {self.last_error}")
        if self._pending_ops >= self.max_pending:
            raise StoreError(E.UNAVAILABLE, "the database is behind; writes are refused for now")

    def commit(self, work: UnitOfWork) -> None:
        """Apply a unit of work to memory and queue its writes, in order."""
        if not work.ops:
            return
        for op in work.ops:
            self._apply_memory(op)
            self._queue.append(op)
        self._pending_ops += len(work.ops)
        self._wake.set()

    def _apply_memory(self, op: Op) -> None:
        if isinstance(op, ScoreOp):
            self._boards.setdefault(op.board, Board()).submit(op.player_id, op.score)
            return
        owner = op.player_id if isinstance(op, LedgerOp) else op.owner
        if isinstance(op, StorageOp) and owner == GLOBAL_OWNER:
            self._set(self._global, op)
            return
        load = self._loading.get(owner)
        if load is not None:
            load.replay.append(op)
            return
        if owner not in self._wallets:
            return  # not resident: the database alone has it, a later load will see it
        if isinstance(op, LedgerOp):
            wallet = self._wallets[owner]
            after = wallet.get(op.currency, 0) + op.delta
            if after > MAX_BALANCE:
                return  # a grant queued before the wallet was loaded: the database refuses it too
            wallet[op.currency] = after
        else:
            self._set(self._pstore[owner], op)

    @staticmethod
    def _set(table: dict[tuple[str, str], Any], op: StorageOp) -> None:
        if op.value is None:
            table.pop((op.collection, op.key), None)
        else:
            table[(op.collection, op.key)] = orjson.loads(op.value)

    # -- reads (memory) ---------------------------------------------------------------------------
    def wallet(self, player_id: str) -> dict[str, int]:
        wallet = self._wallets.get(player_id)
        if wallet is None:
            raise self._not_resident(player_id)
        return wallet

    def player_storage(self, player_id: str) -> dict[tuple[str, str], Any]:
        table = self._pstore.get(player_id)
        if table is None:
            raise self._not_resident(player_id)
        return table

    def _not_resident(self, player_id: str) -> StoreError:
        if not self.available:
            return StoreError(E.UNAVAILABLE, f"the database is unavailable: {self.last_error}")
        failed = self._load_errors.get(player_id)
        if failed is not None:
            return StoreError(E.UNAVAILABLE, f"loading the player's data failed: {failed}")
        return StoreError(
            E.NOT_LOADED, f"player {player_id[:64]!r} is not connected, so their data is not loaded"
        )

    def board(self, name: str) -> Board | None:
        return self._boards.get(name)

    def top(self, board: str, n: int) -> list[dict[str, object]]:
        b = self._boards.get(board)
        return b.top(n) if b is not None else []

    # -- reads (database) -------------------------------------------------------------------------
    async def flush(self, timeout: float | None = None) -> None:
        """Wait until everything committed so far is in the database."""
        barrier = _Barrier(asyncio.get_running_loop().create_future())
        self._queue.append(barrier)
        self._wake.set()
        await asyncio.wait_for(barrier.future, timeout)

    async def ledger(self, player_id: str, limit: int = 1000) -> list[tuple[Any, ...]]:
        return list(await self.backend.transact(ops.ledger(player_id, limit)))

    async def create_account(self, player_id: str, username: str, password_hash: str) -> bool:
        return bool(
            await self.backend.transact(ops.create_account(player_id, username, password_hash))
        )

    async def find_account(self, username: str) -> tuple[str, str] | None:
        return await self.backend.transact(ops.find_account(username))

    async def update_hash(self, player_id: str, password_hash: str) -> None:
        await self.backend.transact(ops.update_hash(player_id, password_hash))

    # -- the writer -------------------------------------------------------------------------------
    async def _writer(self) -> None:
        backoff = RETRY_FIRST_S
        while True:
            if not self._queue:
                if self._closing:
                    return
                if not self.available:
                    await self._probe(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                self._step()  # barriers resolve without touching the database
                head = self._queue[0] if self._queue else None
                if isinstance(head, _Load):
                    await self._load(head)
                elif head is not None and not isinstance(head, _Barrier):
                    await self._write_batch()
            except BackendUnavailable as exc:
                # Retryable: the head stays where it is (order matters) and is tried again
                # after a pause that doubles up to a cap, so an outage costs no CPU.
                self._unavailable(str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            except Exception as exc:  # refused for good: never retried, never blocks the stream
                head = self._queue[0] if self._queue else None
                if isinstance(head, _Load):
                    self._fail_load(head, exc)
                else:
                    log.exception("store_batch_rejected", error=str(exc))
                    await self._split_batch()
            backoff = RETRY_FIRST_S
            if not self.available:
                self._recovered()

    def _step(self) -> None:
        while self._queue and isinstance(self._queue[0], _Barrier):
            barrier = self._queue.popleft()
            assert isinstance(barrier, _Barrier)
            if not barrier.future.done():
                barrier.future.set_result(None)

    def _leading_ops(self) -> Iterator[Op]:
        for count, entry in enumerate(self._queue):
            if count >= self.batch_max or isinstance(entry, _Load | _Barrier):
                return
            yield entry

    async def _write_batch(self) -> None:
        if self._batch is None:
            # A retry reuses the same id and ops, so a commit whose acknowledgement was lost
            # is recognised and not applied twice.
            self._batch = _Batch(uuid.uuid4().hex, list(self._leading_ops()))
        batch = self._batch
        result = await self.backend.transact(ops.apply_batch(batch.id, batch.ops))
        self._done(batch, result)

    def _done(self, batch: _Batch, result: ops.BatchResult) -> None:
        for _ in batch.ops:
            self._queue.popleft()
        self._pending_ops -= len(batch.ops)
        self._batch = None
        self.durable_ops += len(batch.ops)
        self.batches += 1
        for op in result.over_max:
            log.error(
                "ledger_over_max",
                player_id=op.player_id,
                currency=op.currency,
                delta=op.delta,
                hint=f"the balance would pass {MAX_BALANCE}; the grant was not written",
            )
        for op in result.conflicts:
            log.error(
                "ledger_conflict",
                player_id=op.player_id,
                currency=op.currency,
                delta=op.delta,
                hint="another server changed this wallet; the debit was not written",
            )
        log.debug(
            "store_flushed",
            ops=len(batch.ops),
            ledger=result.ledger,
            duplicate=result.duplicate,
            durable_ops=self.durable_ops,
        )

    async def _split_batch(self) -> None:
        """Write the failed batch one op at a time, so one bad op cannot block the stream."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        for op in batch.ops:
            single = _Batch(uuid.uuid4().hex, [op])
            try:
                result = await self.backend.transact(ops.apply_batch(single.id, single.ops))
            except BackendUnavailable:
                # Keep the rest queued (in order) for the normal retry path.
                return
            except Exception as exc:
                log.error("store_op_dropped", op=repr(op)[:500], error=str(exc))
                result = ops.BatchResult()
            self._done(single, result)

    async def _load(self, load: _Load) -> None:
        if not load.cancelled:
            wallet_rows, storage_rows = await self.backend.transact(ops.load_player(load.player_id))
        if load.cancelled:  # released before or while the query ran
            self._queue.popleft()
            if not load.future.done():
                load.future.set_result(None)
            return
        # Both built before either is installed: a row that cannot be read leaves nothing half
        # resident.
        wallet = {cur: int(bal) for cur, bal in wallet_rows}
        storage = {(c, k): orjson.loads(v) for c, k, v in storage_rows}
        self._queue.popleft()
        pid = load.player_id
        self._wallets[pid] = wallet
        self._pstore[pid] = storage
        del self._loading[pid]
        for op in load.replay:
            self._apply_memory(op)
        if not load.future.done():
            load.future.set_result(None)

    def _fail_load(self, load: _Load, exc: Exception) -> None:
        """A load the database answers with something unusable (a corrupt row, a query it
        refuses): retrying would fail the same way, so the load leaves the queue and the waiting
        session hears why.  The player's writes still go out; their data stays not resident."""
        self._queue.popleft()
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("player_load_failed", player_id=load.player_id, error=error)
        if self._loading.get(load.player_id) is load:
            del self._loading[load.player_id]
            self._load_errors[load.player_id] = error
        if not load.future.done():
            load.future.set_exception(
                StoreError(E.UNAVAILABLE, f"loading the player's data failed: {error}")
            )

    async def _probe(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.backend.transact(ops.ping())
        except BackendUnavailable as exc:
            self.last_error = str(exc)
            return
        self._recovered()

    def _unavailable(self, error: str) -> None:
        self.last_error = error
        if self.available:
            self.available = False
            log.error("store_unavailable", error=error, pending_ops=self._pending_ops)

    def _recovered(self) -> None:
        self.available = True
        log.info("store_recovered", pending_ops=self._pending_ops)


class UnitOfWork:
    """The persistence writes of one callback: checked against memory, applied on commit."""

    __slots__ = ("match_id", "ops", "scores", "storage", "store", "wallet")

    def __init__(self, store: Store, match_id: str | None) -> None:
        self.store = store
        self.match_id = match_id
        self.ops: list[Op] = []
        self.wallet: dict[tuple[str, str], int] = {}
        self.storage: dict[tuple[str, str, str], Any] = {}
        self.scores: dict[tuple[str, str], int] = {}

    def commit(self) -> None:
        self.store.commit(self)

    def _writing(self) -> None:
        self.store.check_writable()
        if len(self.ops) >= MAX_OPS_PER_CALLBACK:
            raise StoreError(E.TOO_LARGE, f"more than {MAX_OPS_PER_CALLBACK} writes in one call")

    # -- economy ----------------------------------------------------------------------------------
    def _balance(self, player_id: str, currency: str) -> int:
        return self.store.wallet(player_id).get(currency, 0) + self.wallet.get(
            (player_id, currency), 0
        )

    def grant(self, player_id: str, currency: str, amount: int, reason: str | None) -> Any:
        self._writing()
        resident = self.store.resident(player_id)
        key = (player_id, currency)
        # A connected player's balance is in memory: check it.  Otherwise only this callback's
        # own grants are known here, and the database refuses a grant that would pass the
        # maximum when it writes it (logged as `ledger_over_max`).
        known = self._balance(player_id, currency) if resident else self.wallet.get(key, 0)
        if known + amount > MAX_BALANCE:
            raise StoreError(
                E.TOO_LARGE,
                f"the {currency} balance would pass the maximum of {MAX_BALANCE}",
            )
        after = known + amount if resident else None
        self.wallet[key] = self.wallet.get(key, 0) + amount
        self.ops.append(LedgerOp(player_id, currency, amount, reason, self.match_id))
        return after if after is not None else True

    def debit(self, player_id: str, currency: str, amount: int, reason: str | None) -> int:
        self._writing()
        current = self._balance(player_id, currency)
        if current < amount:
            raise StoreError(E.INSUFFICIENT_FUNDS)
        key = (player_id, currency)
        self.wallet[key] = self.wallet.get(key, 0) - amount
        self.ops.append(LedgerOp(player_id, currency, -amount, reason, self.match_id))
        return current - amount

    def balance(self, player_id: str) -> dict[str, int]:
        out = dict(self.store.wallet(player_id))
        for (pid, currency), delta in self.wallet.items():
            if pid == player_id:
                out[currency] = out.get(currency, 0) + delta
        return out

    # -- leaderboards -----------------------------------------------------------------------------
    def submit(self, board: str, player_id: str, score: int) -> dict[str, Any]:
        self._writing()
        b = self.store.board(board)
        known = (b.best(player_id) if b else None, self.scores.get((board, player_id)))
        best = max((s for s in known if s is not None), default=None)
        if best is not None and score <= best:
            return {"best": best, "improved": False}
        self.scores[(board, player_id)] = score
        self.ops.append(ScoreOp(board, player_id, score))
        return {"best": score, "improved": True}

    def top(self, board: str, n: int) -> list[dict[str, object]]:
        return self.store.top(board, n)

    def rank(self, board: str, player_id: str) -> dict[str, Any] | None:
        b = self.store.board(board)
        rank = b.rank(player_id) if b else None
        if b is None or rank is None:
            return None
        return {"rank": rank, "score": b.best(player_id), "total": len(b)}

    def around(self, board: str, player_id: str, n: int) -> list[dict[str, object]]:
        b = self.store.board(board)
        return b.around(player_id, n) if b else []

    # -- storage ----------------------------------------------------------------------------------
    def get(self, owner: str, collection: str, key: str) -> Any:
        pending = self.storage.get((owner, collection, key), None)
        if pending is not None:
            return None if pending is _DELETED else pending
        if owner == GLOBAL_OWNER:
            return self.store._global.get((collection, key))
        return self.store.player_storage(owner).get((collection, key))

    def set(self, owner: str, collection: str, key: str, value: Any) -> bool:
        self._writing()
        text: str | None = None
        if value is not None:
            raw = orjson.dumps(value)
            if len(raw) > self.store.value_max_bytes:
                raise StoreError(
                    E.TOO_LARGE,
                    f"value is {len(raw)} bytes; the limit is {self.store.value_max_bytes}",
                )
            text = raw.decode()
        self.storage[(owner, collection, key)] = _DELETED if value is None else value
        self.ops.append(StorageOp(owner, collection, key, text))
        return True
