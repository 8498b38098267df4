"""What an identifier may look like: each name rule of the server, defined once.

Names travel into log lines, database keys, file paths and other players' screens, so each kind
is a small alphabet with a length range.  Every rule matches the *whole* text: `re.match` with a
trailing `$` would let `"alice\\n"` through, because `$` also matches before a final newline.
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard


class NameRule:
    """One identifier rule; `str(rule)` is the pattern, for error messages."""

    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._regex = re.compile(pattern)

    def accepts(self, value: Any) -> TypeGuard[str]:
        """True for a `str` that the pattern matches from its first to its last character (so a
        caller that checked a value may use it as a `str`)."""
        return isinstance(value, str) and self._regex.fullmatch(value) is not None

    def __str__(self) -> str:
        return self.pattern

    def __repr__(self) -> str:
        return f"NameRule({self.pattern!r})"


# Game modes (matchmaker, config.lua); `game.broadcast` event names follow the same rule.
MODE = NameRule(r"[A-Za-z0-9_-]{1,64}")
EVENT = MODE
# Leaderboards and storage collections.
BOARD = NameRule(r"[A-Za-z0-9_.:-]{1,64}")
COLLECTION = BOARD
STORAGE_KEY = NameRule(r"[A-Za-z0-9_.:@/-]{1,128}")
CURRENCY = NameRule(r"[A-Za-z0-9_-]{1,32}")
USERNAME = NameRule(r"[A-Za-z0-9_-]{3,32}")
# Player ids, as token subjects and in game.* calls.
PLAYER_ID = NameRule(r"[A-Za-z0-9_.:@-]{1,128}")
# `require` names: dotted paths of modules in the game dir.
MODULE = NameRule(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
