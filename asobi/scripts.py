"""The game directory as the server knows it: the last good version of every script.

A script is any `*.lua` file under the game dir.  The registry keeps, per file, the newest version
that compiled and whose top-level code ran; a save that fails either check is reported and the
previous version stays in force.  Matches, `require` and the matchmaker only ever read from here,
never from disk, so a half-written or broken file can never reach a running match.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asobi import names
from asobi.lua.convert import ConversionError, to_python
from asobi.lua.runtime import Bytecode, Limits, MatchLua, ScriptLoadError, compile_script
from asobi.script_files import UnreadableScript, read_script, script_paths

DEFAULT_SCRIPT = "match.lua"
CONFIG_SCRIPT = "config.lua"
MAX_ERRORS_REPORTED = 3
MAX_SCRIPT_BYTES = 4 * 1024 * 1024
MIN_TICK_RATE, MAX_TICK_RATE = 1.0, 60.0


@dataclass(frozen=True, slots=True)
class ScriptMeta:
    """Script globals the server reads once per version."""

    match_size: int = 1
    max_players: int = 1
    tick_rate: float = 10.0
    shared_state: bool = False
    reload_dependents: bool = False
    version: str | None = None


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


def is_script_path(path: Path) -> bool:
    """Lua files only; skip editor droppings (`.#x.lua`, `.x.lua.swp`, `x.lua~`) and hidden dirs."""
    return path.suffix == ".lua" and not any(part.startswith(".") for part in path.parts)


class _ProbeHost:
    """Host for running a script's top level once to read its globals: no side effects."""

    def __init__(self, registry: ScriptRegistry) -> None:
        self.registry = registry

    def log(self, level: bytes, message: bytes, meta: Any) -> None:
        return None

    def send(self, player_id: Any, payload: Any) -> None:
        return None

    def broadcast(self, event: Any, payload: Any) -> None:
        return None

    def module(self, name: bytes) -> tuple[bytes | None, bytes]:
        return self.registry.module_source(name)


