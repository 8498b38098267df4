"""The store's in-memory model: what Lua reads and writes, and the ordered queue of pending work.

This half of the store does no I/O and needs no event loop (`asobi.store.store` is the other
half: the asyncio writer that carries the queue to the database).  It holds the resident data
(every leaderboard, all global storage, the wallets and storage of connected players), the
`UnitOfWork` that checks a callback's writes against it, and one ordered queue of entries: write
ops, player loads and flush barriers.  The writer asks it for the next step (`head`,
`next_batch`) and reports each answer back (`batch_written`, `load_answered`, `load_failed`), so
the ordering rules (a load sees exactly the writes queued before it, writes while it loads are
replayed on top, a retried batch keeps its id) are unit-tested without a database.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from asobi.store import errors as E
from asobi.store import ops
from asobi.store.board import Board
from asobi.store.errors import StoreError
from asobi.store.ops import (
    GLOBAL_OWNER,
    MAX_BALANCE,
    LedgerOp,
    MatchMark,
    Op,
    ScoreOp,
    StorageOp,
)

log = structlog.get_logger("asobi.store")

MAX_OPS_PER_CALLBACK = 10_000
_DELETED = object()


@dataclass(eq=False)
class Load:
    """A player's data being read; ops for them committed meanwhile wait in `replay`.  A
    `reread` load is of a resident player whose memory the database contradicts
    (`StoreModel.reread`): memory keeps serving and taking writes until the rows arrive."""

    player_id: str
    replay: list[Op] = field(default_factory=list)
    cancelled: bool = False
    reread: bool = False


@dataclass(eq=False)
class Barrier:
    """Reached once everything queued before it is in the database (`flush`)."""


@dataclass
class Batch:
    id: str
    ops: list[Op]


Entry = Op | Load | Barrier


class StoreModel:
    def __init__(
        self,
        *,
        max_pending: int = 100_000,
        batch_max: int = 1000,
        value_max_bytes: int = 64 * 1024,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.max_pending = max_pending
        self.batch_max = batch_max
        self.value_max_bytes = value_max_bytes
        # Called whenever an entry is queued (the writer wakes up).
        self.on_queued = on_queued
        self.available = True
        self.last_error: str | None = None
        self.durable_ops = 0
        self.batches = 0
        self.queue: deque[Entry] = deque()
        self.pending_ops = 0
        self.batch: Batch | None = None
        self.wallets: dict[str, dict[str, int]] = {}
        self.pstore: dict[str, dict[tuple[str, str], Any]] = {}
        self.loading: dict[str, Load] = {}
        self.load_errors: dict[str, str] = {}
        self.boards: dict[str, Board] = {}
        self.global_storage: dict[tuple[str, str], Any] = {}
        # Global keys with writes of this server not yet in the database, and how many: a value
        # re-read for another server's write must not replace a newer one of ours still queued.
        self.pending_global: dict[tuple[str, str], int] = {}
        # Global keys another server changed, to be re-read (`refresh_all`: every key).
        self.stale_global: set[tuple[str, str]] = set()
        self.stale_all = False
        # Matches restored from a snapshot: the last unit of work each had committed before the
        # restart, `(tick, seq)`.  Units keyed at or before it ran already; they are skipped.
        self.committed_before: dict[str, tuple[int, int]] = {}
        self.units_skipped = 0

    def _queued(self) -> None:
        if self.on_queued is not None:
            self.on_queued()

    # -- what is always resident ------------------------------------------------------------------
    def install(self, board_rows: Any, global_rows: Any) -> None:
        for board, pid, score in board_rows:
            self.boards.setdefault(board, Board()).submit(pid, int(score))
        for collection, key, value in global_rows:
            self.global_storage[(collection, key)] = orjson.loads(value)

    # -- residency --------------------------------------------------------------------------------
    def acquire(self, player_id: str) -> Load | None:
        """Queue a load of the player's data (or join the one under way); None when resident."""
        if player_id in self.wallets:
            return None
        load = self.loading.get(player_id)
        if load is None:
            self.load_errors.pop(player_id, None)
            load = Load(player_id)
            self.loading[player_id] = load
            self.queue.append(load)
            self._queued()
        return load

    def release(self, player_id: str) -> None:
        """The player is gone: forget their resident data (their queued writes still go out)."""
        self.wallets.pop(player_id, None)
        self.pstore.pop(player_id, None)
        self.load_errors.pop(player_id, None)
        load = self.loading.pop(player_id, None)
        if load is not None:
            load.cancelled = True

    def resident(self, player_id: str) -> bool:
        return player_id in self.wallets

    def reread(self, player_id: str) -> None:
        """Read a resident player's data again, behind everything queued so far: memory took
        writes the database then refused (`unit_fenced`), so it no longer shows what the
        database holds.  Writes committed meanwhile are replayed on the rows read."""
        if player_id not in self.wallets or player_id in self.loading:
            return  # not resident (nothing to correct), or a read is already behind the writes
        load = Load(player_id, reread=True)
        self.loading[player_id] = load
        self.queue.append(load)
        self._queued()

    # -- transactions -----------------------------------------------------------------------------
    def unit(self, match_id: str | None = None, key: tuple[int, int] | None = None) -> UnitOfWork:
        """A unit of work; `key` is its `(tick, seq)` in its match (exactly-once across a
        restore: see `commit`)."""
        return UnitOfWork(self, match_id, key)

    def check_writable(self) -> None:
        if not self.available:
            raise StoreError(E.UNAVAILABLE, f"the database is unavailable: {self.last_error}")
        if self.pending_ops >= self.max_pending:
            raise StoreError(E.UNAVAILABLE, "the database is behind; writes are refused for now")

    def commit(self, work: UnitOfWork) -> None:
        """Apply a unit of work to memory and queue its writes, in order."""
        if not work.ops:
            return
        key, match_id = work.key, work.match_id
        if key is not None and match_id is not None and self.committed_before:
            done = self.committed_before.get(match_id)
            if done is not None:
                if key <= done:
                    # A tick lost in a crash and run again after the restore: its first run's
                    # writes are in the database already.
                    self.units_skipped += 1
                    log.info(
                        "unit_skipped",
                        match_id=match_id,
                        tick=key[0],
                        seq=key[1],
                        ops=len(work.ops),
                        committed=list(done),
                    )
                    return
                if key[0] > done[0]:
                    del self.committed_before[match_id]
        count = len(work.ops)
        if key is not None and match_id is not None:
            # The mark goes first: it guards the unit's writes in their transaction (`MatchMark`).
            self.queue.append(MatchMark(match_id, key[0], key[1], count))
            count += 1
        for op in work.ops:
            self._apply_memory(op)
            self.queue.append(op)
            if isinstance(op, StorageOp) and op.owner == GLOBAL_OWNER:
                name = (op.collection, op.key)
                self.pending_global[name] = self.pending_global.get(name, 0) + 1
        self.pending_ops += count
        self._queued()

    def _apply_memory(self, op: Op) -> None:
        if isinstance(op, MatchMark):
            return
        if isinstance(op, ScoreOp):
            self.boards.setdefault(op.board, Board()).submit(op.player_id, op.score)
            return
        owner = op.player_id if isinstance(op, LedgerOp) else op.owner
        if isinstance(op, StorageOp) and owner == GLOBAL_OWNER:
            self._set(self.global_storage, op)
            return
        load = self.loading.get(owner)
        if load is not None:
            load.replay.append(op)  # and, if resident (a reread), applied to memory meanwhile
        if owner not in self.wallets:
            return  # not resident: the database alone has it, a later load will see it
        if isinstance(op, LedgerOp):
            wallet = self.wallets[owner]
            after = wallet.get(op.currency, 0) + op.delta
            if after > MAX_BALANCE:
                return  # a grant queued before the wallet was loaded: the database refuses it too
            wallet[op.currency] = after
        else:
            self._set(self.pstore[owner], op)

    @staticmethod
    def _set(table: dict[tuple[str, str], Any], op: StorageOp) -> None:
        if op.value is None:
            table.pop((op.collection, op.key), None)
        else:
            table[(op.collection, op.key)] = orjson.loads(op.value)

    # -- reads ------------------------------------------------------------------------------------
    def wallet(self, player_id: str) -> dict[str, int]:
        wallet = self.wallets.get(player_id)
        if wallet is None:
            raise self._not_resident(player_id)
        return wallet

    def player_storage(self, player_id: str) -> dict[tuple[str, str], Any]:
        table = self.pstore.get(player_id)
        if table is None:
            raise self._not_resident(player_id)
        return table

    def _not_resident(self, player_id: str) -> StoreError:
        if not self.available:
            return StoreError(E.UNAVAILABLE, f"the database is unavailable: {self.last_error}")
        failed = self.load_errors.get(player_id)
        if failed is not None:
            return StoreError(E.UNAVAILABLE, f"loading the player's data failed: {failed}")
        return StoreError(
            E.NOT_LOADED, f"player {player_id[:64]!r} is not connected, so their data is not loaded"
        )

    def board(self, name: str) -> Board | None:
        return self.boards.get(name)

    def top(self, board: str, n: int) -> list[dict[str, object]]:
        b = self.boards.get(board)
        return b.top(n) if b is not None else []

    # -- other servers' writes (asobi.store.sync) ------------------------------------------------
    def merge_scores(self, entries: Any) -> None:
        """Leaderboard entries another server wrote: a board keeps each player's best, so the
        higher of the two is what the database holds too."""
        for board, player_id, score in entries:
            self.boards.setdefault(board, Board()).submit(player_id, int(score))

    def has_stale(self) -> bool:
        return self.stale_all or bool(self.stale_global)

    def take_stale(self) -> tuple[bool, list[tuple[str, str]]]:
        """What the writer should re-read now: everything, or these global keys."""
        every, keys = self.stale_all, sorted(self.stale_global)
        self.stale_all = False
        self.stale_global.clear()
        return every, keys

    def global_refreshed(self, rows: Any, keys: list[tuple[str, str]] | None) -> int:
        """Install re-read global rows (`keys` None: the whole table was read).  Called by the
        writer between batches, so a key with a write of ours still queued was not in the
        database when it was read: ours comes later and stays.  Returns the keys changed."""
        found = {(c, k): v for c, k, v in rows}
        names = set(self.global_storage) | set(found) if keys is None else set(keys)
        changed = 0
        for name in names:
            if name in self.pending_global:
                continue
            text = found.get(name)
            if text is None:
                changed += self.global_storage.pop(name, _DELETED) is not _DELETED
                continue
            value = orjson.loads(text)
            if self.global_storage.get(name, _DELETED) != value:
                self.global_storage[name] = value
                changed += 1
        return changed

    # -- the queue, step by step (the writer's side) ----------------------------------------------
    def add_barrier(self) -> Barrier:
        barrier = Barrier()
        self.queue.append(barrier)
        self._queued()
        return barrier

    def pop_barriers(self) -> list[Barrier]:
        """Barriers at the head are reached: nothing before them is still pending."""
        reached = []
        while self.queue and isinstance(self.queue[0], Barrier):
            barrier = self.queue.popleft()
            assert isinstance(barrier, Barrier)
            reached.append(barrier)
        return reached

    def head(self) -> Entry | None:
        return self.queue[0] if self.queue else None

    def _leading_ops(self) -> Iterator[Op]:
        """Up to `batch_max` ops, never splitting a match's unit from its guarding mark."""
        unit_left = 0
        for count, entry in enumerate(self.queue):
            if isinstance(entry, Load | Barrier) or (count >= self.batch_max and not unit_left):
                return
            unit_left = entry.count if isinstance(entry, MatchMark) else max(unit_left - 1, 0)
            yield entry

    def next_batch(self) -> Batch:
        """The ops at the head, up to `batch_max`.  A retry gets the same id and ops, so a
        commit whose acknowledgement was lost is recognised and not applied twice."""
        if self.batch is None:
            self.batch = Batch(uuid.uuid4().hex, list(self._leading_ops()))
        return self.batch

    def take_batch(self) -> Batch | None:
        """The failed batch, to be written one op at a time."""
        batch, self.batch = self.batch, None
        return batch

    def batch_written(self, batch: Batch, result: ops.BatchResult) -> None:
        for op in batch.ops:
            self.queue.popleft()
            if isinstance(op, StorageOp) and op.owner == GLOBAL_OWNER:
                name = (op.collection, op.key)
                left = self.pending_global.get(name, 0) - 1
                if left > 0:
                    self.pending_global[name] = left
                else:
                    self.pending_global.pop(name, None)
        self.pending_ops -= len(batch.ops)
        self.batch = None
        self.durable_ops += len(batch.ops)
        self.batches += 1
        for mark in result.fenced:
            log.warning(
                "unit_fenced",
                match_id=mark.match_id,
                tick=mark.tick,
                seq=mark.seq,
                ops=mark.count,
            )
        if result.fenced:
            self._turned_away(batch.ops, result.fenced)
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
            self.reread(op.player_id)  # memory took the debit: read what the database has
        log.debug(
            "store_flushed",
            ops=len(batch.ops),
            ledger=result.ledger,
            duplicate=result.duplicate,
            durable_ops=self.durable_ops,
        )

    def _turned_away(self, batch_ops: list[Op], fenced: list[MatchMark]) -> None:
        """Memory applied these units when they were committed; the database did not (another
        run of the match had applied their tick).  What they touched is read again."""
        marks = {id(mark) for mark in fenced}
        for mark, *writes in ops.units_of(batch_ops):
            if id(mark) not in marks:
                continue
            for write in writes:
                if isinstance(write, LedgerOp):
                    self.reread(write.player_id)
                elif isinstance(write, StorageOp) and write.owner == GLOBAL_OWNER:
                    self.stale_global.add((write.collection, write.key))
                elif isinstance(write, StorageOp):
                    self.reread(write.owner)

    def load_answered(self, load: Load, wallet_rows: Any, storage_rows: Any) -> None:
        """The head load's rows arrived (None for both when it was cancelled before asking)."""
        if load.cancelled:  # released before or while the query ran
            self.queue.popleft()
            return
        # Both built before either is installed: a row that cannot be read leaves nothing half
        # resident (and the load at the head, for `load_failed`).
        wallet = {cur: int(bal) for cur, bal in wallet_rows}
        storage = {(c, k): orjson.loads(v) for c, k, v in storage_rows}
        self.queue.popleft()
        pid = load.player_id
        self.wallets[pid] = wallet
        self.pstore[pid] = storage
        del self.loading[pid]
        for op in load.replay:
            self._apply_memory(op)

    def load_failed(self, load: Load, exc: Exception) -> str:
        """A load the database answers with something unusable (a corrupt row, a query it
        refuses): retrying would fail the same way, so the load leaves the queue.  The player's
        writes still go out; their data stays not resident.  Returns the reason."""
        self.queue.popleft()
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("player_load_failed", player_id=load.player_id, error=error, reread=load.reread)
        if self.loading.get(load.player_id) is load:
            del self.loading[load.player_id]
            if not load.reread:  # a failed reread leaves the player resident, as they were
                self.load_errors[load.player_id] = error
        return error

    def unavailable(self, error: str) -> None:
        self.last_error = error
        if self.available:
            self.available = False
            log.error("store_unavailable", error=error, pending_ops=self.pending_ops)

    def recovered(self) -> None:
        self.available = True
        log.info("store_recovered", pending_ops=self.pending_ops)


class UnitOfWork:
    """The persistence writes of one callback: checked against memory, applied on commit."""

    __slots__ = ("key", "match_id", "ops", "scores", "storage", "store", "wallet")

    def __init__(
        self, store: StoreModel, match_id: str | None, key: tuple[int, int] | None = None
    ) -> None:
        self.store = store
        self.match_id = match_id
        self.key = key
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
            return self.store.global_storage.get((collection, key))
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
