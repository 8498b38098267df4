"""`asobi replay`: run a recorded match again, headless, and say where it stops matching its record.

The match is rebuilt from its first snapshot (`asobi.recording`) on the very script versions it
ran (their sources are in the record, by content hash), with its seed and random generator, under
the Lua limits it ran under (memory cap, callback budgets: a failure that came from a limit then
comes again, whatever this machine's `ASOBI_LUA_*` say).  Each
recorded tick is then fed as it happened: the joins and leaves before it, the inputs its
`handle_input` was given, the reload it resolved.  After each tick, the digest of every player's
`get_state` frame is compared with the record.

No sockets, no event loop, no store: the match runs under `ReplayServices` (a `MatchServices`
whose outbox drops frames).  A script that reads the store (`game.economy`, `game.storage`, ...)
sees it refused here, which is a divergence of its own.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import orjson

from asobi.engine import EngineConfig
from asobi.journal import Snapshot
from asobi.lua.convert import ConversionError, to_python
from asobi.lua.runtime import Bytecode, Limits, ScriptLoadError
from asobi.match import Match
from asobi.recording import MatchRecording
from asobi.scripts import ScriptError, ScriptVersion, compile_checked, find_module, vet_script
from asobi.store import ops
from asobi.store.store import Backend

Job = Generator[tuple[str, tuple[Any, ...]], list[tuple[Any, ...]], Any]


class ReplayError(Exception):
    """The record cannot be replayed at all (not found, a source missing, the state unreadable)."""


@dataclass
class Record:
    """One recorded match as read from the database."""

    match_id: str
    snapshot: Snapshot
    modules: dict[str, str]
    ticks: list[tuple[int, dict[str, Any]]]
    sources: dict[str, tuple[str, bytes]]
    ended_tick: int | None = None
    result: Any = None
    # The limits the match ran under; None in a record made before they were kept.
    limits: Limits | None = None


def _read(match_id: str) -> Job:
    rows = yield (
        "SELECT match_id, started_at, meta, state, ended_tick, result FROM match_records "
        "WHERE match_id = ? OR match_id LIKE ?",
        (match_id, match_id + "%"),
    )
    if len(rows) != 1:
        return rows, [], []
    ticks = yield (
        "SELECT tick, body FROM match_record_ticks WHERE match_id = ? ORDER BY tick",
        (rows[0][0],),
    )
    sources = yield ("SELECT hash, name, source FROM script_sources", ())
    return rows, ticks, sources


async def load_record(backend: Backend, match_id: str) -> Record:
    """Read match `match_id` (or the one match whose id starts with it); raises ReplayError."""
    await backend.transact(ops.migrate(backend.dialect))
    rows, ticks, sources = await backend.transact(_read(match_id))
    if not rows:
        raise ReplayError(f"no recorded match {match_id} (was the server run with ASOBI_RECORD=1?)")
    if len(rows) > 1:
        raise ReplayError(f"{len(rows)} recorded matches start with {match_id}: give more of it")
    found, started_at, meta_text, state, ended_tick, result = rows[0]
    meta = orjson.loads(meta_text)
    snapshot = Snapshot.from_row(found, meta.get("tick", 0), started_at, meta_text, state)
    return Record(
        match_id=found,
        snapshot=snapshot,
        modules=dict(meta.get("modules", {})),
        ticks=[(int(tick), orjson.loads(body)) for tick, body in ticks],
        sources={h: (name, bytes(source)) for h, name, source in sources},
        ended_tick=ended_tick,
        result=orjson.loads(result) if result else None,
        limits=recorded_limits(meta.get("limits")),
    )


def recorded_limits(data: Any) -> Limits | None:
    """The limits a record names (a field it lacks keeps the default; None: no limits kept)."""
    if not isinstance(data, dict):
        return None
    default = Limits()
    values = {}
    for f in fields(Limits):
        if f.name in data:
            try:
                values[f.name] = type(getattr(default, f.name))(data[f.name])
            except (TypeError, ValueError):
                raise ReplayError(f"the recorded limit {f.name} is unreadable") from None
    return replace(default, **values)


def limits_for(record: Record, local: Limits, *, use_local: bool = False) -> tuple[Limits, str]:
    """The limits to replay `record` under, and a line saying so when they are not the
    recorded ones (empty when they are)."""
    if use_local:
        return local, "replaying under this machine's Lua limits (ASOBI_LUA_*), not the recorded"
    if record.limits is None:
        return local, (
            "the record keeps no Lua limits (made before they were recorded): replaying under this "
            "machine's (ASOBI_LUA_*)"
        )
    return record.limits, ""


class _NullOutbox:
    def send(self, player_id: str, frame: bytes, *, droppable: bool = False) -> bool:
        return True


class ReplayServices:
    """What a replayed match runs under: the recorded code, nothing sent, no store."""

    def __init__(self, record: Record, limits: Limits) -> None:
        self.record = record
        self.config = EngineConfig(limits=limits, match_seed=record.snapshot.seed)
        self.outbox = _NullOutbox()
        self.store = None
        self.reload_subscribers: frozenset[str] = frozenset()
        self.state_sync: dict[str, bool] = {}
        self.limits = limits
        self._code: dict[str, Bytecode] = {}
        self._versions: dict[str, ScriptVersion] = {}
        self.modules: dict[str, Bytecode] = {}
        self.use_modules(record.modules)
        self.finished: tuple[int, Any] | None = None
        self.reloads: list[str] = []

    def code(self, script_hash: str) -> tuple[str, bytes, Bytecode]:
        try:
            name, source = self.record.sources[script_hash]
        except KeyError:
            raise ReplayError(
                f"the source of script version {script_hash} is not recorded"
            ) from None
        if script_hash not in self._code:
            code = compile_checked(name, source, len(source) + 1)
            if isinstance(code, ScriptError):
                raise ReplayError(f"{name} ({script_hash}) does not compile: {code.errors}")
            self._code[script_hash] = code
        return name, source, self._code[script_hash]

    def use_modules(self, modules: dict[str, str]) -> None:
        """`require` finds these module versions from now on (path -> content hash)."""
        for path, script_hash in modules.items():
            self.modules[path] = self.code(script_hash)[2]

    def version(self, script_hash: str) -> ScriptVersion:
        if script_hash not in self._versions:
            name, source, _ = self.code(script_hash)
            vetted = vet_script(name, source, self.limits, dict(self.modules), len(source) + 1)
            if isinstance(vetted, ScriptError):
                raise ReplayError(f"{name} ({script_hash}) does not load: {vetted.errors}")
            self._versions[script_hash] = vetted.version
        return self._versions[script_hash]

    # -- MatchServices ----------------------------------------------------------------------------
    def module_source(self, name: bytes) -> tuple[bytes | None, bytes]:
        return find_module(self.modules, name)

    def input_dropped(self, match: Match) -> None:
        return None

    def finish(self, match: Match, result: Any) -> None:
        if self.finished is None:
            self.finished = (match.tick_no, result)
            match.close()

    def reload_resolved(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None:
        self.reloads.append(outcome)


class _ReplayedMatch(Match):
    """A match that keeps its callbacks' failures for the report instead of only logging them."""

    failures_seen: list[tuple[str, str]]

    def log_failure(self, callback: str, error: str) -> None:
        self.failures_seen.append((callback, error))
        super().log_failure(callback, error)