class ScriptRegistry:
    def __init__(
        self,
        game_dir: Path,
        limits: Limits | None = None,
        *,
        max_script_bytes: int = MAX_SCRIPT_BYTES,
    ) -> None:
        self.game_dir = game_dir.resolve()
        self.limits = limits or Limits()
        self.max_script_bytes = max_script_bytes
        self._scripts: dict[str, ScriptVersion] = {}
        self._rejected: dict[str, str] = {}
        self._modes: dict[str, str] = {}

    # -- reading ---------------------------------------------------------------------------------
    def get(self, name: str) -> ScriptVersion | None:
        return self._scripts.get(name)

    def names(self) -> list[str]:
        return sorted(self._scripts)

    def resolve_mode(self, mode: str) -> ScriptVersion | None:
        """`config.lua` mapping first, then `game/<mode>.lua`, then `game/match.lua`."""
        if not names.MODE.accepts(mode):
            return None
        mapped = self._modes.get(mode)
        if mapped and mapped in self._scripts:
            return self._scripts[mapped]
        own = f"{mode}.lua"
        if own in self._scripts and own != CONFIG_SCRIPT:
            return self._scripts[own]
        return self._scripts.get(DEFAULT_SCRIPT)

    def module_source(self, name: bytes) -> tuple[bytes | None, bytes]:
        """Source for `require(name)`: `a.b` is `game/a/b.lua`; nothing outside the game dir."""
        text = name.decode(errors="replace")
        if not names.MODULE.accepts(text):
            return None, f"invalid module name {text!r}".encode()
        path = text.replace(".", "/") + ".lua"
        script = self._scripts.get(path)
        if script is None:
            return None, f"module '{text}' not found (looked for {path} in the game dir)".encode()
        return script.code, ("@" + path).encode()

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
                errors.append(code)
                continue
            pending[name] = (source, code)
            self._scripts[name] = ScriptVersion(name, source, code, content_hash(source))
        for name, (source, code) in pending.items():
            outcome = self.accept(name, source, code)
            if isinstance(outcome, ScriptError):
                self._scripts.pop(name, None)
                errors.append(outcome)
        return errors

    def update(self, name: str, source: bytes) -> ScriptVersion | ScriptError | None:
        """Consider a new saved content for `name`.

        Returns None when nothing changed (same content as the version in force or as the last
        refused save), the accepted version, or the refusal.
        """
        digest = content_hash(source)
        current = self._scripts.get(name)
        if (current and current.hash == digest) or self._rejected.get(name) == digest:
            return None
        code = self._compile(name, source)
        if isinstance(code, ScriptError):
            self._rejected[name] = digest
            return code
        return self.accept(name, source, code)

    def restore(self, version: ScriptVersion, replaced: ScriptVersion) -> bool:
        """Put `version` back in force if `replaced` still is (a reload every match rolled back:
        new matches should not start on code that is known to fail)."""
        if self._scripts.get(replaced.name) is not replaced:
            return False
        self._scripts[version.name] = version
        self._rejected[replaced.name] = replaced.hash
        return True

    def remove(self, name: str) -> bool:
        """A deleted file: stop offering it to new matches and `require` (running ones keep it)."""
        self._rejected.pop(name, None)
        if name == CONFIG_SCRIPT:
            self._modes = {}
        return self._scripts.pop(name, None) is not None

    def accept(self, name: str, source: bytes, code: Bytecode) -> ScriptVersion | ScriptError:
        """Run the top level once in a throwaway sandbox to read its globals, then install it."""
        digest = content_hash(source)
        probe = MatchLua(_ProbeHost(self), self.limits, seed=0)
        started = time.perf_counter()
        try:
            returned = probe.load(code, name)
        except ScriptLoadError as exc:
            self._rejected[name] = digest
            return script_errors(name, source, [str(exc).split("\nstack traceback:")[0]])
        load_ms = round((time.perf_counter() - started) * 1000, 3)
        meta = _read_meta(probe)
        modes: dict[str, str] | None = None
        if name == CONFIG_SCRIPT:
            modes = _read_modes(returned)
            if isinstance(modes, str):
                self._rejected[name] = digest
                return script_errors(name, source, [modes])
        version = ScriptVersion(name, source, code, digest, meta, load_ms)
        self._scripts[name] = version
        self._rejected.pop(name, None)
        if modes is not None:
            self._modes = modes
        return version

    def read(self, name: str) -> bytes:
        """The file `name` (as `relative_name` gives it) from disk; see `asobi.script_files`.
        Blocking file I/O: reloads call it on a worker thread."""
        return read_script(self.game_dir / name, self.max_script_bytes)

    def _compile(self, name: str, source: bytes) -> Bytecode | ScriptError:
        """The script's bytecode, or why it was refused."""
        if len(source) > self.max_script_bytes:
            return script_errors(
                name, source, [f"{name} is larger than {self.max_script_bytes} bytes"]
            )
        if source.startswith(b"\x1bLua"):
            return script_errors(name, source, [f"{name}: precompiled bytecode is not accepted"])
        try:
            return compile_script(source, name)
        except ScriptLoadError as exc:
            return script_errors(name, source, str(exc).splitlines())


def _read_meta(probe: MatchLua) -> ScriptMeta:
    def number(name: str, default: float, low: float, high: float) -> float:
        value = probe.global_value(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return default
        return float(min(max(value, low), high))

    match_size = int(number("match_size", 1, 1, 1024))
    max_players = int(number("max_players", match_size, match_size, 4096))
    version = probe.global_value("version")
    return ScriptMeta(
        match_size=match_size,
        max_players=max_players,
        tick_rate=number("tick_rate", 10.0, MIN_TICK_RATE, MAX_TICK_RATE),
        shared_state=probe.global_value("shared_state") is True,
        reload_dependents=probe.global_value("reload_dependents") is True,
        version=str(version) if isinstance(version, str | int | float) and version != "" else None,
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
