"""Recording matches for replay (`ASOBI_RECORD=1`): what went in, and a digest of what came out.

A recorded match keeps, in the store's database:

- its first snapshot, taken when it started (tick 0: the state `init` and the first `join`s
  left, the seed and the random generator), with the scripts it runs and the Lua limits it runs
  under (table `match_records`): a callback that ran out of memory or of its budget in production
  must do so again on a machine whose `ASOBI_LUA_*` settings differ;
- one row per tick (`match_record_ticks`): the joins and leaves since the tick before, the inputs
  `handle_input` was given, the reloads the tick resolved, and a digest of every player's
  `get_state` frame;
- the source of every script version and module it ran, by content hash (`script_sources`): a
  replay runs the same code even after the game dir changed.

`asobi.replay` re-runs a match from these and compares digests.  The match calls its
`MatchRecording` with plain data (None when recording is off, so the tick path pays one attribute
test); rows are handed to `RecordWriter`, whose task writes them in batches off the tick path.
Each row is encoded (JSON) when its tick ends, so what waits for the database is bytes, not the
inputs' objects.  Memory is bounded: past `max_pending_bytes` of rows not yet written, a match's
recording stops (`record_overflow`), and its replay ends where its record does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Generator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from asobi.journal import Snapshot
from asobi.match_host import first_line
from asobi.store.errors import BackendUnavailable

if TYPE_CHECKING:
    from asobi.match import Match
    from asobi.scripts import ScriptRegistry, ScriptVersion
    from asobi.store.store import Backend

log = structlog.get_logger("asobi.recording")

COALESCE_S = 0.1
RETRY_MAX_S = 1.0
MAX_PENDING_BYTES = 64 * 1024 * 1024
# The digest of a get_state call that failed (no frame was sent).
FAILED = "!"
# The key of the one frame a `shared_state` match renders for everybody.
SHARED = "*"
_DIGEST_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS

Job = Generator[tuple[str, tuple[Any, ...]], list[tuple[Any, ...]], Any]


def digest(frame: bytes) -> str:
    """A compact fingerprint of one encoded frame (8 bytes of BLAKE2b, hex)."""
    return hashlib.blake2b(frame, digest_size=8).hexdigest()


class MatchRecording:
    """One match's record in the making: the events of the tick under way, handed over as one
    row per tick.  Called by the match with plain data; never raises into it."""

    __slots__ = ("events", "inputs", "match_id", "reloads", "sink", "states", "stopped")

    def __init__(self, match_id: str, sink: Any) -> None:
        self.match_id = match_id
        # Where finished rows go, encoded: `sink.row(match_id, tick, body) -> bool` (False: no
        # room).
        self.sink = sink
        self.events: list[list[Any]] = []
        self.inputs: list[list[Any]] = []
        self.reloads: list[list[Any]] = []
        self.states: dict[str, str] = {}
        self.stopped = False

    # -- what the match reports -------------------------------------------------------------------
    def joined(self, player_id: str) -> None:
        self.events.append(["join", player_id])

    def left(self, player_id: str) -> None:
        self.events.append(["leave", player_id])

    def input(self, player_id: str, payload: Any) -> None:
        self.inputs.append([player_id, payload])

    def state(self, player_id: str | None, data: Any) -> None:
        """A `get_state` result rendered (as sent, before any patch).  Encoded again with sorted
        keys: the order of a Lua table's keys differs from one Lua state to the next, so the
        frame's own bytes would not compare across a replay."""
        try:
            body = orjson.dumps(data, option=_DIGEST_OPTIONS)
        except TypeError:
            body = repr(data).encode()
        self.states[SHARED if player_id is None else player_id] = digest(body)

    def state_failed(self, player_id: str | None) -> None:
        self.states[SHARED if player_id is None else player_id] = FAILED

    def reloaded(self, script: str, script_hash: str, outcome: str) -> None:
        self.reloads.append([script, script_hash, outcome])

    # -- rows -------------------------------------------------------------------------------------
    def ticked(self, tick: int) -> None:
        """Tick `tick` ran: its row holds what came before it and what it did."""
        self._flush(tick, ran=True)

    def ended(self, tick: int) -> None:
        """The match ended between ticks (its last player left): the events that led there."""
        if self.events:
            self._flush(tick + 1, ran=False)
        self.stopped = True

    def _flush(self, tick: int, *, ran: bool) -> None:
        if self.stopped:
            return
        body: dict[str, Any] = {"ran": ran}
        if self.events:
            body["ev"] = self.events
            self.events = []
        if self.inputs:
            body["in"] = self.inputs
            self.inputs = []
        if self.reloads:
            body["rl"] = self.reloads
            self.reloads = []
        if self.states:
            body["s"] = self.states
            self.states = {}
        if not self.sink.row(self.match_id, tick, encode_body(body)):
            self.stopped = True
            log.warning("record_overflow", match_id=self.match_id, tick=tick)


_INSERT_START = "INSERT INTO match_records (match_id, started_at, meta, state) VALUES (?, ?, ?, ?)"
_INSERT_TICK = "INSERT INTO match_record_ticks (match_id, tick, body) VALUES (?, ?, ?)"
_INSERT_SOURCE = (
    "INSERT INTO script_sources (hash, name, source) VALUES (?, ?, ?) ON CONFLICT (hash) DO NOTHING"
)
_END = "UPDATE match_records SET ended_tick = ?, result = ? WHERE match_id = ?"