class _Frames:
    """The replay's own recording of each tick: digests to compare, and the frames' data."""

    def __init__(self) -> None:
        self.body: dict[str, Any] = {}

    def row(self, match_id: str, tick: int, body: bytes) -> bool:
        self.body = orjson.loads(body)
        return True


class _KeepingRecording(MatchRecording):
    """Also keeps each player's get_state data of the tick, to show at a divergence."""

    def __init__(self, match_id: str, sink: Any) -> None:
        super().__init__(match_id, sink)
        self.data: dict[str, Any] = {}

    def state(self, player_id: str | None, data: Any) -> None:
        super().state(player_id, data)
        self.data["*" if player_id is None else player_id] = data


@dataclass
class Outcome:
    """What a replay found: `kind` is identical, divergence, failure, finished or incomplete."""

    kind: str
    ticks: int
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kind in ("identical", "finished")

    def text(self) -> str:
        return "\n".join(self.lines)


def _data(match: Match) -> str:
    try:
        data = to_python(match.state, what="state")
    except (ConversionError, TypeError, RuntimeError) as exc:
        return f"(not shown: {exc})"
    return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS).decode()


def _dump(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS).decode()


def start(record: Record, services: ReplayServices) -> _ReplayedMatch:
    """The match as its first snapshot left it."""
    snap = record.snapshot
    try:
        match = _ReplayedMatch(
            services, snap.match_id, snap.mode, services.version(snap.script_hash), []
        )
    except ScriptLoadError as exc:
        raise ReplayError(f"{snap.script} does not load: {exc}") from None
    match.failures_seen = []
    match.tick_no = snap.tick
    match.lua.set_context(match.id, snap.tick, [])
    unpacked = match.lua.unpack_state(snap.state)
    if not unpacked.ok:
        raise ReplayError(f"the first snapshot does not unpack: {unpacked.error}")
    match.state = unpacked.value
    match.lua.set_random_state(snap.random)
    match.players = [pid for pid, _ in snap.seats]
    match.lua.set_players(match.players)
    return match


