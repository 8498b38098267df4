"""The match journal: every match's latest snapshot, so a match can outlive its process.

A `Snapshot` is what a match needs to carry on elsewhere or later: its state written as data
(the reload's copy, `MatchLua.pack_state`), its tick, the script version it runs, its random
generator and its seats with their resume tokens.  `asobi.snapshots` takes them at tick
boundaries; `asobi.restore` starts matches from them.

`Journal` is the interface; `StoreJournal` keeps snapshots in the store's database (SQLite or
PostgreSQL, table `match_journal`), which is what a single node needs.  A cluster swaps in another
implementation in `asobi.app.join_cluster`.  Saving never waits: `save` and `forget` only note
the newest word on a match, and one writer task carries those notes to the database off the tick
path, the latest snapshot of each match winning over any older one not yet written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import structlog

from asobi.store.errors import BackendUnavailable
from asobi.store.store import Backend

log = structlog.get_logger("asobi.journal")

# The writer gathers this long after a wake-up before writing: one transaction (one fsync) then
# carries every match whose snapshot came due meanwhile.  A write costs about a millisecond of
# the server's CPU whatever it carries (a thread woken, a transaction, an fsync, the loop woken
# back; measured on a busy core), so gathering for 250 ms instead of 50 costs a crash at most
# 200 ms more of replayed ticks and saves 3-4% of a shared_state match-tick's CPU
# (docs/performance-history.md, "Latest changes").
COALESCE_S = 0.25
RETRY_MAX_S = 1.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One match at one tick boundary."""

    match_id: str
    mode: str
    script: str
    script_hash: str
    script_version: str
    tick: int
    seed: int
    random: tuple[int, int, int, int]
    # (player id, resume token): the token a reconnecting player presents to take the seat back.
    seats: tuple[tuple[str, str | None], ...]
    state: bytes
    saved_at_ms: int

    def meta(self) -> bytes:
        """Everything but the state, as JSON (the `meta` column)."""
        return orjson.dumps(
            {
                "mode": self.mode,
                "script": self.script,
                "script_hash": self.script_hash,
                "script_version": self.script_version,
                "seed": self.seed,
                "random": [str(w) for w in self.random],  # 64-bit unsigned: past JSON's doubles
                "seats": [list(seat) for seat in self.seats],
            }
        )

    @classmethod
    def from_row(
        cls, match_id: str, tick: int, saved_at: int, meta: str | bytes, state: bytes
    ) -> Snapshot:
        m = orjson.loads(meta)
        a, b, c, d = (int(w) for w in m["random"])
        return cls(
            match_id=match_id,
            mode=m["mode"],
            script=m["script"],
            script_hash=m["script_hash"],
            script_version=m["script_version"],
            tick=int(tick),
            seed=int(m["seed"]),
            random=(a, b, c, d),
            seats=tuple((str(pid), tok) for pid, tok in m["seats"]),
            state=bytes(state),
            saved_at_ms=int(saved_at),
        )

    @property
    def size(self) -> int:
        return len(self.state) + len(self.meta())


