"""Opt-in tick statistics for the benchmark suite, read from outside the server process.

With `ASOBI_BENCH_STATS=<file>` set, each SIGUSR1 writes the tick lateness percentiles collected
since the previous signal (and counters) to that file as JSON, atomically.  Without the variable
nothing is installed: the server's behaviour and cost are unchanged.  A signal keeps the measuring
out of the WebSocket port and away from the frames being measured.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import orjson

from asobi.app import App

ENV = "ASOBI_BENCH_STATS"


def snapshot(app: App) -> dict[str, float | int]:
    """Lateness percentiles (ms) since the last snapshot, and running totals."""
    app.metrics.take_lateness(app.engine)
    values = sorted(app.metrics.drain_recent_lateness())
    n = len(values)
    gc_pauses = app.metrics.drain_recent_gc_pauses()

    def pct(q: float) -> float:
        return values[min(n - 1, int(q * n))] * 1000 if n else 0.0

    return {
        "time": time.monotonic(),
        "samples": n,
        "lateness_p50_ms": pct(0.50),
        "lateness_p99_ms": pct(0.99),
        "lateness_max_ms": values[-1] * 1000 if n else 0.0,
        "gc_collections": len(gc_pauses),
        "gc_pause_total_ms": sum(gc_pauses) * 1000,
        "gc_pause_max_ms": max(gc_pauses, default=0.0) * 1000,
        "ticks": app.engine.ticks,
        "matches": len(app.engine.matches),
        "frames_sent": app.metrics.frames_sent,
        "connections": len(app.hub),
    }


def write(app: App, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(snapshot(app)))
    os.replace(tmp, path)


def install(loop: asyncio.AbstractEventLoop, app: App, target: str | None) -> None:
    if not target:
        return
    loop.add_signal_handler(signal.SIGUSR1, write, app, Path(target))
