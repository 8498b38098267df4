"""Keeping the shared part of the store's memory in step with writes made by other servers.

Every server holds all leaderboards and all global storage in memory (Lua reads them
synchronously).  When several servers share one database, a write committed by one must reach
the others' memory.  `StoreSync` is that seam: the writer asks it for statements to run inside
each batch's transaction (`announce`), and an implementation that hears other servers' batches
calls `Store.merge_scores`, `Store.refresh_global` and `Store.refresh_all`.

A single server has nobody to tell: `NoSync` announces nothing.  A cluster announces with
PostgreSQL's NOTIFY (`asobi.cluster.store_sync`), because a notification sent in the batch's own
transaction goes out exactly when, and only if, the batch commits, in commit order.

What a notice carries, and why that is enough:
- a leaderboard entry as `(board, player, score)`: a board keeps each player's best score, so
  merging the submitted score into memory (keep the higher) gives what the database holds,
  whatever order notices arrive in and however often;
- a global storage key by name only (values are up to 64 KiB): the receiver re-reads it.

Wallets and player storage are not shared this way: they are resident on the server of the
player's session only.  When a player's session moves to another server, `handover` lets the new
one wait until the old one has written the player's pending writes out, so the load sees them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from asobi.store.ops import GLOBAL_OWNER, Op, ScoreOp, StorageOp

Statement = tuple[str, tuple[Any, ...]]


@dataclass(slots=True)
class Changes:
    """What one batch changed in the data every server holds."""

    scores: list[tuple[str, str, int]] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.scores or self.keys)


def changes_of(batch: Iterable[Op]) -> Changes:
    """The leaderboard entries and global keys among a batch's ops (economy and player storage
    live on the player's own server and are not announced)."""
    changes = Changes()
    keys: set[tuple[str, str]] = set()
    for op in batch:
        if isinstance(op, ScoreOp):
            changes.scores.append((op.board, op.player_id, op.score))
        elif isinstance(op, StorageOp) and op.owner == GLOBAL_OWNER:
            keys.add((op.collection, op.key))
    changes.keys = sorted(keys)
    return changes


class StoreSync(Protocol):
    def announce(self, changes: Changes) -> list[Statement]:
        """Statements to run in the transaction that writes `changes` (after the writes)."""
        ...

    def handover(self, player_id: str) -> Awaitable[None] | None:
        """The player's data is about to be loaded here: make whichever server held it before
        write its pending writes out first.  None when there is nothing to wait for."""
        ...

    def released(self, player_id: str) -> None:
        """The player's data stopped being resident here."""
        ...


class NoSync:
    """One server: its memory already holds every write, nobody else needs telling."""

    def announce(self, changes: Changes) -> list[Statement]:
        return []

    def handover(self, player_id: str) -> Awaitable[None] | None:
        return None

    def released(self, player_id: str) -> None:
        return None