class Journal(Protocol):
    """Where matches' latest snapshots are kept."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Write out what is pending, then stop."""

    def save(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` as its match's latest; returns at once (written behind)."""

    def forget(self, match_id: str) -> None:
        """The match is over: drop its snapshot (written behind, after any pending save)."""

    async def flush(self) -> None:
        """Wait until everything saved or forgotten so far is written."""

    async def latest(self, match_id: str) -> Snapshot | None: ...

    async def all(self) -> list[Snapshot]: ...


Rows = list[tuple[Any, ...]]
Job = Generator[tuple[str, tuple[Any, ...]], Rows, Any]

_UPSERT = (
    "INSERT INTO match_journal (match_id, tick, saved_at, meta, state) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (match_id) DO UPDATE SET tick = excluded.tick, saved_at = excluded.saved_at, "
    "meta = excluded.meta, state = excluded.state"
)
_SELECT = "SELECT match_id, tick, saved_at, meta, state FROM match_journal"


def _write(notes: dict[str, Snapshot | None]) -> Job:
    for match_id, snapshot in notes.items():
        if snapshot is None:
            yield ("DELETE FROM match_journal WHERE match_id = ?", (match_id,))
            yield ("DELETE FROM match_marks WHERE match_id = ?", (match_id,))
        else:
            yield (
                _UPSERT,
                (
                    match_id,
                    snapshot.tick,
                    snapshot.saved_at_ms,
                    snapshot.meta().decode(),
                    snapshot.state,
                ),
            )


def forget_marks(match_ids: list[str]) -> Job:
    """Drop the exactly-once marks of matches that ended (a journal kept elsewhere than the
    store, as in a cluster, still leaves its marks in the store's database)."""
    for match_id in match_ids:
        yield ("DELETE FROM match_marks WHERE match_id = ?", (match_id,))


def _read(match_id: str | None) -> Job:
    if match_id is None:
        rows = yield (_SELECT + " ORDER BY saved_at", ())
    else:
        rows = yield (_SELECT + " WHERE match_id = ?", (match_id,))
    return rows


class WriteBehindJournal:
    """The write-behind part every journal shares: `save` and `forget` note the newest word on a
    match and return at once; one task writes the notes in batches, gathering `coalesce_s` after
    a wake-up, retrying with back-off while the storage is unreachable (`RETRYABLE`) and keeping
    only the newest note per match meanwhile.  Subclasses say where a batch goes (`write`) and
    how to read snapshots back."""

    RETRYABLE: tuple[type[Exception], ...] = ()

    def __init__(self, *, coalesce_s: float = COALESCE_S) -> None:
        self.coalesce_s = coalesce_s
        # match id -> its newest snapshot, or None to forget it; not written yet.
        self._notes: dict[str, Snapshot | None] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._unavailable = False
        # `flush_now`: notes are numbered; the writer says up to which one all are written,
        # and a hurried flush cuts the writer's gathering delay short.
        self._noted = 0
        self._written_through = 0
        self._hurried = asyncio.Event()
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self.written = 0
        self.bytes_written = 0
        self.writes = 0

    async def write(self, notes: dict[str, Snapshot | None]) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._writer())

    async def stop(self, timeout: float = 5.0) -> None:
        if self._task is None or self._closing:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            log.error("journal_stop_unwritten", matches=len(self._notes))

    def save(self, snapshot: Snapshot) -> None:
        self._note(snapshot.match_id, snapshot)

    def forget(self, match_id: str) -> None:
        self._note(match_id, None)

    def _note(self, match_id: str, snapshot: Snapshot | None) -> None:
        self._notes[match_id] = snapshot
        self._noted += 1
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        await self._idle.wait()

    async def flush_now(self) -> None:
        """Wait until every note made so far is written, without the writer's gathering delay
        (a drain waits on it between a match's last tick here and its first on another node,
        so notes made after the call, by matches still running, do not hold it up)."""
        target = self._noted
        if self._written_through >= target or self._task is None:
            return
        done = asyncio.get_running_loop().create_future()
        self._flushes.append((target, done))
        self._hurried.set()
        self._wake.set()
        await done

    def _written(self, through: int) -> None:
        """Every note up to `through` is written (or dropped for good): release their flushes."""
        self._written_through = max(self._written_through, through)
        waiting = []
        for target, done in self._flushes:
            if target <= self._written_through:
                if not done.done():
                    done.set_result(None)
            else:
                waiting.append((target, done))
        self._flushes = waiting
        if not waiting:
            self._hurried.clear()

    async def _writer(self) -> None:
        backoff = self.coalesce_s
        while True:
            if not self._notes:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if not (self._closing or self._hurried.is_set()):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurried.wait(), self.coalesce_s)
                continue
            notes, self._notes = self._notes, {}
            through = self._noted
            try:
                await self.write(notes)
            except self.RETRYABLE as exc:
                # Put them back under anything newer noted meanwhile, and try again later.
                for match_id, snapshot in notes.items():
                    self._notes.setdefault(match_id, snapshot)
                if not self._unavailable:
                    self._unavailable = True
                    log.error("journal_unavailable", error=str(exc), matches=len(self._notes))
                if self._closing:
                    log.error("journal_stop_unwritten", matches=len(self._notes))
                    self._notes.clear()
                    self._written(self._noted)
                    continue
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            except Exception as exc:  # a snapshot the storage refuses: dropped, never retried
                log.exception("journal_write_failed", error=str(exc), matches=len(notes))
                self._written(through)
                continue
            if self._unavailable:
                self._unavailable = False
                log.info("journal_recovered")
            backoff = self.coalesce_s
            self._written(through)
            self.writes += 1
            for snapshot in notes.values():
                if snapshot is not None:
                    self.written += 1
                    self.bytes_written += len(snapshot.state)


class StoreJournal(WriteBehindJournal):
    """The journal in the store's database, written by one task of its own."""

    RETRYABLE = (BackendUnavailable,)

    def __init__(self, backend: Backend, *, coalesce_s: float = COALESCE_S) -> None:
        super().__init__(coalesce_s=coalesce_s)
        self.backend = backend

    async def write(self, notes: dict[str, Snapshot | None]) -> None:
        await self.backend.transact(_write(notes))

    async def latest(self, match_id: str) -> Snapshot | None:
        rows = await self.backend.transact(_read(match_id))
        return Snapshot.from_row(*rows[0]) if rows else None

    async def all(self) -> list[Snapshot]:
        """Every snapshot, oldest first.  A row that does not read back (damaged by hand, by a
        disk) is logged as `journal_row_unreadable` and left out: it must not stop a start."""
        snapshots = []
        for row in await self.backend.transact(_read(None)):
            try:
                snapshots.append(Snapshot.from_row(*row))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("journal_row_unreadable", match_id=row[0], error=repr(exc)[:300])
        return snapshots
