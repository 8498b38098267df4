"""Prometheus metrics for one server, in a registry of its own.

A dedicated `CollectorRegistry` (not the process-global one) keeps two servers in one process
(tests) from sharing or clashing over metrics.  Hot-path counts (frames written or dropped,
ticks) are plain integers read at scrape time by a custom collector: a prometheus `Counter`
takes a lock per increment, which is measurable at tens of thousands of frames per second.
Tick lateness is a histogram counted the same way: the engine's lateness buffer, one sample per
match-tick, is drained periodically and counted into buckets in a batch (`BatchHistogram`),
where prometheus' `Histogram.observe` costs ~1.8 us per sample (two locked increments); the
collector exposes it through prometheus' own `HistogramMetricFamily`.
"""

from __future__ import annotations

import gc
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from asobi.engine import Engine

LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class BatchHistogram:
    """A histogram counted in batches: each value goes to the first bucket whose upper bound it
    does not exceed (prometheus' `le`), found by bisection, and the sum grows by the batch's."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf's own
        self.sum = 0.0

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds = self.counts, self.bounds
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self.sum += total

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as prometheus exposes one: cumulative counts per `le`."""
        buckets = []
        cumulative = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            # The `le` labels exactly as prometheus_client writes its own histograms'.
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.frames_sent = 0
        self.frames_dropped = 0
        self.recent_lateness: deque[float] = deque(maxlen=65536)
        self.tick_lateness = BatchHistogram(LATENESS_BUCKETS)
        self.errors = Counter(
            "asobi_errors",
            "Error frames sent to clients, by code.",
            ["code"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "asobi_reloads", "Script reloads, by outcome.", ["outcome"], registry=self.registry
        )
        self.refused = Counter(
            "asobi_connections_refused",
            "WebSocket handshakes refused, by reason (capacity, ip_rate).",
            ["reason"],
            registry=self.registry,
        )
        self.closed = Counter(
            "asobi_connections_closed_by_server",
            "Connections the server closed, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.seats = Counter(
            "asobi_seats",
            "Seats held for dropped players, by how the hold ended (resumed, expired, released).",
            ["outcome"],
            registry=self.registry,
        )
        self.gc_pause = Histogram(
            "asobi_gc_pause_seconds",
            "Python garbage collector pauses, by generation (they delay every tick).",
            ["generation"],
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.recent_gc_pauses: deque[float] = deque(maxlen=4096)
        self._gc_started = 0.0
        self._live = _LiveCollector(self)
        self.registry.register(self._live)
        self._last_reload_id = 0

    def bind(self, **gauges: Callable[[], float]) -> None:
        """Values read at scrape time: connections, matches, ticks..."""
        self._live.sources.update(gauges)

    def read(self, name: str) -> float | None:
        """The current value of a bound gauge (see `bind`), or None when nothing is bound."""
        source = self._live.sources.get(name)
        return source() if source is not None else None

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def take_lateness(self, engine: Engine) -> None:
        """Move the engine's tick lateness samples into the histogram (and the raw window)."""
        self.observe_lateness(engine.drain_lateness())

    def observe_lateness(self, values: Iterable[float]) -> None:
        values = [value if value > 0 else 0.0 for value in values]
        self.tick_lateness.observe_many(values)
        self.recent_lateness.extend(values)

    def drain_recent_lateness(self) -> list[float]:
        """Raw samples since the last call (exact percentiles for the benchmark suite)."""
        return _drain(self.recent_lateness)

    def watch_gc(self) -> None:
        """Time every garbage collection (process-wide, so only the served app calls this): a
        tick lateness spike that lines up with a long generation-2 pause is the collector, not
        the game."""
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_started
        self.gc_pause.labels(str(info.get("generation", ""))).observe(pause)
        self.recent_gc_pauses.append(pause)

    def drain_recent_gc_pauses(self) -> list[float]:
        return _drain(self.recent_gc_pauses)

    def count_reloads(self, records: Iterable[Any]) -> None:
        """Count reload records newer than the last seen (history ids only grow)."""
        newest = self._last_reload_id
        for record in records:
            if record.id > self._last_reload_id:
                self.reloads.labels(record.outcome).inc()
                newest = max(newest, record.id)
        self._last_reload_id = newest

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _drain(samples: deque[float]) -> list[float]:
    values = list(samples)
    samples.clear()
    return values


class _LiveCollector(Collector):
    """Gauges and integer counters read from the running server when scraped."""

    COUNTERS = {
        "ticks": "Match ticks run.",
        "ticks_skipped": "Match ticks skipped because the match fell over a period behind.",
        "inputs_dropped": "Match inputs dropped because the player's input queue was full.",
    }
    GAUGES = {
        "connections": "Open WebSocket connections.",
        "players": "Authenticated players with a live connection.",
        "matches": "Running matches.",
        "seats_held": "Seats kept for players whose connection dropped (grace period).",
        "tickets": "Matchmaker tickets waiting.",
    }

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.sources: dict[str, Callable[[], float]] = {}

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        sent = CounterMetricFamily("asobi_frames_sent", "Frames written to client connections.")
        sent.add_metric([], m.frames_sent)
        yield sent
        dropped = CounterMetricFamily(
            "asobi_frames_dropped",
            "Frames dropped for clients that could not keep up (stale match.state, rate_limited).",
        )
        dropped.add_metric([], m.frames_dropped)
        yield dropped
        yield m.tick_lateness.family(
            "asobi_tick_lateness_seconds",
            "How late each match tick ran: actual minus scheduled time.",
        )
        for name, doc in self.COUNTERS.items():
            source = self.sources.get(name)
            if source is not None:
                family = CounterMetricFamily(f"asobi_{name}", doc)
                family.add_metric([], source())
                yield family
        for name, doc in self.GAUGES.items():
            source = self.sources.get(name)
            if source is not None:
                yield GaugeMetricFamily(f"asobi_{name}", doc, value=source())
