"""Hot reload: noticing saves, vetting them, and following each reload until every match has it.

`Reloader.apply_paths` is the whole decision for a batch of changed files: read (on a worker
thread, regular files only: see `asobi.script_files`), hash (an unchanged content is ignored),
compile and run the top level in a throwaway sandbox (also on a worker thread: see
`asobi.scripts.vet_script`; refused saves log `reload_failed` with the first three compiler
errors), install the version in the registry and mark the affected matches.  Each match then
switches at one of its next tick boundaries (see `asobi.engine`: a pass runs a bounded number of
switches); the reloader collects their outcomes into one `ReloadRecord`, logs it once and
keeps it in a bounded history served at `GET /api/v1/reloads`.

Detection is separate (`watch_changes`): watchfiles (inotify) by default, an mtime poll as the
fallback, or nothing at all when reloading is off.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import structlog

from asobi.engine import Engine
from asobi.match import Match
from asobi.script_files import UnreadableScript, script_paths
from asobi.scripts import (
    MAX_ERRORS_REPORTED,
    ScriptError,
    ScriptRegistry,
    ScriptVersion,
    vet_script,
)

log = structlog.get_logger("asobi.reload")

HISTORY_SIZE = 256
WATCH_TIMEOUT_MS = 100
WATCH_STEP_MS = 10


@dataclass(slots=True)
class ReloadRecord:
    id: int
    script: str
    hash: str
    trigger: str
    started_at: float
    outcome: str = "pending"
    version: str | None = None
    elapsed_ms: float = 0.0
    # The new version's top-level run time (see ScriptVersion.load_ms).
    load_ms: float = 0.0
    # The reload transactions' run time summed over the matches (what the reload cost the tick
    # loop) and the longest one.
    switch_ms_total: float = 0.0
    switch_ms_max: float = 0.0
    matches: list[str] = field(default_factory=list)
    switched: list[str] = field(default_factory=list)
    rolled_back: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    errors_truncated: bool = False
    error_count: int = 0
    restored_previous: bool = False
    # Which version new matches start on once this attempt settled: "new" (this one),
    # "previous" (it was refused, here or by every running match) or "none" (no version).
    new_matches: str = "none"
    dependents: list[str] = field(default_factory=list)
    _pending: set[str] = field(default_factory=set, repr=False)
    _t0: float = field(default=0.0, repr=False)
    _version: ScriptVersion | None = field(default=None, repr=False)
    _previous: ScriptVersion | None = field(default=None, repr=False)
    # The saved content this attempt was about (kept for the console's diff).
    _source: bytes | None = field(default=None, repr=False)

    def sources(self) -> tuple[bytes | None, bytes | None]:
        """(the version in force before this attempt, the attempted content)."""
        return (self._previous.source if self._previous else None), self._source

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.name.startswith("_"):
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, list) else value
        return out


class ReloadHistory:
    """The last HISTORY_SIZE reload attempts, newest last."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self._records: deque[ReloadRecord] = deque(maxlen=size)

    def add(self, record: ReloadRecord) -> None:
        self._records.append(record)

    def as_list(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self._records]

    def __iter__(self) -> Iterator[ReloadRecord]:
        return iter(self._records)


