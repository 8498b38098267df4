"""Hot reload under load: save the script N times while many matches run.

Each save is an editor-style atomic rename changing only the `message` constant.  The clock
starts right after the rename; clients report the first frame showing the new message (any
client) and the moment every client has shown it.  `counter` must advance by exactly one per
frame across every reload: a gap is a skipped tick (or a dropped frame), a repeat a repeated tick.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import game
from bench.capacity import pct
from bench.targets import AsobiTarget

WAIT_PER_SAVE_S = 5.0
QUIET_S = 3.0


@dataclass
class ReloadResult:
    matches: int
    saves: int
    shared: bool = False
    players_per_match: int = game.MATCH_SIZE
    quiet_lateness_p99_ms: float = 0.0
    first_frame_ms: list[float] = field(default_factory=list)
    all_matches_ms: list[float] = field(default_factory=list)
    spread_ticks: list[float] = field(default_factory=list)
    timed_out: int = 0
    skipped: int = 0
    repeated: int = 0
    lateness_p99_ms: float = 0.0
    lateness_max_ms: float = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "first_frame_p50_ms": pct(self.first_frame_ms, 0.5),
            "first_frame_p99_ms": pct(self.first_frame_ms, 0.99),
            "all_matches_p50_ms": pct(self.all_matches_ms, 0.5),
            "all_matches_p99_ms": pct(self.all_matches_ms, 0.99),
            "spread_ticks_p50": pct(self.spread_ticks, 0.5),
            "spread_ticks_max": max(self.spread_ticks, default=0.0),
            "saves_within_2_ticks": sum(1 for s in self.spread_ticks if s <= 2.0),
        }

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


async def run(target: AsobiTarget, matches: int, saves: int, settle: float) -> ReloadResult:
    """Reload with `matches` running (matches are added to whatever already runs)."""
    tally = target.tally
    await target.add_matches(matches - target.matches)
    tally.track_messages = True
    await asyncio.sleep(settle)
    await target.stats()
    result = ReloadResult(matches, saves, target.shared, target.players_per_match)
    # Lateness with no reload going on: a server that is late already cannot switch on time.
    await asyncio.sleep(QUIET_S)
    result.quiet_lateness_p99_ms = (await target.stats())["lateness_p99_ms"]
    _, gaps0, repeats0 = tally.counters()
    period = tally.period
    for i in range(1, saves + 1):
        message = f"m{matches}-v{i}"
        game.write_script(target.game_dir, message, target.shared, target.players_per_match)
        t0 = time.monotonic()
        deadline = t0 + WAIT_PER_SAVE_S
        key = message.encode()
        while time.monotonic() < deadline:
            version = tally.versions.get(key)
            if version is not None and version.all_at is not None:
                break
            await asyncio.sleep(0.005)
        version = tally.versions.get(key)
        if version is None or version.all_at is None:
            result.timed_out += 1
            continue
        result.first_frame_ms.append((version.first - t0) * 1000)
        result.all_matches_ms.append((version.all_at - t0) * 1000)
        result.spread_ticks.append((version.all_at - version.first) / period)
        # the next save lands at a random phase of the tick schedule
        await asyncio.sleep(random.uniform(0.05, 0.25))
    await asyncio.sleep(2 * period)
    _, gaps1, repeats1 = tally.counters()
    result.skipped = gaps1 - gaps0
    result.repeated = repeats1 - repeats0
    stats = await target.stats()
    result.lateness_p99_ms = stats["lateness_p99_ms"]
    result.lateness_max_ms = stats["lateness_max_ms"]
    summary = result.summary()
    print(
        f"  reload   M={matches:5} shared={target.shared} players={target.players_per_match} "
        f"saves={saves} quiet p99={result.quiet_lateness_p99_ms:.0f}ms "
        f"first p50={summary['first_frame_p50_ms']:.0f}ms "
        f"all p50={summary['all_matches_p50_ms']:.0f}ms skipped={result.skipped} "
        f"repeated={result.repeated} timed_out={result.timed_out}",
        flush=True,
    )
    return result
