"""One leaderboard in memory: best score per player, kept sorted for rank queries.

Order is score descending, then who got there first.  A sorted Python list with `bisect` is
simple and fast for the sizes one server holds (inserting into 100k entries is a memmove of
under a millisecond); ranks are positions in it.
"""

from __future__ import annotations

import bisect
import itertools

_seq = itertools.count()


class Board:
    __slots__ = ("_keys", "_order")

    def __init__(self) -> None:
        self._keys: dict[str, tuple[int, int, str]] = {}
        self._order: list[tuple[int, int, str]] = []

    def __len__(self) -> int:
        return len(self._order)

    def best(self, player_id: str) -> int | None:
        key = self._keys.get(player_id)
        return -key[0] if key is not None else None

    def submit(self, player_id: str, score: int) -> bool:
        """Keep `score` if it beats the player's best; True when it did."""
        old = self._keys.get(player_id)
        if old is not None:
            if -old[0] >= score:
                return False
            del self._order[bisect.bisect_left(self._order, old)]
        key = (-score, next(_seq), player_id)
        self._keys[player_id] = key
        bisect.insort(self._order, key)
        return True

    def rank(self, player_id: str) -> int | None:
        key = self._keys.get(player_id)
        return bisect.bisect_left(self._order, key) + 1 if key is not None else None

    def slice(self, start: int, stop: int) -> list[dict[str, object]]:
        """Entries at 0-based positions [start, stop), with their 1-based ranks."""
        start = max(start, 0)
        return [
            {"rank": start + i + 1, "player_id": pid, "score": -neg}
            for i, (neg, _, pid) in enumerate(self._order[start:stop])
        ]

    def top(self, n: int) -> list[dict[str, object]]:
        return self.slice(0, n)

    def around(self, player_id: str, n: int) -> list[dict[str, object]]:
        rank = self.rank(player_id)
        if rank is None:
            return []
        return self.slice(rank - 1 - n, rank + n)