def _write(rows: list[tuple[str, tuple[Any, ...]]]) -> Job:
    for sql, params in rows:
        # Not `yield from rows`: the backend sends each statement's result back, which a list's
        # iterator cannot take.
        _result = yield (sql, params)


class Recorder:
    """Starts a `MatchRecording` for every match the engine starts, and carries their rows to the
    database (one writer task).  An engine listener: it hears reloads and the matches' ends."""

    def __init__(
        self,
        backend: Backend,
        registry: ScriptRegistry,
        *,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        coalesce_s: float = COALESCE_S,
    ) -> None:
        self.backend = backend
        self.registry = registry
        self.max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self.coalesce_s = coalesce_s
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._sources: set[str] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.rows_written = 0
        self.bytes_written = 0

    # -- the engine's side ------------------------------------------------------------------------
    def attach(self, match: Match) -> None:
        """Record `match` from now on (it has just started: tick 0).  A state that cannot be
        copied cannot be replayed: the match then runs unrecorded (`record_refused`).  Never
        raises into the engine: a match runs whether or not it can be recorded."""
        try:
            self._attach(match)
        except Exception:
            log.exception("record_failed", match_id=match.id)

    def _attach(self, match: Match) -> None:
        packed = match.lua.pack_state(match.state)
        if not packed.ok:
            log.warning("record_refused", match_id=match.id, error=first_line(packed.error))
            return
        script = match.script
        snapshot = Snapshot(
            match_id=match.id,
            mode=match.mode,
            script=script.name,
            script_hash=script.hash,
            script_version=script.version,
            tick=match.tick_no,
            seed=match.seed,
            random=match.lua.random_state(),
            seats=tuple((pid, None) for pid in match.players),
            state=bytes(packed.value),
            saved_at_ms=int(time.time() * 1000),
        )
        meta = orjson.loads(snapshot.meta())
        meta["tick"] = snapshot.tick
        meta["modules"] = self._modules()
        meta["limits"] = asdict(match.lua.limits)
        self._source(script)
        self._queue(
            _INSERT_START,
            (match.id, snapshot.saved_at_ms, orjson.dumps(meta).decode(), snapshot.state),
        )
        match.recorder = MatchRecording(match.id, self)

    def _modules(self) -> dict[str, str]:
        """Every script `require` could load now, by content hash, their sources kept: a module
        a tick requires later is then in the record too."""
        modules = {}
        for name in self.registry.names():
            version = self.registry.get(name)
            if version is not None:
                self._source(version)
                modules[name] = version.hash
        return modules

    def _source(self, version: ScriptVersion) -> None:
        if version.hash not in self._sources:
            self._sources.add(version.hash)
            self._queue(_INSERT_SOURCE, (version.hash, version.name, version.source))

    def match_finished(self, match: Match, result: Any) -> None:
        recording = match.recorder
        if recording is None:
            return
        if not match.host.ticking:  # ended between ticks; a tick's own row comes from the engine
            recording.ended(match.tick_no)
        try:
            encoded = orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            encoded = orjson.dumps(repr(result)).decode()
        self._queue(_END, (match.tick_no, encoded, match.id))

    def reload_resolved(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None:
        recording = match.recorder
        if recording is None:
            return
        self._source(version)
        recording.reloaded(version.name, version.hash, outcome)
        recording.events.append(["modules", self._modules()])

    # -- the rows ---------------------------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        """Bytes of tick rows queued and not written yet (at most `max_pending_bytes`)."""
        return self._pending_bytes

    def row(self, match_id: str, tick: int, body: bytes) -> bool:
        """Queue one tick's row; False when too much waits already (the match stops recording)."""
        if self._pending_bytes + len(body) > self.max_pending_bytes:
            return False
        self._pending_bytes += len(body)
        self._queue(_INSERT_TICK, (match_id, tick, body))
        return True

    def _queue(self, sql: str, params: tuple[Any, ...]) -> None:
        self._pending.append((sql, params))
        if self._idle.is_set():
            self._idle.clear()
            self._wake.set()

    # -- the writer task --------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._writer())

    async def flush(self) -> None:
        """Wait until every row queued so far is written."""
        await self._idle.wait()

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
            log.error("record_stop_unwritten", rows=len(self._pending))

    async def _writer(self) -> None:
        backoff = self.coalesce_s
        while True:
            if not self._pending:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if not self._closing:
                    await asyncio.sleep(self.coalesce_s)
                continue
            batch, self._pending = self._pending, []
            batch_bytes, self._pending_bytes = self._pending_bytes, 0
            try:
                await self.backend.transact(_write(batch))
            except BackendUnavailable as exc:
                self._pending[:0] = batch
                self._pending_bytes += batch_bytes
                log.error("record_unavailable", error=str(exc), rows=len(self._pending))
                if self._closing:
                    self._pending.clear()
                    self._pending_bytes = 0
                    continue
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            except Exception as exc:  # rows the database refuses: dropped, never retried
                log.exception("record_write_failed", error=str(exc), rows=len(batch))
                continue
            backoff = self.coalesce_s
            self.rows_written += len(batch)
            self.bytes_written += batch_bytes


def encode_body(body: dict[str, Any]) -> bytes:
    """A tick row as stored (JSON); an input that JSON cannot hold is noted, not raised."""
    try:
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        return orjson.dumps({"ran": body.get("ran", True), "unrecordable": str(exc)})
