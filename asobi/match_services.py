"""What a match needs from whoever runs it, as interfaces (`asobi.engine.Engine` provides them).

Naming the few things a match uses keeps `asobi.match` free of the engine (no import circle) and
lets a match run under anything that provides them: the engine, a replay, a test.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import TYPE_CHECKING, Any, Protocol

from asobi.directory import Outbox
from asobi.lua.runtime import Limits
from asobi.scripts import ScriptVersion
from asobi.state_frames import SyncChoice
from asobi.store import Store

if TYPE_CHECKING:
    from asobi.match import Match


class MatchConfig(Protocol):
    """The settings a match reads (`asobi.engine.EngineConfig` has them)."""

    @property
    def limits(self) -> Limits: ...

    @property
    def max_consecutive_failures(self) -> int: ...

    @property
    def log_lines_per_second(self) -> float: ...

    @property
    def match_seed(self) -> int | None: ...

    @property
    def max_queued_inputs(self) -> int: ...


class MatchServices(Protocol):
    """Everything a match needs from whoever runs it, and all it tells them.

    `asobi.engine.Engine` is the implementation; naming the few things a match uses keeps this
    module free of the engine (no import circle) and lets a match run under anything that
    provides them.
    """

    @property
    def config(self) -> MatchConfig: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def store(self) -> Store | None: ...

    @property
    def reload_subscribers(self) -> Set[str]:
        """Players who asked for `match.reloaded` frames."""
        ...

    @property
    def state_sync(self) -> Mapping[str, SyncChoice | bool]:
        """Players whose connection chose their state frames (a bare bool: patch (True) or full
        (False) frames, in JSON)."""
        ...

    def module_source(self, name: bytes) -> tuple[bytes | None, bytes]:
        """Source for a script's `require(name)` (see `ScriptRegistry.module_source`)."""
        ...

    def input_dropped(self, match: Match) -> None:
        """One input of `match` was dropped (its player's queue was full)."""
        ...

    def finish(self, match: Match, result: Any) -> None:
        """The match is over (its script said so, or it failed too often)."""
        ...

    def reload_resolved(
        self,
        match: Match,
        version: ScriptVersion,
        outcome: str,
        error: str | None,
        elapsed_ms: float,
    ) -> None:
        """A reload transaction ended: "reloaded", "reload_rolled_back" or "reload_failed"."""
        ...
