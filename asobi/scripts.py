"""The game directory as the server knows it: the last good version of every script.

A script is any `*.lua` file under the game dir.  The registry keeps, per file, the newest version
that compiled and whose top-level code ran; a save that fails either check is reported and the
previous version stays in force.  Matches, `require` and the matchmaker only ever read from here,
never from disk, so a half-written or broken file can never reach a running match.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from asobi import names
from asobi.lua.convert import ConversionError, to_python
from asobi.lua.runtime import Bytecode, Limits, MatchLua, ScriptLoadError, compile_script
from asobi.script_files import UnreadableScript, read_script, script_paths

log = structlog.get_logger("asobi.scripts")

DEFAULT_SCRIPT = "match.lua"
CONFIG_SCRIPT = "config.lua"
MAX_ERRORS_REPORTED = 3
MAX_SCRIPT_BYTES = 4 * 1024 * 1024
MIN_TICK_RATE, MAX_TICK_RATE = 1.0, 60.0
MAX_MATCH_SIZE, MAX_MAX_PLAYERS = 1024, 4096
STATE_SYNC_MODES = ("full", "patch")
FULL_STATE_EVERY_S = 10.0
MAX_FULL_EVERY = 1_000_000
# A script defining any of these is a match script and must define all of them.
MATCH_CALLBACKS = ("init", "tick", "get_state")
# `require("name")` / `require "name"` with a literal name, for `unresolved_requires`.
_REQUIRE_RE = re.compile(r"""\brequire\s*\(?\s*["']([^"'\n]*)["']""")
_LUA_COMMENT_RE = re.compile(r"--\[(=*)\[.*?\]\1\]|--[^\n]*", re.S)
# Modes logged once as running on match.lua (bounded: a mode name is client input).
MAX_FALLBACK_MODES_LOGGED = 256


@dataclass(frozen=True, slots=True)
class ScriptMeta:
    """Script globals the server reads once per version."""

    match_size: int = 1
    max_players: int = 1
    tick_rate: float = 10.0
    shared_state: bool = False
    # "full": every state frame is the whole state; "patch": merge patches after a full frame.
    state_sync: str = "full"
    # Ticks between full frames in patch mode (the default is 10 s of ticks).
    full_state_every: int = 100
    reload_dependents: bool = False
    version: str | None = None
    # Defines init, tick and get_state (a module defines none of them).
    is_match: bool = False


@dataclass(frozen=True, slots=True)
class ScriptVersion:
    """One accepted content of a script.  `code` is its bytecode, compiled once from `source`:
    every match that starts or reloads on this version loads the same bytes."""

    name: str
    source: bytes
    code: Bytecode
    hash: str
    meta: ScriptMeta = field(default_factory=ScriptMeta)
    # How long its top level (with its `require`s) took when it was vetted: every match pays
    # about this much when it starts on this version or switches to it.
    load_ms: float = 0.0

    @property
    def version(self) -> str:
        return self.meta.version or self.hash


@dataclass(frozen=True, slots=True)
class ScriptError:
    """A save that was refused, with the compiler's errors (first three kept)."""

    name: str
    hash: str
    errors: tuple[str, ...]
    error_count: int

    @property
    def truncated(self) -> bool:
        return self.error_count > len(self.errors)

    def as_log(self) -> dict[str, Any]:
        return {
            "script": self.name,
            "hash": self.hash,
            "errors": list(self.errors),
            "error_count": self.error_count,
            "errors_truncated": self.truncated,
        }


def content_hash(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:16]


def script_errors(name: str, source: bytes, messages: list[str]) -> ScriptError:
    lines = [m for m in messages if m]
    return ScriptError(
        name, content_hash(source), tuple(lines[:MAX_ERRORS_REPORTED]), max(len(lines), 1)
    )


def literal_requires(source: bytes) -> list[tuple[int, str]]:
    """(line, module name) of each `require` with a literal name in `source`, comments skipped:
    what a script will ask for, read without running it."""
    text = source.decode(errors="replace")
    text = _LUA_COMMENT_RE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return [
        (text.count("\n", 0, found.start()) + 1, found.group(1))
        for found in _REQUIRE_RE.finditer(text)
    ]


def is_script_path(path: Path) -> bool:
    """Lua files only; skip editor droppings (`.#x.lua`, `.x.lua.swp`, `x.lua~`) and hidden dirs."""
    return path.suffix == ".lua" and not any(part.startswith(".") for part in path.parts)


@dataclass(frozen=True, slots=True)
class Vetted:
    """A save that compiled and whose top level ran: the version to install, and for
    `config.lua` the mode map it returned."""

    version: ScriptVersion
    modes: dict[str, str] | None = None


def vet_script(
    name: str,
    source: bytes,
    limits: Limits,
    modules: Mapping[str, Bytecode],
    max_script_bytes: int = MAX_SCRIPT_BYTES,
) -> Vetted | ScriptError:
    """Compile `source` and run its top level once in a throwaway sandbox to read its globals.

    Touches nothing shared: `modules` is a snapshot of the compiled scripts `require` may load
    (`ScriptRegistry.modules`), and the probe is a Lua state of its own.  So a reload runs this
    on a worker thread (lupa releases the GIL while Lua runs) and the event loop keeps ticking
    matches while a top level takes up to its `load` budget.
    """
    code = compile_checked(name, source, max_script_bytes)
    if isinstance(code, ScriptError):
        return code
    return probe_script(name, source, code, limits, modules)


def probe_script(
    name: str, source: bytes, code: Bytecode, limits: Limits, modules: Mapping[str, Bytecode]
) -> Vetted | ScriptError:
    """Run compiled `code`'s top level in a probe (see `vet_script`)."""
    # Unwatched: the watchdog follows the calls that hold up the event loop; a probe runs on a
    # worker thread and its own budget ends it.
    probe = MatchLua(_ProbeHost(modules), limits, seed=0, watched=False)
    started = time.perf_counter()
    try:
        returned = probe.load(code, name)
    except ScriptLoadError as exc:
        error = str(exc).split("\nstack traceback:")[0]
        return script_errors(name, source, [error])
    load_ms = round((time.perf_counter() - started) * 1000, 3)
    meta = _read_meta(name, probe)
    if isinstance(meta, list):
        return script_errors(name, source, meta)
    modes: dict[str, str] | None = None
    if name == CONFIG_SCRIPT:
        read = _read_modes(returned)
        if isinstance(read, str):
            return script_errors(name, source, [read])
        modes = read
    version = ScriptVersion(name, source, code, content_hash(source), meta, load_ms)
    return Vetted(version, modes)


def compile_checked(name: str, source: bytes, max_script_bytes: int) -> Bytecode | ScriptError:
    """The script's bytecode, or why it was refused."""
    if len(source) > max_script_bytes:
        return script_errors(name, source, [f"{name} is larger than {max_script_bytes} bytes"])
    if source.startswith(b"\x1bLua"):
        return script_errors(name, source, [f"{name}: precompiled bytecode is not accepted"])
    try:
        return compile_script(source, name)
    except ScriptLoadError as exc:
        return script_errors(name, source, str(exc).splitlines())


def find_module(modules: Mapping[str, Bytecode], name: bytes) -> tuple[Bytecode | None, bytes]:
    """Source for `require(name)`: `a.b` is `game/a/b.lua`; nothing outside the game dir."""
    text = name.decode(errors="replace")
    if not names.MODULE.accepts(text):
        return None, f"invalid module name {text!r}".encode()
    path = text.replace(".", "/") + ".lua"
    code = modules.get(path)
    if code is None:
        return None, f"module '{text}' not found (looked for {path} in the game dir)".encode()
    return code, ("@" + path).encode()


class _ProbeHost:
    """Host for running a script's top level once to read its globals: no side effects."""

    def __init__(self, modules: Mapping[str, Bytecode]) -> None:
        self.modules = modules

    def log(self, level: bytes, message: bytes, meta: Any) -> None:
        return None

    def send(self, player_id: Any, payload: Any) -> None:
        return None

    def broadcast(self, event: Any, payload: Any) -> None:
        return None

    def module(self, name: bytes) -> tuple[bytes | None, bytes]:
        return find_module(self.modules, name)


class ScriptRegistry:
    def __init__(
        self,
        game_dir: Path,
        limits: Limits | None = None,
        *,
        strict_modes: bool = False,
        max_script_bytes: int = MAX_SCRIPT_BYTES,
    ) -> None:
        self.game_dir = game_dir.resolve()
        self.limits = limits or Limits()
        # Refuse a mode with no script of its own instead of running match.lua for it.
        self.strict_modes = strict_modes
        self.max_script_bytes = max_script_bytes
        self._scripts: dict[str, ScriptVersion] = {}
        self._rejected: dict[str, str] = {}
        # The first error of each script's last refused save (why a mode is unavailable).
        self._rejected_error: dict[str, str] = {}
        self._modes: dict[str, str] = {}
        self._fallback_logged: set[str] = set()

    # -- reading ---------------------------------------------------------------------------------
    def get(self, name: str) -> ScriptVersion | None:
        return self._scripts.get(name)

    def names(self) -> list[str]:
        return sorted(self._scripts)

    def known_modes(self) -> list[str]:
        """Modes a client can name with a script of their own (config.lua entries and
        `<mode>.lua` match scripts); any other valid mode falls back to match.lua."""
        own = {n[:-4] for n, v in self._scripts.items() if v.meta.is_match and "/" not in n}
        return sorted(own | {m for m, n in self._modes.items() if n in self._scripts})

    def rejected_count(self) -> int:
        """Scripts refused with no earlier version in force."""
        return sum(1 for name in self._rejected_error if name not in self._scripts)

    def resolve_mode(self, mode: str) -> ScriptVersion | None:
        """`config.lua` mapping first, then `game/<mode>.lua`, then `game/match.lua` (unless
        strict, or the mode's own script exists but was refused: a broken `arena.lua` must not
        quietly run the tutorial)."""
        if not names.MODE.accepts(mode):
            return None
        mapped = self._modes.get(mode)
        if mapped and mapped in self._scripts:
            return self._scripts[mapped]
        own = f"{mode}.lua"
        if own != CONFIG_SCRIPT:
            script = self._scripts.get(own)
            if script is not None and script.meta.is_match:
                return script
            if own in self._rejected_error:
                return None
        if self.strict_modes:
            return None
        fallback = self._scripts.get(DEFAULT_SCRIPT)
        if (
            fallback is not None
            and mode not in self._fallback_logged
            and len(self._fallback_logged) < MAX_FALLBACK_MODES_LOGGED
        ):
            self._fallback_logged.add(mode)
            log.info(
                "mode_fallback",
                mode=mode,
                script=DEFAULT_SCRIPT,
                hint=f"no {own} in the game dir; ASOBI_STRICT_MODES=1 refuses such modes",
            )
        return fallback

    def mode_refusal(self, mode: str) -> str:
        """Why `resolve_mode(mode)` found nothing, in the words `unknown_mode` carries."""
        own = f"{mode}.lua"
        mapped = self._modes.get(mode)
        for name in (mapped, own):
            if name and name not in self._scripts and name in self._rejected_error:
                return f"mode {mode!r}: {name} was rejected: {self._rejected_error[name]}"
        if self.strict_modes:
            return f"no script for mode {mode!r} (looked for {own}; strict modes are on)"
        return f"no script for mode {mode!r} (looked for {own} and {DEFAULT_SCRIPT})"

    def unresolved_requires(self, name: str) -> list[str]:
        """`require`s with a literal name in `name`'s source that no script answers, in the
        words the server uses when such a `require` runs."""
        script = self._scripts.get(name)
        if script is None:
            return []
        problems = []
        for line, module in literal_requires(script.source):
            code, message = self.module_source(module.encode())
            if code is None:
                problems.append(f"{name}:{line}: {message.decode()}")
        return problems

    def module_source(self, name: bytes) -> tuple[bytes | None, bytes]:
        """Source for `require(name)`: `a.b` is `game/a/b.lua`; nothing outside the game dir."""
        return find_module(_ScriptCode(self._scripts), name)

    def modules(self) -> dict[str, Bytecode]:
        """The compiled code of every script now, by name: what `require` finds when a save
        is vetted away from the registry (`vet_script`)."""
        return {name: version.code for name, version in self._scripts.items()}

    # -- loading ---------------------------------------------------------------------------------
    def relative_name(self, path: Path) -> str | None:
        try:
            rel = path.resolve().relative_to(self.game_dir)
        except ValueError:
            return None
        return rel.as_posix() if is_script_path(rel) else None

    def load_all(self) -> list[ScriptError]:
        """Load every script in the game dir (server start and `asobi check`)."""
        errors: list[ScriptError] = []
        # Compile everything first so that top-level `require`s see every module.
        pending: dict[str, tuple[bytes, Bytecode]] = {}
        for path in script_paths(self.game_dir):
            name = self.relative_name(path)
            if name is None or name in pending:
                continue
            try:
                source = self.read(name)
            except FileNotFoundError:
                continue  # deleted since the directory was listed
            except (UnreadableScript, OSError) as exc:
                errors.append(ScriptError(name, "", (f"{name} {exc}",), 1))
                continue
            code = self._compile(name, source)
            if isinstance(code, ScriptError):
                errors.append(self._refuse(name, code))
                continue
            pending[name] = (source, code)
            self._scripts[name] = ScriptVersion(name, source, code, content_hash(source))
        for name, (source, code) in pending.items():
            outcome = self.accept(name, source, code)
            if isinstance(outcome, ScriptError):
                self._scripts.pop(name, None)
                errors.append(outcome)
        return errors

    def unchanged_reason(self, name: str, source: bytes) -> str | None:
        """Why `update` would ignore this content: "unchanged" (the version in force) or
        "already_rejected" (the last refused save); None when it would consider it."""
        digest = content_hash(source)
        current = self._scripts.get(name)
        if current is not None and current.hash == digest:
            return "unchanged"
        if self._rejected.get(name) == digest:
            return "already_rejected"
        return None

    def _refuse(self, name: str, error: ScriptError) -> ScriptError:
        self._rejected[name] = error.hash
        self._rejected_error[name] = error.errors[0] if error.errors else "refused"
        return error

    def restore(self, version: ScriptVersion, replaced: ScriptVersion) -> bool:
        """Put `version` back in force if `replaced` still is (a reload every match refused:
        new matches should not start on code that is known to fail)."""
        if self._scripts.get(replaced.name) is not replaced:
            return False
        self._scripts[version.name] = version
        self._rejected[replaced.name] = replaced.hash
        return True

    def remove(self, name: str) -> bool:
        """A deleted file: stop offering it to new matches and `require` (running ones keep it)."""
        self._rejected.pop(name, None)
        self._rejected_error.pop(name, None)
        if name == CONFIG_SCRIPT:
            self._modes = {}
        return self._scripts.pop(name, None) is not None

    def accept(self, name: str, source: bytes, code: Bytecode) -> ScriptVersion | ScriptError:
        """Run the top level once in a throwaway sandbox to read its globals, then install it."""
        return self.install(name, probe_script(name, source, code, self.limits, self.modules()))

    def install(self, name: str, outcome: Vetted | ScriptError) -> ScriptVersion | ScriptError:
        """Put a vetted save in force, or remember its refusal (`vet_script`'s outcome)."""
        if isinstance(outcome, ScriptError):
            return self._refuse(name, outcome)
        self._scripts[name] = outcome.version
        self._rejected.pop(name, None)
        self._rejected_error.pop(name, None)
        if outcome.modes is not None:
            self._modes = outcome.modes
        return outcome.version

    def read(self, name: str) -> bytes:
        """The file `name` (as `relative_name` gives it) from disk; see `asobi.script_files`.
        Blocking file I/O: reloads call it on a worker thread."""
        return read_script(self.game_dir / name, self.max_script_bytes)

    def _compile(self, name: str, source: bytes) -> Bytecode | ScriptError:
        return compile_checked(name, source, self.max_script_bytes)


class _ScriptCode(Mapping[str, Bytecode]):
    """The registry's scripts seen as their code, for `find_module` (no copy per `require`)."""

    __slots__ = ("_scripts",)

    def __init__(self, scripts: dict[str, ScriptVersion]) -> None:
        self._scripts = scripts

    def __getitem__(self, name: str) -> Bytecode:
        return self._scripts[name].code

    def __iter__(self) -> Iterator[str]:
        return iter(self._scripts)

    def __len__(self) -> int:
        return len(self._scripts)


def _read_meta(name: str, probe: MatchLua) -> ScriptMeta | list[str]:
    """The script's globals, or what is wrong with them: the server refuses a script it could
    not run (a match script missing a callback, a size or rate out of range) at load time, so
    `asobi check` and a save report it, rather than every tick failing later."""
    problems: list[str] = []

    def number(key: str, default: float, low: float, high: float, *, integer: bool) -> float:
        value = probe.global_value(key)
        if value is None:
            return default
        kind = "an integer" if integer else "a number"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and value != int(value))
            or not low <= value <= high
        ):
            problems.append(f"{name}: {key} must be {kind} from {low:g} to {high:g}, not {value!r}")
            return default
        return float(value)

    match_size = int(number("match_size", 1, 1, MAX_MATCH_SIZE, integer=True))
    max_players = int(number("max_players", match_size, match_size, MAX_MAX_PLAYERS, integer=True))
    tick_rate = number("tick_rate", 10.0, MIN_TICK_RATE, MAX_TICK_RATE, integer=False)
    full_every = number(
        "full_state_every", round(FULL_STATE_EVERY_S * tick_rate), 1, MAX_FULL_EVERY, integer=True
    )
    state_sync = probe.global_value("state_sync")
    if state_sync is None:
        state_sync = "full"
    elif state_sync not in STATE_SYNC_MODES:
        problems.append(f'{name}: state_sync must be "full" or "patch", not {state_sync!r}')
    defined = [cb for cb in MATCH_CALLBACKS if probe.function(cb) is not None]
    is_match = bool(defined) or name == DEFAULT_SCRIPT
    missing = [cb for cb in MATCH_CALLBACKS if cb not in defined]
    if is_match and missing:
        problems.append(
            f"{name}: missing function {', '.join(missing)} "
            f"(a match script defines {', '.join(MATCH_CALLBACKS)})"
        )
    if problems:
        return problems
    version = probe.global_value("version")
    return ScriptMeta(
        match_size=match_size,
        max_players=max_players,
        tick_rate=tick_rate,
        shared_state=probe.global_value("shared_state") is True,
        state_sync=state_sync,
        full_state_every=int(full_every),
        reload_dependents=probe.global_value("reload_dependents") is True,
        version=str(version) if isinstance(version, str | int | float) and version != "" else None,
        is_match=is_match,
    )


def _read_modes(returned: Any) -> dict[str, str] | str:
    """`config.lua` returns `{mode = "file.lua", ...}`."""
    if returned is None:
        return {}
    try:
        data = to_python(returned, what="config")
    except ConversionError as exc:
        return f"config.lua: {exc}"
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        return 'config.lua must return a table of {mode = "file.lua"}'
    return {k: v for k, v in data.items() if names.MODE.accepts(k)}