def replay(record: Record, *, until: int | None = None, limits: Limits | None = None) -> Outcome:
    """Run the record's ticks (up to `until`) and compare; see `Outcome`.  `limits`: the Lua
    limits to run under (default: the recorded ones, see `limits_for`)."""
    if limits is None:
        limits = record.limits or Limits()
    services = ReplayServices(record, limits)
    match = start(record, services)
    frames = _Frames()
    recording = _KeepingRecording(match.id, frames)
    ran = 0
    expected_tick = record.snapshot.tick + 1
    for tick, body in record.ticks:
        if until is not None and tick > until:
            break
        if tick != expected_tick:
            return Outcome(
                "incomplete",
                ran,
                [
                    f"replayed {ran} ticks, identical; the record has no tick {expected_tick} "
                    f"(its recording stopped there), next recorded tick is {tick}"
                ],
            )
        before = _data(match)
        match.failures_seen.clear()
        match.recorder = recording
        for event in body.get("ev", ()):
            if event[0] == "join":
                match.join(event[1])
            elif event[0] == "leave":
                match.leave(event[1])
            elif event[0] == "modules":
                services.use_modules(event[1])
        if not body.get("ran", True):
            if not match.players:
                line = (
                    f"replayed {ran} ticks, identical; the last player left after tick {tick - 1}"
                )
                return Outcome("finished", ran, [line])
            break
        for pid, payload in body.get("in", ()):
            match.inputs.append((pid, payload))
            match.queued[pid] = match.queued.get(pid, 0) + 1
        for _, script_hash, _ in body.get("rl", ()):
            match.pending = services.version(script_hash)
        recording.data.clear()
        try:
            match.run_tick()
        except Exception as exc:  # the engine logs `match_crashed` and ends such a match
            lines = [
                f"tick {tick}: the server failed running the tick: {exc!r}",
                f"inputs at tick {tick}: {_dump(body.get('in', []))}",
                f"state before tick {tick}: {before}",
            ]
            return Outcome("failure", ran, lines)
        recording.ticked(tick)
        ran += 1
        if match.failures_seen:
            callback, error = match.failures_seen[0]
            same = frames.body.get("s") == body.get("s")
            lines = [
                f"tick {tick}: {callback} failed: {error.splitlines()[0] if error else ''}",
                *(f"  {line}" for line in error.splitlines()[1:12]),
                f"inputs at tick {tick}: {_dump(body.get('in', []))}",
                f"state before tick {tick}: {before}",
                "the recorded frames of this tick match the replay (the failure is reproduced)"
                if same
                else "the recorded frames of this tick differ from the replay",
            ]
            return Outcome("failure", ran, lines)
        recorded_reloads = [outcome for _, _, outcome in body.get("rl", ())]
        if recorded_reloads and services.reloads[-len(recorded_reloads) :] != recorded_reloads:
            return Outcome(
                "divergence",
                ran,
                [
                    f"divergence at tick {tick}: the reload ended {recorded_reloads[-1]} in the "
                    f"record, {services.reloads[-1] if services.reloads else 'not at all'} here",
                    f"state before tick {tick}: {before}",
                ],
            )
        diverged = _divergence(tick, body.get("s", {}), frames.body.get("s", {}))
        if diverged is not None:
            pid = diverged[0]
            lines = [diverged[1]]
            if pid in recording.data:
                lines.append(f"get_state for {pid} (replayed): {_dump(recording.data[pid])}")
            lines.append(f"inputs at tick {tick}: {_dump(body.get('in', []))}")
            lines.append(f"state before tick {tick}: {before}")
            if not match.finished:
                lines.append(f"state after tick {tick} (replayed): {_data(match)}")
            return Outcome("divergence", ran, lines)
        expected_tick = tick + 1
        if match.inputs:
            return Outcome(
                "divergence",
                ran,
                [f"tick {tick}: {len(match.inputs)} recorded inputs did not fit the input budget"],
            )
        if services.finished is not None:
            at, result = services.finished
            return Outcome(
                "finished",
                ran,
                [
                    f"replayed {ran} ticks, identical; the match "
                    f"finished at tick {at}: {_dump(result)}"
                ],
            )
    line = f"replayed {ran} ticks, identical"
    last = record.ticks[-1][0] if record.ticks else record.snapshot.tick
    if until is None and record.ended_tick is not None and record.ended_tick > last:
        line += f" (the record stops at tick {last}; the match ran to tick {record.ended_tick})"
    return Outcome("identical", ran, [line])


def _divergence(tick: int, expected: dict[str, str], got: dict[str, str]) -> tuple[str, str] | None:
    """The first player whose frame differs from the record, and the line that says so."""
    for pid in [*expected, *(p for p in got if p not in expected)]:
        want, have = expected.get(pid), got.get(pid)
        if want != have:
            return pid, (
                f"divergence at tick {tick}, player {pid}: expected digest {want or 'no frame'}, "
                f"got {have or 'no frame'}"
            )
    return None