class Reloader:
    """Turns file changes into script versions and follows them through every match."""

    def __init__(self, registry: ScriptRegistry, engine: Engine, history: ReloadHistory) -> None:
        self.registry = registry
        self.engine = engine
        self.history = history
        self._ids = itertools.count(1)
        self._in_flight: dict[str, ReloadRecord] = {}
        self._match_record: dict[str, ReloadRecord] = {}
        # Batches are read off the loop; this keeps them applied one at a time, in order.
        self._applying = asyncio.Lock()
        engine.listeners.append(self)

    # -- decisions --------------------------------------------------------------------------------
    async def apply_paths(
        self, paths: Iterable[Path], trigger: str, *, report_unchanged: bool = True
    ) -> list[ReloadRecord]:
        """Consider each changed path once; returns the records of the attempts it made.

        The files are read on a worker thread: whatever sits in the game dir (a FIFO, a huge
        file, a slow disk), the event loop and every match keep going meanwhile.  A save whose
        content is already known (the version in force, or the last refused one) is skipped;
        `report_unchanged` logs `reload_skipped` for it, so a save that seemingly did nothing is
        explained (off for the start-up catch-up pass over every file).
        """
        async with self._applying:
            reads = await asyncio.to_thread(self._read, list(paths))
            records = []
            for name, content in reads:
                record = await self._apply_read(name, content, trigger, report_unchanged)
                if record is not None:
                    records.append(record)
            return records

    def _read(self, paths: list[Path]) -> list[tuple[str, bytes | Exception]]:
        """Worker thread: the content of each script named by `paths`, or why it has none."""
        names = sorted({n for n in (self.registry.relative_name(p) for p in paths) if n})
        out: list[tuple[str, bytes | Exception]] = []
        for name in names:
            try:
                out.append((name, self.registry.read(name)))
            except (UnreadableScript, OSError) as exc:
                out.append((name, exc))
        return out

    async def _apply_read(
        self, name: str, content: bytes | Exception, trigger: str, report_unchanged: bool
    ) -> ReloadRecord | None:
        if isinstance(content, bytes):
            skipped = self.registry.unchanged_reason(name, content)
            if skipped is None:
                return await self.apply_source(name, content, trigger)
            if report_unchanged:
                current = self.registry.get(name)
                log.info(
                    "reload_skipped",
                    script=name,
                    reason=skipped,
                    trigger=trigger,
                    version=current.version if current is not None else None,
                )
            return None
        if isinstance(content, FileNotFoundError):
            if self.registry.remove(name):
                log.info("script_removed", script=name)
            return None
        if isinstance(content, UnreadableScript):
            # Refused like a save that does not compile: the version in force stays.
            record = self._new_record(name, "", trigger, time.perf_counter())
            record.outcome = "reload_failed"
            record.errors = [f"{name} {content}"]
            record.error_count = 1
            self._finish(record)
            return record
        log.warning("script_unreadable", script=name, error=str(content))
        return None

    async def apply_source(
        self, name: str, source: bytes, trigger: str, *, again: bool = False
    ) -> ReloadRecord | None:
        """Vet a new content of `name` and, if it passes, reload the matches running it.

        Vetting (compiling and running the top level in a probe, up to the `load` budget) runs
        on a worker thread, on a snapshot of the modules `require` may load; its outcome is
        installed back here, on the loop.  Batches are applied one at a time (`_applying`), so
        nothing else installs a script meanwhile.  `again` vets a content refused before once
        more (it is skipped only when it is the version in force).
        """
        t0 = time.perf_counter()
        registry = self.registry
        skipped = registry.unchanged_reason(name, source)
        if skipped == "unchanged" or (skipped is not None and not again):
            return None
        vetted = await asyncio.to_thread(
            vet_script, name, source, registry.limits, registry.modules(), registry.max_script_bytes
        )
        previous = registry.get(name)
        outcome = registry.install(name, vetted)
        if isinstance(outcome, ScriptError):
            record = self._new_record(name, outcome.hash, trigger, t0)
            record._previous, record._source = previous, source
            record.outcome = "reload_failed"
            record.errors = list(outcome.errors)
            record.error_count = outcome.error_count
            record.errors_truncated = outcome.truncated
            self._finish(record)
            return record
        return self._schedule(outcome, previous, trigger, t0)

    async def apply_sources(
        self, sources: Iterable[tuple[str, bytes]], trigger: str
    ) -> list[tuple[str, ReloadRecord | None]]:
        """Apply given contents (a pushed bundle, not files on disk) in order, as one batch.

        Each content goes through `apply_source`, the transaction a save goes through, and is
        vetted even when this content was refused before (what it `require`s may have arrived
        since, earlier in the same batch); `None` stands for a content already in force.
        """
        async with self._applying:
            return [
                (name, await self.apply_source(name, source, trigger, again=True))
                for name, source in sources
            ]

    async def reload_now(
        self, name: str | None, trigger: str = "manual", *, report_unchanged: bool = True
    ) -> list[ReloadRecord]:
        """Re-read scripts from disk now (all of them when `name` is None)."""
        if name is None:
            paths = await asyncio.to_thread(script_paths, self.registry.game_dir)
        else:
            paths = [self.registry.game_dir / name]
        return await self.apply_paths(paths, trigger, report_unchanged=report_unchanged)

    def _schedule(
        self, version: ScriptVersion, previous: ScriptVersion | None, trigger: str, t0: float
    ) -> ReloadRecord:
        record = self._new_record(version.name, version.hash, trigger, t0)
        record.version = version.version
        record.load_ms = version.load_ms
        record._version, record._previous = version, previous
        record._source = version.source
        superseded = self._in_flight.pop(version.name, None)
        affected = self.engine.schedule_reload(version)
        for match in affected:
            older = self._match_record.get(match.id)
            if older is not None and older is not record:
                older._pending.discard(match.id)
                if not older._pending:
                    self._settle(older)
            self._match_record[match.id] = record
            record._pending.add(match.id)
        record.matches = [m.id for m in affected]
        record.dependents = sorted({m.script.name for m in affected} - {version.name})
        if superseded is not None:
            self._settle(superseded)
        if record._pending:
            self._in_flight[version.name] = record
        else:
            record.outcome = "reloaded"
            self._finish(record)
        return record

    # -- engine callbacks -------------------------------------------------------------------------
    def reload_resolved(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None:
        record = self._match_record.pop(match.id, None)
        if record is None:
            return
        record._pending.discard(match.id)
        record.switch_ms_total = round(record.switch_ms_total + elapsed_ms, 3)
        record.switch_ms_max = round(max(record.switch_ms_max, elapsed_ms), 3)
        if outcome == "reloaded":
            record.switched.append(match.id)
        elif outcome == "reload_rolled_back":
            record.rolled_back.append({"match_id": match.id, "error": error or ""})
        else:
            record.failed.append({"match_id": match.id, "error": error or ""})
        self._settle(record)

    def match_finished(self, match: Match, result: Any) -> None:
        record = self._match_record.pop(match.id, None)
        if record is not None:
            record._pending.discard(match.id)
            self._settle(record)

    # -- records ----------------------------------------------------------------------------------
    def _new_record(self, name: str, digest: str, trigger: str, t0: float) -> ReloadRecord:
        return ReloadRecord(next(self._ids), name, digest, trigger, time.time(), _t0=t0)

    def _settle(self, record: ReloadRecord) -> None:
        if record._pending:
            return
        if self._in_flight.get(record.script) is record:
            del self._in_flight[record.script]
        if record.rolled_back:
            record.outcome = "reload_rolled_back"
        elif record.failed:
            record.outcome = "reload_failed"
        else:
            record.outcome = "reloaded"
        refused = record.rolled_back or record.failed
        if refused and not record.switched and record._previous and record._version:
            # Every match refused the new code (it failed, or the state could not cross): new
            # matches keep starting on the old code too.
            record.restored_previous = self.registry.restore(record._previous, record._version)
        errors = [e["error"].split("\n", 1)[0] for e in record.rolled_back + record.failed]
        record.error_count = len(errors)
        record.errors = errors[:MAX_ERRORS_REPORTED]
        record.errors_truncated = len(errors) > MAX_ERRORS_REPORTED
        self._finish(record)

    def _finish(self, record: ReloadRecord) -> None:
        record.elapsed_ms = round((time.perf_counter() - record._t0) * 1000, 3)
        current = self.registry.get(record.script)
        record.new_matches = (
            "new"
            if current is not None and current.hash == record.hash
            else "previous"
            if current is not None
            else "none"
        )
        self.history.add(record)
        fields = record.as_dict()
        event = fields.pop("outcome")
        fields.pop("started_at")
        if event == "reload_failed" and not record.matches:
            for key in ("matches", "switched", "rolled_back", "failed"):
                fields.pop(key)
        if event == "reloaded":
            log.info(event, **fields)
        else:
            log.warning(event, **fields)


# -- detection -------------------------------------------------------------------------------------
def _snapshot(game_dir: Path) -> dict[Path, tuple[int, int]]:
    stats = {}
    for path in game_dir.rglob("*.lua"):
        try:
            st = path.stat()
        except OSError:
            continue
        stats[path] = (st.st_mtime_ns, st.st_size)
    return stats


class Debouncer:
    """Collects changed paths until the game dir has been quiet for `quiet_s` (or `max_wait_s`
    has passed since the first change), then applies them as one batch.

    An editor's save can be several events (truncate, write, rename; swap files), and a save
    storm many more: only the content on disk once it settles is loaded, and only once.
    """

    def __init__(self, reloader: Reloader, trigger: str, quiet_s: float, max_wait_s: float = 1.0):
        self.reloader = reloader
        self.trigger = trigger
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self._paths: set[Path] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._first = 0.0
        self._applying: set[asyncio.Task[None]] = set()

    def add(self, paths: Iterable[Path]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._paths:
            self._first = now
        self._paths.update(paths)
        if self._timer is not None:
            self._timer.cancel()
        when = min(now + self.quiet_s, self._first + self.max_wait_s)
        self._timer = loop.call_at(when, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        paths, self._paths = sorted(self._paths), set()
        if paths:
            task = asyncio.get_running_loop().create_task(
                _apply_safely(self.reloader, paths, self.trigger)
            )
            self._applying.add(task)
            task.add_done_callback(self._applying.discard)

    async def drain(self) -> None:
        """Apply what is collected and wait for every batch still being applied."""
        self.flush()
        while self._applying:
            await asyncio.gather(*self._applying)


async def poll_changes(
    reloader: Reloader, interval_s: float, stop: asyncio.Event, ready: asyncio.Event
) -> None:
    """The fallback detector: compare mtimes and sizes every `interval_s`.

    A file whose signature changed is applied once its signature holds still for one more poll
    (or right away when it did not change during the last poll), so a slow writer's half-saved
    file is not loaded.
    """
    game_dir = reloader.registry.game_dir
    seen = await asyncio.to_thread(_snapshot, game_dir)
    await _catch_up(reloader, "poll")
    ready.set()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        except TimeoutError:
            pass
        current = await asyncio.to_thread(_snapshot, game_dir)
        changed = [p for p, sig in current.items() if seen.get(p) != sig]
        changed += [p for p in seen if p not in current]
        seen = current
        if changed:
            await _apply_safely(reloader, changed, "poll")


async def watch_changes(
    reloader: Reloader, debounce_ms: int, stop: asyncio.Event, ready: asyncio.Event
) -> None:
    """inotify (or forced polling through WATCHFILES_FORCE_POLLING) via watchfiles.

    Events go through a `Debouncer` (quiet for `debounce_ms`).  An editor's atomic save (temp
    file + rename) arrives as an added file and is handled like a modification: what counts is
    the content now on disk.  The watcher also yields on a short timeout: the first empty yield
    proves it is running, and a catch-up pass then picks up anything saved between the server's
    start and that moment.
    """
    import watchfiles

    game_dir = reloader.registry.game_dir
    debouncer = Debouncer(reloader, "watch", debounce_ms / 1000)
    async for changes in watchfiles.awatch(
        game_dir,
        step=WATCH_STEP_MS,
        stop_event=stop,
        recursive=True,
        rust_timeout=WATCH_TIMEOUT_MS,
        yield_on_timeout=True,
        watch_filter=lambda _change, path: path.endswith(".lua"),
    ):
        if not ready.is_set():
            await _catch_up(reloader, "watch")
            ready.set()
        if changes:
            debouncer.add(Path(p) for _, p in changes)
    await debouncer.drain()


async def _catch_up(reloader: Reloader, trigger: str) -> None:
    try:
        await reloader.reload_now(None, trigger, report_unchanged=False)
    except Exception:
        log.exception("reload_crashed", paths=["*"])


async def _apply_safely(reloader: Reloader, paths: list[Path], trigger: str) -> None:
    try:
        await reloader.apply_paths(paths, trigger)
    except Exception:
        log.exception("reload_crashed", paths=[str(p) for p in paths])
